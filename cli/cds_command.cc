// `vmdedup cds build` and `vmdedup cds status`: the common data set (CDS),
// the shared area of the most popular blocks across VMs (docs/cds.md).
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <map>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "engine/cds_builder.h"
#include "store/cds_area.h"
#include "store/repository.h"

namespace vmdedup::cli {
namespace {

const char kHelp[] = R"(usage: vmdedup cds build -r REPO [--fraction PERCENT | --budget SIZE]
                        [--seed SOURCE ...] [--vm VM ...] [--threads N] [--json] [-q]
       vmdedup cds status -r REPO [--json]

Manages the common data set (CDS): the blocks most popular across VMs,
stored once in the repository's shared area. A backup looks every block it
would otherwise store up in the CDS version in force at its start (level 3)
and references the shared copy instead. docs/cds.md has the details.

build
  Counts how many VMs hold each block in the snapshots they keep (own or CDS
  references; each VM counts once however often it holds a block), plus one
  for each --seed image that holds it. Counting is exact: when the blocks do
  not fit in memory, the fingerprint space is split and counted in several
  passes. Blocks held by two VMs or more, or by a seed, are candidates; the
  most popular are chosen (then by fingerprint) until the budget is full.
  Chosen blocks that are already in the CDS area stay where they are; others
  are copied from a VM's containers (checksum and fingerprint verified) or,
  when only a seed holds them, read from the seed and compressed. The new
  version is published at the end with one atomic write: until then (and if
  the build fails or is killed) the version in force stays as it was, and
  whatever the build wrote is a leftover that 'check' reports as
  reclaimable. Backups already running keep the version they started with.
  A VM being backed up is counted with the snapshots it had when the build
  started (it is read through a read view, and neither waits).
  One build runs at a time per repository.

status
  Lists every published version: number, creation time (UTC), blocks, their
  plaintext and stored bytes, how they were chosen, the seeds, and how many
  snapshots looked blocks up in it; '*' marks the version in force. Also
  counts leftovers of builds that did not finish. Snapshots of VMs that a
  running backup holds cannot be read; a line says which were not counted.

Options (build):
  -r, --repo REPO       repository (or $VMDEDUP_REPO)
  --fraction PERCENT    budget: this percentage of the unique (distinct,
                        non-zero) data, above 0 and at most 100; "1" and "1%"
                        are the same (default: 1, the CLOUD 2012 paper's size)
  --budget SIZE         budget: the memory of the CDS index, counted at 24
                        bytes a block (a cap: the index takes 20.25)
                        (suffixes K, M, G, T: "24M" is about a million blocks)
  --vm VM               count only this VM's blocks (repeat for several;
                        default: every VM). The CDS serves every VM either
                        way; this only chooses whose blocks make a block
                        popular, e.g. the production VMs.
  --seed SOURCE         a template image whose blocks are candidates even when
                        fewer than two VMs hold them: raw:PATH or qcow2:PATH
                        (an image that no process writes, in the format
                        named: vmdedup never guesses one) or an NBD URI;
                        repeat for several. A seed that cannot be read fails
                        the build before anything is written.
  --count-memory SIZE   memory for counting one pass (default 256M); less
                        memory means more passes over the recipes, same result
  --threads N           threads hashing seed images (default: the number of
                        cores)
  --json                print the result as one JSON object on stdout
  -q, --quiet           no progress, no notes
Options (status):
  -r, --repo REPO       repository (or $VMDEDUP_REPO)
  --json                one JSON object: {"current": V, "versions": [...], ...}
  -h, --help            this text

Interrupting a build (Ctrl-C, SIGTERM, SIGKILL) ends the process at once, by
the signal (a shell shows 130 for Ctrl-C); nothing is published and the
version in force stays as it was.

Exit codes: 0 success, 1 failure (nothing published; the version in force is
unchanged), 2 bad usage (also: a bad budget, nothing to count), 4 another cds
build is running on the repository, 128+N killed by signal N (interrupted).
)";

std::string TimeString(int64_t t) {
  std::time_t tt = static_cast<std::time_t>(t);
  std::tm tm{};
  gmtime_r(&tt, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

Result<double> ParseFraction(std::string text) {
  if (!text.empty() && text.back() == '%') text.pop_back();
  char* end = nullptr;
  double v = std::strtod(text.c_str(), &end);
  if (text.empty() || end == text.c_str() || *end != '\0' || std::isnan(v) || v <= 0 || v > 100)
    return Status::InvalidArgument(
        "--fraction must be a percentage above 0 and at most 100, got '" + text + "'");
  return v;
}

int Usage() {
  std::fputs(kHelp, stderr);
  return kExitUsage;
}

nlohmann::json ResultJson(const CdsBuildResult& r) {
  return {{"version", r.version},
          {"previous_version", r.previous_version},
          {"vms_counted", r.vms_counted},
          {"seed_blocks", r.seed_blocks},
          {"unique_blocks", r.unique_blocks},
          {"unique_bytes", r.unique_bytes},
          {"candidates", r.candidates},
          {"blocks", r.blocks},
          {"raw_bytes", r.raw_bytes},
          {"stored_bytes", r.stored_bytes},
          {"copied_blocks", r.copied_blocks},
          {"copied_stored_bytes", r.copied_stored_bytes},
          {"index_memory", r.index_memory},
          {"passes", r.passes},
          {"duration_ms", r.duration_ms}};
}

int Build(const Args& args) {
  if (args.Has("fraction") && args.Has("budget")) {
    std::fprintf(stderr,
                 "vmdedup: give either --fraction or --budget, not both (see 'vmdedup cds "
                 "--help')\n");
    return kExitUsage;
  }
  CdsBuildOptions o;
  if (auto b = args.Get("budget")) {
    auto size = ParseSize(*b);
    if (!size.ok()) return ReportError(size.status().WithContext("--budget"));
    o.index_budget_bytes = *size;
  } else {
    auto f = ParseFraction(args.Get("fraction").value_or("1"));
    if (!f.ok()) return ReportError(f.status());
    o.fraction_percent = *f;
  }
  if (auto m = args.Get("count-memory")) {
    auto size = ParseSize(*m);
    if (!size.ok()) return ReportError(size.status().WithContext("--count-memory"));
    o.count_memory_budget = *size;
  }
  o.seeds = args.GetAll("seed");
  o.vms = args.GetAll("vm");
  auto threads = args.Threads();
  if (!threads.ok()) return ReportError(threads.status());
  o.threads = *threads;
  auto repo_path = args.Repo();
  if (!repo_path.ok()) return ReportError(repo_path.status());
  auto repo = OpenRepository(*repo_path);
  if (!repo.ok()) return ReportError(repo.status());

  const bool json = args.Has("json");
  const bool quiet = args.Has("quiet");
  ProgressLine progress(!quiet && StderrIsTerminal());

  // Seeds report bytes (the progress line); the other phases report items
  // (VMs counted, blocks copied), drawn as "cds copy 12/40".
  const bool draw = !quiet && StderrIsTerminal();
  o.note = [&](const std::string& line) {
    if (quiet) return;
    progress.Finish();
    if (draw) std::fputs("\r\033[K", stderr);
    std::fprintf(stderr, "%s\n", line.c_str());
  };
  o.progress = [&](uint64_t done, uint64_t total, const char* phase) {
    if (std::string(phase) == "seed") {
      progress.Update("cds seed", done, total, "");
    } else if (draw) {
      progress.Finish();
      std::fprintf(stderr, "\r\033[Kcds %s %llu/%llu", phase, static_cast<unsigned long long>(done),
                   static_cast<unsigned long long>(total));
      std::fflush(stderr);
    }
  };
  // Nothing a build writes is in force before its last write, so an
  // interrupt may end the process at once: the default action.
  std::signal(SIGINT, SIG_DFL);
  std::signal(SIGTERM, SIG_DFL);
  auto r = BuildCds(**repo, o);
  progress.Finish();
  if (draw) std::fprintf(stderr, "\r\033[K");
  if (!r.ok()) return ReportError(r.status());
  if (json) {
    PrintJson(ResultJson(*r));
    return kExitOk;
  }
  if (quiet) return kExitOk;
  std::printf("cds version %llu published in %.1f s", static_cast<unsigned long long>(r->version),
              r->duration_ms / 1000.0);
  if (r->previous_version)
    std::printf(" (replaces version %llu)\n", static_cast<unsigned long long>(r->previous_version));
  else
    std::printf(" (the first)\n");
  std::printf("  counted        %llu VMs, %zu seeds, %u %s\n",
              static_cast<unsigned long long>(r->vms_counted), o.seeds.size(), r->passes,
              r->passes == 1 ? "pass" : "passes");
  std::printf("  unique data    %s in %llu blocks (%llu of them in the seeds)\n",
              HumanSize(r->unique_bytes).c_str(), static_cast<unsigned long long>(r->unique_blocks),
              static_cast<unsigned long long>(r->seed_blocks));
  std::printf("  candidates     %llu blocks (held by two VMs or more, or by a seed)\n",
              static_cast<unsigned long long>(r->candidates));
  std::printf("  chosen         %llu blocks, %s (%s of the unique data), %s stored\n",
              static_cast<unsigned long long>(r->blocks), HumanSize(r->raw_bytes).c_str(),
              Percent(r->raw_bytes, r->unique_bytes).c_str(), HumanSize(r->stored_bytes).c_str());
  std::printf("  copied         %llu blocks, %s stored (the others were in the CDS area)\n",
              static_cast<unsigned long long>(r->copied_blocks),
              HumanSize(r->copied_stored_bytes).c_str());
  std::printf("  index memory   %s\n", HumanSize(r->index_memory).c_str());
  return kExitOk;
}

int StatusOf(const Args& args) {
  if (args.Has("fraction") || args.Has("budget") || args.Has("seed") || args.Has("count-memory") ||
      args.Has("threads") || args.Has("vm")) {
    std::fprintf(stderr, "vmdedup: cds status takes only -r REPO and --json\n");
    return kExitUsage;
  }
  auto repo_path = args.Repo();
  if (!repo_path.ok()) return ReportError(repo_path.status());
  auto repo = OpenRepository(*repo_path);
  if (!repo.ok()) return ReportError(repo.status());
  CdsArea area((*repo)->objects());
  auto pointer = area.ReadPointer();
  if (!pointer.ok()) return ReportError(pointer.status());
  std::vector<CdsVersionInfo> versions;
  for (uint64_t v : pointer->published) {
    auto m = area.ReadManifest(v);
    if (!m.ok()) return ReportError(m.status());
    versions.push_back(std::move(m).value());
  }
  // Snapshots per CDS version (0: looked up in none).
  std::map<uint64_t, uint64_t> refs;
  auto vms = (*repo)->ListVms();
  if (!vms.ok()) return ReportError(vms.status());
  for (const std::string& name : *vms) {
    auto vm = (*repo)->OpenVm(name, Repository::Access::kRead);
    if (!vm.ok()) return ReportError(vm.status());
    auto snaps = (*vm)->ListSnapshots();
    if (!snaps.ok()) return ReportError(snaps.status());
    for (const SnapshotRecord& s : *snaps) refs[s.cds_version]++;
  }
  std::vector<std::string> leftovers;
  Status st = area.ListLeftovers(&leftovers);
  if (!st.ok()) return ReportError(st);

  if (args.Has("json")) {
    nlohmann::json j = {{"current", pointer->current},
                        {"versions", nlohmann::json::array()},
                        {"snapshots_without_cds", refs[0]},
                        {"leftovers", leftovers.size()}};
    for (const CdsVersionInfo& v : versions)
      j["versions"].push_back({{"version", v.version},
                               {"current", v.version == pointer->current},
                               {"created", v.created},
                               {"blocks", v.block_count},
                               {"raw_bytes", v.raw_bytes},
                               {"stored_bytes", v.stored_bytes},
                               {"containers", v.containers.size()},
                               {"chunker", v.chunker},
                               {"selection", v.selection},
                               {"seeds", v.seeds},
                               {"snapshots", refs[v.version]}});
    PrintJson(j);
    return kExitOk;
  }
  if (versions.empty()) {
    std::printf("no CDS version is published; build one with 'vmdedup cds build -r %s'\n",
                repo_path->c_str());
  } else {
    std::printf("%-9s %-19s %10s %10s %10s %9s  %-20s %s\n", "VERSION", "CREATED (UTC)", "BLOCKS",
                "RAW", "STORED", "SNAPSHOTS", "SELECTION", "SEEDS");
    for (const CdsVersionInfo& v : versions) {
      std::string seeds;
      for (const auto& s : v.seeds) seeds += (seeds.empty() ? "" : ", ") + s;
      std::string num = (v.version == pointer->current ? "*" : " ") + std::to_string(v.version);
      std::printf("%-9s %-19s %10llu %10s %10s %9llu  %-20s %s\n", num.c_str(),
                  TimeString(v.created).c_str(), static_cast<unsigned long long>(v.block_count),
                  HumanSize(v.raw_bytes).c_str(), HumanSize(v.stored_bytes).c_str(),
                  static_cast<unsigned long long>(refs[v.version]), v.selection.c_str(),
                  seeds.empty() ? "-" : seeds.c_str());
    }
    std::printf("version in force: %llu\n", static_cast<unsigned long long>(pointer->current));
  }
  std::printf("snapshots without CDS lookups: %llu\n", static_cast<unsigned long long>(refs[0]));
  if (!leftovers.empty())
    std::printf("%zu objects left by builds that did not finish (reclaimable)\n", leftovers.size());
  return kExitOk;
}

}  // namespace

int CdsCommand(int argc, char** argv) {
  auto args = Args::Parse(argc, argv, 2,
                          {{"repo", 'r', true},
                           {"fraction", 0, true},
                           {"budget", 0, true},
                           {"seed", 0, true},
                           {"vm", 0, true},
                           {"count-memory", 0, true},
                           {"threads", 0, true},
                           {"json", 0, false},
                           {"quiet", 'q', false},
                           {"help", 'h', false}});
  if (!args.ok()) return ReportError(args.status());
  if (args->Has("help")) {
    std::fputs(kHelp, stdout);
    return kExitOk;
  }
  if (args->positionals().size() != 1) return Usage();
  const std::string& sub = args->positionals()[0];
  if (sub == "build") return Build(*args);
  if (sub == "status") return StatusOf(*args);
  std::fprintf(stderr, "vmdedup: unknown cds subcommand '%s' (build, status)\n\n", sub.c_str());
  return Usage();
}

}  // namespace vmdedup::cli
