#include "nbd-export/snapshot_export.h"

#include <algorithm>
#include <cstring>
#include <thread>
#include <tuple>

#include "base/fingerprint.h"

namespace vmdedup {
namespace {

constexpr uint64_t kMinLayoutCacheBytes = 1u << 20;
// Reads up to this size that do not continue the previous read decode only
// the blocks they touch on a cache miss.
constexpr uint64_t kRangeReadMax = 64u << 10;
// A reader that skipped a hole of up to this many all-zero segments (a client
// following the extents) is still sequential.
constexpr uint64_t kMaxHoleSegments = 256;

// Holds one of the decode slots for its lifetime.
class SlotGuard {
 public:
  explicit SlotGuard(std::counting_semaphore<>& s) : s_(s) { s_.acquire(); }
  ~SlotGuard() { s_.release(); }
  SlotGuard(const SlotGuard&) = delete;
  SlotGuard& operator=(const SlotGuard&) = delete;

 private:
  std::counting_semaphore<>& s_;
};

}  // namespace

// Spare segment buffers, so that decoding into a buffer does not fault in
// fresh pages every time (a measurable share of the cost).
class SnapshotExport::BufferPool {
 public:
  BufferPool(size_t size, size_t keep) : size_(size), keep_(keep) {}
  std::unique_ptr<uint8_t[]> Get() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_.empty()) {
        auto b = std::move(free_.back());
        free_.pop_back();
        return b;
      }
    }
    return std::unique_ptr<uint8_t[]>(new uint8_t[size_]);
  }
  void Put(std::unique_ptr<uint8_t[]> b) {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.size() < keep_) free_.push_back(std::move(b));
  }

 private:
  const size_t size_;
  const size_t keep_;
  std::mutex mu_;
  std::vector<std::unique_ptr<uint8_t[]>> free_;
};

SnapshotExport::Decoded::~Decoded() {
  if (pool && bytes) pool->Put(std::move(bytes));
}

SnapshotExport::SnapshotExport(std::unique_ptr<Repository> repo, std::unique_ptr<VmStore> vm,
                               const ExportOptions& options)
    : repo_(std::move(repo)),
      vm_(std::move(vm)),
      segments_(options.cache_bytes, [](const Decoded& d) { return uint64_t{d.length}; }),
      layouts_(std::max<uint64_t>(kMinLayoutCacheBytes, options.cache_bytes / 64),
               [](const Layout& l) {
                 return 96 + 8 * uint64_t{l.data.size()} +
                        sizeof(BlockRef) * uint64_t{l.recipe.blocks.size()};
               }),
      readahead_(options.readahead) {
  dropped_.fill({UINT64_MAX, 0});
  decoders_ = options.decoders;
  if (decoders_ == 0) decoders_ = std::max(2u, std::thread::hardware_concurrency());
  decode_slots_ = std::make_unique<std::counting_semaphore<>>(decoders_);
}

SnapshotExport::~SnapshotExport() {
  {
    std::lock_guard<std::mutex> lock(ra_mu_);
    ra_stop_ = true;
  }
  ra_cv_.notify_all();
  for (std::thread& t : ra_threads_) t.join();
}

Result<std::unique_ptr<SnapshotExport>> SnapshotExport::Open(const std::string& repo_path,
                                                             const std::string& snapshot,
                                                             const ExportOptions& options) {
  ASSIGN_OR_RETURN(SnapshotRef ref, ParseSnapshotRef(snapshot));
  ASSIGN_OR_RETURN(std::unique_ptr<Repository> repo, Repository::Open(repo_path));
  ASSIGN_OR_RETURN(std::unique_ptr<VmStore> vm, repo->OpenVm(ref.vm, Repository::Access::kRead));
  ASSIGN_OR_RETURN(SnapshotRecord snap,
                   ref.seq ? vm->GetSnapshot(ref.disk, *ref.seq) : vm->LatestSnapshot(ref.disk));
  if (snap.segment_size == 0)
    return Status::Corruption("snapshot " + snap.Id() + " has segment size 0");
  ASSIGN_OR_RETURN(std::vector<uint64_t> ids, vm->GetSnapshotSegments(snap.disk, snap.seq));
  std::unique_ptr<SnapshotExport> e(new SnapshotExport(std::move(repo), std::move(vm), options));
  ASSIGN_OR_RETURN(e->reader_, SnapshotReader::Open(*e->repo_, *e->vm_, snap));
  if (ids.size() != e->reader_->segment_count())
    return Status::Corruption("snapshot " + snap.Id() + ": segment list changed while opening");
  e->segment_ids_ = std::move(ids);
  e->pool_ = std::make_shared<BufferPool>(snap.segment_size, e->decoders_ + e->readahead_ + 2);
  return e;
}

