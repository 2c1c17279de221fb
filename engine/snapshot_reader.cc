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
  std::string run_bytes;
  thread_local std::vector<uint8_t> plain;    // blocks the range cuts, decoded
  thread_local std::vector<uint32_t> starts;  // of blocks k..m-1 in their record's plaintext
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
    // Coalesce the following blocks of the range whose records lie back to
    // back in the same object (or are the record just before: blocks of one
    // frame).
    size_t j = i + 1;
    uint64_t obj_end = static_cast<uint64_t>(b.offset) + b.record_len;
    uint32_t last_offset = b.offset;
    uint32_t run_pos = pos + b.length;
    while (j < blocks.size() && run_pos < end && blocks[j].kind == b.kind &&
           blocks[j].container == b.container && obj_end - b.offset < (8u << 20)) {
      const BlockRef& n = blocks[j];
      if (n.offset == last_offset && obj_end == uint64_t{n.offset} + n.record_len) {
        // the same record again
      } else if (n.offset == obj_end) {
        last_offset = n.offset;
        obj_end += n.record_len;
      } else {
        break;
      }
      run_pos += n.length;
      j++;
    }
    const std::string object = BlockObjectName(vm_.vm(), b);
    Status st = repo_.objects()->GetRange(object, b.offset, obj_end - b.offset, &run_bytes);
    if (!st.ok()) return st.WithContext(context + ": read " + object);
    for (size_t k = i; k < j;) {
      const BlockRef& r = blocks[k];
      std::string_view record(run_bytes.data() + (r.offset - b.offset), r.record_len);
      const std::string what = object + " at offset " + std::to_string(r.offset);
      RecordView view;
      st = RecordView::Parse(record, what, &view);
      if (!st.ok()) return st.WithContext(context);
      // The blocks k..m-1 of the recipe that this record holds, and how much
      // of its plaintext they need.
      size_t m = k + 1;
      while (m < j && blocks[m].offset == r.offset && blocks[m].record_len == r.record_len) m++;
      uint32_t need = 0;
      bool direct = true;  // blocks 0, 1, ... of the record, all inside the range
      uint32_t p = pos;
      starts.clear();
      for (size_t t = k; t < m; t++) {
        auto blk = view.Find(blocks[t].index, &blocks[t].fingerprint, blocks[t].length, what);
        if (!blk.ok()) return blk.status().WithContext(context);
        starts.push_back(blk->plain_offset);
        need = std::max(need, blk->plain_offset + blk->raw_len);
        direct = direct && blocks[t].index == t - k && p >= begin && p + blocks[t].length <= end;
        p += blocks[t].length;
      }
      // Decoded straight into `out` when the blocks are the record's
      // plaintext from its start, in order; else through `plain`.
      uint8_t* src;
      if (direct) {
        src = out + (pos - begin);
      } else {
        if (plain.size() < need) plain.resize(need);
        src = plain.data();
      }
      st = view.DecodePrefix({src, need}, what);
      if (!st.ok()) return st.WithContext(context);
      for (size_t t = k; t < m; t++) {
        const BlockRef& ref = blocks[t];
        const uint8_t* bytes = direct ? out + (pos - begin) : src + starts[t - k];
        if (hasher.Hash({bytes, ref.length}) != ref.fingerprint)
          return Status::Corruption(context + ": " + what + ": content of block " +
                                    std::to_string(ref.index) + " does not match fingerprint " +
                                    ref.fingerprint.Hex());
        if (!direct) copy_overlap(pos, bytes, ref.length);
        if (data) {
          if (!data->empty() && data->back().second == pos)
            data->back().second = pos + ref.length;
          else
            data->push_back({pos, pos + ref.length});
        }
        pos += ref.length;
      }
      k = m;
    }
    i = j;
  }
  return Status::OK();
}

}  // namespace vmdedup
