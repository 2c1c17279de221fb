#include <cerrno>
#include <cstdio>
#include <cstdlib>

#include "base/priority.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "engine/backup_job.h"
#include "engine/cds_index.h"
#include "engine/live_backup_job.h"
#include "store/cds_area.h"

namespace vmdedup::cli {
namespace {

const char kHelp[] = R"(usage: vmdedup backup -r REPO --vm VM [--disk DISK] [OPTIONS] SOURCE
       vmdedup backup -r REPO --vm VM [--disk DISK ...] [OPTIONS] qemu:QMP_SOCKET

Backs up one virtual disk into a new snapshot VM/DISK/N of REPO (a running
QEMU guest: each of its disks into a snapshot of its own). Every snapshot is
logically full: it restores without any other snapshot.

SOURCE is one of:
  raw:PATH, qcow2:PATH
                   an image file that no process has open, in the format
                   named. vmdedup reads a raw image itself and serves a qcow2
                   image with qemu-nbd for the backup. In a qcow2 image it
                   keeps one persistent dirty bitmap per disk series and
                   rotates it at each backup, so the next backup reads only
                   what was written in between.
  file:PATH        the same, in the format given with --format, or else the
                   one the series' latest snapshot was read as. vmdedup never
                   guesses a format: a guest can write a qcow2 header into
                   its raw disk, and that header would name any host file.
  nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH
                   any NBD server. With --bitmap NAME, the server's
                   qemu:dirty-bitmap:NAME is taken as the writes since the
                   latest snapshot of the series (the caller manages it).
  qemu:QMP_SOCKET  a running QEMU guest, through its QMP unix socket. All its
                   writable disks (or those given with --disk: qdev id, drive
                   or node name) are read from one instant (fleecing, one QMP
                   transaction) while the guest runs; the disk series is
                   named after the device id. vmdedup keeps one persistent
                   dirty bitmap per series in QEMU and rotates it, and removes
                   what a killed earlier run left (nodes, exports, files).

The backup reads every allocated extent (full read) when there is no usable
bitmap: first backup, raw image, bitmap missing or inconsistent, disk resized,
bitmap not continuing the latest snapshot, or --full. One line says which.
A full read still stores only the blocks that changed.

Options:
  -r, --repo REPO     repository (or $VMDEDUP_REPO)
  --vm VM             the virtual machine (letters, digits, '.', '_', '-')
  --disk DISK         the disk of the VM (default: disk0)
  --format FORMAT     file: the image's format, raw or qcow2
  --backing-chain     qcow2: read the image's backing chain (by default an
                      image with a backing file is refused); every image of
                      the chain must record its backing file's format
  --bitmap NAME       caller-managed dirty bitmap of an NBD source
  --scratch-dir DIR   qemu: where QEMU keeps the old content of blocks the
                      guest overwrites during the backup (default: $TMPDIR,
                      else /var/tmp)
  --fsfreeze          qemu: freeze the guest's filesystems around the instant
                      through qemu-guest-agent (--qga); if the agent does not
                      answer within 2 s, warn and go on
  --qga SOCKET        qemu: the guest agent's chardev socket
  --full              ignore bitmaps and read every allocated extent
  --tag TAG           record TAG with the snapshot (forget --keep-tag keeps it);
                      may be given more than once; TAG as a VM name
  --threads N         worker threads for chunking, hashing, compression
                      (default: the number of cores)
  --timeout SECONDS   NBD sources and qcow2 images: fail when the server (or
                      qemu-nbd) stays silent this long, in the handshake or
                      on a request (default 300; 0: wait forever). SIGINT
                      and SIGTERM end such a wait within a second
  --priority P        CPU and I/O priority of the backup, so that busy guests
                      come first: low (default; nice 10, I/O best-effort 7),
                      idle (runs only on CPU the guests leave: SCHED_IDLE and
                      the idle I/O class; a busy host may stall the backup)
                      or normal. Threads and the qemu-nbd that vmdedup starts
                      inherit it; QEMU's own work for a live backup does not
  --json              print the new snapshot as a JSON object on stdout
  -q, --quiet         no progress, no report
  -h, --help          this text

Output: the read mode line, progress on a terminal, then the snapshot's
per-level report (see 'vmdedup snapshots').

Exit codes: 0 snapshot committed, 1 failure (no snapshot recorded; earlier
snapshots untouched), 2 bad usage, 4 a backup of this VM is already running,
130 interrupted (no snapshot recorded).
)";

