#include <cstdio>
#include <cstdlib>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "store/check.h"

namespace vmdedup::cli {
namespace {

const char kHelp[] = R"(usage: vmdedup check -r REPO [--vm VM] [--read-data] [--lock-wait SECONDS]
                     [--json]

Verifies a repository. Always: every metadata record's checksum, every
snapshot's segment list, every recipe's references (recipe present, container
catalogued, record inside the object), every catalogued object present with
its recorded size. With --read-data also: every container read in full, every
record's checksum, every block decompressed and re-hashed against its
fingerprint, and every reference pointing at a record with that fingerprint.
The common data set (CDS) is checked the same way: the pointer to the version
in force, every published version's manifest and index, and the CDS
containers they reach (read and re-hashed with --read-data); a snapshot's CDS
references must land on those records.

Problems name the object and the snapshots they damage. Leftovers of
interrupted backups (objects not in the catalog, unreferenced containers and
recipes, temporary files, CDS objects of an unfinished 'cds build') are
listed as reclaimable: they are not errors. When a VM's metadata is damaged
(a record that does not decode, a snapshot's missing segment list or
recipe), what its damaged snapshots use is unknown: nothing of that VM is
listed as reclaimable then (one 'skipped' finding counts it), and with
--read-data its unreferenced containers are re-hashed too.

A VM that a backup holds is not checked (check opens its metadata store
itself, to record what it quarantines): it is named, and the check is
incomplete (exit code 5) unless damage was found. --lock-wait waits for it.
A repository check cannot write (a read-only mount) is checked all the
same; the quarantines it could not record are reported.

The configuration record (vmdedup-repo) has a copy (vmdedup-repo.copy):
when one is damaged or missing, commands read the other and say so, and
check rewrites the bad one from the good one ("repaired: ..." lines; this
is not damage). Damaged containers are quarantined: later backups take
nothing from them. Segment recipes that snapshots use but that are missing
or unreadable (a damaged metadata store) are recorded as lost: later
backups read those segments again instead of reusing them. A metadata
store damaged below its records is checked as far as it can be read; the
snapshots that need its damaged part are named (docs/operations.md,
"Damage").

Options:
  -r, --repo REPO   repository (or $VMDEDUP_REPO)
  --vm VM           only this VM
  --read-data       also read and re-hash all data
  --lock-wait SECONDS
                    wait up to SECONDS for a VM that a backup holds
                    (default 0: do not wait)
  --json            one JSON object with the findings
  -h, --help        this text

Exit codes: 0 no damage (reclaimable leftovers allowed), 1 the check could not
run, 2 bad usage, 3 damage found (the damaged snapshots are listed), 5 no
damage found but some VM was not checked (a backup held it), 130
interrupted.
)";

const char* KindName(CheckFinding::Kind k) {
  switch (k) {
    case CheckFinding::Kind::kError:
      return "error";
    case CheckFinding::Kind::kReclaimable:
      return "reclaimable";
    case CheckFinding::Kind::kSkipped:
      return "skipped";
  }
  return "?";
}

}  // namespace

