// SnapshotReader: the one read path from a snapshot to its bytes, shared by
// restore and (later) the NBD export. Resolves segment recipes, reads block
// records from containers (coalescing neighbours of one container into one
// read), verifies each record's checksum, decompresses, and re-hashes the
// plaintext against the recipe's fingerprint, so a damaged byte is an error
// naming the snapshot and the object, never wrong data.
//
// Thread model: after Open, ReadSegment may be called from many threads at
// once (each with its own Sha256Hasher); the reader itself is immutable.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "base/fingerprint.h"
#include "base/status.h"
#include "store/records.h"
#include "store/repository.h"

namespace vmdedup {

class SnapshotReader {
 public:
  static Result<std::unique_ptr<SnapshotReader>> Open(Repository& repo, VmStore& vm,
                                                      const SnapshotRecord& snapshot);
  const SnapshotRecord& snapshot() const { return snap_; }
  uint64_t segment_count() const { return segments_.size(); }
  uint32_t SegmentLength(uint64_t index) const;
  // True when the segment is all zeros (no recipe).
  bool SegmentIsZero(uint64_t index) const { return segments_[index] == 0; }

  // Fills buf[0, SegmentLength(index)) with the segment's bytes; zero blocks
  // are written as zeros. `data` (optional) receives the [begin, end) ranges
  // that are not zero blocks, relative to the segment.
  Status ReadSegment(uint64_t index, uint8_t* buf, Sha256Hasher& hasher,
                     std::vector<std::pair<uint32_t, uint32_t>>* data) const;

 private:
  SnapshotReader(Repository& repo, VmStore& vm, SnapshotRecord snap)
      : repo_(repo), vm_(vm), snap_(std::move(snap)) {}
  Repository& repo_;
  VmStore& vm_;
  SnapshotRecord snap_;
  std::vector<uint64_t> segments_;
};

}  // namespace vmdedup