Result<std::shared_ptr<const SnapshotExport::Layout>> SnapshotExport::GetLayout(uint64_t index) {
  return layouts_.GetOrLoad(index, [&]() -> Result<std::shared_ptr<const Layout>> {
    ASSIGN_OR_RETURN(SegmentRecipe recipe, reader_->GetRecipe(index));
    auto layout = std::make_shared<Layout>();
    uint32_t pos = 0;
    for (const BlockRef& b : recipe.blocks) {
      if (b.kind != BlockKind::kZero) {
        layout->data_bytes += b.length;
        if (!layout->data.empty() && layout->data.back().second == pos)
          layout->data.back().second = pos + b.length;
        else
          layout->data.push_back({pos, pos + b.length});
      }
      pos += b.length;
    }
    layout->recipe = std::move(recipe);
    return std::shared_ptr<const Layout>(std::move(layout));
  });
}

Result<std::shared_ptr<const SnapshotExport::Decoded>> SnapshotExport::GetSegment(
    uint64_t index, const std::shared_ptr<const Layout>& layout_ptr, bool sequential) {
  const Layout& layout = *layout_ptr;
  return segments_.GetOrLoad(index, [&]() -> Result<std::shared_ptr<const Decoded>> {
    thread_local Sha256Hasher hasher;
    auto d = std::make_shared<Decoded>();
    d->length = reader_->SegmentLength(index);
    d->bytes = pool_->Get();
    d->pool = pool_;
    if (sequential) d->streamed = layout_ptr;
    {
      std::lock_guard<std::mutex> lock(dropped_mu_);
      d->loaded_at = drops_;
    }
    Status st;
    {
      SlotGuard slot(*decode_slots_);
      // The layout holds the recipe: no second metadata read.
      st = reader_->ReadRange(index, layout.recipe, 0, d->length, d->bytes.get(), hasher);
    }
    decoded_++;
    if (!st.ok()) return st;
    return std::shared_ptr<const Decoded>(std::move(d));
  });
}

