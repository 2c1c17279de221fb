#include <cstdio>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "store/check.h"

namespace vmdedup::cli {
namespace {

const char kHelp[] = R"(usage: vmdedup repair -r REPO --vm VM [--json]

Salvages a VM's damaged metadata store: the one 'vmdedup check' reports as
"metadata store ...: Corruption" (a LevelDB table block that fails its
checksum, a lost CURRENT or MANIFEST). Such damage hides more than it
destroys: one damaged block makes every record in its key range unreadable,
also those of older snapshots stored elsewhere, and the VM can no longer be
backed up.

The repair works on a copy of the store. LevelDB's own repair rebuilds the
copy from every table and log it can read, dropping only the damaged blocks;
the copy must then read whole; every counter is raised above every id the
salvaged records use, so that no id is ever handed out twice; then the copy
takes the damaged store's place in one atomic step, and the damaged store is
kept beside it as vms/VM/meta.damaged-TIME (remove it yourself once you are
satisfied). Snapshots that were committed once (the VM's snapshot ledger
lists them) and that the store no longer holds, because a log file was lost
or the metadata was put back from an older copy, are recorded as lost, so
that backups of the VM, which refuse it until then, go on without ever
handing their numbers out again. A check of the VM follows: it names the snapshots that needed
what the damaged blocks held (they cannot be restored whole) and records
their lost segment recipes, so that the next backup stores those segments
afresh and is whole again.

Containers that recipes reference but whose catalog records were lost are
catalogued again from the containers themselves, once every block in them
verifies (this is also done for a store that reads whole). A store that
reads whole is otherwise left as it is. Nothing is written to the VM's
containers.

Options:
  -r, --repo REPO   repository (or $VMDEDUP_REPO)
  --vm VM           the VM whose metadata store to repair (required)
  --json            one JSON object: repaired, kept_as, records, bad_records,
                    counters_raised, recatalogued, lost_snapshots,
                    ledger_rewritten, damaged_snapshots, lost_recipes,
                    findings
  -h, --help        this text

Exit codes: 0 repaired (or nothing to repair) and every snapshot reads whole,
1 the repair failed (the store is as it was), 2 bad usage, 3 repaired but
some snapshots stay damaged (listed), 4 a backup or check holds the VM, 130
interrupted.
)";

}  // namespace

int RepairCommand(int argc, char** argv) {
  auto args =
      Args::Parse(argc, argv, 2,
                  {{"repo", 'r', true}, {"vm", 0, true}, {"json", 0, false}, {"help", 'h', false}});
  if (!args.ok()) return ReportError(args.status());
  if (args->Has("help")) {
    std::fputs(kHelp, stdout);
    return kExitOk;
  }
  auto vm = args->Get("vm");
  if (!args->positionals().empty() || !vm) {
    if (!vm) std::fputs("vmdedup: repair needs --vm VM\n", stderr);
    std::fputs(kHelp, stderr);
    return kExitUsage;
  }
  auto repo_path = args->Repo();
  if (!repo_path.ok()) return ReportError(repo_path.status());
  auto repo = OpenRepository(*repo_path);
  if (!repo.ok()) return ReportError(repo.status());
  auto repair = (*repo)->RepairVmMetadata(*vm);
  if (!repair.ok()) return ReportError(repair.status().WithContext("repair VM '" + *vm + "'"));
  CheckOptions opt;
  opt.vm = *vm;
  opt.cancel = &CancelFlag();
  auto check = CheckRepository(**repo, opt);
  if (!check.ok())
    return ReportError(check.status().WithContext("check VM '" + *vm + "' after its repair"));
  const bool json = args->Has("json");
  if (json) {
    nlohmann::json j = {{"repaired", repair->repaired},
                        {"kept_as", repair->kept_as},
                        {"records", repair->records},
                        {"bad_records", repair->bad_records},
                        {"counters_raised", repair->counters_raised},
                        {"recatalogued", repair->recatalogued},
                        {"lost_snapshots", repair->lost_snapshots},
                        {"ledger_rewritten", repair->ledger_rewritten},
                        {"damaged_snapshots", check->DamagedSnapshots()},
                        {"lost_recipes", check->lost_recipes},
                        {"findings", nlohmann::json::array()}};
    for (const auto& f : check->findings)
      if (f.kind == CheckFinding::Kind::kError)
        j["findings"].push_back({{"message", f.message}, {"snapshots", f.snapshots}});
    PrintJson(j);
  } else if (!repair->repaired) {
    std::printf("the metadata store of VM %s reads whole: nothing to salvage\n", vm->c_str());
  } else {
    std::printf("repaired the metadata store of VM %s: %llu record(s) salvaged", vm->c_str(),
                static_cast<unsigned long long>(repair->records));
    if (repair->bad_records)
      std::printf(", %llu of them failing their checksum (check names them)",
                  static_cast<unsigned long long>(repair->bad_records));
    std::printf("\nthe damaged store is kept as %s/vms/%s/%s; remove it when you are satisfied\n",
                repo_path->c_str(), vm->c_str(), repair->kept_as.c_str());
  }
  if (!json)
    for (const auto& c : repair->counters_raised) std::printf("raised counter %s\n", c.c_str());
  if (!json && repair->ledger_rewritten)
    std::printf("the snapshot ledger did not decode: written again from the metadata store\n");
  if (!json && !repair->lost_snapshots.empty()) {
    std::printf("recorded %zu committed snapshot(s) the metadata store lost (gone for good):",
                repair->lost_snapshots.size());
    for (const auto& id : repair->lost_snapshots) std::printf(" %s", id.c_str());
    std::printf("\n");
  }
  if (!json && !repair->recatalogued.empty())
    std::printf("catalogued %zu container(s) again from their objects (verified whole)\n",
                repair->recatalogued.size());
  if (!json) {
    for (const auto& f : check->findings) {
      if (f.kind != CheckFinding::Kind::kError) continue;
      std::printf("error: %s\n", f.message.c_str());
      if (!f.snapshots.empty()) {
        std::printf("  damaged snapshots:");
        for (const auto& s : f.snapshots) std::printf(" %s", s.c_str());
        std::printf("\n");
      }
    }
    if (check->lost_recipes)
      std::printf(
          "recorded %llu lost segment recipe(s): the next backup reads their segments again\n",
          static_cast<unsigned long long>(check->lost_recipes));
    auto damaged = check->DamagedSnapshots();
    if (damaged.empty()) {
      std::printf("every snapshot of VM %s reads whole\n", vm->c_str());
    } else {
      std::printf("damaged snapshots (they cannot be restored whole):");
      for (const auto& s : damaged) std::printf(" %s", s.c_str());
      std::printf("\n");
    }
  }
  return check->ok() ? kExitOk : kExitDamaged;
}

}  // namespace vmdedup::cli
