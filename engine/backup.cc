#include "engine/backup.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <deque>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include "base/encoding.h"
#include "base/fingerprint.h"
#include "engine/block_scan.h"
#include "engine/chunker.h"
#include "engine/container_sealer.h"
#include "engine/thread_pool.h"
#include "store/cds_area.h"
#include "store/compression.h"
#include "store/container.h"

namespace vmdedup {
namespace {

constexpr uint64_t kWindowSegments = 64;        // extents are queried per window
constexpr size_t kReadBatchBytes = 8u << 20;    // reads issued together
constexpr size_t kMaxPendingRecipes = 512;      // recipes waiting for a container seal
constexpr uint64_t kContainerIdsReserved = 16;  // container ids reserved at a time
// In-run index of the new blocks stored so far (64 bytes an entry, 4 or 8 more
// in its hash table).
constexpr size_t kMaxRunIndexEntries = 512u << 10;

enum class Level { kZero, kSegment, kBlock, kCds, kNew };

// Bytes written back to back into storage allocated once, uninitialised, and
// reused from job to job (fresh pages cost a page fault each).
struct Arena {
  std::unique_ptr<uint8_t[]> data;
  size_t capacity = 0;
  size_t size = 0;
  // Empties the arena and makes room for at least `n` bytes.
  void Reset(size_t n) {
    if (n > capacity) {
      data = std::make_unique_for_overwrite<uint8_t[]>(n);
      capacity = n;
    }
    size = 0;
  }
  std::span<uint8_t> free_space() { return {data.get() + size, capacity - size}; }
};

// One entry of a segment's new recipe, in offset order.
struct Piece {
  BlockRef ref;
  Level level = Level::kZero;
  // kBlock only: a block an earlier piece of this run stores; Commit takes
  // its location from the run index.
  bool in_run = false;
  // kNew only: where the block lies in the job's read buffer.
  uint32_t data_offset = 0;
};

// New blocks of one segment stored as one record: a block record (one
// block) or a frame record (several, compressed together).
struct Frame {
  uint32_t first = 0;  // index in `members` of the job
  uint32_t count = 0;
  Compression compression = Compression::kNone;
  bool in_buffer = false;  // the payload is in the read buffer, else in `compressed`
  uint32_t payload_offset = 0;
  uint32_t payload_len = 0;
};

// The new blocks one run has stored (level 2 across segments), shared by the
// workers and the committing thread. A worker that decides to store a block
// claims its fingerprint with its segment's index; a later block with that
// fingerprint (in that segment or a later one) is then referenced instead,
// and Commit, which runs in segment order, finds where the claimed block went.
// When a later segment's worker got to a fingerprint first, the earlier
// segment takes the claim over and the later one is marked: its Commit
// drops the block from its frames (TakeOverridden), so the earliest
// occurrence is the one stored, as if the segments had been processed in
// order. Nothing is ever referenced before it is stored. Thread-safe; bounded
// to `max_entries` fingerprints (then nothing new is claimed).
class RunIndex {
 public:
  explicit RunIndex(size_t max_entries) : max_entries_(max_entries) {
    // Virtual only: pages are touched (and counted) as entries are added.
    entries_.reserve(max_entries_);
    slots_.assign(kInitialSlots, kEmpty);
  }
  // True: a block with this fingerprint is stored by segment `job` or an
  // earlier one (reference it). False: the caller stores it (and claims it
  // when there is room).
  bool ClaimOrFind(const Fingerprint& fp, uint64_t job) {
    std::lock_guard<std::mutex> lock(mu_);
    uint32_t* slot = Slot(fp);
    if (*slot == kEmpty) {
      if (entries_.size() < max_entries_) {
        *slot = static_cast<uint32_t>(entries_.size());
        entries_.push_back(Entry{.fingerprint = fp, .job = job});
        if (entries_.size() * 2 > slots_.size()) Grow();
      }
      return false;
    }
    Entry& e = entries_[*slot];
    if (e.job <= job) return true;
    overridden_.insert(e.job);  // a later segment got here first
    e.job = job;
    return false;
  }
  // The segment (by index) of the earliest claim on `fp`; UINT64_MAX: none.
  uint64_t Claimant(const Fingerprint& fp) {
    std::lock_guard<std::mutex> lock(mu_);
    const uint32_t* slot = Slot(fp);
    return *slot == kEmpty ? UINT64_MAX : entries_[*slot].job;
  }
  // True (once) when an earlier segment took over a claim of segment `job`.
  bool TakeOverridden(uint64_t job) {
    std::lock_guard<std::mutex> lock(mu_);
    return overridden_.erase(job) > 0;
  }
  // Where the block went; the first stored copy wins.
  void SetLocation(const BlockRef& where) {
    std::lock_guard<std::mutex> lock(mu_);
    const uint32_t* slot = Slot(where.fingerprint);
    if (*slot == kEmpty || entries_[*slot].located) return;
    Entry& e = entries_[*slot];
    e.located = true;
    e.length = where.length;
    e.container = where.container;
    e.offset = where.offset;
    e.record_len = where.record_len;
    e.index = static_cast<uint16_t>(where.index);
  }
  std::optional<BlockRef> Location(const Fingerprint& fp) {
    std::lock_guard<std::mutex> lock(mu_);
    const uint32_t* slot = Slot(fp);
    if (*slot == kEmpty || !entries_[*slot].located) return std::nullopt;
    const Entry& e = entries_[*slot];
    BlockRef r;
    r.kind = BlockKind::kOwn;
    r.fingerprint = fp;
    r.length = e.length;
    r.container = e.container;
    r.offset = e.offset;
    r.record_len = e.record_len;
    r.index = e.index;
    return r;
  }

