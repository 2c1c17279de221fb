// The in-memory index of one CDS version, used by every backup at level 3.
//
// Compact: 20 bytes an entry (an 8-byte fingerprint prefix, the record's
// offset, and the plaintext length, record length and container slot packed
// into 64 bits), plus a bucket table of 4 bytes per 16 entries to start the
// search: 20.25 bytes a block in all. The full
// 32-byte fingerprints stay in the version's index objects; a prefix hit is
// confirmed by reading the entry's full fingerprint from there before the
// block is referenced, so a prefix collision is a miss, never a wrong block.
//
// Thread model: immutable after Load/Build; Lookup is safe from many threads
// at once (the confirmation read goes through the thread-safe ObjectStore).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "engine/common_block_index.h"
#include "store/cds_area.h"

namespace vmdedup {

class CdsIndex final : public CommonBlockIndex {
 public:
  // Reads a published version's index objects. Corruption names the object.
  // `objects` must outlive the index: Lookup reads confirmations from it.
  static Result<std::unique_ptr<CdsIndex>> Load(ObjectStore* objects, uint64_t version);
  // An index over `entries` (sorted by fingerprint) whose full fingerprints
  // come from `full` (entry number → fingerprint): an index held elsewhere
  // than in a published version (tests, benchmarks).
  static std::unique_ptr<CdsIndex> FromEntries(
      uint64_t version, const std::vector<CdsEntry>& entries,
      std::function<Result<Fingerprint>(uint64_t entry)> full);

  std::optional<BlockRef> Lookup(const Fingerprint& fp) const override;

  uint64_t version() const override { return version_; }
  uint64_t size() const { return entries_.size(); }
  // Bytes of memory the index holds (entries, buckets, container table).
  uint64_t MemoryBytes() const;
  // Prefix hits whose full fingerprint differed (misses), and confirmation
  // reads that failed (also misses: an unreadable index never fails a backup,
  // it only makes it store more).
  uint64_t prefix_collisions() const { return collisions_.load(); }
  uint64_t confirm_errors() const { return confirm_errors_.load(); }

  // 20 bytes, 4-byte aligned (no padding): the prefix in two halves, the
  // record offset, and length (21 bits) | record length (21) | container
  // slot (22) in two words.
  struct Entry {
    uint32_t prefix_hi, prefix_lo;
    uint32_t offset;
    uint32_t packed_lo, packed_hi;
    uint64_t prefix() const { return uint64_t{prefix_hi} << 32 | prefix_lo; }
    uint64_t packed() const { return uint64_t{packed_hi} << 32 | packed_lo; }
    uint32_t length() const { return static_cast<uint32_t>(packed() & kField21); }
    uint32_t record_len() const { return static_cast<uint32_t>(packed() >> 21 & kField21); }
    uint32_t slot() const { return static_cast<uint32_t>(packed() >> 42); }
  };
  static_assert(sizeof(Entry) == 20);
  static constexpr uint64_t kField21 = (uint64_t{1} << 21) - 1;
  static constexpr uint64_t kMaxContainers = uint64_t{1} << 22;

 private:
  CdsIndex() = default;
  Entry Compact(const CdsEntry& e) const;  // containers_ must hold e.container
  void BuildBuckets();
  size_t Bucket(uint64_t prefix) const { return shift_ >= 64 ? 0 : prefix >> shift_; }
  uint64_t version_ = 0;
  std::vector<Entry> entries_;     // sorted by prefix
  std::vector<uint32_t> buckets_;  // first entry whose prefix >> shift_ >= bucket
  unsigned shift_ = 64;
  std::vector<uint64_t> containers_;  // slot → CDS container id
  std::function<Result<Fingerprint>(uint64_t entry)> full_;
  mutable std::atomic<uint64_t> collisions_{0};
  mutable std::atomic<uint64_t> confirm_errors_{0};
};

}  // namespace vmdedup
