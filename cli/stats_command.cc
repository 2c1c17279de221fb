#include <cstdio>
#include <set>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "engine/cds_index.h"
#include "store/cds_area.h"
#include "store/repository.h"

namespace vmdedup::cli {
namespace {

const char kHelp[] = R"(usage: vmdedup stats -r REPO [--vm VM] [--json]

Totals per VM and for the whole repository:
  logical      sum of the snapshots' virtual sizes
  nonzero      logical bytes that are not zero (holes, zero extents, zero blocks)
  zero, segment, block, cds, new
               bytes removed by levels 0-3, and new block data (as in 'snapshots')
  stored       bytes of the VM's containers (compressed data and record headers)
  metadata     bytes of the VM's metadata store on disk
  left_after_l1, left_after_l12, left_after_l123
               data left after level 1, levels 1+2 and levels 1+2+3, as a
               percentage of the non-zero logical data (the CLOUD 2012 paper's
               Figure 4): (block+cds+new), (cds+new) and new over nonzero.

The common data set (CDS), when the repository has one:
  versions     published versions, and the one in force
  blocks       blocks of the version in force
  cds_bytes    uncompressed bytes of all blocks in the CDS area, every
               published version counted (a block shared by versions once)
  stored       bytes of the CDS containers
  index        memory of the version in force's in-memory index
  hit rate     cds / (cds + new) over the snapshots made with a CDS: the
               share of the blocks left after level 2 that the CDS held

Options:
  -r, --repo REPO   repository (or $VMDEDUP_REPO)
  --vm VM           only this VM
  --json            one JSON object: {"vms": [...], "total": {...},
                    "cds_bytes": N, "cds": {...}}
  -h, --help        this text

Exit codes: 0 printed, 1 failure, 2 bad usage, 4 a VM is locked by a running backup.
)";

struct Totals {
  uint64_t snapshots = 0, logical = 0, containers = 0, stored = 0, metadata = 0;
  LevelStats levels;
  void Add(const Totals& o) {
    snapshots += o.snapshots;
    logical += o.logical;
    containers += o.containers;
    stored += o.stored;
    metadata += o.metadata;
    levels.Add(o.levels);
  }
  uint64_t nonzero() const { return logical - levels.zero; }
  double Left(uint64_t part) const {
    return nonzero() ? 100.0 * static_cast<double>(part) / static_cast<double>(nonzero()) : 0.0;
  }
  nlohmann::json Json() const {
    const LevelStats& l = levels;
    return {{"snapshots", snapshots},
            {"logical", logical},
            {"nonzero", nonzero()},
            {"read_bytes", l.read_bytes},
            {"zero", l.zero},
            {"segment", l.segment},
            {"block", l.block},
            {"cds", l.cds},
            {"new", l.new_bytes},
            {"containers", containers},
            {"stored", stored},
            {"metadata", metadata},
            {"left_after_l1", Left(l.block + l.cds + l.new_bytes)},
            {"left_after_l12", Left(l.cds + l.new_bytes)},
            {"left_after_l123", Left(l.new_bytes)}};
  }
  void Print(const std::string& name) const {
    const LevelStats& l = levels;
    std::printf("%-16s %5llu %10s %10s %10s %10s %10s %10s %10s %10s %9.1f%% %9.1f%% %9.1f%%\n",
                name.c_str(), static_cast<unsigned long long>(snapshots),
                HumanSize(logical).c_str(), HumanSize(l.zero).c_str(), HumanSize(l.segment).c_str(),
                HumanSize(l.block).c_str(), HumanSize(l.cds).c_str(),
                HumanSize(l.new_bytes).c_str(), HumanSize(stored).c_str(),
                HumanSize(metadata).c_str(), Left(l.block + l.cds + l.new_bytes),
                Left(l.cds + l.new_bytes), Left(l.new_bytes));
  }
};

struct CdsTotals {
  uint64_t current = 0;
  std::vector<uint64_t> published;
  uint64_t blocks = 0;  // of the version in force
  uint64_t bytes = 0;   // distinct blocks of every published version
  uint64_t stored = 0;  // their containers
  uint64_t index_memory = 0;
  uint64_t hit = 0, miss = 0;  // cds and new bytes of snapshots made with a CDS
  double HitRate() const {
    return hit + miss ? 100.0 * static_cast<double>(hit) / static_cast<double>(hit + miss) : 0.0;
  }
};

Status ReadCdsTotals(Repository& repo, CdsTotals* t) {
  CdsArea area(repo.objects());
  ASSIGN_OR_RETURN(CdsPointer pointer, area.ReadPointer());
  t->current = pointer.current;
  t->published = pointer.published;
  std::set<std::pair<uint64_t, uint32_t>> seen;  // (container, offset)
  std::set<uint64_t> containers;
  for (uint64_t v : pointer.published) {
    std::vector<CdsEntry> entries;
    RETURN_IF_ERROR(area.ReadEntries(v, &entries));
    if (v == pointer.current) t->blocks = entries.size();
    for (const CdsEntry& e : entries) {
      containers.insert(e.container);
      if (seen.insert({e.container, e.offset}).second) t->bytes += e.length;
    }
  }
  for (uint64_t c : containers) {
    ASSIGN_OR_RETURN(uint64_t size, repo.objects()->Size(CdsArea::ContainerObjectName(c)));
    t->stored += size;
  }
  if (pointer.current != 0) {
    ASSIGN_OR_RETURN(auto index, CdsIndex::Load(repo.objects(), pointer.current));
    t->index_memory = index->MemoryBytes();
  }
  return Status::OK();
}

}  // namespace

