#include "engine/snapshot_reader.h"

#include <cstring>

#include "store/container.h"

namespace vmdedup {

Result<std::unique_ptr<SnapshotReader>> SnapshotReader::Open(Repository& repo, VmStore& vm,
                                                             const SnapshotRecord& snapshot) {
  std::unique_ptr<SnapshotReader> r(new SnapshotReader(repo, vm, snapshot));
  ASSIGN_OR_RETURN(r->segments_, vm.GetSnapshotSegments(snapshot.disk, snapshot.seq));
  if (r->segments_.size() != snapshot.segment_count)
    return Status::Corruption("snapshot " + snapshot.Id() + ": segment list has " +
                              std::to_string(r->segments_.size()) + " entries, expected " +
                              std::to_string(snapshot.segment_count));
  return r;
}

uint32_t SnapshotReader::SegmentLength(uint64_t index) const {
  uint64_t off = index * snap_.segment_size;
  return static_cast<uint32_t>(std::min<uint64_t>(snap_.segment_size, snap_.size - off));
}

Status SnapshotReader::ReadSegment(uint64_t index, uint8_t* buf, Sha256Hasher& hasher,
                                   std::vector<std::pair<uint32_t, uint32_t>>* data) const {
  const uint32_t length = SegmentLength(index);
  if (data) data->clear();
  if (segments_[index] == 0) {
    std::memset(buf, 0, length);
    return Status::OK();
  }
  const std::string context = "snapshot " + snap_.Id() + ", segment " + std::to_string(index);
  auto recipe = vm_.GetSegmentRecipe(segments_[index]);
  if (!recipe.ok()) return recipe.status().WithContext(context);
  if (recipe->length != length)
    return Status::Corruption(context + ": recipe " + SegmentRecipeKey(recipe->id) + " covers " +
                              std::to_string(recipe->length) + " bytes, expected " +
                              std::to_string(length));
  const auto& blocks = recipe->blocks;
  std::string run_bytes, plain;
  uint32_t pos = 0;
  size_t i = 0;
  while (i < blocks.size()) {
    const BlockRef& b = blocks[i];
    if (b.kind == BlockKind::kZero) {
      std::memset(buf + pos, 0, b.length);
      pos += b.length;
      i++;
      continue;
    }
    // Coalesce the following blocks stored back to back in the same object.
    size_t j = i + 1;
    uint64_t end = static_cast<uint64_t>(b.offset) + b.record_len;
    while (j < blocks.size() && blocks[j].kind == b.kind && blocks[j].container == b.container &&
           blocks[j].offset == end && end - b.offset < (8u << 20)) {
      end += blocks[j].record_len;
      j++;
    }
    const std::string object = BlockObjectName(vm_.vm(), b);
    Status st = repo_.objects()->GetRange(object, b.offset, end - b.offset, &run_bytes);
    if (!st.ok()) return st.WithContext(context + ": read " + object);
    uint64_t rel = 0;
    for (size_t k = i; k < j; k++) {
      const BlockRef& r = blocks[k];
      std::string_view record(run_bytes.data() + rel, r.record_len);
      rel += r.record_len;
      std::string what = object + " at offset " + std::to_string(r.offset);
      st = DecodeBlockRecord(record, &r.fingerprint, &plain, what);
      if (!st.ok()) return st.WithContext(context);
      if (plain.size() != r.length)
        return Status::Corruption(context + ": " + what + " holds " + std::to_string(plain.size()) +
                                  " bytes, the recipe expects " + std::to_string(r.length));
      if (hasher.Hash({reinterpret_cast<const uint8_t*>(plain.data()), plain.size()}) !=
          r.fingerprint)
        return Status::Corruption(context + ": " + what + ": content does not match fingerprint " +
                                  r.fingerprint.Hex());
      std::memcpy(buf + pos, plain.data(), r.length);
      if (data) {
        if (!data->empty() && data->back().second == pos)
          data->back().second = pos + r.length;
        else
          data->push_back({pos, pos + r.length});
      }
      pos += r.length;
    }
    i = j;
  }
  return Status::OK();
}

}  // namespace vmdedup
