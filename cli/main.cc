// vmdedup: backs up QEMU/KVM virtual machine disks with multi-level
// deduplication. This file dispatches to the subcommands.
#include <sys/stat.h>

#include <csignal>
#include <cstdio>
#include <cstring>
#include <string>

#include "cli/commands.h"
#include "cli/output.h"

namespace vmdedup::cli {

std::atomic<bool>& CancelFlag() {
  static std::atomic<bool> flag{false};
  return flag;
}

namespace {

void OnSignal(int) { CancelFlag().store(true); }

const char kUsage[] = R"(usage: vmdedup COMMAND [OPTIONS] ...

Backs up virtual machine disks incrementally, forever, with multi-level
deduplication: unchanged segments are not read (dirty bitmaps), blocks already
in the VM's previous snapshot are not stored again, and every snapshot restores
on its own.

Commands:
  init        create a repository
  backup      back up a disk image or an NBD export into a repository
  snapshots   list snapshots with what each deduplication level removed
  restore     write a snapshot to a raw or qcow2 image
  serve       export a snapshot over NBD (read-only) for QEMU, nbdcopy, qemu-img
  check       verify a repository's metadata (and with --read-data, all data)
  repair      salvage a VM's damaged metadata store
  forget      remove snapshots by a retention policy (--keep-daily 7 ...) or by name
  gc          free the space no snapshot uses (after forget, interrupted backups)
  stats       totals per VM and for the repository
  status      a running QEMU's disks, vmdedup's bitmaps on them, last snapshots
  cds         build the common data set of popular blocks; list its versions

Run 'vmdedup COMMAND --help' for a command's options.
The repository is given with -r REPO or the environment variable VMDEDUP_REPO.

Exit codes: 0 success, 1 failure, 2 bad usage, 3 check found damage,
4 locked by another vmdedup, 130 interrupted.
)";

}  // namespace
}  // namespace vmdedup::cli

int main(int argc, char** argv) {
  using namespace vmdedup::cli;
  // Everything vmdedup creates is its user's alone (a repository holds
  // every guest's secrets): vmdedup's own files ask for 0600 and 0700, and
  // this also covers what LevelDB, qemu-img and nbdkit create for it.
  // restore --mode sets an image's mode exactly, whatever the umask.
  ::umask(077);
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_handler = OnSignal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);

  if (argc < 2) {
    std::fputs(kUsage, stderr);
    return kExitUsage;
  }
  std::string cmd = argv[1];
  if (cmd == "-h" || cmd == "--help" || cmd == "help") {
    std::fputs(kUsage, stdout);
    return kExitOk;
  }
  if (cmd == "--version") {
    std::puts("vmdedup 0.1.0");
    return kExitOk;
  }
  if (cmd == "init") return InitCommand(argc, argv);
  if (cmd == "backup") return BackupCommand(argc, argv);
  if (cmd == "snapshots") return SnapshotsCommand(argc, argv);
  if (cmd == "restore") return RestoreCommand(argc, argv);
  if (cmd == "check") return CheckCommand(argc, argv);
  if (cmd == "repair") return RepairCommand(argc, argv);
  if (cmd == "forget") return ForgetCommand(argc, argv);
  if (cmd == "gc") return GcCommand(argc, argv);
  if (cmd == "stats") return StatsCommand(argc, argv);
  if (cmd == "status") return StatusCommand(argc, argv);
  if (cmd == "serve") return ServeCommand(argc, argv);
  if (cmd == "cds") return CdsCommand(argc, argv);
  std::fprintf(stderr, "vmdedup: unknown command '%s'\n\n%s", cmd.c_str(), kUsage);
  return kExitUsage;
}
