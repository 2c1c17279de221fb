#include <cstdio>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "store/check.h"

namespace vmdedup::cli {
namespace {

const char kHelp[] = R"(usage: vmdedup check -r REPO [--vm VM] [--read-data] [--json]

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

Options:
  -r, --repo REPO   repository (or $VMDEDUP_REPO)
  --vm VM           only this VM
  --read-data       also read and re-hash all data
  --json            one JSON object with the findings
  -h, --help        this text

Exit codes: 0 no damage (reclaimable leftovers allowed), 1 the check could not
run, 2 bad usage, 3 damage found (the damaged snapshots are listed).
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
  auto repo = Repository::Open(*repo_path);
  if (!repo.ok()) return ReportError(repo.status());
  CheckOptions opt;
  opt.read_data = args->Has("read-data");
  opt.vm = args->Get("vm").value_or("");
  const bool json = args->Has("json");
  auto report = CheckRepository(**repo, opt);
  if (!report.ok()) return ReportError(report.status());
  const CheckReport& r = *report;
  if (json) {
    nlohmann::json j = {{"ok", r.ok()},
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
                        {"damaged_snapshots", r.DamagedSnapshots()},
                        {"findings", nlohmann::json::array()}};
    for (const auto& f : r.findings)
      j["findings"].push_back({{"kind", KindName(f.kind)},
                               {"vm", f.vm},
                               {"message", f.message},
                               {"snapshots", f.snapshots},
                               {"bytes", f.bytes}});
    std::puts(j.dump().c_str());
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
    auto damaged = r.DamagedSnapshots();
    std::printf("%s\n", r.ok() ? "no damage found" : "DAMAGE FOUND");
    if (!damaged.empty()) {
      std::printf("damaged snapshots:");
      for (const auto& s : damaged) std::printf(" %s", s.c_str());
      std::printf("\n");
    }
  }
  return r.ok() ? kExitOk : kExitDamaged;
}

}  // namespace vmdedup::cli
