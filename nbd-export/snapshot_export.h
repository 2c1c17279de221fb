// SnapshotExport: one snapshot as a read-only block device — the logic of
// the NBD export, kept apart from nbdkit so that it can be tested in-process.
//
// Reads go through SnapshotReader (engine/snapshot_reader.h), the read path
// restore uses: every block record's checksum is verified and its plaintext
// re-hashed against the recipe's fingerprint, so a damaged byte fails the
// read with Corruption naming the snapshot and the object, never wrong data.
// Sequential and large reads decode a segment whole and keep it in an LRU
// cache of decoded segments bounded by `cache_bytes`; a small read (up to
// 64 KiB) that does not continue the previous read decodes, on a miss, only
// the blocks it touches (SnapshotReader::ReadRange) and caches nothing. A
// damaged block fails whole-segment reads of its segment and the small reads
// that touch it; other data stays readable.
//
// Extents come from the recipes without reading data: an all-zero segment
// (segment id 0) and the zero blocks of a segment are zero (hole|zero), all
// else is data. The zero/data layout of recently used segments is cached too.
//
// Read-ahead: a read of segment i while the data segment before it (across a
// hole a client following the extents skipped) is cached or was just
// dropped behind (a sequential reader: a copy, QEMU's block-stream) queues
// the decode of the next `readahead` segments on background threads
// (`decoders` of them), so that decoding runs on every core and overlaps the
// sending of data. Random readers do not trigger it.
//
// Drop-behind: a segment decoded for a sequential reader (by read-ahead or by
// the reader itself) leaves the cache once reads have covered all its data, so that a sequential
// pass over a large disk neither fills the cache (faulting in cache_bytes of fresh memory) nor
// pushes out the segments that random readers use; its buffer goes back to
// the pool for the next decode.
//
// Memory: at most cache_bytes of decoded segments, plus one segment buffer
// per decode in progress (at most `decoders` at a time), plus a pool of up
// to decoders + readahead + 2 spare segment buffers (reused, so that a
// decode does not fault in fresh pages), plus a small layout cache
// (cache_bytes / 64, at least 1 MiB), plus 8 bytes per segment of the disk
// for the snapshot's segment list.
//
// Thread model: Open on one thread; afterwards Read, Extents and stats may be
// called from any number of threads at once (nbdkit's parallel model).
// The export holds the VM's metadata store open read-only for its lifetime:
// a backup of the same VM gets Busy meanwhile.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <semaphore>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "base/status.h"
#include "engine/snapshot_reader.h"
#include "nbd-export/lru_cache.h"
#include "store/records.h"
#include "store/repository.h"

namespace vmdedup {

struct ExportOptions {
  uint64_t cache_bytes = 256ull << 20;
  unsigned decoders = 0;   // segments decoded at once; 0: the number of cores (at least 2)
  unsigned readahead = 4;  // segments decoded ahead of a sequential reader; 0: none
};

struct ExportStats {
  uint64_t reads = 0;  // Read calls
  uint64_t read_bytes = 0;
  uint64_t read_errors = 0;
  uint64_t decoded_segments = 0;
  uint64_t readahead_segments = 0;  // decoded by read-ahead
  uint64_t range_reads = 0;         // small random reads served by decoding only their blocks
  LruCacheStats segments;           // decoded-segment cache
  LruCacheStats layouts;            // zero/data layout cache
};

class SnapshotExport {
 public:
  // `snapshot` is "VM/DISK/SEQ" or "VM/DISK/latest". Errors: NotFound (no
  // repository, VM or snapshot), Busy (a backup holds the VM), Corruption.
  static Result<std::unique_ptr<SnapshotExport>> Open(const std::string& repo_path,
                                                      const std::string& snapshot,
                                                      const ExportOptions& options);
  ~SnapshotExport();

  const SnapshotRecord& snapshot() const { return reader_->snapshot(); }
  uint64_t size() const { return reader_->snapshot().size; }

  // Fills buf[0, count) with the snapshot's bytes at `offset`.
  // InvalidArgument beyond size(); Corruption/IOError/NotFound from the
  // store, with the snapshot, segment and object named in the message.
  Status Read(uint8_t* buf, uint64_t count, uint64_t offset);