 private:
  struct Entry {  // 64 bytes
    Fingerprint fingerprint;
    uint64_t job = 0;
    uint64_t container = 0;
    uint32_t offset = 0;
    uint32_t record_len = 0;
    uint32_t length = 0;
    uint16_t index = 0;
    bool located = false;
  };
  static constexpr uint32_t kEmpty = UINT32_MAX;
  static constexpr size_t kInitialSlots = 1u << 14;

  // The slot holding `fp`, or the empty slot where it would go (linear
  // probing in a power-of-two table at most half full). Called with mu_ held.
  uint32_t* Slot(const Fingerprint& fp) {
    const size_t mask = slots_.size() - 1;
    for (size_t i = fp.Prefix64() & mask;; i = (i + 1) & mask)
      if (slots_[i] == kEmpty || entries_[slots_[i]].fingerprint == fp) return &slots_[i];
  }
  void Grow() {
    slots_.assign(slots_.size() * 2, kEmpty);
    for (uint32_t i = 0; i < entries_.size(); i++) *Slot(entries_[i].fingerprint) = i;
  }

  const size_t max_entries_;
  std::mutex mu_;
  std::vector<Entry> entries_;  // in claim order; slots_ index them
  std::vector<uint32_t> slots_;
  std::unordered_set<uint64_t> overridden_;
};

// What a segment job must do, in offset order: keep a parent block, record a
// zero range, or chunk a range of data read into the buffer.
struct Item {
  enum Kind { kKept, kZeroRange, kDataRange } kind;
  BlockRef kept;
  uint32_t begin = 0;
  uint32_t end = 0;
};

struct SegmentJob {
  uint64_t index = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
  bool reuse = false;  // level 1: the whole parent recipe
  uint64_t reuse_id = 0;
  uint64_t reuse_zero_bytes = 0;  // of a reused segment, holes per allocation
  std::optional<SegmentRecipe> parent;
  std::vector<Item> items;
  std::vector<uint8_t> buffer;
  uint64_t read_bytes = 0;
  std::vector<Piece> pieces;
  std::vector<uint32_t> members;  // indexes in `pieces` of the new blocks, frame by frame
  std::vector<Frame> frames;
  // The payloads of the job's frames that are not in the read buffer as they
  // are, back to back; workers compress straight into it. Each is at most
  // its blocks' size, so read_bytes bounds the whole.
  Arena compressed;
  Status status;  // what Process returned; set before `done`
  bool submitted = false;
  std::promise<void> done;
  std::future<void> future = done.get_future();
};

bool SameRef(const BlockRef& a, const BlockRef& b) {
  if (a.kind != b.kind || a.length != b.length) return false;
  if (a.kind == BlockKind::kZero) return true;
  return a.fingerprint == b.fingerprint && a.container == b.container && a.offset == b.offset &&
         a.record_len == b.record_len && a.index == b.index;
}

bool SameBlocks(const std::vector<BlockRef>& a, const std::vector<BlockRef>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); i++)
    if (!SameRef(a[i], b[i])) return false;
  return true;
}

// Extents clipped to [begin, end), relative to `base`.
std::vector<Extent> Slice(const std::vector<Extent>& extents, uint64_t begin, uint64_t end) {
  std::vector<Extent> out;
  auto it = std::upper_bound(extents.begin(), extents.end(), begin,
                             [](uint64_t v, const Extent& e) { return v < e.offset + e.length; });
  for (; it != extents.end() && it->offset < end; ++it) {
    uint64_t b = std::max(begin, it->offset);
    uint64_t e = std::min(end, it->offset + it->length);
    if (b < e) out.push_back({b, e - b, it->flags});
  }
  return out;
}

bool IsZeroExtent(const Extent& e) { return (e.flags & (Extent::kHole | Extent::kZero)) != 0; }

struct WorkerState {
  Sha256Hasher hasher;
  std::unique_ptr<Compressor> compressor;
  int level = 0;                // 0 is no zstd level vmdedup accepts: "not set up yet"
  std::vector<uint8_t> gather;  // a frame's blocks, when not adjacent in the buffer
  void SetUp(int compression_level) {
    if (level == compression_level) return;
    compressor = std::make_unique<Compressor>(compression_level);
    level = compression_level;
  }
};

class BackupRun {
 public:
  BackupRun(Repository& repo, VmStore& vm, const BackupRequest& req)
      : repo_(repo),
        vm_(vm),
        req_(req),
        cfg_(repo.config()),
        writer_(0, cfg_.container_capacity),
        run_index_(kMaxRunIndexEntries),
        sealer_(repo.objects(), vm.meta(), vm.vm()),
        pool_(std::max(1u, req.threads)) {}

  Result<SnapshotRecord> Run();

