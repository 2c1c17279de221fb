#include "store/records.h"

#include <algorithm>
#include <cstdio>
#include <limits>

#include "base/crc32c.h"
#include "base/encoding.h"
#include "store/container.h"

namespace vmdedup {
namespace {

enum RecordType : uint8_t {
  kVmInfo = 1,
  kSnapshot = 2,
  kSegmentList = 3,
  kSegmentRecipe = 4,
  kContainer = 5,
  kCounter = 6,
  kQuarantine = 7,
  kLostRecipe = 8,
};
// The record version each type is written with; a reader accepts 1 up to it.
// Snapshots: 2 appends the CDS version, 3 the source format (written only
// when there is one), 4 the image's exact length (only when it is not the
// virtual size), 5 the tags (only when there are some). Segment recipes: 2 appends each block's
// index in its record (written only when one is not 0).
uint8_t CurrentVersion(RecordType type) {
  if (type == kSnapshot) return 5;
  return type == kSegmentRecipe ? 2 : 1;
}

uint32_t EnvelopeCrc(std::string_view key, std::string_view head_and_body) {
  uint32_t crc = crc32c::Extend(0, key.data(), key.size());
  return crc32c::Extend(crc, head_and_body.data(), head_and_body.size());
}

// Starts a value: type and version; the caller appends the body, then Seal.
ByteWriter Begin(RecordType type, uint8_t version = 0) {
  ByteWriter w;
  w.U8(type);
  w.U8(version != 0 ? version : CurrentVersion(type));
  return w;
}

std::string Seal(std::string_view key, ByteWriter& w) {
  uint32_t crc = crc32c::Mask(EnvelopeCrc(key, w.buffer()));
  w.U32(crc);
  return w.Take();
}

// Verifies the envelope and returns the body and the record version.
Status Open(std::string_view key, std::string_view value, RecordType type, std::string_view* body,
            uint8_t* version = nullptr) {
  std::string what = "metadata record '" + std::string(key) + "'";
  if (value.size() < 6)
    return Status::Corruption(what + ": too short (" + std::to_string(value.size()) + " bytes)");
  std::string_view covered = value.substr(0, value.size() - 4);
  uint32_t stored = DecodeU32(reinterpret_cast<const uint8_t*>(value.data() + value.size() - 4));
  if (crc32c::Unmask(stored) != EnvelopeCrc(key, covered))
    return Status::Corruption(what + ": checksum mismatch");
  if (static_cast<uint8_t>(covered[0]) != type)
    return Status::Corruption(what + ": unexpected record type " +
                              std::to_string(static_cast<uint8_t>(covered[0])));
  uint8_t v = static_cast<uint8_t>(covered[1]);
  if (v == 0) return Status::Corruption(what + ": record version 0");
  if (v > CurrentVersion(type))
    return Status::NotSupported(what + ": record version " + std::to_string(v) +
                                " is newer than this vmdedup understands");
  *body = covered.substr(2);
  if (version != nullptr) *version = v;
  return Status::OK();
}

Status Finish(const ByteReader& r) {
  if (r.remaining() != 0)
    return Status::Corruption(r.what() + ": " + std::to_string(r.remaining()) + " trailing bytes");
  return Status::OK();
}

void PutStats(ByteWriter& w, const LevelStats& s) {
  for (uint64_t v : {s.read_bytes, s.zero, s.segment, s.block, s.cds, s.new_bytes, s.stored,
                     s.new_blocks, s.metadata})
    w.Varint(v);
}

Status GetStats(ByteReader& r, LevelStats* s) {
  for (uint64_t* v : {&s->read_bytes, &s->zero, &s->segment, &s->block, &s->cds, &s->new_bytes,
                      &s->stored, &s->new_blocks, &s->metadata})
    RETURN_IF_ERROR(r.Varint(v));
  return Status::OK();
}

template <typename T>
Status GetVarintAs(ByteReader& r, T* out) {
  uint64_t v = 0;
  RETURN_IF_ERROR(r.Varint(&v));
  if (v > static_cast<uint64_t>(std::numeric_limits<T>::max()))
    return Status::Corruption(r.what() + ": value out of range");
  *out = static_cast<T>(v);
  return Status::OK();
}

}  // namespace

void LevelStats::Add(const LevelStats& o) {
  read_bytes += o.read_bytes;
  zero += o.zero;
  segment += o.segment;
  block += o.block;
  cds += o.cds;
  new_bytes += o.new_bytes;
  stored += o.stored;
  new_blocks += o.new_blocks;
  metadata += o.metadata;
}

std::string SeqString(uint64_t seq) {
  char b[21];
  std::snprintf(b, sizeof(b), "%020llu", static_cast<unsigned long long>(seq));
  return b;
}

std::string VmInfoKey() { return "vm"; }
std::string SnapshotPrefix(std::string_view disk) {
  return std::string(kSnapshotKeyPrefix) + std::string(disk) + "/";
}
std::string SnapshotKey(std::string_view disk, uint64_t seq) {
  return SnapshotPrefix(disk) + SeqString(seq);
}
std::string SnapshotSegmentsKey(std::string_view disk, uint64_t seq) {
  return "snapseg/" + std::string(disk) + "/" + SeqString(seq);
}
std::string SegmentRecipeKey(uint64_t id) { return std::string(kSegmentKeyPrefix) + Hex16(id); }
std::string ContainerKey(uint64_t id) { return std::string(kContainerKeyPrefix) + Hex16(id); }
std::string CounterKey(std::string_view name) { return "next/" + std::string(name); }
std::string ContainerObjectName(std::string_view vm, uint64_t id) {
  return "vms/" + std::string(vm) + "/data/" + Hex16(id) + ".ctr";
}

bool ParseContainerObjectName(std::string_view vm, std::string_view name, uint64_t* id) {
  const std::string prefix = "vms/" + std::string(vm) + "/data/";
  if (name.substr(0, prefix.size()) != prefix) return false;
  name.remove_prefix(prefix.size());
  if (name.size() < 20 || name.substr(16, 4) != ".ctr") return false;
  if (name.size() > 20 && name.substr(20, 5) != ".tmp.") return false;
  return ParseHex16(name.substr(0, 16), id);
}

std::string CdsContainerObjectName(uint64_t id) { return "cds/data/" + Hex16(id) + ".ctr"; }
std::string BlockObjectName(std::string_view vm, const BlockRef& ref) {
  return ref.kind == BlockKind::kCds ? CdsContainerObjectName(ref.container)
                                     : ContainerObjectName(vm, ref.container);
}

Status ValidateName(std::string_view what, std::string_view name) {
  if (name.empty() || name.size() > 64)
    return Status::InvalidArgument(std::string(what) + " name must be 1 to 64 characters, got '" +
                                   std::string(name) + "'");
  if (name[0] == '.')
    return Status::InvalidArgument(std::string(what) + " name '" + std::string(name) +
                                   "' must not start with '.'");
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-';
    if (!ok)
      return Status::InvalidArgument(std::string(what) + " name '" + std::string(name) +
                                     "' may only contain letters, digits, '.', '_' and '-'");
  }
  return Status::OK();
}

