// BuildCds: count, choose, copy, write, publish. docs/cds.md explains the
// phases and their memory bounds; the header is the contract.
#include "engine/cds_builder.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <thread>
#include <tuple>

#include "dirty-bitmap/image_bitmaps.h"
#include "engine/block_scan.h"
#include "engine/chunker.h"
#include "engine/image_source.h"
#include "engine/thread_pool.h"
#include "nbd-client/block_source.h"
#include "nbd-client/raw_file_source.h"
#include "store/cds_area.h"
#include "store/compression.h"
#include "store/container.h"

namespace vmdedup {
namespace {

// Memory of one distinct block while a partition is counted: its entry in
// the partition's list (44 bytes) plus its entry in one VM's list (36 bytes)
// and vector slack, rounded.
constexpr uint64_t kCountBytesPerBlock = 64;
constexpr uint64_t kSeedWindowSegments = 64;  // allocation queried per window
constexpr uint64_t kSeedBatchBytes = 16u << 20;
constexpr uint32_t kMaxReadRequest = 16u << 20;
constexpr uint64_t kIndexEntryBytes = 24;

struct SeedBlock {
  Fingerprint fp;
  uint32_t length = 0;
  uint32_t holders = 0;  // seeds holding it (merged list only)
};

bool ByFp(const BlockPopularity& a, const BlockPopularity& b) {
  return a.fingerprint < b.fingerprint;
}

// Choosing order: holders descending, then fingerprint.
bool ChoiceOrder(const BlockPopularity& a, const BlockPopularity& b) {
  if (a.holders != b.holders) return a.holders > b.holders;
  return a.fingerprint < b.fingerprint;
}

bool IsCandidate(const BlockPopularity& b) { return b.holders >= 2 || b.seed; }

// Linear merge of two lists sorted by fingerprint.
std::vector<BlockPopularity> MergeTwo(const std::vector<BlockPopularity>& a,
                                      const std::vector<BlockPopularity>& b) {
  std::vector<BlockPopularity> out;
  out.reserve(a.size() + b.size());
  size_t i = 0, j = 0;
  while (i < a.size() || j < b.size()) {
    if (j == b.size() || (i < a.size() && a[i].fingerprint < b[j].fingerprint)) {
      out.push_back(a[i++]);
    } else if (i == a.size() || b[j].fingerprint < a[i].fingerprint) {
      out.push_back(b[j++]);
    } else {
      BlockPopularity m = a[i++];
      m.holders += b[j].holders;
      m.seed = m.seed || b[j].seed;
      j++;
      out.push_back(m);
    }
  }
  return out;
}

std::string SizeText(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  uint64_t v = bytes;
  while (u < 4 && v >= 1024 && v % 1024 == 0) {
    v /= 1024;
    u++;
  }
  if (v >= 1024 * 1024) {  // not a round number: one decimal of the largest unit
    double d = static_cast<double>(bytes);
    u = 0;
    while (d >= 1024 && u < 4) {
      d /= 1024;
      u++;
    }
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.1f %s", d, units[u]);
    return buf;
  }
  return std::to_string(v) + " " + units[u];
}

std::string ChunkerText(const ChunkerParams& c) {
  if (c.kind == ChunkerKind::kFixed) return std::string("fixed ") + std::to_string(c.avg_size);
  return std::string(ChunkerKindName(c.kind)) + " " + std::to_string(c.avg_size) + "/" +
         std::to_string(c.min_size) + "/" + std::to_string(c.max_size);
}

Result<std::unique_ptr<BlockSource>> OpenSeed(const std::string& seed) {
  ASSIGN_OR_RETURN(std::optional<ImageSourceSpec> image, ParseImageSource(seed));
  if (image) {
    // A seed has no series to remember its format: raw:PATH or qcow2:PATH.
    ASSIGN_OR_RETURN(const std::string format, ResolveImageFormat(*image, "", "", "seed " + seed));
    RETURN_IF_ERROR(InspectSourceImage(image->path, format, /*backing_chain=*/false).status());
    ImageFileOptions fo;
    fo.path = image->path;
    fo.format = format;
    // As for backups: a raw seed is read directly, qcow2 through qemu-nbd.
    return format == "raw" ? OpenRawFile(image->path) : OpenImageFile(fo);
  }
  if (IsNbdUri(seed)) {
    NbdUriOptions no;
    no.uri = seed;
    return OpenNbdUri(no);
  }
  return Status::InvalidArgument(
      "unknown seed source: use raw:PATH, qcow2:PATH or an NBD URI (nbd://HOST[:PORT]/EXPORT, "
      "nbd+unix:///EXPORT?socket=PATH)");
}

// One non-zero block of a seed, with its bytes when the caller wants them.
struct SeedOut {
  Fingerprint fp;
  uint32_t length = 0;
  std::string data;
};

struct SeedSegment {
  uint64_t offset = 0;
  uint32_t length = 0;
  std::vector<std::pair<uint32_t, uint32_t>> ranges;  // data ranges, relative
  std::vector<uint8_t> buffer;
  std::vector<SeedOut> out;
};

struct SeedWorker {
  Sha256Hasher hasher;
};

// Reads a seed the way a full backup reads a disk: segment by segment at the
// repository's segment size, each data extent (per base:allocation) of a
// segment chunked on its own, holes, zero extents and all-zero blocks
// skipped. Calls `fn` for every non-zero block in disk order; when `want`
// is set, the blocks it accepts come with their bytes.
Status ScanSeed(const std::string& seed, const RepoConfig& cfg, const Chunker& chunker,
                ThreadPool& pool, const std::function<bool(const Fingerprint&)>& want,
                const std::function<Status(SeedOut&)>& fn,
                const std::function<void(uint64_t)>& progress) {
  ASSIGN_OR_RETURN(std::unique_ptr<BlockSource> src, OpenSeed(seed));
  const uint64_t size = src->size();
  const uint64_t seg = cfg.segment_size;
  const uint64_t nseg = (size + seg - 1) / seg;
  const uint64_t batch_segments = std::max<uint64_t>(1, kSeedBatchBytes / seg);
  for (uint64_t w = 0; w < nseg; w += kSeedWindowSegments) {
    uint64_t wbegin = w * seg;
    uint64_t wend = std::min(size, (w + kSeedWindowSegments) * seg);
    std::vector<Extent> alloc;
    Status st = src->Allocation(wbegin, wend - wbegin, &alloc);
    if (!st.ok()) return st.WithContext("read " + src->Describe());
    uint64_t wlast = std::min(nseg, w + kSeedWindowSegments);
    for (uint64_t b = w; b < wlast; b += batch_segments) {
      std::vector<std::unique_ptr<SeedSegment>> segs;
      std::vector<ReadRequest> reqs;
      for (uint64_t s = b; s < std::min(wlast, b + batch_segments); s++) {
        auto job = std::make_unique<SeedSegment>();
        job->offset = s * seg;
        job->length = static_cast<uint32_t>(std::min<uint64_t>(seg, size - job->offset));
        uint64_t end = job->offset + job->length;
        for (const Extent& e : alloc) {
          uint64_t eb = std::max(job->offset, e.offset);
          uint64_t ee = std::min(end, e.offset + e.length);
          if (eb >= ee || (e.flags & (Extent::kHole | Extent::kZero)) != 0) continue;
          job->ranges.push_back(
              {static_cast<uint32_t>(eb - job->offset), static_cast<uint32_t>(ee - job->offset)});
        }
        if (job->ranges.empty()) continue;
        job->buffer.resize(job->length);
        for (const auto& [rb, re] : job->ranges)
          for (uint32_t p = rb; p < re; p += kMaxReadRequest)
            reqs.push_back(
                {job->offset + p, std::min(kMaxReadRequest, re - p), job->buffer.data() + p});
        segs.push_back(std::move(job));
      }
      if (!reqs.empty()) {
        st = src->ReadMany(reqs);
        if (!st.ok()) return st.WithContext("read " + src->Describe());
      }
      for (auto& job : segs) {
        SeedSegment* raw = job.get();
        pool.Submit([raw, &chunker, &want] {
          thread_local SeedWorker ws;
          std::vector<uint32_t> lengths;
          for (const auto& [rb, re] : raw->ranges) {
            std::span<const uint8_t> data(raw->buffer.data() + rb, re - rb);
            lengths.clear();
            chunker.Cut(data, &lengths);
            size_t pos = 0;
            for (uint32_t len : lengths) {
              std::span<const uint8_t> block = data.subspan(pos, len);
              pos += len;
              if (IsAllZero(block)) continue;
              SeedOut o;
              o.fp = ws.hasher.Hash(block);
              o.length = len;
              if (want && want(o.fp)) o.data.assign(block.begin(), block.end());
              raw->out.push_back(std::move(o));
            }
          }
        });
      }
      pool.Wait();
      for (auto& job : segs)
        for (SeedOut& o : job->out) RETURN_IF_ERROR(fn(o));
      if (progress) progress(std::min(size, (b + batch_segments) * seg));
    }
  }
  return Status::OK();
}

// A block chosen for the new version and where its record will come from.
struct Chosen {
  Fingerprint fp;
  uint32_t length = 0;
  bool seed = false;
  enum class Src : uint8_t { kNone, kCds, kOwn } src = Src::kNone;
  uint32_t vm = 0;  // kOwn: index into the counted VMs
  uint64_t container = 0;
  uint32_t offset = 0;
  uint32_t record_len = 0;
  uint32_t index = 0;        // in a frame record
  bool in_unusable = false;  // seen in a missing or quarantined container
};

struct CountedVm {
  std::string name;
  std::vector<uint64_t> recipes;  // live segment recipe ids, sorted, unique
};

class CdsBuild {
 public:
  CdsBuild(Repository& repo, const CdsBuildOptions& o)
      : repo_(repo),
        o_(o),
        cfg_(repo.config()),
        area_(repo.objects()),
        pool_(std::max(1u, o.threads)),
        writer_(0, cfg_.container_capacity) {}