 private:
  Status Prepare();
  Status FindUnusableReferences();
  Status PlanSegment(SegmentJob& job, const std::vector<Extent>& alloc,
                     const std::vector<Extent>* dirty);
  void Dispatch(SegmentJob* job);
  Status Process(SegmentJob& job);
  void MakeFrames(SegmentJob& job, WorkerState& ws);
  Status Commit(SegmentJob& job);
  Status FlushReads();
  Status AppendFrame(SegmentJob& job, const Frame& f);
  Status Seal();
  void Report();

  Repository& repo_;
  VmStore& vm_;
  const BackupRequest& req_;
  const RepoConfig& cfg_;
  std::unique_ptr<Chunker> chunker_;
  EmptyCommonBlockIndex no_cds_;
  const CommonBlockIndex* cds_ = nullptr;

  SnapshotRecord snap_;
  std::vector<uint64_t> parent_segments_;
  bool parent_compatible_ = false;  // same size and geometry: levels 1 and kept blocks
  // Containers the snapshot must not reference: the VM's (quarantined, or
  // missing or of the wrong size) and the CDS's (quarantined or missing);
  // and the parent's segments that reference one, which are read again.
  std::set<uint64_t> unusable_own_, unusable_cds_;
  std::set<uint64_t> reread_segments_;
  bool cds_unusable_all_ = false;  // the CDS area cannot be read: no CDS block is used
  std::vector<uint64_t> segments_;

  ContainerWriter writer_;
  bool writer_has_id_ = false;
  uint64_t next_container_id_ = 0;  // [next, end): reserved ids not used yet
  uint64_t reserved_ids_end_ = 0;
  uint64_t next_segment_id_ = 1;
  WriteBatch pending_;
  size_t pending_recipes_ = 0;
  RunIndex run_index_;
  // Stores sealed containers, then their metadata, while the run goes on.
  ContainerSealer sealer_;
  WorkerState committer_;                 // the main thread's, for frames made again in Commit
  std::vector<FrameBlock> frame_blocks_;  // AppendFrame's table, reused

  std::deque<std::unique_ptr<SegmentJob>> queue_;
  // Recycled read buffers and compression arenas (main thread only): fresh
  // 2 MiB allocations would be page-faulted in again for every segment.
  std::vector<std::vector<uint8_t>> free_buffers_;
  std::vector<Arena> free_arenas_;
  std::vector<SegmentJob*> read_batch_;
  size_t read_batch_bytes_ = 0;
  ThreadPool pool_;
  BackupProgress progress_;
  std::chrono::steady_clock::time_point last_report_;
};

Status BackupRun::Prepare() {
  ASSIGN_OR_RETURN(chunker_, NewChunker(cfg_.chunker));
  cds_ = req_.cds ? req_.cds : &no_cds_;
  const uint64_t size = req_.source->size();
  snap_.vm = vm_.vm();
  snap_.disk = req_.disk;
  snap_.size = size;
  snap_.segment_size = cfg_.segment_size;
  snap_.chunker = cfg_.chunker;
  snap_.segment_count = (size + cfg_.segment_size - 1) / cfg_.segment_size;
  snap_.source = req_.source->Describe();
  // Record version 4 (docs/format.md), never in a repository of format
  // version 1, which an older vmdedup must read.
  if (req_.source->content_bytes() != size && repo_.config().format_version >= 2)
    snap_.image_bytes = req_.source->content_bytes();
  snap_.read_mode = req_.read_mode;
  snap_.bitmap = req_.bitmap;
  snap_.source_format = req_.source_format;
  snap_.tags = req_.tags;
  snap_.cds_version = cds_->version();
  snap_.time = req_.time ? req_.time
                         : std::chrono::duration_cast<std::chrono::seconds>(
                               std::chrono::system_clock::now().time_since_epoch())
                               .count();
  ASSIGN_OR_RETURN(snap_.seq, vm_.GetCounter("seq/" + req_.disk));
  ASSIGN_OR_RETURN(next_segment_id_, vm_.GetCounter("segment"));
  if (req_.parent) {
    const SnapshotRecord& p = *req_.parent;
    snap_.parent_seq = p.seq;
    ASSIGN_OR_RETURN(parent_segments_, vm_.GetSnapshotSegments(p.disk, p.seq));
    if (parent_segments_.size() != p.segment_count)
      return Status::Corruption("snapshot " + p.Id() + ": segment list has " +
                                std::to_string(parent_segments_.size()) + " entries, expected " +
                                std::to_string(p.segment_count));
    bool same_geometry = p.segment_size == cfg_.segment_size &&
                         p.chunker.kind == cfg_.chunker.kind &&
                         p.chunker.avg_size == cfg_.chunker.avg_size;
    if (!same_geometry) parent_segments_.clear();  // nothing comparable
    parent_compatible_ = same_geometry && p.size == size;
  }
  RETURN_IF_ERROR(FindUnusableReferences());
  segments_.assign(snap_.segment_count, 0);
  progress_.total_bytes = size;
  return Status::OK();
}