std::string EncodeSnapshot(std::string_view key, const SnapshotRecord& r) {
  // Without a source format the record is version 2, as a repository of
  // format version 1 needs for an older vmdedup to read it.
  const bool odd_length = r.image_bytes != 0 && r.image_bytes != r.size;
  const bool tagged = !r.tags.empty();
  ByteWriter w = Begin(kSnapshot, tagged ? 5 : odd_length ? 4 : r.source_format.empty() ? 2 : 3);
  w.String(r.vm);
  w.String(r.disk);
  w.Varint(r.seq);
  w.Varint(r.parent_seq);
  w.U64(static_cast<uint64_t>(r.time));
  w.Varint(r.size);
  w.Varint(r.segment_size);
  w.U8(static_cast<uint8_t>(r.chunker.kind));
  w.Varint(r.chunker.avg_size);
  w.Varint(r.chunker.min_size);
  w.Varint(r.chunker.max_size);
  w.Varint(r.segment_count);
  PutStats(w, r.stats);
  w.Varint(r.duration_ms);
  w.String(r.source);
  w.String(r.read_mode);
  w.String(r.bitmap);
  w.Varint(r.cds_version);  // record version 2
  if (!r.source_format.empty() || odd_length || tagged) w.String(r.source_format);  // version 3
  if (odd_length || tagged) w.Varint(odd_length ? r.image_bytes : r.size);          // version 4
  if (tagged) {                                                                     // version 5
    w.Varint(r.tags.size());
    for (const std::string& t : r.tags) w.String(t);
  }
  return Seal(key, w);
}