int StatsCommand(int argc, char** argv) {
  auto args =
      Args::Parse(argc, argv, 2,
                  {{"repo", 'r', true}, {"vm", 0, true}, {"json", 0, false}, {"help", 'h', false}});
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
  CdsTotals cds;
  if (Status st = ReadCdsTotals(**repo, &cds); !st.ok()) return ReportError(st);
  Totals total;
  std::vector<std::pair<std::string, Totals>> per_vm;
  for (const std::string& name : vms) {
    auto vm = (*repo)->OpenVm(name, Repository::Access::kRead);
    if (!vm.ok()) return ReportError(vm.status());
    Totals t;
    auto snaps = (*vm)->ListSnapshots();
    if (!snaps.ok()) return ReportError(snaps.status());
    for (const SnapshotRecord& s : *snaps) {
      t.snapshots++;
      t.logical += s.size;
      t.levels.Add(s.stats);
      if (s.cds_version != 0) {
        cds.hit += s.stats.cds;
        cds.miss += s.stats.new_bytes;
      }
    }
    auto containers = (*vm)->ListContainers();
    if (!containers.ok()) return ReportError(containers.status());
    for (const ContainerRecord& c : *containers) {
      t.containers++;
      t.stored += c.size;
    }
    // A first backup that failed leaves a VM with nothing in it: listed
    // only when asked for by name.
    if (!args->Has("vm") && t.snapshots == 0 && t.containers == 0) continue;
    t.metadata = (*vm)->meta()->ApproximateBytes();
    total.Add(t);
    per_vm.emplace_back(name, t);
  }
  if (args->Has("json")) {
    nlohmann::json j = {{"vms", nlohmann::json::array()}, {"total", total.Json()}};
    for (const auto& [name, t] : per_vm) {
      auto o = t.Json();
      o["vm"] = name;
      j["vms"].push_back(o);
    }
    j["cds_bytes"] = cds.bytes;
    j["cds"] = {{"current_version", cds.current}, {"published_versions", cds.published},
                {"blocks", cds.blocks},           {"bytes", cds.bytes},
                {"stored", cds.stored},           {"index_memory", cds.index_memory},
                {"hit_rate", cds.HitRate()}};
    PrintJson(j);
    return kExitOk;
  }
  std::printf("%-16s %5s %10s %10s %10s %10s %10s %10s %10s %10s %10s %10s %10s\n", "VM", "SNAPS",
              "LOGICAL", "ZERO", "SEGMENT", "BLOCK", "CDS", "NEW", "STORED", "METADATA", "LEFT L1",
              "LEFT L1+2", "L1+2+3");
  for (const auto& [name, t] : per_vm) t.Print(name);
  total.Print("total");
  if (!cds.published.empty()) {
    std::printf(
        "common data set: version %llu in force (%zu published), %llu blocks, %s in the area "
        "(%s stored), index %s, hit rate %.1f%%\n",
        static_cast<unsigned long long>(cds.current), cds.published.size(),
        static_cast<unsigned long long>(cds.blocks), HumanSize(cds.bytes).c_str(),
        HumanSize(cds.stored).c_str(), HumanSize(cds.index_memory).c_str(), cds.HitRate());
  }
  return kExitOk;
}

}  // namespace vmdedup::cli