// A new snapshot never references a record that is missing or known
// damaged (docs/format.md, "Quarantine"). Looks at every catalogued
// container's size and lists the CDS containers once; only when something
// is unusable does it read the parent's recipes, to find the segments
// that use it.
Status BackupRun::FindUnusableReferences() {
  ASSIGN_OR_RETURN(unusable_own_, vm_.UnusableContainers());
  // The CDS containers: every published version's (manifests), and those of
  // them missing or quarantined. A damaged CDS never fails a backup: when
  // the pointer, a manifest or the quarantine cannot be read, no CDS
  // container is known good, so none is used (the parent's CDS references
  // are read again; level 3 finds nothing).
  CdsArea area(repo_.objects());
  std::vector<uint64_t> cds_containers;
  auto pointer = area.ReadPointer();
  bool cds_unknown = !pointer.ok();
  for (uint64_t v : pointer.ok() ? pointer->published : std::vector<uint64_t>{}) {
    auto info = area.ReadManifest(v);
    if (!info.ok()) {
      cds_unknown = true;
      break;
    }
    cds_containers.insert(cds_containers.end(), info->containers.begin(), info->containers.end());
  }
  if (!cds_unknown && !cds_containers.empty()) {
    auto unusable = area.UnusableContainers(cds_containers);
    cds_unknown = !unusable.ok();
    if (unusable.ok()) unusable_cds_ = std::move(unusable).value();
  }
  cds_unusable_all_ = cds_unknown;
  // Recipes check found missing or unreadable: their segments are read
  // again, never reused (level 1) nor compared with (level 2).
  ASSIGN_OR_RETURN(std::set<uint64_t> lost, vm_.LostRecipes());
  uint64_t lost_segments = 0;
  for (uint64_t i = 0; i < parent_segments_.size(); i++) {
    if (parent_segments_[i] != 0 && lost.count(parent_segments_[i])) {
      reread_segments_.insert(i);
      lost_segments++;
    }
  }
  if (lost_segments > 0 && req_.note)
    req_.note("warning: " + std::to_string(lost_segments) + " segment(s) of " + req_.parent->Id() +
              " use segment recipes that check found missing or unreadable: they are read "
              "again and their blocks stored afresh (docs/operations.md, \"Damage\")");
  if (unusable_own_.empty() && unusable_cds_.empty() && !cds_unknown) return Status::OK();
  const size_t lost_rereads = reread_segments_.size();
  for (uint64_t i = 0; i < parent_segments_.size(); i++) {
    if (parent_segments_[i] == 0 || reread_segments_.count(i)) continue;
    ASSIGN_OR_RETURN(SegmentRecipe recipe, vm_.GetSegmentRecipe(parent_segments_[i]));
    for (const BlockRef& b : recipe.blocks) {
      if ((b.kind == BlockKind::kOwn && unusable_own_.count(b.container)) ||
          (b.kind == BlockKind::kCds && (cds_unknown || unusable_cds_.count(b.container)))) {
        reread_segments_.insert(i);
        break;
      }
    }
  }
  auto ids = [](const std::set<uint64_t>& s) {
    std::string out;
    for (uint64_t id : s) out += (out.empty() ? "" : ", ") + Hex16(id);
    return out;
  };
  if (!req_.note) return Status::OK();
  if (cds_unknown)
    req_.note(
        "warning: the common data set cannot be read whole: this backup takes no block "
        "from it; run 'vmdedup check'");
  else if (!unusable_cds_.empty())
    req_.note("warning: CDS container(s) " + ids(unusable_cds_) +
              " are missing or quarantined: this backup takes no block from them (rebuild the "
              "CDS with 'vmdedup cds build'; docs/operations.md, \"Damage\")");
  if (reread_segments_.size() > lost_rereads)
    req_.note("warning: " + std::to_string(reread_segments_.size() - lost_rereads) +
              " segment(s) of " + req_.parent->Id() +
              " use containers that are missing, damaged or quarantined (" +
              (unusable_own_.empty() ? std::string("CDS only") : "VM: " + ids(unusable_own_)) +
              "): they are read again and their blocks stored afresh; run 'vmdedup check' "
              "(docs/operations.md, \"Damage\")");
  return Status::OK();
}