Status DecodeSnapshot(std::string_view key, std::string_view value, SnapshotRecord* r) {
  std::string_view body;
  uint8_t version = 0;
  RETURN_IF_ERROR(Open(key, value, kSnapshot, &body, &version));
  ByteReader in(body, "snapshot record '" + std::string(key) + "'");
  uint64_t time = 0;
  uint8_t kind = 0;
  RETURN_IF_ERROR(in.String(&r->vm));
  RETURN_IF_ERROR(in.String(&r->disk));
  RETURN_IF_ERROR(in.Varint(&r->seq));
  RETURN_IF_ERROR(in.Varint(&r->parent_seq));
  RETURN_IF_ERROR(in.U64(&time));
  r->time = static_cast<int64_t>(time);
  RETURN_IF_ERROR(in.Varint(&r->size));
  RETURN_IF_ERROR(GetVarintAs(in, &r->segment_size));
  RETURN_IF_ERROR(in.U8(&kind));
  if (kind > static_cast<uint8_t>(ChunkerKind::kCdc))
    return Status::Corruption(in.what() + ": unknown chunker kind");
  r->chunker.kind = static_cast<ChunkerKind>(kind);
  RETURN_IF_ERROR(GetVarintAs(in, &r->chunker.avg_size));
  RETURN_IF_ERROR(GetVarintAs(in, &r->chunker.min_size));
  RETURN_IF_ERROR(GetVarintAs(in, &r->chunker.max_size));
  RETURN_IF_ERROR(in.Varint(&r->segment_count));
  RETURN_IF_ERROR(GetStats(in, &r->stats));
  RETURN_IF_ERROR(in.Varint(&r->duration_ms));
  RETURN_IF_ERROR(in.String(&r->source));
  RETURN_IF_ERROR(in.String(&r->read_mode));
  RETURN_IF_ERROR(in.String(&r->bitmap));
  r->cds_version = 0;
  r->source_format.clear();
  if (version >= 2) RETURN_IF_ERROR(in.Varint(&r->cds_version));
  r->image_bytes = 0;
  if (version >= 3) RETURN_IF_ERROR(in.String(&r->source_format));
  if (version >= 4) {
    RETURN_IF_ERROR(in.Varint(&r->image_bytes));
    if (r->image_bytes > r->size || r->size - r->image_bytes >= 512)
      return Status::Corruption(in.what() + ": image bytes " + std::to_string(r->image_bytes) +
                                " do not round up to the size " + std::to_string(r->size));
  }
  r->tags.clear();
  if (version >= 5) {
    uint64_t n = 0;
    RETURN_IF_ERROR(in.Varint(&n));
    if (n > in.remaining()) return Status::Corruption(in.what() + ": tag count out of bounds");
    r->tags.resize(n);
    for (std::string& t : r->tags) RETURN_IF_ERROR(in.String(&t));
  }
  if (r->segment_size == 0) return Status::Corruption(in.what() + ": segment size 0");
  if (r->segment_count != (r->size + r->segment_size - 1) / r->segment_size)
    return Status::Corruption(in.what() + ": segment count does not match the size");
  return Finish(in);
}

std::string EncodeSegmentList(std::string_view key, const std::vector<uint64_t>& ids) {
  ByteWriter w = Begin(kSegmentList);
  w.Varint(ids.size());
  for (uint64_t id : ids) w.Varint(id);
  return Seal(key, w);
}

Status DecodeSegmentList(std::string_view key, std::string_view value, std::vector<uint64_t>* ids) {
  std::string_view body;
  RETURN_IF_ERROR(Open(key, value, kSegmentList, &body));
  ByteReader in(body, "segment list '" + std::string(key) + "'");
  uint64_t n = 0;
  RETURN_IF_ERROR(in.Varint(&n));
  if (n > body.size()) return Status::Corruption(in.what() + ": count exceeds record size");
  ids->clear();
  ids->reserve(n);
  for (uint64_t i = 0; i < n; i++) {
    uint64_t id = 0;
    RETURN_IF_ERROR(in.Varint(&id));
    ids->push_back(id);
  }
  return Finish(in);
}

