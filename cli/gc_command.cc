#include <cstdio>
#include <cstdlib>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "engine/gc.h"

namespace vmdedup::cli {
namespace {

const char kHelp[] =
    R"(usage: vmdedup gc -r REPO [--vm VM] [--dry-run] [--max-unused PERCENT]
                  [--lock-wait SECONDS] [--json]

Frees the space that no snapshot uses any more: after 'vmdedup forget', and
what interrupted backups left. For each VM, under its writer lock: the
blocks live are those the VM's snapshots reference; segment recipes no
snapshot uses, containers with no live block, container files the catalog
does not know (left by interrupted backups) and temporary files of writers
that died are removed, the metadata first, in one synced write, the files
after, so that a crash at any point leaves only what the next gc removes.
Snapshots that 'forget' was interrupted removing are removed first.

Nothing of a VM is deleted when what its snapshots use cannot be known
whole (a metadata record that does not decode, a missing recipe, committed
snapshots gone from its metadata: run 'vmdedup check'), nor while a
restore, serve or cds build reads it (each holds a lease on the VM while it
reads; the next gc deletes what is unused). Such a VM is named, and the
exit code is 5.

Containers that are partly live are rewritten while more than
--max-unused percent of the VM's container bytes are unused, the least
live first: their live records are copied into new containers (written
and made durable first), the recipes are re-pointed in one synced write,
then the old containers are deleted. Not yet done: the common data set is
not collected, and blocks the CDS also holds are not re-pointed to it.

Options:
  -r, --repo REPO       repository (or $VMDEDUP_REPO)
  --vm VM               only this VM
  --dry-run             say what would be freed, delete nothing
  --max-unused PERCENT  rewrite partly live containers while more than
                        PERCENT of the VM's container bytes are unused
                        (default 10; 100: never rewrite)
  --lock-wait SECONDS   wait up to SECONDS for a VM a backup holds (default 0)
  --json                one JSON object: {"vms": [{"vm", "skipped", "readers",
                        "forgets_finished", "recipes_removed",
                        "containers_removed", "containers_repacked",
                        "bytes_written", "leftovers_removed",
                        "bytes_freed", "live_bytes", "stored_bytes",
                        "unused_bytes"}], "bytes_freed", "complete", "dry_run"}
  -h, --help            this text

Exit codes: 0 done, 1 failure, 2 bad usage, 5 some VM was left untouched
(named, with why), 130 interrupted.
)";

}  // namespace

int GcCommand(int argc, char** argv) {
  auto args = Args::Parse(argc, argv, 2,
                          {{"repo", 'r', true},
                           {"vm", 0, true},
                           {"dry-run", 0, false},
                           {"lock-wait", 0, true},
                           {"max-unused", 0, true},
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
  GcOptions opt;
  opt.vm = args->Get("vm").value_or("");
  opt.dry_run = args->Has("dry-run");
  auto lock_wait = args->LockWaitSeconds();
  if (!lock_wait.ok()) {
    std::fprintf(stderr, "vmdedup: %s\n", lock_wait.status().message().c_str());
    return kExitUsage;
  }
  opt.lock_wait_seconds = *lock_wait;
  if (auto m = args->Get("max-unused")) {
    char* end = nullptr;
    const double v = std::strtod(m->c_str(), &end);
    if (m->empty() || *end != '\0' || !(v >= 0) || v > 100) {
      std::fprintf(stderr, "vmdedup: --max-unused takes a percentage from 0 to 100, not '%s'\n",
                   m->c_str());
      return kExitUsage;
    }
    opt.max_unused_percent = v;
  }
  opt.cancel = &CancelFlag();
  auto repo_path = args->Repo();
  if (!repo_path.ok()) return ReportError(repo_path.status());
  auto repo = OpenRepository(*repo_path);
  if (!repo.ok()) return ReportError(repo.status());
  const bool json = args->Has("json");
  if (!json && StderrIsTerminal())
    opt.progress = [](const std::string& line) { std::fprintf(stderr, "%s\n", line.c_str()); };
  auto report = CollectGarbage(**repo, opt);
  if (!report.ok()) return ReportError(report.status());
  if (json) {
    nlohmann::json vms = nlohmann::json::array();
    for (const GcVmReport& v : report->vms)
      vms.push_back({{"vm", v.vm},
                     {"skipped", v.skipped},
                     {"readers", v.readers},
                     {"forgets_finished", v.forgets_finished},
                     {"recipes_removed", v.recipes_removed},
                     {"containers_removed", v.containers_removed},
                     {"containers_repacked", v.containers_repacked},
                     {"bytes_written", v.bytes_written},
                     {"leftovers_removed", v.leftovers_removed},
                     {"bytes_freed", v.bytes_freed},
                     {"live_bytes", v.live_bytes},
                     {"stored_bytes", v.stored_bytes},
                     {"unused_bytes", v.unused_bytes}});
    PrintJson({{"vms", vms},
               {"bytes_freed", report->bytes_freed},
               {"complete", report->complete()},
               {"dry_run", opt.dry_run}});
  } else {
    const char* verb = opt.dry_run ? "would free" : "freed";
    for (const GcVmReport& v : report->vms) {
      if (!v.skipped.empty()) {
        std::printf("VM %s: left untouched: %s\n", v.vm.c_str(), v.skipped.c_str());
        continue;
      }
      std::printf(
          "VM %s: %s %s (%llu container(s) removed, %llu rewritten, %llu leftover file(s), %llu "
          "recipe(s)); holds %s in %s of containers, %s of it unused\n",
          v.vm.c_str(), verb, HumanSize(v.bytes_freed).c_str(),
          static_cast<unsigned long long>(v.containers_removed),
          static_cast<unsigned long long>(v.containers_repacked),
          static_cast<unsigned long long>(v.leftovers_removed),
          static_cast<unsigned long long>(v.recipes_removed), HumanSize(v.live_bytes).c_str(),
          HumanSize(v.stored_bytes).c_str(), HumanSize(v.unused_bytes).c_str());
    }
    std::printf("%s %s in total%s\n", verb, HumanSize(report->bytes_freed).c_str(),
                opt.dry_run ? " (dry run: nothing was deleted)" : "");
  }
  return report->complete() ? kExitOk : kExitIncomplete;
}

}  // namespace vmdedup::cli