Status BackupRun::PlanSegment(SegmentJob& job, const std::vector<Extent>& alloc_all,
                              const std::vector<Extent>* dirty_all) {
  const uint64_t seg_begin = job.offset, seg_end = job.offset + job.length;
  std::vector<Extent> alloc = Slice(alloc_all, seg_begin, seg_end);
  // A segment whose parent recipe uses an unusable container is read again
  // whole, and nothing of that recipe is kept or referenced.
  const bool reread = reread_segments_.count(job.index) > 0;
  const bool have_parent_seg = job.index < parent_segments_.size() && !reread;
  const uint64_t parent_id = have_parent_seg ? parent_segments_[job.index] : 0;
  const bool incremental =
      req_.use_dirty_map && parent_compatible_ && dirty_all != nullptr && !reread;

  std::vector<Extent> dirty;
  if (incremental) {
    for (const Extent& e : Slice(*dirty_all, seg_begin, seg_end))
      if (e.flags & Extent::kDirty) dirty.push_back(e);
    if (dirty.empty()) {  // level 1: not read, parent's recipe reused
      job.reuse = true;
      job.reuse_id = parent_id;
      for (const Extent& e : alloc)
        if (IsZeroExtent(e)) job.reuse_zero_bytes += e.length;
      if (parent_id == 0) job.reuse_zero_bytes = job.length;
      return Status::OK();
    }
  }
  if (have_parent_seg && parent_id != 0) {
    ASSIGN_OR_RETURN(SegmentRecipe recipe, vm_.GetSegmentRecipe(parent_id));
    job.parent = std::move(recipe);
  }

  // Ranges (relative to the segment) to rebuild; everything else keeps the
  // parent's blocks.
  std::vector<std::pair<uint32_t, uint32_t>> regions;
  if (incremental && job.parent && job.parent->length == job.length) {
    uint32_t pos = 0;
    size_t d = 0;
    for (const BlockRef& b : job.parent->blocks) {
      uint64_t bb = seg_begin + pos, be = bb + b.length;
      while (d < dirty.size() && dirty[d].offset + dirty[d].length <= bb) d++;
      bool touched = d < dirty.size() && dirty[d].offset < be;
      if (touched) {
        if (!regions.empty() && regions.back().second == pos)
          regions.back().second = pos + b.length;
        else
          regions.push_back({pos, pos + b.length});
      } else {
        job.items.push_back({Item::kKept, b, pos, pos + b.length});
      }
      pos += b.length;
    }
  } else if (incremental && parent_id == 0) {
    // The parent segment was all zeros: rebuild the dirty ranges only.
    uint32_t pos = 0;
    for (const Extent& e : dirty) {
      uint32_t b = static_cast<uint32_t>(e.offset - seg_begin);
      uint32_t en = static_cast<uint32_t>(e.offset + e.length - seg_begin);
      if (b > pos) job.items.push_back({Item::kZeroRange, {}, pos, b});
      regions.push_back({b, en});
      pos = en;
    }
    if (pos < job.length) job.items.push_back({Item::kZeroRange, {}, pos, job.length});
  } else {
    regions.push_back({0, job.length});
  }

  // Split every region by allocation into zero and data ranges; insert them
  // among the kept items in offset order.
  std::vector<Item> rebuilt;
  for (const auto& [rb, re] : regions) {
    for (const Extent& e : Slice(alloc, seg_begin + rb, seg_begin + re)) {
      uint32_t b = static_cast<uint32_t>(e.offset - seg_begin);
      uint32_t en = static_cast<uint32_t>(b + e.length);
      Item::Kind kind = IsZeroExtent(e) ? Item::kZeroRange : Item::kDataRange;
      if (!rebuilt.empty() && rebuilt.back().kind == kind && rebuilt.back().end == b &&
          kind == Item::kZeroRange)
        rebuilt.back().end = en;
      else
        rebuilt.push_back({kind, {}, b, en});
      if (kind == Item::kDataRange) job.read_bytes += e.length;
    }
  }
  job.items.insert(job.items.end(), rebuilt.begin(), rebuilt.end());
  std::sort(job.items.begin(), job.items.end(),
            [](const Item& a, const Item& b) { return a.begin < b.begin; });
  if (job.read_bytes > 0) {
    if (!free_buffers_.empty()) {
      job.buffer = std::move(free_buffers_.back());
      free_buffers_.pop_back();
    }
    job.buffer.resize(job.length);
    if (!free_arenas_.empty()) {
      job.compressed = std::move(free_arenas_.back());
      free_arenas_.pop_back();
    }
    // Every payload is at most its blocks' size, and zstd wants room for
    // its worst case: Bound of the largest frame more.
    job.compressed.Reset(job.read_bytes + Compressor::Bound(kMaxBlockSize) - kMaxBlockSize);
  }
  return Status::OK();
}

// Hands a job whose data is in its buffer to the workers. Run's commit_front
// waits for `done`; Commit then checks the job's status before it uses
// anything else of it.
void BackupRun::Dispatch(SegmentJob* job) {
  job->submitted = true;
  pool_.Submit([this, job] {
    job->status = Process(*job);
    job->done.set_value();
  });
}

Status BackupRun::Process(SegmentJob& job) {
  thread_local WorkerState ws;
  ws.SetUp(cfg_.compression_level);
  std::unordered_map<Fingerprint, const BlockRef*, FingerprintHash> parent_blocks;
  if (job.parent) {
    parent_blocks.reserve(job.parent->blocks.size());
    for (const BlockRef& b : job.parent->blocks)
      if (b.kind != BlockKind::kZero) parent_blocks.emplace(b.fingerprint, &b);
  }
  std::vector<uint32_t> lengths;
  job.pieces.reserve(job.items.size() + job.read_bytes / cfg_.chunker.avg_size + 16);
  for (const Item& item : job.items) {
    if (item.kind == Item::kKept) {
      Piece p;
      p.ref = item.kept;
      p.level = item.kept.kind == BlockKind::kZero ? Level::kZero : Level::kSegment;
      job.pieces.push_back(std::move(p));
      continue;
    }
    if (item.kind == Item::kZeroRange) {
      Piece p;
      p.ref.kind = BlockKind::kZero;
      p.ref.length = item.end - item.begin;
      job.pieces.push_back(std::move(p));
      continue;
    }
    std::span<const uint8_t> data(job.buffer.data() + item.begin, item.end - item.begin);
    lengths.clear();
    chunker_->Cut(data, &lengths);
    size_t pos = 0;
    for (uint32_t len : lengths) {
      std::span<const uint8_t> block = data.subspan(pos, len);
      pos += len;
      Piece p;
      p.ref.length = len;
      if (IsAllZero(block)) {
        p.ref.kind = BlockKind::kZero;
        job.pieces.push_back(std::move(p));
        continue;
      }
      Fingerprint fp = ws.hasher.Hash(block);
      if (auto it = parent_blocks.find(fp);
          it != parent_blocks.end() && it->second->length == len) {
        p.ref = *it->second;
        p.level = Level::kBlock;
      } else if (auto hit = cds_->Lookup(fp); hit && hit->length == len && !cds_unusable_all_ &&
                                              !unusable_cds_.count(hit->container)) {
        p.ref = *hit;
        p.level = Level::kCds;
      } else {
        // The fingerprint covers the length: equal fingerprints mean equal
        // blocks.
        p.ref.kind = BlockKind::kOwn;
        p.ref.fingerprint = fp;
        if (run_index_.ClaimOrFind(fp, job.index)) {
          p.level = Level::kBlock;
          p.in_run = true;
        } else {
          p.level = Level::kNew;
          p.data_offset = static_cast<uint32_t>(block.data() - job.buffer.data());
        }
      }
      job.pieces.push_back(std::move(p));
    }
  }
  MakeFrames(job, ws);
  return Status::OK();
}