  Result<CdsBuildResult> Run();

 private:
  Status Validate();
  Status ListVms(uint64_t* est_blocks, uint64_t* snapshots);
  Status ReadSeeds();
  Result<std::unique_ptr<VmStore>> OpenCounted(const std::string& name);
  Result<std::vector<BlockPopularity>> CountPartition(unsigned p);
  Status Choose();
  Status Locate();
  Status Copy();
  Status AppendRecord(Chosen& c, const Fingerprint& fp, uint32_t raw_len, Compression comp,
                      std::span<const uint8_t> payload);
  Status Seal();
  void Note(const std::string& line) const {
    if (o_.note) o_.note(line);
  }
  void Progress(uint64_t done, uint64_t total, const char* phase) const {
    if (o_.progress) o_.progress(done, total, phase);
  }
  unsigned PartitionOf(const Fingerprint& fp) const {
    return shift_ >= 8 ? 0u : static_cast<unsigned>(fp.bytes[0] >> shift_);
  }

  Repository& repo_;
  const CdsBuildOptions& o_;
  const RepoConfig& cfg_;
  CdsArea area_;
  ThreadPool pool_;
  std::unique_ptr<Chunker> chunker_;
  CdsBuildResult r_;
  CdsPointer pointer_;
  std::vector<CountedVm> vms_;
  std::vector<SeedBlock> seed_list_;  // merged over seeds, sorted by fingerprint
  unsigned partitions_ = 1;
  unsigned shift_ = 8;
  uint64_t count_done_ = 0, count_total_ = 0;
  std::vector<Chosen> chosen_;  // sorted by fingerprint
  uint64_t limit_ = 0;          // budget in entries or plaintext bytes
  bool limit_entries_ = false;
  ContainerWriter writer_;
  uint32_t next_container_ = 0;
  bool writer_open_ = false;
};

Status CdsBuild::Validate() {
  if (o_.fraction_percent.has_value() == o_.index_budget_bytes.has_value())
    return Status::InvalidArgument(
        "give exactly one budget: a fraction of the unique data (--fraction PERCENT) or the "
        "index memory (--budget SIZE)");
  if (o_.fraction_percent) {
    double f = *o_.fraction_percent;
    if (std::isnan(f) || f <= 0 || f > 100)
      return Status::InvalidArgument(
          "the fraction must be a percentage above 0 and at most 100, got " + std::to_string(f));
  } else {
    uint64_t b = *o_.index_budget_bytes;
    if (b < kIndexEntryBytes)
      return Status::InvalidArgument("the index budget must hold at least one entry (" +
                                     std::to_string(kIndexEntryBytes) + " bytes), got " +
                                     std::to_string(b) + " bytes");
  }
  if (o_.count_memory_budget == 0)
    return Status::InvalidArgument("the count memory budget must not be 0");
  return Status::OK();
}

// A read view: a backup of the VM neither stops nor waits for the build.
// The recipes the build reads were listed when it started; recipes are
// immutable, so every pass counts the same ones.
Result<std::unique_ptr<VmStore>> CdsBuild::OpenCounted(const std::string& name) {
  return repo_.OpenVm(name, Repository::Access::kRead);
}

Status CdsBuild::ListVms(uint64_t* est_blocks, uint64_t* snapshots) {
  ASSIGN_OR_RETURN(std::vector<std::string> names, repo_.ListVms());
  if (!o_.vms.empty()) {
    for (const std::string& want : o_.vms) {
      if (std::find(names.begin(), names.end(), want) == names.end())
        return Status::NotFound("VM '" + want + "' is not in the repository " + repo_.path() +
                                " (see 'vmdedup snapshots')");
    }
    names = o_.vms;
    std::sort(names.begin(), names.end());
    names.erase(std::unique(names.begin(), names.end()), names.end());
  }
  uint64_t own = 0, cds_refs = 0;
  for (const std::string& name : names) {
    ASSIGN_OR_RETURN(std::unique_ptr<VmStore> vm, OpenCounted(name));
    ASSIGN_OR_RETURN(std::vector<SnapshotRecord> snaps, vm->ListSnapshots());
    CountedVm c;
    c.name = name;
    for (const SnapshotRecord& s : snaps) {
      ASSIGN_OR_RETURN(std::vector<uint64_t> ids, vm->GetSnapshotSegments(s.disk, s.seq));
      for (uint64_t id : ids)
        if (id != 0) c.recipes.push_back(id);
      own += s.stats.new_blocks;
      cds_refs += (s.stats.cds + cfg_.chunker.avg_size - 1) / cfg_.chunker.avg_size;
    }
    std::sort(c.recipes.begin(), c.recipes.end());
    c.recipes.erase(std::unique(c.recipes.begin(), c.recipes.end()), c.recipes.end());
    *snapshots += snaps.size();
    if (snaps.empty()) continue;
    vms_.push_back(std::move(c));
  }
  // CDS references are distinct blocks of the published versions at most.
  // The cap applies only when every manifest is read: an unreadable one must
  // not make the estimate too small (`vmdedup check` reports the damage).
  uint64_t published_blocks = 0;
  bool all_read = true;
  for (uint64_t v : pointer_.published) {
    auto m = area_.ReadManifest(v);
    if (!m.ok()) {
      all_read = false;
      break;
    }
    published_blocks += m->block_count;
  }
  if (!pointer_.published.empty() && all_read) cds_refs = std::min(cds_refs, published_blocks);
  *est_blocks = own + cds_refs;
  r_.vms_counted = vms_.size();
  return Status::OK();
}

Status CdsBuild::ReadSeeds() {
  uint64_t total = 0;
  // Every seed must open before any is read (and long before anything is
  // written): a bad one fails the build at once, naming it.
  for (const std::string& seed : o_.seeds) {
    auto src = OpenSeed(seed);
    if (!src.ok()) return src.status().WithContext("seed '" + seed + "'");
    total += (*src)->size();
  }
  uint64_t base = 0;
  for (const std::string& seed : o_.seeds) {
    uint64_t seed_size = 0;
    std::vector<SeedBlock> mine;
    Status st = ScanSeed(
        seed, cfg_, *chunker_, pool_, nullptr,
        [&](SeedOut& b) {
          mine.push_back({b.fp, b.length, 1});
          return Status::OK();
        },
        [&](uint64_t done) {
          seed_size = done;
          Progress(base + done, total, "seed");
        });
    if (!st.ok()) return st.WithContext("seed '" + seed + "'");
    std::sort(mine.begin(), mine.end(),
              [](const SeedBlock& a, const SeedBlock& b) { return a.fp < b.fp; });
    mine.erase(std::unique(mine.begin(), mine.end(),
                           [](const SeedBlock& a, const SeedBlock& b) { return a.fp == b.fp; }),
               mine.end());
    std::vector<SeedBlock> merged;
    merged.reserve(seed_list_.size() + mine.size());
    size_t i = 0, j = 0;
    while (i < seed_list_.size() || j < mine.size()) {
      if (j == mine.size() || (i < seed_list_.size() && seed_list_[i].fp < mine[j].fp)) {
        merged.push_back(seed_list_[i++]);
      } else if (i == seed_list_.size() || mine[j].fp < seed_list_[i].fp) {
        merged.push_back(mine[j++]);
      } else {
        SeedBlock m = seed_list_[i++];
        m.holders++;
        j++;
        merged.push_back(m);
      }
    }
    seed_list_ = std::move(merged);
    Note("seed " + seed + ": " + std::to_string(mine.size()) + " distinct non-zero blocks");
    base += seed_size;
  }
  r_.seed_blocks = seed_list_.size();
  return Status::OK();
}

Result<std::vector<BlockPopularity>> CdsBuild::CountPartition(unsigned p) {
  std::vector<BlockPopularity> acc;
  std::vector<BlockPopularity> mine;
  for (const CountedVm& c : vms_) {
    ASSIGN_OR_RETURN(std::unique_ptr<VmStore> vm, OpenCounted(c.name));
    mine.clear();
    for (uint64_t id : c.recipes) {
      ASSIGN_OR_RETURN(SegmentRecipe recipe, vm->GetSegmentRecipe(id));
      for (const BlockRef& b : recipe.blocks) {
        if (b.kind == BlockKind::kZero || PartitionOf(b.fingerprint) != p) continue;
        BlockPopularity e;
        e.fingerprint = b.fingerprint;
        e.length = b.length;
        e.holders = 1;
        mine.push_back(e);
      }
    }
    vm.reset();
    std::sort(mine.begin(), mine.end(), ByFp);
    mine.erase(std::unique(mine.begin(), mine.end(),
                           [](const BlockPopularity& a, const BlockPopularity& b) {
                             return a.fingerprint == b.fingerprint;
                           }),
               mine.end());
    acc = MergeTwo(acc, mine);
    Progress(++count_done_, count_total_, "count");
  }
  mine.clear();
  for (const SeedBlock& s : seed_list_) {
    if (PartitionOf(s.fp) != p) continue;
    BlockPopularity e;
    e.fingerprint = s.fp;
    e.length = s.length;
    e.holders = s.holders;
    e.seed = true;
    mine.push_back(e);
  }
  return MergeTwo(acc, mine);
}

Status CdsBuild::Choose() {
  // Round 1: count every partition; keep the candidates while they fit in
  // half the count budget (else only their histogram by holders).
  const uint64_t keep_limit =
      std::max<uint64_t>(1, o_.count_memory_budget / 2 / sizeof(BlockPopularity));
  std::map<uint32_t, std::pair<uint64_t, uint64_t>, std::greater<>> hist;  // count, bytes
  std::vector<BlockPopularity> kept;
  bool spilled = false;
  for (unsigned p = 0; p < partitions_; p++) {
    ASSIGN_OR_RETURN(std::vector<BlockPopularity> part, CountPartition(p));
    for (const BlockPopularity& e : part) {
      r_.unique_blocks++;
      r_.unique_bytes += e.length;
      if (!IsCandidate(e)) continue;
      r_.candidates++;
      auto& h = hist[e.holders];
      h.first++;
      h.second += e.length;
      if (!spilled) kept.push_back(e);
    }
    if (!spilled && limit_entries_ && kept.size() > 2 * limit_) {
      // The entry budget is known: only the best `limit_` can be chosen.
      std::sort(kept.begin(), kept.end(), ChoiceOrder);
      kept.resize(limit_);
    }
    if (!spilled && kept.size() > keep_limit) {
      spilled = true;
      kept.clear();
      kept.shrink_to_fit();
    }
  }
  if (r_.unique_blocks == 0)
    return Status::InvalidArgument(
        "nothing to count: the snapshots and seeds hold no non-zero block");
  if (!limit_entries_) {
    double f = *o_.fraction_percent / 100.0;
    limit_ = static_cast<uint64_t>(std::floor(f * static_cast<double>(r_.unique_bytes)));
  }
  uint64_t all_cost = 0;
  for (const auto& [h, cb] : hist) all_cost += limit_entries_ ? cb.first : cb.second;
  const std::string budget_text = limit_entries_
                                      ? std::to_string(limit_) + " entries"
                                      : SizeText(limit_) + " of " + SizeText(r_.unique_bytes);
  if (r_.candidates == 0) {
    Note("no block is held by two VMs or by a seed: the new version is empty");
    return Status::OK();
  }
  if (all_cost <= limit_)
    Note("the budget (" + budget_text + ") holds all " + std::to_string(r_.candidates) +
         " candidates: all of them are taken");

  auto cost = [&](const BlockPopularity& e) -> uint64_t { return limit_entries_ ? 1 : e.length; };
  std::vector<BlockPopularity> take;
  if (!spilled) {
    std::sort(kept.begin(), kept.end(), ChoiceOrder);
    uint64_t used = 0;
    for (const BlockPopularity& e : kept) {
      if (used + cost(e) > limit_) break;
      used += cost(e);
      take.push_back(e);
    }
  } else {
    // Round 2: the histogram gives the holders threshold; count again and
    // take every candidate above it and, in fingerprint order (the order of
    // the passes), those at it while they fit.
    uint64_t remaining = limit_;
    uint32_t threshold = 0;
    for (const auto& [h, cb] : hist) {
      uint64_t c = limit_entries_ ? cb.first : cb.second;
      if (c > remaining) {
        threshold = h;
        break;
      }
      remaining -= c;
    }
    Note("the candidates exceed the memory budget: counting again to take those above " +
         std::to_string(threshold) + " holders");
    count_done_ = 0;
    bool full = false;
    for (unsigned p = 0; p < partitions_; p++) {
      ASSIGN_OR_RETURN(std::vector<BlockPopularity> part, CountPartition(p));
      for (const BlockPopularity& e : part) {
        if (!IsCandidate(e)) continue;
        if (e.holders > threshold) {
          take.push_back(e);
        } else if (e.holders == threshold && !full) {
          if (cost(e) > remaining) {
            full = true;
            continue;
          }
          remaining -= cost(e);
          take.push_back(e);
        }
      }
    }
  }
  if (take.empty())
    return Status::InvalidArgument("the budget (" + budget_text +
                                   ") is smaller than the most popular block; choose a larger "
                                   "fraction or budget");
  std::sort(take.begin(), take.end(), ByFp);
  chosen_.reserve(take.size());
  for (const BlockPopularity& e : take) {
    Chosen c;
    c.fp = e.fingerprint;
    c.length = e.length;
    c.seed = e.seed;
    chosen_.push_back(c);
  }
  return Status::OK();
}

Status CdsBuild::Locate() {
  auto find = [&](const Fingerprint& fp) -> Chosen* {
    auto it = std::lower_bound(chosen_.begin(), chosen_.end(), fp,
                               [](const Chosen& c, const Fingerprint& f) { return c.fp < f; });
    return it != chosen_.end() && it->fp == fp ? &*it : nullptr;
  };
  // Records are never copied from, nor left in, a container that is missing
  // or quarantined (docs/format.md, "Quarantine").
  std::set<uint64_t> unusable_cds;
  {
    std::vector<uint64_t> containers;
    for (uint64_t v : pointer_.published) {
      auto info = area_.ReadManifest(v);
      if (info.ok())
        containers.insert(containers.end(), info->containers.begin(), info->containers.end());
    }
    ASSIGN_OR_RETURN(unusable_cds, area_.UnusableContainers(containers));
  }
  // The version in force first: its blocks stay where they are.
  if (pointer_.current != 0) {
    ASSIGN_OR_RETURN(CdsVersionInfo info, area_.ReadManifest(pointer_.current));
    std::vector<CdsEntry> entries;
    for (uint32_t part = 0; part < info.index_parts; part++) {
      RETURN_IF_ERROR(area_.ReadIndexPart(pointer_.current, part, &entries));
      for (const CdsEntry& e : entries) {
        Chosen* c = find(e.fingerprint);
        if (!c || c->length != e.length) continue;
        if (unusable_cds.count(e.container)) {
          c->in_unusable = true;
          continue;
        }
        c->src = Chosen::Src::kCds;
        c->container = e.container;
        c->offset = e.offset;
        c->record_len = e.record_len;
        c->index = 0;
      }
    }
  }
  // Then the recipes: a CDS reference (of an older version) is taken as it
  // is; else an own block is copied.
  uint64_t done = 0;
  for (uint32_t i = 0; i < vms_.size(); i++) {
    ASSIGN_OR_RETURN(std::unique_ptr<VmStore> vm, OpenCounted(vms_[i].name));
    ASSIGN_OR_RETURN(std::set<uint64_t> unusable_own, vm->UnusableContainers());
    for (uint64_t id : vms_[i].recipes) {
      ASSIGN_OR_RETURN(SegmentRecipe recipe, vm->GetSegmentRecipe(id));
      for (const BlockRef& b : recipe.blocks) {
        if (b.kind == BlockKind::kZero) continue;
        Chosen* c = find(b.fingerprint);
        if (!c || c->src == Chosen::Src::kCds || c->length != b.length) continue;
        if ((b.kind == BlockKind::kCds ? unusable_cds : unusable_own).count(b.container)) {
          c->in_unusable = true;
          continue;
        }
        if (b.kind == BlockKind::kCds) {
          c->src = Chosen::Src::kCds;
        } else if (c->src == Chosen::Src::kNone) {
          c->src = Chosen::Src::kOwn;
          c->vm = i;
        } else {
          continue;
        }
        c->container = b.container;
        c->offset = b.offset;
        c->record_len = b.record_len;
        c->index = b.index;
      }
    }
    Progress(++done, vms_.size(), "locate");
  }
  for (const Chosen& c : chosen_)
    if (c.src == Chosen::Src::kNone && !c.seed && !c.in_unusable)
      return Status::Corruption("block " + c.fp.Hex() +
                                " was counted but no recipe holds it any more");
  // A chosen block that only unusable containers hold (and no seed) cannot
  // be copied: it is left out of the version.
  const size_t before = chosen_.size();
  chosen_.erase(
      std::remove_if(chosen_.begin(), chosen_.end(),
                     [](const Chosen& c) { return c.src == Chosen::Src::kNone && !c.seed; }),
      chosen_.end());
  if (chosen_.size() != before)
    Note(std::to_string(before - chosen_.size()) +
         " chosen block(s) are held only in missing, damaged or quarantined containers: left out "
         "of the new version (run 'vmdedup check')");
  return Status::OK();
}

Status CdsBuild::Seal() {
  if (!writer_open_ || writer_.empty()) return Status::OK();
  std::string name = CdsArea::ContainerObjectName(writer_.id());
  std::string_view bytes = writer_.FinishInPlace();
  Status st =
      repo_.objects()->PutNew(name, {reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()});
  writer_open_ = false;
  if (!st.ok()) return st.WithContext("store CDS container " + name);
  return Status::OK();
}

Status CdsBuild::AppendRecord(Chosen& c, const Fingerprint& fp, uint32_t raw_len, Compression comp,
                              std::span<const uint8_t> payload) {
  if (writer_open_ && !writer_.Fits(payload.size())) RETURN_IF_ERROR(Seal());
  if (!writer_open_) {
    if (next_container_ >= (1u << 20))
      return Status::InvalidArgument("a CDS version cannot hold more than 2^20 containers");
    writer_.Reset(CdsArea::ContainerId(r_.version, next_container_++));
    writer_open_ = true;
    if (!writer_.Fits(payload.size()))
      return Status::InvalidArgument("a block record does not fit in an empty container");
  }
  BlockRecordInfo info = writer_.Append(fp, raw_len, comp, payload);
  c.src = Chosen::Src::kCds;
  c.container = writer_.id();
  c.offset = info.offset;
  c.record_len = info.record_len;
  c.index = 0;
  r_.copied_blocks++;
  r_.copied_stored_bytes += info.record_len;
  return Status::OK();
}

Status CdsBuild::Copy() {
  // Own blocks, read in container order and verified. A block record is
  // copied as it is; a block of a frame record is compressed alone, since
  // CDS containers hold block records only.
  std::vector<Chosen*> own;
  uint64_t seed_only = 0;
  for (Chosen& c : chosen_) {
    if (c.src == Chosen::Src::kOwn) own.push_back(&c);
    if (c.src == Chosen::Src::kNone) seed_only++;
  }
  std::sort(own.begin(), own.end(), [](const Chosen* a, const Chosen* b) {
    return std::tie(a->vm, a->container, a->offset, a->index) <
           std::tie(b->vm, b->container, b->offset, b->index);
  });
  const uint64_t total = own.size() + seed_only;
  uint64_t done = 0;
  Compressor compressor(cfg_.compression_level);
  std::string record, plain, payload;
  RecordView view;
  // The record `view` and `plain` hold: VM, container, offset, length.
  std::optional<std::tuple<uint32_t, uint64_t, uint32_t, uint32_t>> decoded;
  for (Chosen* c : own) {
    BlockRef ref;
    ref.kind = BlockKind::kOwn;
    ref.container = c->container;
    std::string object = BlockObjectName(vms_[c->vm].name, ref);
    std::string what = object + " at offset " + std::to_string(c->offset);
    const auto key = std::make_tuple(c->vm, c->container, c->offset, c->record_len);
    if (decoded != key) {
      decoded.reset();
      Status st = repo_.objects()->GetRange(object, c->offset, c->record_len, &record);
      if (!st.ok())
        return st.WithContext("read block " + c->fp.Hex() + " of VM '" + vms_[c->vm].name + "'");
      RETURN_IF_ERROR(RecordView::Parse(record, what, &view));
      plain.resize(view.raw_len());
      RETURN_IF_ERROR(
          view.DecodePrefix({reinterpret_cast<uint8_t*>(plain.data()), plain.size()}, what));
      decoded = key;
    }
    ASSIGN_OR_RETURN(RecordView::Block blk, view.Find(c->index, &c->fp, c->length, what));
    std::span<const uint8_t> block(
        reinterpret_cast<const uint8_t*>(plain.data()) + blk.plain_offset, blk.raw_len);
    if (Sha256(block) != c->fp)
      return Status::Corruption(what + ": the block's content does not match its fingerprint " +
                                c->fp.Hex());
    if (!view.is_frame()) {
      std::span<const uint8_t> stored(
          reinterpret_cast<const uint8_t*>(record.data()) + kBlockRecordHeaderSize,
          record.size() - kBlockRecordHeaderSize);
      RETURN_IF_ERROR(AppendRecord(*c, c->fp, blk.raw_len, view.compression(), stored));
    } else {
      Compression comp = compressor.Compress(block, &payload);
      RETURN_IF_ERROR(
          AppendRecord(*c, c->fp, blk.raw_len, comp,
                       {reinterpret_cast<const uint8_t*>(payload.data()), payload.size()}));
    }
    Progress(++done, total, "copy");
  }
  if (seed_only == 0) return Status::OK();
  // Seed-only blocks: read the seeds once more and compress them afresh.
  auto find = [&](const Fingerprint& fp) -> Chosen* {
    auto it = std::lower_bound(chosen_.begin(), chosen_.end(), fp,
                               [](const Chosen& c, const Fingerprint& f) { return c.fp < f; });
    return it != chosen_.end() && it->fp == fp ? &*it : nullptr;
  };
  auto want = [&](const Fingerprint& fp) {
    const Chosen* c = find(fp);
    return c != nullptr && c->src == Chosen::Src::kNone;
  };
  for (const std::string& seed : o_.seeds) {
    Status st = ScanSeed(
        seed, cfg_, *chunker_, pool_, want,
        [&](SeedOut& b) -> Status {
          Chosen* c = find(b.fp);
          if (!c || c->src != Chosen::Src::kNone || b.data.size() != c->length) return Status::OK();
          std::span<const uint8_t> data(reinterpret_cast<const uint8_t*>(b.data.data()),
                                        b.data.size());
          Compression comp = compressor.Compress(data, &payload);
          RETURN_IF_ERROR(
              AppendRecord(*c, b.fp, c->length, comp,
                           {reinterpret_cast<const uint8_t*>(payload.data()), payload.size()}));
          Progress(++done, total, "copy");
          return Status::OK();
        },
        nullptr);
    if (!st.ok()) return st.WithContext("seed '" + seed + "'");
  }
  for (const Chosen& c : chosen_)
    if (c.src == Chosen::Src::kNone)
      return Status::Aborted("block " + c.fp.Hex() +
                             " of the seeds was not found when they were read again: a seed "
                             "changed during the build");
  return Status::OK();
}

Result<CdsBuildResult> CdsBuild::Run() {
  auto start = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(Validate());
  if (o_.index_budget_bytes) {
    limit_entries_ = true;
    limit_ = *o_.index_budget_bytes / kIndexEntryBytes;
  }
  ASSIGN_OR_RETURN(chunker_, NewChunker(cfg_.chunker));
  ASSIGN_OR_RETURN(std::unique_ptr<RepoLock> lock, repo_.LockCds());
  ASSIGN_OR_RETURN(pointer_, area_.ReadPointer());
  r_.previous_version = pointer_.current;

  uint64_t est = 0, snapshots = 0;
  RETURN_IF_ERROR(ListVms(&est, &snapshots));
  if (snapshots == 0 && o_.seeds.empty()) {
    std::string why = "repository " + repo_.path() + " has no snapshot";
    return Status::InvalidArgument("nothing to count: " + why +
                                   " and no seed was given (back up VMs first, or --seed)");
  }
  RETURN_IF_ERROR(ReadSeeds());
  est += seed_list_.size();

  // Partitions: the smallest power of two whose share of the estimate fits.
  unsigned bits = 0;
  while (bits < 8 && (est >> bits) * kCountBytesPerBlock > o_.count_memory_budget) bits++;
  partitions_ = 1u << bits;
  shift_ = 8 - bits;
  r_.passes = partitions_;
  if ((est >> bits) * kCountBytesPerBlock > o_.count_memory_budget)
    Note("about " + std::to_string(est) +
         " distinct blocks need more than the count memory "
         "budget even in 256 passes");
  Note("counting " + std::to_string(vms_.size()) + " VMs and " + std::to_string(o_.seeds.size()) +
       " seeds in " + std::to_string(partitions_) + (partitions_ == 1 ? " pass" : " passes") +
       " (about " + std::to_string(est) + " blocks)");
  count_total_ = static_cast<uint64_t>(partitions_) * vms_.size();
  RETURN_IF_ERROR(Choose());
  RETURN_IF_ERROR(Locate());

  ASSIGN_OR_RETURN(r_.version, area_.NextVersion());
  RETURN_IF_ERROR(Copy());
  RETURN_IF_ERROR(Seal());

  std::vector<CdsEntry> entries;
  entries.reserve(chosen_.size());
  for (const Chosen& c : chosen_) {
    CdsEntry e;
    e.fingerprint = c.fp;
    e.length = c.length;
    e.container = c.container;
    e.offset = c.offset;
    e.record_len = c.record_len;
    entries.push_back(e);
  }
  CdsVersionInfo info;
  info.version = r_.version;
  info.created = std::chrono::duration_cast<std::chrono::seconds>(
                     std::chrono::system_clock::now().time_since_epoch())
                     .count();
  info.chunker = ChunkerText(cfg_.chunker);
  if (o_.fraction_percent) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "fraction %g%%", *o_.fraction_percent);
    info.selection = buf;
  } else {
    info.selection = "index budget " + SizeText(*o_.index_budget_bytes);
  }
  info.seeds = o_.seeds;
  Progress(0, 1, "write");
  RETURN_IF_ERROR(area_.WriteVersion(&info, entries));
  RETURN_IF_ERROR(area_.Publish(r_.version));
  Progress(1, 1, "write");