std::string EncodeSegmentRecipe(std::string_view key, const SegmentRecipe& r) {
  // Version 1 when no block lies inside a frame record: a repository of
  // format version 1 stays readable by a vmdedup that predates frames.
  const bool indexed =
      std::any_of(r.blocks.begin(), r.blocks.end(), [](const BlockRef& b) { return b.index != 0; });
  ByteWriter w = Begin(kSegmentRecipe, indexed ? 2 : 1);
  w.Varint(r.id);
  w.Varint(r.length);
  w.Varint(r.blocks.size());
  for (const BlockRef& b : r.blocks) {
    w.U8(static_cast<uint8_t>(b.kind));
    w.Varint(b.length);
    if (b.kind == BlockKind::kZero) continue;
    w.Bytes(b.fingerprint.bytes.data(), b.fingerprint.bytes.size());
    w.Varint(b.container);
    w.Varint(b.offset);
    w.Varint(b.record_len);
    if (indexed) w.Varint(b.index);
  }
  return Seal(key, w);
}

Status DecodeSegmentRecipe(std::string_view key, std::string_view value, SegmentRecipe* r) {
  std::string_view body;
  uint8_t version = 0;
  RETURN_IF_ERROR(Open(key, value, kSegmentRecipe, &body, &version));
  ByteReader in(body, "segment recipe '" + std::string(key) + "'");
  uint64_t n = 0;
  RETURN_IF_ERROR(in.Varint(&r->id));
  RETURN_IF_ERROR(GetVarintAs(in, &r->length));
  RETURN_IF_ERROR(in.Varint(&n));
  if (n > body.size()) return Status::Corruption(in.what() + ": count exceeds record size");
  r->blocks.clear();
  r->blocks.reserve(n);
  uint64_t total = 0;
  for (uint64_t i = 0; i < n; i++) {
    BlockRef b;
    uint8_t kind = 0;
    RETURN_IF_ERROR(in.U8(&kind));
    if (kind > static_cast<uint8_t>(BlockKind::kCds))
      return Status::Corruption(in.what() + ": unknown block kind " + std::to_string(kind));
    b.kind = static_cast<BlockKind>(kind);
    RETURN_IF_ERROR(GetVarintAs(in, &b.length));
    if (b.length == 0) return Status::Corruption(in.what() + ": empty block");
    if (b.kind != BlockKind::kZero) {
      RETURN_IF_ERROR(in.Bytes(b.fingerprint.bytes.data(), b.fingerprint.bytes.size()));
      RETURN_IF_ERROR(in.Varint(&b.container));
      RETURN_IF_ERROR(GetVarintAs(in, &b.offset));
      RETURN_IF_ERROR(GetVarintAs(in, &b.record_len));
      if (version >= 2) {
        RETURN_IF_ERROR(GetVarintAs(in, &b.index));
        if (b.index >= kMaxFrameBlocks || (b.kind == BlockKind::kCds && b.index != 0))
          return Status::Corruption(in.what() + ": block index " + std::to_string(b.index) +
                                    " out of range");
      }
    }
    total += b.length;
    r->blocks.push_back(b);
  }
  if (total != r->length)
    return Status::Corruption(in.what() + ": block lengths add up to " + std::to_string(total) +
                              ", not " + std::to_string(r->length));
  return Finish(in);
}

std::string EncodeContainerRecord(std::string_view key, const ContainerRecord& r) {
  ByteWriter w = Begin(kContainer);
  w.Varint(r.id);
  w.Varint(r.size);
  w.Varint(r.block_count);
  w.Varint(r.raw_bytes);
  w.String(r.object);
  w.String(r.written_by);
  return Seal(key, w);
}

Status DecodeContainerRecord(std::string_view key, std::string_view value, ContainerRecord* r) {
  std::string_view body;
  RETURN_IF_ERROR(Open(key, value, kContainer, &body));
  ByteReader in(body, "container record '" + std::string(key) + "'");
  RETURN_IF_ERROR(in.Varint(&r->id));
  RETURN_IF_ERROR(in.Varint(&r->size));
  RETURN_IF_ERROR(GetVarintAs(in, &r->block_count));
  RETURN_IF_ERROR(in.Varint(&r->raw_bytes));
  RETURN_IF_ERROR(in.String(&r->object));
  RETURN_IF_ERROR(in.String(&r->written_by));
  return Finish(in);
}

