// The in-memory index of one CDS version, used by every backup at level 3.
//
// Compact: 24 bytes an entry (an 8-byte fingerprint prefix, the plaintext
// length, and where the record is: container slot, offset, record length),
// plus a bucket table of 4 bytes per 16 entries to start the search. The full
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
  // For tests: an index over `entries` (sorted by fingerprint) whose full
  // fingerprints come from `full` (entry number → fingerprint).
  static std::unique_ptr<CdsIndex> BuildForTest(
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

  struct Entry {  // 24 bytes
    uint64_t prefix;
    uint32_t length;
    uint32_t container_slot;  // into containers_
    uint32_t offset;
    uint32_t record_len;
  };
  static_assert(sizeof(Entry) == 24);

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