// Groups the job's new blocks, in offset order, into frames of at most
// frame_size bytes (one block a frame when frame_size is 0 or a block is that
// big) and compresses each frame.
void BackupRun::MakeFrames(SegmentJob& job, WorkerState& ws) {
  const uint32_t frame_size = cfg_.frame_size;
  const uint8_t* buf = job.buffer.data();
  size_t i = 0;
  const size_t n = job.pieces.size();
  while (true) {
    while (i < n && job.pieces[i].level != Level::kNew) i++;
    if (i == n) break;
    Frame f;
    f.first = static_cast<uint32_t>(job.members.size());
    uint64_t raw = 0;
    bool adjacent = true;  // the blocks lie back to back in the buffer
    for (; i < n; i++) {
      const Piece& p = job.pieces[i];
      if (p.level != Level::kNew) continue;
      if (f.count > 0 && (f.count == kMaxFrameBlocks || raw + p.ref.length > frame_size)) break;
      if (f.count > 0) {
        const Piece& prev = job.pieces[job.members.back()];
        adjacent = adjacent && prev.data_offset + prev.ref.length == p.data_offset;
      }
      job.members.push_back(static_cast<uint32_t>(i));
      f.count++;
      raw += p.ref.length;
      if (raw >= frame_size) {  // also frame_size 0: one block a frame
        i++;
        break;
      }
    }
    std::span<const uint8_t> plain;
    if (adjacent) {
      plain = {buf + job.pieces[job.members[f.first]].data_offset, raw};
    } else {
      ws.gather.resize(raw);
      size_t at = 0;
      for (uint32_t k = f.first; k < f.first + f.count; k++) {
        const Piece& p = job.pieces[job.members[k]];
        std::memcpy(ws.gather.data() + at, buf + p.data_offset, p.ref.length);
        at += p.ref.length;
      }
      plain = {ws.gather.data(), raw};
    }
    Compressor::View out = ws.compressor->CompressInto(plain, job.compressed.free_space());
    f.compression = out.compression;
    f.payload_len = static_cast<uint32_t>(out.bytes.size());
    if (out.compression == Compression::kNone && adjacent) {
      f.in_buffer = true;
      f.payload_offset = static_cast<uint32_t>(plain.data() - buf);
    } else {
      f.payload_offset = static_cast<uint32_t>(job.compressed.size);
      if (out.compression == Compression::kNone)  // gathered blocks, stored as they are
        std::memcpy(job.compressed.free_space().data(), out.bytes.data(), out.bytes.size());
      job.compressed.size += out.bytes.size();
    }
    job.frames.push_back(f);
  }
}

// Hands the open container (if any) and the metadata waiting for it to the
// sealer, which stores the container and then writes the batch while this
// thread goes on.
Status BackupRun::Seal() {
  WriteBatch batch = std::move(pending_);
  pending_.Clear();
  pending_recipes_ = 0;
  std::string object, bytes;
  if (!writer_.empty()) {
    ContainerRecord rec;
    rec.id = writer_.id();
    rec.block_count = writer_.block_count();
    rec.object = ContainerObjectName(vm_.vm(), rec.id);
    rec.written_by = req_.disk + "/" + std::to_string(snap_.seq);
    bytes = writer_.Finish();
    rec.size = bytes.size();
    object = rec.object;
    writer_has_id_ = false;
    batch.Put(ContainerKey(rec.id), EncodeContainerRecord(ContainerKey(rec.id), rec));
  }
  if (batch.empty()) return Status::OK();
  batch.Put(CounterKey("segment"), EncodeCounter(CounterKey("segment"), next_segment_id_));
  snap_.stats.metadata += batch.bytes();
  return sealer_.Submit(std::move(object), std::move(bytes), std::move(batch));
}

