#include <cstdio>
#include <cstdlib>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "engine/restore.h"
#include "store/repository.h"

namespace vmdedup::cli {
namespace {

const char kHelp[] =
    R"(usage: vmdedup restore -r REPO SNAPSHOT --to PATH [--format raw|qcow2] [--force]
                       [--mode OCTAL]

Writes snapshot SNAPSHOT (VM/DISK/N or VM/DISK/latest) to an image file,
bit-exact: sparse where the snapshot is zero. Every block read is verified
(record checksum and SHA-256 of its content); a damaged block fails the
restore with the object named, never writes wrong data. The image is built
as PATH.partial and renamed to PATH when complete. A new image is created
with mode 0600 (a disk holds every secret of its guest), whatever the umask.

PATH may be a block device (a logical volume, a loop or RBD device) that
exists: with --force and --format raw the snapshot is written into it in
place, zeros included, after checking that the device is at least as large
as the snapshot (bytes past the snapshot's size are left as they are). The
device is opened exclusively, so a mounted or otherwise held device is
refused. Any other existing PATH that is not a regular file (a directory,
FIFO, socket, character device) and a symbolic link to anything but a block
device are refused.

Options:
  -r, --repo REPO    repository (or $VMDEDUP_REPO)
  --to PATH          the image to write
  --format FORMAT    raw (default) or qcow2 (converted with qemu-img)
  --force            replace PATH if it exists (write into it if it is a block
                     device)
  --mode OCTAL       mode of the new image (default 0600)
  --threads N        parallel readers (default: the number of cores)
  --json             print {"snapshot", "path", "size", "written"} on stdout
  -q, --quiet        no progress
  -h, --help         this text

Exit codes: 0 restored, 1 failure (PATH untouched), 2 bad usage (PATH exists
without --force, unknown snapshot name, a target that is not a file or a block
device), 4 the VM is locked by a running backup or the block device is in use,
130 interrupted.
)";

}  // namespace

int RestoreCommand(int argc, char** argv) {
  auto args = Args::Parse(argc, argv, 2,
                          {{"repo", 'r', true},
                           {"to", 0, true},
                           {"format", 0, true},
                           {"force", 0, false},
                           {"mode", 0, true},
                           {"threads", 0, true},
                           {"json", 0, false},
                           {"quiet", 'q', false},
                           {"help", 'h', false}});
  if (!args.ok()) return ReportError(args.status());
  if (args->Has("help")) {
    std::fputs(kHelp, stdout);
    return kExitOk;
  }
  if (args->positionals().size() != 1 || !args->Has("to")) {
    std::fputs(kHelp, stderr);
    return kExitUsage;
  }
  auto repo_path = args->Repo();
  if (!repo_path.ok()) return ReportError(repo_path.status());
  auto threads = args->Threads();
  if (!threads.ok()) return ReportError(threads.status());
  auto ref = ParseSnapshotRef(args->positionals()[0]);
  if (!ref.ok()) return ReportError(ref.status());
  auto repo = OpenRepository(*repo_path);
  if (!repo.ok()) return ReportError(repo.status());
  auto vm = (*repo)->OpenVm(ref->vm, Repository::Access::kRead);
  if (!vm.ok()) return ReportError(vm.status());
  auto snap =
      ref->seq ? (*vm)->GetSnapshot(ref->disk, *ref->seq) : (*vm)->LatestSnapshot(ref->disk);
  if (!snap.ok()) {
    if (snap.status().IsNotFound()) {
      std::fprintf(stderr, "vmdedup: %s\n", snap.status().message().c_str());
      return kExitUsage;
    }
    return ReportError(snap.status());
  }
  RestoreRequest req;
  req.path = *args->Get("to");
  req.format = args->Get("format").value_or("raw");
  req.force = args->Has("force");
  req.threads = *threads;
  if (auto mode = args->Get("mode")) {
    char* end = nullptr;
    unsigned long v = std::strtoul(mode->c_str(), &end, 8);
    if (mode->empty() || *end != '\0' || v > 0777 || (*mode)[0] == '-') {
      std::fprintf(stderr,
                   "vmdedup: --mode takes an octal permission mode from 0 to 0777 (0600), "
                   "not '%s'\n",
                   mode->c_str());
      return kExitUsage;
    }
    req.mode = static_cast<unsigned>(v);
  }
  req.cancel = &CancelFlag();
  ProgressLine progress(!args->Has("quiet") && StderrIsTerminal());
  req.progress = [&](const RestoreProgress& p) {
    progress.Update("restore", p.done_bytes, p.total_bytes,
                    "written " + HumanSize(p.written_bytes));
  };
  auto result = RestoreToFile(**repo, **vm, *snap, req);
  progress.Finish();
  if (!result.ok()) return ReportError(result.status());
  if (args->Has("json")) {
    nlohmann::json j = {{"snapshot", snap->Id()},
                        {"path", req.path},
                        {"format", req.format},
                        {"size", result->size},
                        {"written", result->written_bytes}};
    PrintJson(j);
  } else if (!args->Has("quiet")) {
    std::printf("restored %s to %s (%s, %s of data)\n", snap->Id().c_str(), req.path.c_str(),
                HumanSize(result->size).c_str(), HumanSize(result->written_bytes).c_str());
  }
  return kExitOk;
}

}  // namespace vmdedup::cli