std::string EncodeCounter(std::string_view key, uint64_t v) {
  ByteWriter w = Begin(kCounter);
  w.Varint(v);
  return Seal(key, w);
}

Status DecodeCounter(std::string_view key, std::string_view value, uint64_t* v) {
  std::string_view body;
  RETURN_IF_ERROR(Open(key, value, kCounter, &body));
  ByteReader in(body, "counter '" + std::string(key) + "'");
  RETURN_IF_ERROR(in.Varint(v));
  return Finish(in);
}

std::string QuarantineKey(uint64_t container_id) {
  return std::string(kQuarantineKeyPrefix) + Hex16(container_id);
}

namespace {

// Quarantine and lost-recipe records share one body: varint id, u64 time,
// string reason; the key names the id.
std::string EncodeMark(RecordType type, std::string_view key, uint64_t id, int64_t time,
                       const std::string& reason) {
  ByteWriter w = Begin(type);
  w.Varint(id);
  w.U64(static_cast<uint64_t>(time));
  w.String(reason);
  return Seal(key, w);
}

Status DecodeMark(RecordType type, std::string_view key, std::string_view value,
                  const std::string& what, std::string (*key_of)(uint64_t), uint64_t* id,
                  int64_t* time, std::string* reason) {
  std::string_view body;
  RETURN_IF_ERROR(Open(key, value, type, &body));
  ByteReader in(body, what + " '" + std::string(key) + "'");
  uint64_t t = 0;
  RETURN_IF_ERROR(in.Varint(id));
  RETURN_IF_ERROR(in.U64(&t));
  RETURN_IF_ERROR(in.String(reason));
  *time = static_cast<int64_t>(t);
  RETURN_IF_ERROR(Finish(in));
  if (key != key_of(*id))
    return Status::Corruption(what + " '" + std::string(key) + "' names " + Hex16(*id));
  return Status::OK();
}

}  // namespace

std::string EncodeQuarantine(std::string_view key, const QuarantineRecord& r) {
  return EncodeMark(kQuarantine, key, r.container, r.time, r.reason);
}

Status DecodeQuarantine(std::string_view key, std::string_view value, QuarantineRecord* r) {
  return DecodeMark(kQuarantine, key, value, "quarantine record", QuarantineKey, &r->container,
                    &r->time, &r->reason);
}

std::string LostRecipeKey(uint64_t recipe_id) {
  return std::string(kLostRecipeKeyPrefix) + Hex16(recipe_id);
}

std::string EncodeLostRecipe(std::string_view key, const LostRecipeRecord& r) {
  return EncodeMark(kLostRecipe, key, r.recipe, r.time, r.reason);
}

Status DecodeLostRecipe(std::string_view key, std::string_view value, LostRecipeRecord* r) {
  return DecodeMark(kLostRecipe, key, value, "lost recipe record", LostRecipeKey, &r->recipe,
                    &r->time, &r->reason);
}

std::string EncodeVmInfo(std::string_view key, std::string_view vm, int64_t created) {
  ByteWriter w = Begin(kVmInfo);
  w.String(vm);
  w.U64(static_cast<uint64_t>(created));
  return Seal(key, w);
}

Status DecodeVmInfo(std::string_view key, std::string_view value, std::string* vm,
                    int64_t* created) {
  std::string_view body;
  RETURN_IF_ERROR(Open(key, value, kVmInfo, &body));
  ByteReader in(body, "VM record '" + std::string(key) + "'");
  uint64_t c = 0;
  RETURN_IF_ERROR(in.String(vm));
  RETURN_IF_ERROR(in.U64(&c));
  *created = static_cast<int64_t>(c);
  return Finish(in);
}

Status VerifyEnvelope(std::string_view key, std::string_view value) {
  if (value.size() < 6)
    return Status::Corruption("metadata record '" + std::string(key) + "': too short");
  std::string_view body;
  return Open(key, value, static_cast<RecordType>(static_cast<uint8_t>(value[0])), &body);
}

}  // namespace vmdedup