Status BackupRun::AppendFrame(SegmentJob& job, const Frame& f) {
  const uint8_t* base = f.in_buffer ? job.buffer.data() : job.compressed.data.get();
  std::span<const uint8_t> payload(base + f.payload_offset, f.payload_len);
  auto fits = [&] {
    return f.count == 1 ? writer_.Fits(payload.size()) : writer_.FitsFrame(f.count, payload.size());
  };
  if (writer_has_id_ && !fits()) RETURN_IF_ERROR(Seal());
  if (!writer_has_id_) {
    if (next_container_id_ == reserved_ids_end_) {  // one synced write per run of ids
      ASSIGN_OR_RETURN(next_container_id_, vm_.AllocateContainerIds(kContainerIdsReserved));
      reserved_ids_end_ = next_container_id_ + kContainerIdsReserved;
    }
    writer_.Reset(next_container_id_++, sealer_.TakeBuffer());
    writer_has_id_ = true;
  }
  BlockRecordInfo info;
  if (f.count == 1) {
    const BlockRef& r = job.pieces[job.members[f.first]].ref;
    info = writer_.Append(r.fingerprint, r.length, f.compression, payload);
  } else {
    frame_blocks_.clear();
    for (uint32_t k = 0; k < f.count; k++) {
      const BlockRef& r = job.pieces[job.members[f.first + k]].ref;
      frame_blocks_.push_back({r.fingerprint, r.length});
    }
    info = writer_.AppendFrame(frame_blocks_, f.compression, payload);
  }
  snap_.stats.stored += info.record_len;
  for (uint32_t k = 0; k < f.count; k++) {
    BlockRef& r = job.pieces[job.members[f.first + k]].ref;
    r.container = writer_.id();
    r.offset = info.offset;
    r.record_len = info.record_len;
    r.index = k;
    snap_.stats.new_bytes += r.length;
    snap_.stats.new_blocks++;
    run_index_.SetLocation(r);
  }
  return Status::OK();
}

Status BackupRun::Commit(SegmentJob& job) {
  LevelStats& st = snap_.stats;
  st.read_bytes += job.read_bytes;
  progress_.read_bytes += job.read_bytes;
  progress_.done_bytes = job.offset + job.length;
  if (job.reuse) {
    segments_[job.index] = job.reuse_id;
    st.zero += job.reuse_zero_bytes;
    st.segment += job.length - job.reuse_zero_bytes;
    return Status::OK();
  }
  RETURN_IF_ERROR(job.status);
  if (run_index_.TakeOverridden(job.index)) {
    // An earlier segment stores some of this one's new blocks: reference
    // them, and frame (and compress) the rest again, on this thread.
    for (Piece& p : job.pieces) {
      if (p.level == Level::kNew && run_index_.Claimant(p.ref.fingerprint) < job.index) {
        p.level = Level::kBlock;
        p.in_run = true;
      }
    }
    job.members.clear();
    job.frames.clear();
    job.compressed.size = 0;
    committer_.SetUp(cfg_.compression_level);
    MakeFrames(job, committer_);
  }
  SegmentRecipe recipe;
  recipe.length = job.length;
  for (const Frame& f : job.frames) RETURN_IF_ERROR(AppendFrame(job, f));
  for (Piece& p : job.pieces) {
    if (p.in_run) {  // stored by this segment's frames or an earlier segment's
      std::optional<BlockRef> where = run_index_.Location(p.ref.fingerprint);
      if (!where)
        return Status::Internal("block " + p.ref.fingerprint.Hex() +
                                " was claimed in this run but never stored (a bug in vmdedup)");
      p.ref = *where;
    }
    switch (p.level) {
      case Level::kZero:
        st.zero += p.ref.length;
        break;
      case Level::kSegment:
        st.segment += p.ref.length;
        break;
      case Level::kBlock:
        st.block += p.ref.length;
        break;
      case Level::kCds:
        st.cds += p.ref.length;
        break;
      case Level::kNew:
        break;  // counted by AppendFrame
    }
    if (p.ref.kind == BlockKind::kZero && !recipe.blocks.empty() &&
        recipe.blocks.back().kind == BlockKind::kZero)
      recipe.blocks.back().length += p.ref.length;
    else
      recipe.blocks.push_back(p.ref);
  }
  job.pieces.clear();
  job.members.clear();
  job.frames.clear();
  if (job.buffer.capacity() > 0) free_buffers_.push_back(std::move(job.buffer));
  if (job.read_bytes > 0) free_arenas_.push_back(std::move(job.compressed));
  if (recipe.blocks.size() == 1 && recipe.blocks[0].kind == BlockKind::kZero) {
    segments_[job.index] = 0;  // all zero: no recipe
  } else if (job.parent && job.parent->length == recipe.length &&
             SameBlocks(job.parent->blocks, recipe.blocks)) {
    segments_[job.index] = job.parent->id;  // rewritten with the same content
  } else {
    recipe.id = next_segment_id_++;
    std::string key = SegmentRecipeKey(recipe.id);
    pending_.Put(key, EncodeSegmentRecipe(key, recipe));
    segments_[job.index] = recipe.id;
    if (++pending_recipes_ >= kMaxPendingRecipes) RETURN_IF_ERROR(Seal());
  }
  progress_.stored_bytes = st.stored;
  return Status::OK();
}

