#include <cstdio>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "store/repository.h"

namespace vmdedup::cli {
namespace {

const char kHelp[] = R"(usage: vmdedup init [OPTIONS] REPO

Creates a repository in directory REPO (new, or empty).

Options:
  --segment-size SIZE   segment size, the unit of the dirty-bitmap level: a power
                        of two from 64K to 64M (default 2M). A multiple of the
                        dirty bitmap granularity (64K by default in QEMU).
  --chunker KIND        how segments are cut into blocks: 'cdc' (content
                        defined, ~4 KiB average, 1-16 KiB) or 'fixed' (4 KiB).
                        Default: cdc (3% less stored data and 21% less
                        metadata on a Debian fleet: docs/chunking.md).
  --compression-level N zstd level for new blocks: 1-19, or -7 to -1 for zstd's
                        fast levels (default 1; on 64 KiB frames of a Debian
                        guest, zstd at level 3 took 60% more CPU time and
                        stored 4% less, at level -1 9% less time and 8% more;
                        see docs/benchmarks.md, "zstd's hash table")
  --frame-size SIZE     the most new-block data compressed together as one zstd
                        frame: 4K to 1M, or 0 for one frame a block (default
                        64K: on a Debian guest 8% less stored and a third less
                        compression CPU than one frame a block, while a random
                        4 KiB read decompresses at most 64 KiB; see
                        docs/benchmarks.md)
  --container-size SIZE the most bytes one container (one object of the store)
                        holds: 1M to 64M (default 8M). A backup keeps two in
                        memory; smaller ones mean more objects and one more
                        fsync each (docs/benchmarks.md, "Container size")
  --json                print the configuration as JSON
  -h, --help            this text

Exit codes: 0 created, 1 failure, 2 bad usage (e.g. REPO not empty).
)";

}  // namespace

int InitCommand(int argc, char** argv) {
  auto args = Args::Parse(argc, argv, 2,
                          {{"segment-size", 0, true},
                           {"chunker", 0, true},
                           {"compression-level", 0, true},
                           {"frame-size", 0, true},
                           {"container-size", 0, true},
                           {"json", 0, false},
                           {"help", 'h', false},
                           {"repo", 'r', true}});
  if (!args.ok()) return ReportError(args.status());
  if (args->Has("help")) {
    std::fputs(kHelp, stdout);
    return kExitOk;
  }
  std::string path;
  if (args->positionals().size() == 1) {
    path = args->positionals()[0];
  } else if (args->positionals().empty() && args->Repo().ok()) {
    path = *args->Repo();
  } else {
    std::fputs(kHelp, stderr);
    return kExitUsage;
  }
  RepoConfig cfg;
  if (auto s = args->Get("segment-size")) {
    auto v = ParseSize(*s);
    if (!v.ok()) return ReportError(v.status());
    cfg.segment_size = static_cast<uint32_t>(*v);
    if (*v > (1ull << 31)) return ReportError(Status::InvalidArgument("segment size too large"));
  }
  if (auto c = args->Get("chunker")) {
    auto k = ParseChunkerKind(*c);
    if (!k.ok()) return ReportError(k.status());
    cfg.chunker.kind = *k;
  }
  if (auto l = args->Get("compression-level")) {
    try {
      cfg.compression_level = std::stoi(*l);
    } catch (...) {
      return ReportError(Status::InvalidArgument("--compression-level must be a number"));
    }
  }
  if (auto f = args->Get("frame-size")) {
    auto v = ParseSize(*f);
    if (!v.ok()) return ReportError(v.status());
    if (*v > (1ull << 31)) return ReportError(Status::InvalidArgument("frame size too large"));
    cfg.frame_size = static_cast<uint32_t>(*v);
  }
  if (auto s = args->Get("container-size")) {
    auto v = ParseSize(*s);
    if (!v.ok()) return ReportError(v.status());
    if (*v < (1u << 20) || *v > (64u << 20))
      return ReportError(Status::InvalidArgument("--container-size must be 1M to 64M, got " + *s));
    cfg.container_capacity = static_cast<uint32_t>(*v);
  }
  auto repo = Repository::Create(path, cfg);
  if (!repo.ok()) return ReportError(repo.status());
  const RepoConfig& c = (*repo)->config();
  if (args->Has("json")) {
    nlohmann::json j = {{"path", path},
                        {"repo_id", c.repo_id},
                        {"format_version", c.format_version},
                        {"segment_size", c.segment_size},
                        {"chunker", ChunkerKindName(c.chunker.kind)},
                        {"compression_level", c.compression_level},
                        {"frame_size", c.frame_size},
                        {"container_capacity", c.container_capacity}};
    PrintJson(j);
  } else {
    std::printf(
        "created repository %s (id %s): %s segments, %s chunking, zstd level %d, %s, "
        "containers of up to %s\n",
        path.c_str(), c.repo_id.c_str(), HumanSize(c.segment_size).c_str(),
        ChunkerKindName(c.chunker.kind), c.compression_level,
        c.frame_size == 0 ? "one frame a block"
                          : ("frames of up to " + HumanSize(c.frame_size)).c_str(),
        HumanSize(c.container_capacity).c_str());
  }
  return kExitOk;
}

}  // namespace vmdedup::cli
