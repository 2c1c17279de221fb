#include <cstdio>
#include <ctime>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "store/repository.h"

namespace vmdedup::cli {
namespace {

const char kHelp[] = R"(usage: vmdedup snapshots -r REPO [--vm VM] [--disk DISK] [--json]

Lists snapshots, oldest first within each disk series, with the bytes each
deduplication level removed. Per snapshot:
  id          VM/DISK/N (what restore takes; VM/DISK/latest also works)
  parent      the snapshot it was deduplicated against, if any
  time        the consistent instant (UTC)
  size        virtual disk size
  read_bytes  bytes read from the source
  zero        level 0: holes, zero extents and all-zero blocks
  segment     level 1: unchanged since the parent, not read
  block       level 2: found among the VM's own blocks
  cds         level 3: found in the common data set
  new         new block data, before compression
  stored      bytes written to the store, after compression
zero + segment + block + cds + new = size.

Options:
  -r, --repo REPO   repository (or $VMDEDUP_REPO)
  --vm VM           only this VM
  --disk DISK       only this disk (with --vm)
  --json            one JSON object per line (JSON Lines)
  -h, --help        this text

Exit codes: 0 listed, 1 failure, 2 bad usage, 4 a VM is locked by a running backup.
)";

std::string TimeString(int64_t t) {
  std::time_t tt = static_cast<std::time_t>(t);
  std::tm tm;
  gmtime_r(&tt, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

}  // namespace

int SnapshotsCommand(int argc, char** argv) {
  auto args = Args::Parse(argc, argv, 2,
                          {{"repo", 'r', true},
                           {"vm", 0, true},
                           {"disk", 0, true},
                           {"json", 0, false},
                           {"help", 'h', false}});
  if (!args.ok()) return ReportError(args.status());
  if (args->Has("help")) {
    std::fputs(kHelp, stdout);
    return kExitOk;
  }
  if (!args->positionals().empty()) {
    std::fputs(kHelp, stderr);
    return kExitUsage;
  }
  auto repo_path = args->Repo();
  if (!repo_path.ok()) return ReportError(repo_path.status());
  auto repo = OpenRepository(*repo_path);
  if (!repo.ok()) return ReportError(repo.status());
  std::vector<std::string> vms;
  if (auto vm = args->Get("vm")) {
    vms.push_back(*vm);
  } else {
    auto all = (*repo)->ListVms();
    if (!all.ok()) return ReportError(all.status());
    vms = *all;
  }
  const bool json = args->Has("json");
  std::string disk = args->Get("disk").value_or("");
  if (!json)
    std::printf("%-28s %-8s %-19s %10s %10s %10s %10s %10s %10s %10s %10s\n", "ID", "PARENT",
                "TIME", "SIZE", "READ", "ZERO", "SEGMENT", "BLOCK", "CDS", "NEW", "STORED");
  for (const std::string& name : vms) {
    auto vm = (*repo)->OpenVm(name, Repository::Access::kRead);
    if (!vm.ok()) return ReportError(vm.status());
    auto snaps = (*vm)->ListSnapshots(disk);
    if (!snaps.ok()) return ReportError(snaps.status());
    for (const SnapshotRecord& s : *snaps) {
      if (json) {
        PrintJson(SnapshotJson(s));
        continue;
      }
      std::printf("%-28s %-8s %-19s %10s %10s %10s %10s %10s %10s %10s %10s\n", s.Id().c_str(),
                  s.parent_seq ? std::to_string(s.parent_seq).c_str() : "-",
                  TimeString(s.time).c_str(), HumanSize(s.size).c_str(),
                  HumanSize(s.stats.read_bytes).c_str(), HumanSize(s.stats.zero).c_str(),
                  HumanSize(s.stats.segment).c_str(), HumanSize(s.stats.block).c_str(),
                  HumanSize(s.stats.cds).c_str(), HumanSize(s.stats.new_bytes).c_str(),
                  HumanSize(s.stats.stored).c_str());
    }
  }
  return kExitOk;
}

}  // namespace vmdedup::cli
