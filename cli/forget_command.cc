#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <map>
#include <set>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "engine/gc.h"
#include "engine/retention.h"

namespace vmdedup::cli {
namespace {

const char kHelp[] =
    R"(usage: vmdedup forget -r REPO [--vm VM] [--disk DISK] POLICY [--dry-run] [--json]
       vmdedup forget -r REPO SNAPSHOT... [--dry-run] [--json]

Removes snapshots from the repository: those that no rule of POLICY keeps,
or the SNAPSHOTs named (VM/DISK/SEQ, or VM/DISK/latest). Every other
snapshot still restores on its own: snapshots are logically full, and
forgetting one changes nothing another uses. Forgetting frees no space by
itself: the blocks only forgotten snapshots used stay in the VM's
containers until 'vmdedup gc' (or --prune) removes them.

The policy has restic's meaning and applies to each series (a VM's disk)
on its own, snapshots taken newest first. A snapshot is kept when any rule
keeps it; each kept snapshot is listed with the rules that kept it.
  --keep-last N       the N newest snapshots
  --keep-hourly N     the newest snapshot of each of the last N hours that
                      have one (local time)
  --keep-daily N      ... of each of the last N days
  --keep-weekly N     ... of each of the last N ISO weeks (Monday to Sunday)
  --keep-monthly N    ... of each of the last N months
  --keep-yearly N     ... of each of the last N years
  --keep-within DURATION
                      every snapshot newer than the newest one minus
                      DURATION (y years, m months, d days, h hours: 1y6m,
                      14d, 36h)
  --keep-tag TAG      every snapshot with this tag (backup --tag); may be
                      given more than once
A count of -1 keeps every hour (day, ...) that has a snapshot. A policy
without any rule is refused: it would remove everything.

Options:
  -r, --repo REPO   repository (or $VMDEDUP_REPO)
  --vm VM           only this VM's series (default: every VM)
  --disk DISK       only this disk's series
  --dry-run         say what would be removed, remove nothing
  --prune           then run gc (vmdedup gc) on the VMs it removed from
  --json            one JSON object: {"series": [{"vm", "disk", "keep":
                    [{"id", "time", "reasons"}], "remove": [{"id", "time"}]}],
                    "removed", "dry_run", "pruned": [{"vm", "skipped",
                    "bytes_freed"}], "bytes_freed"}
  -h, --help        this text

A backup whose parent would have been a forgotten snapshot continues the
newest snapshot left, reading the whole disk once (the forgotten one's
dirty bitmap continues nothing); its new blocks are still only those that
changed. Each VM is locked while its snapshots are removed; a VM a backup
holds is skipped with a message (exit code 4).

Exit codes: 0 done, 1 failure (nothing of the failing VM was removed), 2 bad
usage, 4 a VM was locked by a backup, 5 --prune left a VM untouched (named),
130 interrupted.
)";

Result<int> ParseCount(const Args& args, const std::string& name) {
  auto v = args.Get(name);
  if (!v) return 0;
  char* end = nullptr;
  errno = 0;
  long n = std::strtol(v->c_str(), &end, 10);
  if (v->empty() || *end != '\0' || errno != 0 || n < -1 || n > 1000000 || n == 0)
    return Status::InvalidArgument("--" + name + " takes a count from 1 (or -1 for all), not '" +
                                   *v + "'");
  return static_cast<int>(n);
}

std::string LocalTimeText(int64_t t) {
  std::time_t tt = static_cast<std::time_t>(t);
  std::tm tm{};
  ::localtime_r(&tt, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

std::string Join(const std::vector<std::string>& v, const char* sep) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : sep) + s;
  return out;
}

struct SeriesPlan {
  std::string vm, disk;
  std::vector<RetentionDecision> decisions;
};

}  // namespace