int CheckCommand(int argc, char** argv) {
  auto args = Args::Parse(argc, argv, 2,
                          {{"repo", 'r', true},
                           {"vm", 0, true},
                           {"read-data", 0, false},
                           {"lock-wait", 0, true},
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
  CheckOptions opt;
  opt.read_data = args->Has("read-data");
  opt.vm = args->Get("vm").value_or("");
  auto lock_wait = args->LockWaitSeconds();
  if (!lock_wait.ok()) {
    std::fprintf(stderr, "vmdedup: %s\n", lock_wait.status().message().c_str());
    return kExitUsage;
  }
  opt.lock_wait_seconds = *lock_wait;
  opt.cancel = &CancelFlag();
  const bool json = args->Has("json");
  auto report = CheckRepository(**repo, opt);
  if (!report.ok()) return ReportError(report.status());
  const CheckReport& r = *report;
  if (json) {
    nlohmann::json not_checked = nlohmann::json::array();
    for (const auto& [vm, why] : r.vms_not_checked)
      not_checked.push_back({{"vm", vm}, {"reason", why}});
    nlohmann::json j = {{"ok", r.ok()},
                        {"complete", r.complete()},
                        {"vms_not_checked", not_checked},
                        {"repaired", r.repaired},
                        {"vms", r.vms},
                        {"snapshots", r.snapshots},
                        {"recipes", r.recipes},
                        {"containers", r.containers},
                        {"cds_versions", r.cds_versions},
                        {"cds_containers", r.cds_containers},
                        {"blocks_verified", r.blocks_verified},
                        {"bytes_verified", r.bytes_verified},
                        {"reclaimable_bytes", r.reclaimable_bytes},
                        {"quarantined", r.quarantined},
                        {"lost_recipes", r.lost_recipes},
                        {"damaged_snapshots", r.DamagedSnapshots()},
                        {"findings", nlohmann::json::array()}};
    for (const auto& f : r.findings)
      j["findings"].push_back({{"kind", KindName(f.kind)},
                               {"vm", f.vm},
                               {"message", f.message},
                               {"snapshots", f.snapshots},
                               {"bytes", f.bytes}});
    PrintJson(j);
  } else {
    for (const auto& f : r.findings) {
      std::printf("%s: %s%s%s\n", KindName(f.kind),
                  f.vm.empty() ? "" : ("VM " + f.vm + ": ").c_str(), f.message.c_str(),
                  f.bytes ? (" (" + HumanSize(f.bytes) + ")").c_str() : "");
      if (!f.snapshots.empty()) {
        std::printf("  damaged snapshots:");
        for (const auto& s : f.snapshots) std::printf(" %s", s.c_str());
        std::printf("\n");
      }
    }
    std::printf(
        "checked %llu VM(s), %llu snapshot(s), %llu recipe(s), %llu container(s)",
        static_cast<unsigned long long>(r.vms), static_cast<unsigned long long>(r.snapshots),
        static_cast<unsigned long long>(r.recipes), static_cast<unsigned long long>(r.containers));
    if (r.cds_versions)
      std::printf(", %llu CDS version(s) with %llu container(s)",
                  static_cast<unsigned long long>(r.cds_versions),
                  static_cast<unsigned long long>(r.cds_containers));
    if (opt.read_data)
      std::printf("; re-hashed %llu block(s), %s",
                  static_cast<unsigned long long>(r.blocks_verified),
                  HumanSize(r.bytes_verified).c_str());
    std::printf("\n");
    if (r.reclaimable_bytes)
      std::printf("reclaimable: %s\n", HumanSize(r.reclaimable_bytes).c_str());
    if (r.quarantined)
      std::printf(
          "quarantined %llu damaged container(s): backups take nothing from them and "
          "store their blocks afresh (docs/operations.md, \"Damage\")\n",
          static_cast<unsigned long long>(r.quarantined));
    if (r.lost_recipes)
      std::printf(
          "recorded %llu lost segment recipe(s): backups read their segments again instead "
          "of reusing them (docs/operations.md, \"Damage\")\n",
          static_cast<unsigned long long>(r.lost_recipes));
    for (const auto& [vm, why] : r.vms_not_checked)
      std::printf("not checked: VM %s: %s (--lock-wait waits for it)\n", vm.c_str(), why.c_str());
    for (const auto& line : r.repaired) std::printf("repaired: %s\n", line.c_str());
    auto damaged = r.DamagedSnapshots();
    if (!r.ok())
      std::printf("DAMAGE FOUND\n");
    else if (!r.complete())
      std::printf("no damage found in what was checked; CHECK INCOMPLETE: %zu VM(s) not checked\n",
                  r.vms_not_checked.size());
    else
      std::printf("no damage found\n");
    if (!damaged.empty()) {
      std::printf("damaged snapshots:");
      for (const auto& s : damaged) std::printf(" %s", s.c_str());
      std::printf("\n");
    }
  }
  if (!r.ok()) return kExitDamaged;
  if (CancelFlag().load()) return kExitInterrupted;
  return r.complete() ? kExitOk : kExitIncomplete;
}

}  // namespace vmdedup::cli