Status SnapshotExport::Read(uint8_t* buf, uint64_t count, uint64_t offset) {
  reads_++;
  if (offset > size() || count > size() - offset) {
    read_errors_++;
    return Status::InvalidArgument("read of " + std::to_string(count) + " bytes at offset " +
                                   std::to_string(offset) + " is beyond the end of snapshot " +
                                   snapshot().Id() + " (" + std::to_string(size()) + " bytes)");
  }
  const uint64_t seg_size = snapshot().segment_size;
  // A small read that does not continue the previous one decodes only its
  // blocks on a miss; sequential and large reads decode (and cache) whole
  // segments, which read-ahead then keeps ahead of the reader.
  const bool small_random = count <= kRangeReadMax && last_read_end_.load() != offset;
  last_read_end_.store(offset + count);
  while (count > 0) {
    const uint64_t index = offset / seg_size;
    const uint32_t in = static_cast<uint32_t>(offset % seg_size);
    const uint32_t n =
        static_cast<uint32_t>(std::min<uint64_t>(count, reader_->SegmentLength(index) - in));
    // A sequential reader (the data segment before, across a hole of up to
    // kMaxHoleSegments, is cached or being decoded, or was dropped behind
    // it): decode ahead, and drop behind.
    const bool sequential = segment_ids_[index] != 0 && IsSequential(index);
    if (sequential && readahead_ > 0) ReadAhead(index);
    if (segment_ids_[index] == 0) {
      std::memset(buf, 0, n);
    } else if (auto hit = segments_.Find(index)) {
      std::memcpy(buf, hit->bytes.get() + in, n);
      Served(index, *hit, in, n);
    } else {
      auto layout = GetLayout(index);
      if (!layout.ok()) {
        read_errors_++;
        return layout.status();
      }
      bool has_data = false;
      for (const auto& [b, e] : (*layout)->data) has_data |= b < in + n && e > in;
      if (!has_data) {
        std::memset(buf, 0, n);
      } else if (small_random) {
        thread_local Sha256Hasher hasher;
        Status st = reader_->ReadRange(index, (*layout)->recipe, in, in + n, buf, hasher);
        range_reads_++;
        if (!st.ok()) {
          read_errors_++;
          return st;
        }
      } else {
        auto seg = GetSegment(index, *layout, sequential);
        if (!seg.ok()) {
          read_errors_++;
          return seg.status();
        }
        std::memcpy(buf, (*seg)->bytes.get() + in, n);
        Served(index, **seg, in, n);
      }
    }
    buf += n;
    offset += n;
    count -= n;
    read_bytes_ += n;
  }
  return Status::OK();
}

void SnapshotExport::ReadAhead(uint64_t index) {
  // Read-ahead results live in the cache: pointless when it cannot hold them.
  if (segments_.budget() < (readahead_ + 2) * uint64_t{snapshot().segment_size}) return;
  // Segments dropped since segment `index` was decoded were read by another
  // connection already: the readers are past them.
  uint64_t now;
  {
    std::lock_guard<std::mutex> lock(dropped_mu_);
    now = drops_;
  }
  const auto current = segments_.Peek(index);
  const uint64_t since = current ? current->loaded_at : now;
  std::vector<uint64_t> wanted;
  for (uint64_t i = index + 1; i <= index + readahead_ && i < segment_ids_.size(); i++)
    if (segment_ids_[i] != 0 && !segments_.Contains(i) && !RecentlyDropped(i, since))
      wanted.push_back(i);
  if (wanted.empty()) return;
  {
    std::lock_guard<std::mutex> lock(ra_mu_);
    if (ra_stop_) return;
    for (uint64_t i : wanted) {
      if (ra_queue_.size() >= 4 * readahead_) break;
      if (std::find_if(ra_queue_.begin(), ra_queue_.end(),
                       [&](const auto& q) { return q.first == i; }) == ra_queue_.end())
        ra_queue_.push_back({i, now});
    }
    if (ra_threads_.empty())
      for (unsigned i = 0; i < decoders_; i++)
        ra_threads_.emplace_back([this] { ReadAheadWorker(); });
  }
  ra_cv_.notify_all();  // several segments may have been queued: wake every worker
}

void SnapshotExport::ReadAheadWorker() {
  for (;;) {
    uint64_t index, queued_at;
    {
      std::unique_lock<std::mutex> lock(ra_mu_);
      ra_cv_.wait(lock, [&] { return ra_stop_ || !ra_queue_.empty(); });
      if (ra_stop_) return;
      std::tie(index, queued_at) = ra_queue_.front();
      ra_queue_.pop_front();
    }
    // Already there, or read and dropped since it was queued (the reader
    // overtook the read-ahead): nothing to do.
    if (segments_.Contains(index) || RecentlyDropped(index, queued_at)) continue;
    auto layout = GetLayout(index);
    if (!layout.ok() || (*layout)->data.empty()) continue;
    // Errors are not cached: the client's own read reports them.
    if (GetSegment(index, *layout, true).ok()) ra_decoded_++;
  }
}