  // Calls fn(offset, length, zero) for consecutive extents starting at
  // `offset` (neighbours with the same kind merged), covering at least
  // [offset, offset + 1) and at most up to the end of the segment holding
  // offset + count - 1 (fewer when `max_segments` segments were examined,
  // or just the first extent with `first_only`). fn may stop the walk by
  // returning a non-OK Status, which is returned.
  Status Extents(uint64_t offset, uint64_t count, bool first_only,
                 const std::function<Status(uint64_t, uint64_t, bool)>& fn,
                 uint64_t max_segments = 1024);

  ExportStats stats() const;

 private:
  class BufferPool;
  // Data (non-zero) ranges of a segment, relative to its start, sorted, and
  // its recipe (for reads of a few blocks).
  struct Layout {
    std::vector<std::pair<uint32_t, uint32_t>> data;
    uint32_t data_bytes = 0;  // their total
    SegmentRecipe recipe;
  };
  struct Decoded {
    std::unique_ptr<uint8_t[]> bytes;
    uint32_t length = 0;
    std::shared_ptr<BufferPool> pool;  // gets `bytes` back
    // Decoded for a sequential reader: dropped once `served` (bytes of its data ranges
    // read so far, repeats counted) reaches the layout's data_bytes.
    std::shared_ptr<const Layout> streamed;
    mutable std::atomic<uint64_t> served{0};
    uint64_t loaded_at = 0;  // drops_ when its decode began
    ~Decoded();
  };

  SnapshotExport(std::unique_ptr<Repository> repo, std::unique_ptr<VmStore> vm,
                 const ExportOptions& options);
  Result<std::shared_ptr<const Layout>> GetLayout(uint64_t index);
  // Decodes segment `index` whole (cached), from the recipe in its layout;
  // `sequential`: for a sequential reader (the segment is dropped behind it).
  Result<std::shared_ptr<const Decoded>> GetSegment(uint64_t index,
                                                    const std::shared_ptr<const Layout>& layout,
                                                    bool sequential);
  // Counts a read of seg[in, in + n) and drops a read-ahead segment once its
  // data has been read.
  void Served(uint64_t index, const Decoded& seg, uint32_t in, uint32_t n);
  // True when the data segment before `index` is cached, being decoded or
  // was dropped behind a reader lately: a sequential reader.
  bool IsSequential(uint64_t index);
  // True when segment `index` was dropped behind a reader lately (as drop
  // number `since` or later).
  bool RecentlyDropped(uint64_t index, uint64_t since = 0);
  // Queues segments after `index` for read-ahead.
  void ReadAhead(uint64_t index);
  void ReadAheadWorker();

  std::unique_ptr<Repository> repo_;
  std::unique_ptr<VmStore> vm_;
  std::unique_ptr<SnapshotReader> reader_;
  std::vector<uint64_t> segment_ids_;  // 0: all zero
  LruCache<Decoded> segments_;
  LruCache<Layout> layouts_;
  std::unique_ptr<std::counting_semaphore<>> decode_slots_;
  std::shared_ptr<BufferPool> pool_;
  unsigned decoders_ = 0;
  const unsigned readahead_;
  std::mutex ra_mu_;
  std::condition_variable ra_cv_;
  // Segments to decode ahead, with drops_ when queued: one dropped since
  // was read already (the reader overtook the read-ahead) and is skipped.
  std::deque<std::pair<uint64_t, uint64_t>> ra_queue_;
  // Started at the first read-ahead (after nbdkit forked): one per decoder,
  // so that a sequential reader's next segments decode on all cores.
  std::vector<std::thread> ra_threads_;
  bool ra_stop_ = false;
  std::atomic<uint64_t> reads_{0}, read_bytes_{0}, read_errors_{0}, decoded_{0}, ra_decoded_{0},
      range_reads_{0};
  // Where the latest read ended: a read starting there is sequential.
  std::atomic<uint64_t> last_read_end_{UINT64_MAX};
  // The segments dropped behind readers lately (a ring), so that a
  // sequential reader is still recognised after its last segment left.
  std::mutex dropped_mu_;
  std::array<std::pair<uint64_t, uint64_t>, 16> dropped_{};  // (segment, drop number)
  uint64_t drops_ = 0;  // segments dropped so far; guarded by dropped_mu_
};

}  // namespace vmdedup