int ForgetCommand(int argc, char** argv) {
  auto args = Args::Parse(argc, argv, 2,
                          {{"repo", 'r', true},
                           {"vm", 0, true},
                           {"disk", 0, true},
                           {"keep-last", 0, true},
                           {"keep-hourly", 0, true},
                           {"keep-daily", 0, true},
                           {"keep-weekly", 0, true},
                           {"keep-monthly", 0, true},
                           {"keep-yearly", 0, true},
                           {"keep-within", 0, true},
                           {"keep-tag", 0, true},
                           {"dry-run", 0, false},
                           {"prune", 0, false},
                           {"json", 0, false},
                           {"help", 'h', false}});
  if (!args.ok()) return ReportError(args.status());
  if (args->Has("help")) {
    std::fputs(kHelp, stdout);
    return kExitOk;
  }
  RetentionPolicy policy;
  for (auto [field, name] :
       std::vector<std::pair<int*, const char*>>{{&policy.last, "keep-last"},
                                                 {&policy.hourly, "keep-hourly"},
                                                 {&policy.daily, "keep-daily"},
                                                 {&policy.weekly, "keep-weekly"},
                                                 {&policy.monthly, "keep-monthly"},
                                                 {&policy.yearly, "keep-yearly"}}) {
    auto n = ParseCount(*args, name);
    if (!n.ok()) {
      std::fprintf(stderr, "vmdedup: %s\n", n.status().message().c_str());
      return kExitUsage;
    }
    *field = *n;
  }
  if (auto w = args->Get("keep-within")) {
    auto d = ParseRetentionDuration(*w);
    if (!d.ok() || d->empty()) {
      std::fprintf(stderr, "vmdedup: --keep-within: %s\n",
                   d.ok() ? "the duration is zero" : d.status().message().c_str());
      return kExitUsage;
    }
    policy.within = *d;
  }
  policy.tags = args->GetAll("keep-tag");
  const auto& named = args->positionals();
  if (policy.empty() == named.empty()) {
    std::fputs(named.empty()
                   ? "vmdedup: forget needs a policy (--keep-...) or the snapshots to remove; a "
                     "policy without rules would remove everything\n"
                   : "vmdedup: forget takes either a policy or snapshots, not both\n",
               stderr);
    return kExitUsage;
  }
  if (!named.empty() && (args->Has("vm") || args->Has("disk"))) {
    std::fputs("vmdedup: --vm and --disk go with a policy; name snapshots as VM/DISK/SEQ\n",
               stderr);
    return kExitUsage;
  }
  auto repo_path = args->Repo();
  if (!repo_path.ok()) return ReportError(repo_path.status());
  auto repo = OpenRepository(*repo_path);
  if (!repo.ok()) return ReportError(repo.status());
  const bool dry_run = args->Has("dry-run"), json = args->Has("json");

  // What to remove, by VM: every series of the VMs in scope, decided.
  std::map<std::string, std::vector<SeriesPlan>> plans;
  std::map<std::string, std::set<std::pair<std::string, uint64_t>>> named_by_vm;
  for (const std::string& text : named) {
    auto ref = ParseSnapshotRef(text);
    if (!ref.ok()) return ReportError(ref.status());
    auto vm = (*repo)->OpenVm(ref->vm, Repository::Access::kRead);
    if (!vm.ok()) return ReportError(vm.status());
    auto snap =
        ref->seq ? (*vm)->GetSnapshot(ref->disk, *ref->seq) : (*vm)->LatestSnapshot(ref->disk);
    if (!snap.ok())
      return ReportError(snap.status().IsNotFound() ? Status::NotFound("snapshot " + text +
                                                                       " does not exist ('vmdedup "
                                                                       "snapshots -r " +
                                                                       *repo_path + "' lists them)")
                                                    : snap.status());
    named_by_vm[ref->vm].insert({snap->disk, snap->seq});
  }
  std::vector<std::string> vms;
  if (!named.empty()) {
    for (const auto& [vm, _] : named_by_vm) vms.push_back(vm);
  } else if (auto vm = args->Get("vm")) {
    // Named: it must exist (opening it to write would create it).
    auto dirs = (*repo)->ListVmDirectories();
    if (!dirs.ok()) return ReportError(dirs.status());
    if (std::find(dirs->begin(), dirs->end(), *vm) == dirs->end())
      return ReportError(
          Status::NotFound("VM '" + *vm + "' has no backups in repository " + *repo_path));
    vms.push_back(*vm);
  } else {
    auto all = (*repo)->ListVms();
    if (!all.ok()) return ReportError(all.status());
    vms = *all;
  }

  int exit_code = kExitOk;
  uint64_t removed = 0;
  std::vector<std::string> touched;  // VMs snapshots were removed from
  nlohmann::json out_series = nlohmann::json::array();
  for (const std::string& name : vms) {
    if (CancelFlag().load()) return kExitInterrupted;
    // The writer's lock, taken before deciding: the decision is about the
    // snapshots as they are while nothing else can add or remove one.
    auto vm = dry_run ? (*repo)->OpenVm(name, Repository::Access::kRead)
                      : (*repo)->OpenVm(name, Repository::Access::kWrite);
    if (!vm.ok()) {
      std::fprintf(stderr, "vmdedup: VM %s: %s\n", name.c_str(), vm.status().ToString().c_str());
      exit_code = vm.status().IsBusy() ? kExitBusy : kExitFailure;
      continue;
    }
    auto snaps = (*vm)->ListSnapshots(args->Get("disk").value_or(""));
    if (!snaps.ok()) {
      std::fprintf(stderr, "vmdedup: VM %s: %s\n", name.c_str(), snaps.status().ToString().c_str());
      exit_code = kExitFailure;
      continue;
    }
    // An interrupted forget is finished: its snapshots are no longer
    // decided on.
    std::vector<SnapshotRecord> to_remove;
    std::set<std::pair<std::string, uint64_t>> pending;
    if (auto in_progress = (*vm)->ForgetInProgress(); in_progress.ok()) {
      for (const SnapshotRecord& s : *in_progress) {
        pending.insert({s.disk, s.seq});
        if (!json)
          std::printf("%s: forgotten before, its records remain (an interrupted forget): %s\n",
                      s.Id().c_str(), dry_run ? "would be removed" : "removed");
        to_remove.push_back(s);
      }
    }
    std::map<std::string, std::vector<SnapshotRecord>> by_disk;
    for (SnapshotRecord& s : *snaps)
      if (!pending.count({s.disk, s.seq})) by_disk[s.disk].push_back(std::move(s));
    for (auto& [disk, series] : by_disk) {
      SeriesPlan plan{name, disk, {}};
      if (named.empty()) {
        plan.decisions = ApplyRetentionPolicy(std::move(series), policy);
      } else {
        for (SnapshotRecord& s : series) {
          RetentionDecision d;
          d.keep = !named_by_vm[name].count({s.disk, s.seq});
          if (d.keep) d.reasons.push_back("not named");
          d.snapshot = std::move(s);
          plan.decisions.push_back(std::move(d));
        }
        std::reverse(plan.decisions.begin(), plan.decisions.end());
      }
      nlohmann::json keep = nlohmann::json::array(), remove = nlohmann::json::array();
      if (!json) std::printf("%s/%s:\n", name.c_str(), disk.c_str());
      for (const RetentionDecision& d : plan.decisions) {
        if (d.keep) {
          keep.push_back({{"id", d.snapshot.Id()},
                          {"time", d.snapshot.time},
                          {"reasons", d.reasons},
                          {"tags", d.snapshot.tags}});
        } else {
          remove.push_back({{"id", d.snapshot.Id()}, {"time", d.snapshot.time}});
          to_remove.push_back(d.snapshot);
        }
        if (!json)
          std::printf("  %-7s %-28s %s  %s\n", d.keep ? "keep" : "remove", d.snapshot.Id().c_str(),
                      LocalTimeText(d.snapshot.time).c_str(), Join(d.reasons, ", ").c_str());
      }
      out_series.push_back({{"vm", name}, {"disk", disk}, {"keep", keep}, {"remove", remove}});
    }
    if (dry_run || to_remove.empty()) continue;
    Status st = (*vm)->ForgetSnapshots(to_remove);
    if (!st.ok()) {
      std::fprintf(stderr, "vmdedup: VM %s: %s\n", name.c_str(),
                   st.WithContext("forget snapshots").ToString().c_str());
      exit_code = kExitFailure;
      continue;
    }
    removed += to_remove.size();
    touched.push_back(name);
  }
  // --prune: gc of the VMs it removed from, each after its lock was let go.
  nlohmann::json pruned = nlohmann::json::array();
  uint64_t freed = 0;
  if (args->Has("prune") && !dry_run) {
    for (const std::string& name : touched) {
      GcOptions gc;
      gc.vm = name;
      gc.cancel = &CancelFlag();
      auto report = CollectGarbage(**repo, gc);
      if (!report.ok()) {
        std::fprintf(stderr, "vmdedup: %s\n", report.status().ToString().c_str());
        exit_code = kExitFailure;
        continue;
      }
      for (const GcVmReport& v : report->vms) {
        freed += v.bytes_freed;
        pruned.push_back({{"vm", v.vm}, {"skipped", v.skipped}, {"bytes_freed", v.bytes_freed}});
        if (!v.skipped.empty()) {
          std::fprintf(stderr, "vmdedup: gc left VM %s untouched: %s\n", v.vm.c_str(),
                       v.skipped.c_str());
          if (exit_code == kExitOk) exit_code = kExitIncomplete;
        }
      }
    }
  }
  if (json) {
    PrintJson({{"series", out_series},
               {"removed", removed},
               {"dry_run", dry_run},
               {"pruned", pruned},
               {"bytes_freed", freed}});
  } else if (dry_run) {
    std::printf("dry run: nothing was removed\n");
  } else {
    if (args->Has("prune"))
      std::printf("removed %llu snapshot(s); gc freed %s\n",
                  static_cast<unsigned long long>(removed), HumanSize(freed).c_str());
    else
      std::printf("removed %llu snapshot(s); 'vmdedup gc' frees their space\n",
                  static_cast<unsigned long long>(removed));
  }
  return exit_code;
}

}  // namespace vmdedup::cli
