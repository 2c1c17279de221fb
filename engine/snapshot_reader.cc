#include "engine/snapshot_reader.h"

#include <algorithm>
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

Result<SegmentRecipe> SnapshotReader::GetRecipe(uint64_t index) const {
  const std::string context = "snapshot " + snap_.Id() + ", segment " + std::to_string(index);
  auto recipe = vm_.GetSegmentRecipe(segments_[index]);
  if (!recipe.ok()) return recipe.status().WithContext(context);
  const uint32_t length = SegmentLength(index);
  if (recipe->length != length)
    return Status::Corruption(context + ": recipe " + SegmentRecipeKey(recipe->id) + " covers " +
                              std::to_string(recipe->length) + " bytes, expected " +
                              std::to_string(length));
  return recipe;
}

Status SnapshotReader::ReadSegment(uint64_t index, uint8_t* buf, Sha256Hasher& hasher,
                                   std::vector<std::pair<uint32_t, uint32_t>>* data) const {
  const uint32_t length = SegmentLength(index);
  if (data) data->clear();
  if (segments_[index] == 0) {
    std::memset(buf, 0, length);
    return Status::OK();
  }
  ASSIGN_OR_RETURN(SegmentRecipe recipe, GetRecipe(index));
  return DecodeRange(index, recipe, 0, length, buf, hasher, data);
}

Status SnapshotReader::ReadRange(uint64_t index, const SegmentRecipe& recipe, uint32_t begin,
                                 uint32_t end, uint8_t* out, Sha256Hasher& hasher) const {
  if (begin > end || end > recipe.length)
    return Status::InvalidArgument("range [" + std::to_string(begin) + ", " + std::to_string(end) +
                                   ") of segment " + std::to_string(index) + " of snapshot " +
                                   snap_.Id() + " is beyond its " + std::to_string(recipe.length) +
                                   " bytes");
  return DecodeRange(index, recipe, begin, end, out, hasher, nullptr);
}

Status SnapshotReader::DecodeRange(uint64_t index, const SegmentRecipe& recipe, uint32_t begin,
                                   uint32_t end, uint8_t* out, Sha256Hasher& hasher,
                                   std::vector<std::pair<uint32_t, uint32_t>>* data) const {
  const std::string context = "snapshot " + snap_.Id() + ", segment " + std::to_string(index);
  const auto& blocks = recipe.blocks;
  // Copies the part of a block at `pos` that lies in [begin, end).
  auto copy_overlap = [&](uint32_t pos, const uint8_t* src, uint32_t len) {
    const uint32_t b = std::max(pos, begin), e = std::min(pos + len, end);
    if (b < e) std::memcpy(out + (b - begin), src + (b - pos), e - b);
  };
  std::string run_bytes, plain;
  uint32_t pos = 0;
  size_t i = 0;
  while (i < blocks.size() && pos < end) {
    const BlockRef& b = blocks[i];
    if (pos + b.length <= begin) {  // before the range
      pos += b.length;
      i++;
      continue;
    }
    if (b.kind == BlockKind::kZero) {
      const uint32_t zb = std::max(pos, begin), ze = std::min(pos + b.length, end);
      std::memset(out + (zb - begin), 0, ze - zb);
      pos += b.length;
      i++;
      continue;
    }
    // Coalesce the following blocks of the range stored back to back in the
    // same object.
    size_t j = i + 1;
    uint64_t obj_end = static_cast<uint64_t>(b.offset) + b.record_len;
    uint32_t run_pos = pos + b.length;
    while (j < blocks.size() && run_pos < end && blocks[j].kind == b.kind &&
           blocks[j].container == b.container && blocks[j].offset == obj_end &&
           obj_end - b.offset < (8u << 20)) {
      obj_end += blocks[j].record_len;
      run_pos += blocks[j].length;
      j++;
    }
    const std::string object = BlockObjectName(vm_.vm(), b);
    Status st = repo_.objects()->GetRange(object, b.offset, obj_end - b.offset, &run_bytes);
    if (!st.ok()) return st.WithContext(context + ": read " + object);
    uint64_t rel = 0;
    for (size_t k = i; k < j; k++) {
      const BlockRef& r = blocks[k];
      std::string_view record(run_bytes.data() + rel, r.record_len);
      rel += r.record_len;
      std::string what = object + " at offset " + std::to_string(r.offset);
      // A block wholly inside the range decodes straight into `out`; one
      // the range cuts goes through `plain`.
      const bool whole = pos >= begin && pos + r.length <= end;
      std::span<uint8_t> dst;
      if (whole) {
        dst = {out + (pos - begin), r.length};
        st = DecodeBlockRecordInto(record, &r.fingerprint, dst, what);
      } else {
        st = DecodeBlockRecord(record, &r.fingerprint, &plain, what);
        if (st.ok() && plain.size() != r.length)
          st = Status::Corruption(what + " holds " + std::to_string(plain.size()) +
                                  " bytes, the recipe expects " + std::to_string(r.length));
        dst = {reinterpret_cast<uint8_t*>(plain.data()), plain.size()};
      }
      if (!st.ok()) return st.WithContext(context);
      if (hasher.Hash(dst) != r.fingerprint)
        return Status::Corruption(context + ": " + what + ": content does not match fingerprint " +
                                  r.fingerprint.Hex());
      if (!whole) copy_overlap(pos, dst.data(), r.length);
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