void SnapshotExport::Served(uint64_t index, const Decoded& seg, uint32_t in, uint32_t n) {
  if (!seg.streamed) return;
  uint64_t covered = 0;
  for (const auto& [b, e] : seg.streamed->data) {
    const uint32_t lo = std::max(b, in), hi = std::min(e, in + n);
    if (lo < hi) covered += hi - lo;
  }
  if (covered == 0) return;
  const uint64_t all = seg.streamed->data_bytes;
  const uint64_t before = seg.served.fetch_add(covered);
  if (before >= all || before + covered < all) return;  // not the read that completes it
  segments_.Erase(index, &seg);
  std::lock_guard<std::mutex> lock(dropped_mu_);
  dropped_[drops_ % dropped_.size()] = {index, drops_};
  drops_++;
}

bool SnapshotExport::IsSequential(uint64_t index) {
  uint64_t prev = index;
  for (uint64_t skipped = 0; prev > 0 && skipped <= kMaxHoleSegments; skipped++) {
    prev--;
    if (segment_ids_[prev] != 0) return segments_.Contains(prev) || RecentlyDropped(prev);
  }
  return false;
}

bool SnapshotExport::RecentlyDropped(uint64_t index, uint64_t since) {
  std::lock_guard<std::mutex> lock(dropped_mu_);
  return std::any_of(dropped_.begin(), dropped_.end(),
                     [&](const auto& d) { return d.first == index && d.second >= since; });
}

Status SnapshotExport::Extents(uint64_t offset, uint64_t count, bool first_only,
                               const std::function<Status(uint64_t, uint64_t, bool)>& fn,
                               uint64_t max_segments) {
  if (offset >= size())
    return Status::InvalidArgument("extents at offset " + std::to_string(offset) +
                                   " are beyond the end of snapshot " + snapshot().Id());
  const uint64_t end = offset + std::min(std::max<uint64_t>(count, 1), size() - offset);
  const uint64_t seg_size = snapshot().segment_size;
  uint64_t run_start = offset, run_end = offset;
  bool run_zero = false;
  // Appends [b, e) (clipped to start at `offset`), emitting the pending run
  // when the kind changes.
  auto add = [&](uint64_t b, uint64_t e, bool zero) -> Status {
    b = std::max(b, offset);
    if (e <= b) return Status::OK();
    if (run_end > run_start && run_zero == zero && run_end == b) {
      run_end = e;
      return Status::OK();
    }
    if (run_end > run_start) RETURN_IF_ERROR(fn(run_start, run_end - run_start, run_zero));
    run_start = b;
    run_end = e;
    run_zero = zero;
    return Status::OK();
  };
  uint64_t index = offset / seg_size;
  for (uint64_t examined = 0;
       index * seg_size < end && examined < std::max<uint64_t>(1, max_segments);
       index++, examined++) {
    const uint64_t base = index * seg_size;
    const uint64_t length = reader_->SegmentLength(index);
    if (segment_ids_[index] == 0) {
      RETURN_IF_ERROR(add(base, base + length, true));
    } else {
      ASSIGN_OR_RETURN(auto layout, GetLayout(index));
      uint64_t pos = 0;
      for (const auto& [b, e] : layout->data) {
        RETURN_IF_ERROR(add(base + pos, base + b, true));
        RETURN_IF_ERROR(add(base + b, base + e, false));
        pos = e;
      }
      RETURN_IF_ERROR(add(base + pos, base + length, true));
    }
    if (first_only) break;
  }
  if (run_end > run_start) RETURN_IF_ERROR(fn(run_start, run_end - run_start, run_zero));
  return Status::OK();
}

ExportStats SnapshotExport::stats() const {
  ExportStats s;
  s.reads = reads_.load();
  s.read_bytes = read_bytes_.load();
  s.read_errors = read_errors_.load();
  s.decoded_segments = decoded_.load();
  s.readahead_segments = ra_decoded_.load();
  s.range_reads = range_reads_.load();
  s.segments = segments_.stats();
  s.layouts = layouts_.stats();
  return s;
}

}  // namespace vmdedup