void PrintReport(const SnapshotRecord& s) {
  const LevelStats& st = s.stats;
  uint64_t nonzero = s.size - st.zero;
  std::printf("snapshot %s committed in %.1f s (%s)\n", s.Id().c_str(), s.duration_ms / 1000.0,
              s.read_mode.c_str());
  std::printf("  disk size       %12s\n", HumanSize(s.size).c_str());
  std::printf("  read            %12s\n", HumanSize(st.read_bytes).c_str());
  std::printf("  level 0 zero    %12s\n", HumanSize(st.zero).c_str());
  std::printf("  level 1 segment %12s  (not read: unchanged since the parent)\n",
              HumanSize(st.segment).c_str());
  std::printf("  level 2 block   %12s  (found in the VM's own blocks)\n",
              HumanSize(st.block).c_str());
  std::printf("  level 3 cds     %12s  (found in the common data set)\n",
              HumanSize(st.cds).c_str());
  std::printf("  new             %12s  (%s of the non-zero data)\n",
              HumanSize(st.new_bytes).c_str(), Percent(st.new_bytes, nonzero).c_str());
  std::printf("  stored          %12s  (compressed) + %s metadata\n", HumanSize(st.stored).c_str(),
              HumanSize(st.metadata).c_str());
}

// The CDS version in force when the backup starts; it stays in use for the
// whole backup even if a newer one is published meanwhile. A CDS that cannot
// be loaded never fails a backup: it only stores more (one warning line).
std::unique_ptr<CdsIndex> LoadCurrentCds(Repository& repo) {
  CdsArea area(repo.objects());
  auto pointer = area.ReadPointer();
  Status st = pointer.status();
  if (pointer.ok()) {
    if (pointer->current == 0) return nullptr;
    auto index = CdsIndex::Load(repo.objects(), pointer->current);
    if (index.ok()) return std::move(index).value();
    st = index.status();
  }
  std::fprintf(stderr,
               "vmdedup: warning: the common data set cannot be used (%s); this backup "
               "stores every block in the VM's own store. Run 'vmdedup check'.\n",
               st.ToString().c_str());
  return nullptr;
}

}  // namespace