Status BackupRun::FlushReads() {
  if (read_batch_.empty()) return Status::OK();
  std::vector<ReadRequest> reqs;
  for (SegmentJob* job : read_batch_)
    for (const Item& item : job->items)
      if (item.kind == Item::kDataRange)
        reqs.push_back(
            {job->offset + item.begin, item.end - item.begin, job->buffer.data() + item.begin});
  Status st = req_.source->ReadMany(reqs);
  if (!st.ok()) return st.WithContext("read " + req_.source->Describe());
  for (SegmentJob* job : read_batch_) Dispatch(job);
  read_batch_.clear();
  read_batch_bytes_ = 0;
  return Status::OK();
}

void BackupRun::Report() {
  if (!req_.progress) return;
  auto now = std::chrono::steady_clock::now();
  if (now - last_report_ < std::chrono::milliseconds(250) &&
      progress_.done_bytes < progress_.total_bytes)
    return;
  last_report_ = now;
  req_.progress(progress_);
}

Result<SnapshotRecord> BackupRun::Run() {
  auto start = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(Prepare());
  const uint64_t size = snap_.size;
  const size_t max_queue = 4 * pool_.size() + 2;
  Status failure;

  auto commit_front = [&]() -> Status {
    SegmentJob& job = *queue_.front();
    if (!job.reuse) {
      if (!job.submitted) RETURN_IF_ERROR(FlushReads());
      job.future.wait();
    }
    Status st = Commit(job);
    queue_.pop_front();
    Report();
    return st;
  };

  for (uint64_t w = 0; w < snap_.segment_count && failure.ok(); w += kWindowSegments) {
    uint64_t wbegin = w * cfg_.segment_size;
    uint64_t wend = std::min(size, (w + kWindowSegments) * cfg_.segment_size);
    std::vector<Extent> alloc, dirty;
    failure = req_.source->Allocation(wbegin, wend - wbegin, &alloc);
    if (!failure.ok()) break;
    bool use_dirty = req_.use_dirty_map && parent_compatible_;
    if (use_dirty) {
      failure = req_.source->Dirty(wbegin, wend - wbegin, &dirty);
      if (!failure.ok()) break;
    }
    for (uint64_t s = w; s < std::min(snap_.segment_count, w + kWindowSegments); s++) {
      if (req_.cancel && req_.cancel->load()) {
        failure = Status::Aborted("backup interrupted");
        break;
      }
      auto job = std::make_unique<SegmentJob>();
      job->index = s;
      job->offset = s * cfg_.segment_size;
      job->length =
          static_cast<uint32_t>(std::min<uint64_t>(cfg_.segment_size, size - job->offset));
      failure = PlanSegment(*job, alloc, use_dirty ? &dirty : nullptr);
      if (!failure.ok()) break;
      SegmentJob* raw = job.get();
      queue_.push_back(std::move(job));
      if (!raw->reuse) {
        if (raw->read_bytes == 0) {
          Dispatch(raw);
        } else {
          read_batch_.push_back(raw);
          read_batch_bytes_ += raw->read_bytes;
          if (read_batch_bytes_ >= kReadBatchBytes) {
            failure = FlushReads();
            if (!failure.ok()) break;
          }
        }
      }
      while (failure.ok() && queue_.size() > max_queue) failure = commit_front();
      // A failed commit ends the run here: going on would plan the next
      // segment over `failure` and could commit a snapshot without the
      // segment that failed.
      if (!failure.ok()) break;
    }
  }
  while (failure.ok() && !queue_.empty()) failure = commit_front();
  if (!failure.ok()) {
    pool_.Wait();  // workers may still reference queued jobs
    queue_.clear();
    (void)sealer_.Drain();  // a sealer failure already is `failure` (Submit returned it)
    return failure;
  }
  RETURN_IF_ERROR(Seal());
  RETURN_IF_ERROR(sealer_.Drain());

  auto end = std::chrono::steady_clock::now();
  snap_.duration_ms = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(end - start).count());
  WriteBatch commit;
  std::string seg_key = SnapshotSegmentsKey(snap_.disk, snap_.seq);
  commit.Put(seg_key, EncodeSegmentList(seg_key, segments_));
  commit.Put(CounterKey("seq/" + snap_.disk),
             EncodeCounter(CounterKey("seq/" + snap_.disk), snap_.seq + 1));
  snap_.stats.metadata += commit.bytes();
  std::string key = SnapshotKey(snap_.disk, snap_.seq);
  std::string value = EncodeSnapshot(key, snap_);
  snap_.stats.metadata += key.size() + value.size();
  value = EncodeSnapshot(key, snap_);  // again, now counting itself
  commit.Put(key, value);
  if (req_.commit_into != nullptr) {
    req_.commit_into->Append(commit);
  } else {
    Status st = vm_.meta()->Write(commit, true);
    if (!st.ok()) return st.WithContext("commit snapshot " + snap_.Id());
  }
  progress_.done_bytes = size;
  if (req_.progress) req_.progress(progress_);
  return snap_;
}

}  // namespace

Result<SnapshotRecord> RunBackup(Repository& repo, VmStore& vm, const BackupRequest& request) {
  if (request.source == nullptr) return Status::InvalidArgument("backup without a source");
  RETURN_IF_ERROR(ValidateName("disk", request.disk));
  BackupRun run(repo, vm, request);
  return run.Run();
}

}  // namespace vmdedup