  r_.blocks = info.block_count;
  r_.raw_bytes = info.raw_bytes;
  r_.stored_bytes = info.stored_bytes;
  r_.index_memory = r_.blocks * kIndexEntryBytes + (r_.blocks + 15) / 16 * 4 +
                    info.containers.size() * sizeof(uint64_t);
  r_.duration_ms = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                             std::chrono::steady_clock::now() - start)
                                             .count());
  return r_;
}

}  // namespace

std::vector<BlockPopularity> MergePopularity(
    const std::vector<std::vector<BlockPopularity>>& parts) {
  std::vector<BlockPopularity> all;
  size_t n = 0;
  for (const auto& p : parts) n += p.size();
  all.reserve(n);
  for (const auto& p : parts) all.insert(all.end(), p.begin(), p.end());
  std::stable_sort(all.begin(), all.end(), ByFp);
  std::vector<BlockPopularity> out;
  for (const BlockPopularity& e : all) {
    if (!out.empty() && out.back().fingerprint == e.fingerprint) {
      out.back().holders += e.holders;
      out.back().seed = out.back().seed || e.seed;
      if (out.back().length == 0) out.back().length = e.length;
    } else {
      out.push_back(e);
    }
  }
  return out;
}

Result<CdsBuildResult> BuildCds(Repository& repo, const CdsBuildOptions& options) {
  CdsBuild build(repo, options);
  return build.Run();
}

}  // namespace vmdedup