int BackupCommand(int argc, char** argv) {
  auto args = Args::Parse(argc, argv, 2,
                          {{"repo", 'r', true},
                           {"vm", 0, true},
                           {"disk", 0, true},
                           {"bitmap", 0, true},
                           {"format", 0, true},
                           {"backing-chain", 0, false},
                           {"full", 0, false},
                           {"tag", 0, true},
                           {"threads", 0, true},
                           {"timeout", 0, true},
                           {"priority", 0, true},
                           {"json", 0, false},
                           {"quiet", 'q', false},
                           {"help", 'h', false},
                           {"scratch-dir", 0, true},
                           {"fsfreeze", 0, false},
                           {"qga", 0, true}});
  if (!args.ok()) return ReportError(args.status());
  if (args->Has("help")) {
    std::fputs(kHelp, stdout);
    return kExitOk;
  }
  if (args->positionals().size() != 1 || !args->Has("vm")) {
    std::fputs(kHelp, stderr);
    return kExitUsage;
  }
  auto repo_path = args->Repo();
  if (!repo_path.ok()) return ReportError(repo_path.status());
  auto threads = args->Threads();
  if (!threads.ok()) return ReportError(threads.status());
  unsigned io_timeout = 300;
  if (auto t = args->Get("timeout")) {
    char* end = nullptr;
    errno = 0;
    const unsigned long v = std::strtoul(t->c_str(), &end, 10);
    if (t->empty() || (*t)[0] < '0' || (*t)[0] > '9' || *end != '\0' || errno != 0 || v > 86400) {
      std::fprintf(stderr, "vmdedup: --timeout takes seconds from 0 to 86400, not '%s'\n",
                   t->c_str());
      return kExitUsage;
    }
    io_timeout = static_cast<unsigned>(v);
  }
  auto priority = ParsePriority(args->Get("priority").value_or("low"));
  if (!priority.ok()) return ReportError(priority.status());
  // Before any thread starts (LevelDB's among them), so that all inherit it.
  if (Status st = ApplyPriority(*priority); !st.ok()) return ReportError(st);
  const std::vector<std::string> tags = args->GetAll("tag");
  for (const std::string& tag : tags)
    if (Status st = ValidateName("tag", tag); !st.ok()) return ReportError(st);
  auto repo = OpenRepository(*repo_path);
  if (!repo.ok()) return ReportError(repo.status());

  const bool json = args->Has("json");
  const bool quiet = args->Has("quiet");
  std::unique_ptr<CdsIndex> cds = LoadCurrentCds(**repo);
  if (args->positionals()[0].rfind("qemu:", 0) == 0) {
    LiveBackupOptions o;
    o.vm = *args->Get("vm");
    o.qmp_socket = args->positionals()[0].substr(5);
    o.disks = args->GetAll("disk");
    o.full = args->Has("full");
    o.tags = tags;
    o.threads = *threads;
    o.scratch_dir = args->Get("scratch-dir").value_or("");
    o.fsfreeze = args->Has("fsfreeze");
    o.qga_socket = args->Get("qga").value_or("");
    o.cancel = &CancelFlag();
    o.cds = cds.get();
    if (o.qmp_socket.empty() || args->Has("bitmap") || args->Has("format") ||
        args->Has("backing-chain") || args->Has("timeout")) {
      std::fputs(kHelp, stderr);
      return kExitUsage;
    }
    ProgressLine progress(!quiet && StderrIsTerminal());
    o.progress = [&](const std::string& disk, const BackupProgress& p) {
      progress.Update("backup " + disk, p.done_bytes, p.total_bytes,
                      "read " + HumanSize(p.read_bytes) + ", stored " + HumanSize(p.stored_bytes));
    };
    o.note = [&](const std::string& line) {
      if (!quiet) {
        progress.Finish();
        std::fprintf(stderr, "%s\n", line.c_str());
      }
    };
    auto snaps = RunLiveBackupJob(**repo, o);
    progress.Finish();
    if (!snaps.ok()) {
      if (snaps.status().IsAborted())
        std::fprintf(stderr, "vmdedup: backup interrupted; no snapshot was recorded\n");
      return ReportError(snaps.status());
    }
    if (json) {
      nlohmann::json all = nlohmann::json::array();
      for (const auto& s : *snaps) all.push_back(SnapshotJson(s));
      PrintJson(all);
    } else if (!quiet) {
      for (const auto& s : *snaps) PrintReport(s);
    }
    return kExitOk;
  }
  if (args->GetAll("disk").size() > 1 || args->Has("fsfreeze") || args->Has("qga") ||
      args->Has("scratch-dir")) {
    std::fprintf(stderr,
                 "vmdedup: repeated --disk, --fsfreeze, --qga and --scratch-dir are for qemu: "
                 "sources\n");
    return kExitUsage;
  }
  BackupJobOptions o;
  o.vm = *args->Get("vm");
  if (auto d = args->Get("disk")) o.disk = *d;
  o.source = args->positionals()[0];
  o.bitmap = args->Get("bitmap");
  o.format = args->Get("format").value_or("");
  o.backing_chain = args->Has("backing-chain");
  o.full = args->Has("full");
  o.tags = tags;
  o.threads = *threads;
  o.cancel = &CancelFlag();
  o.io_timeout_seconds = io_timeout;
  o.cds = cds.get();
  ProgressLine progress(!quiet && StderrIsTerminal());
  o.progress = [&](const BackupProgress& p) {
    progress.Update("backup", p.done_bytes, p.total_bytes,
                    "read " + HumanSize(p.read_bytes) + ", stored " + HumanSize(p.stored_bytes));
  };
  o.note = [&](const std::string& line) {
    if (!quiet) {
      progress.Finish();
      std::fprintf(stderr, "%s\n", line.c_str());
    }
  };
  auto snap = RunBackupJob(**repo, o);
  progress.Finish();
  if (!snap.ok()) {
    if (snap.status().IsAborted())
      std::fprintf(stderr, "vmdedup: backup interrupted; no snapshot was recorded\n");
    return ReportError(snap.status());
  }
  const SnapshotRecord& s = *snap;
  if (json) {
    PrintJson(SnapshotJson(s));
  } else if (!quiet) {
    PrintReport(s);
  }
  return kExitOk;
}

}  // namespace vmdedup::cli
