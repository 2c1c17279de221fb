// The compact in-memory index of one CDS version (engine/cds_index.h): entries
// sorted by their big-endian 8-byte fingerprint prefix, a bucket table over
// the top bits of the prefix, and a confirmation read of the full fingerprint
// from the version's index objects for every prefix hit.

#include "engine/cds_index.h"

#include <algorithm>
#include <bit>
#include <cstring>

namespace vmdedup {
namespace {

// The first 8 bytes as a big-endian integer: sorts like the fingerprint.
uint64_t BigEndianPrefix(const Fingerprint& fp) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v = (v << 8) | fp.bytes[i];
  return v;
}

}  // namespace

Result<std::unique_ptr<CdsIndex>> CdsIndex::Load(ObjectStore* objects, uint64_t version) {
  CdsArea area(objects);
  ASSIGN_OR_RETURN(CdsVersionInfo info, area.ReadManifest(version));
  // Count the entries from the objects' sizes before reserving memory for
  // them, so that a damaged manifest cannot ask for an absurd allocation.
  uint64_t total = 0;
  for (uint32_t part = 0; part < info.index_parts; part++) {
    std::string name = CdsArea::IndexObjectName(version, part);
    ASSIGN_OR_RETURN(uint64_t size, objects->Size(name));
    uint64_t header = CdsArea::IndexEntryOffset(0);
    if (size < header + 4 || (size - header - 4) % kCdsIndexEntrySize != 0)
      return Status::Corruption("CDS index " + name + ": size " + std::to_string(size) +
                                " is not that of whole entries");
    total += (size - header - 4) / kCdsIndexEntrySize;
  }
  if (total != info.block_count)
    return Status::Corruption("CDS manifest " + CdsArea::ManifestObjectName(version) + ": " +
                              std::to_string(info.block_count) +
                              " entries, its index objects hold " + std::to_string(total));
  if (total > UINT32_MAX)
    return Status::NotSupported("CDS version " + std::to_string(version) + ": " +
                                std::to_string(total) + " entries are too many for one index");

  std::unique_ptr<CdsIndex> index(new CdsIndex());
  index->version_ = version;
  index->containers_ = info.containers;
  index->containers_.shrink_to_fit();
  if (index->containers_.size() > kMaxContainers)
    return Status::NotSupported("CDS version " + std::to_string(version) + ": " +
                                std::to_string(index->containers_.size()) +
                                " containers are too many for one index");
  index->entries_.reserve(total);
  CdsIndex* ix = index.get();
  RETURN_IF_ERROR(area.ScanEntries(
      info, [ix](uint64_t, const CdsEntry& e) { ix->entries_.push_back(ix->Compact(e)); }));
  index->BuildBuckets();
  // One open reader per index object: a confirmation is one pread.
  std::vector<std::shared_ptr<const ObjectReader>> parts;
  for (uint32_t part = 0; part < info.index_parts; part++) {
    ASSIGN_OR_RETURN(std::unique_ptr<ObjectReader> reader,
                     objects->OpenReader(CdsArea::IndexObjectName(version, part)));
    parts.push_back(std::move(reader));
  }
  index->full_ = [parts = std::move(parts)](uint64_t entry) -> Result<Fingerprint> {
    const uint64_t part = entry / kCdsEntriesPerIndexPart;
    if (part >= parts.size())
      return Status::Corruption("CDS index entry " + std::to_string(entry) + ": no such part");
    std::string bytes;
    RETURN_IF_ERROR(parts[part]->ReadAt(
        CdsArea::IndexEntryOffset(static_cast<uint32_t>(entry % kCdsEntriesPerIndexPart)),
        sizeof(Fingerprint::bytes), &bytes));
    Fingerprint fp;
    std::memcpy(fp.bytes.data(), bytes.data(), fp.bytes.size());
    return fp;
  };
  return Result<std::unique_ptr<CdsIndex>>(std::move(index));
}

std::unique_ptr<CdsIndex> CdsIndex::FromEntries(
    uint64_t version, const std::vector<CdsEntry>& entries,
    std::function<Result<Fingerprint>(uint64_t entry)> full) {
  std::unique_ptr<CdsIndex> index(new CdsIndex());
  index->version_ = version;
  for (const CdsEntry& e : entries) index->containers_.push_back(e.container);
  std::sort(index->containers_.begin(), index->containers_.end());
  index->containers_.erase(std::unique(index->containers_.begin(), index->containers_.end()),
                           index->containers_.end());
  index->containers_.shrink_to_fit();
  index->entries_.reserve(entries.size());
  for (const CdsEntry& e : entries) index->entries_.push_back(index->Compact(e));
  index->BuildBuckets();
  index->full_ = std::move(full);
  return index;
}

CdsIndex::Entry CdsIndex::Compact(const CdsEntry& e) const {
  auto slot = std::lower_bound(containers_.begin(), containers_.end(), e.container);
  const uint64_t prefix = BigEndianPrefix(e.fingerprint);
  // The format bounds both lengths by 48 + 1 MiB < 2^21; Load checks the
  // number of containers against 2^22.
  const uint64_t packed = (uint64_t{e.length} & kField21) |
                          (uint64_t{e.record_len} & kField21) << 21 |
                          static_cast<uint64_t>(slot - containers_.begin()) << 42;
  return Entry{static_cast<uint32_t>(prefix >> 32), static_cast<uint32_t>(prefix), e.offset,
               static_cast<uint32_t>(packed), static_cast<uint32_t>(packed >> 32)};
}

void CdsIndex::BuildBuckets() {
  // About 16 entries a bucket: the largest power of two not above n / 16.
  const uint64_t n = entries_.size();
  const unsigned bits = n / 16 >= 2 ? static_cast<unsigned>(std::bit_width(n / 16)) - 1 : 0;
  shift_ = 64 - bits;
  const size_t count = size_t{1} << bits;
  buckets_.assign(count + 1, 0);
  uint32_t i = 0;
  for (size_t b = 0; b < count; b++) {
    while (i < n && Bucket(entries_[i].prefix()) < b) i++;
    buckets_[b] = i;
  }
  buckets_[count] = static_cast<uint32_t>(n);
}

std::optional<BlockRef> CdsIndex::Lookup(const Fingerprint& fp) const {
  const uint64_t prefix = BigEndianPrefix(fp);
  const size_t b = Bucket(prefix);
  auto first = entries_.begin() + buckets_[b];
  auto last = entries_.begin() + buckets_[b + 1];
  auto it = std::lower_bound(first, last, prefix,
                             [](const Entry& e, uint64_t p) { return e.prefix() < p; });
  // Entries sharing the prefix are adjacent; each is confirmed on its own.
  // Every one whose full fingerprint differs counts as a collision.
  for (; it != last && it->prefix() == prefix; ++it) {
    const uint64_t entry = static_cast<uint64_t>(it - entries_.begin());
    Result<Fingerprint> full = full_(entry);
    if (!full.ok()) {
      confirm_errors_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    if (*full != fp) {
      collisions_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    BlockRef ref;
    ref.kind = BlockKind::kCds;
    ref.length = it->length();
    ref.fingerprint = fp;
    ref.container = containers_[it->slot()];
    ref.offset = it->offset;
    ref.record_len = it->record_len();
    return ref;
  }
  return std::nullopt;
}

uint64_t CdsIndex::MemoryBytes() const {
  return sizeof(*this) + entries_.capacity() * sizeof(Entry) +
         buckets_.capacity() * sizeof(uint32_t) + containers_.capacity() * sizeof(uint64_t);
}

}  // namespace vmdedup
