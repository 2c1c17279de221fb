// SnapshotReader: the one read path from a snapshot to its bytes, shared by
// restore and (later) the NBD export. Resolves segment recipes, reads block
// records from containers (coalescing neighbours of one container into one
// read), verifies each record's checksum, decompresses, and re-hashes the
// plaintext against the recipe's fingerprint, so a damaged byte is an error
// naming the snapshot and the object, never wrong data.
//
// Thread model: after Open, ReadSegment, GetRecipe and ReadRange may be
// called from many threads at once (each with its own Sha256Hasher); the
// reader itself is immutable.
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

  // The recipe of segment `index` (not all zero), checked to cover exactly
  // SegmentLength(index): for callers that read it in parts.
  Result<SegmentRecipe> GetRecipe(uint64_t index) const;

  // Fills out[0, end - begin) with the bytes [begin, end) of segment `index`
  // whose recipe `recipe` GetRecipe returned, reading, verifying and
  // decompressing only the blocks that overlap the range: a small random read
  // costs one or two blocks, not the whole segment.
  Status ReadRange(uint64_t index, const SegmentRecipe& recipe, uint32_t begin, uint32_t end,
                   uint8_t* out, Sha256Hasher& hasher) const;

 private:
  // ReadRange's work; `data` as in ReadSegment (for whole-segment reads).
  Status DecodeRange(uint64_t index, const SegmentRecipe& recipe, uint32_t begin, uint32_t end,
                     uint8_t* out, Sha256Hasher& hasher,
                     std::vector<std::pair<uint32_t, uint32_t>>* data) const;

  SnapshotReader(Repository& repo, VmStore& vm, SnapshotRecord snap)
      : repo_(repo), vm_(vm), snap_(std::move(snap)) {}
  Repository& repo_;
  VmStore& vm_;
  SnapshotRecord snap_;
  std::vector<uint64_t> segments_;
};

}  // namespace vmdedup
