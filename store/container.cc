// Container encoding and validation. Byte layout (all integers little
// endian; docs/format.md is the full description):
//
// Header, 32 bytes, at offset 0:
//    0  magic "VMDDCTR1"          8
//    8  u32 format version (1: block records only, 2: frame records too)
//   12  u32 flags (0)             4
//   16  u64 container id          8
//   24  u32 reserved (0)          4
//   28  u32 masked crc32c of bytes [0, 28)
//
// Records, back to back from offset 32, told apart by their byte 1.
// A block record is a 48-byte header and the payload (record_len = 48 +
// payload_len):
//    0  u8  compression (0 none, 1 zstd)
//    1  u8  kind (0)
//    2  u8[2] reserved (0)
//    4  u32 raw_len (plaintext bytes, <= kMaxBlockSize)
//    8  u32 payload_len (stored bytes, <= kMaxBlockSize; == raw_len if none)
//   12  fingerprint (SHA-256 of the plaintext), 32 bytes
//   44  u32 masked crc32c of header bytes [0, 44) followed by the payload
//   48  payload
// A frame record is a 16-byte header, a table of n blocks and the payload,
// the blocks' plaintexts back to back compressed as one (record_len = 16 +
// 36 n + payload_len):
//    0  u8  compression (0 none, 1 zstd)
//    1  u8  kind (1)
//    2  u16 block count n (2..256)
//    4  u32 raw_len (the blocks' lengths added up, <= kMaxBlockSize)
//    8  u32 payload_len (<= kMaxBlockSize; == raw_len if none)
//   12  u32 masked crc32c of header bytes [0, 12), the table and the payload
//   16  n entries: fingerprint (32) | u32 raw length (>= 1)
//
// Trailer, 32 bytes, at the end:
//    0  magic "VMDDEND1"          8
//    8  u32 record count          4
//   12  u32 reserved (0)          4
//   16  u64 trailer offset (= header + records bytes = object size - 32)
//   24  u32 reserved (0)          4
//   28  u32 masked crc32c of bytes [0, 28) of the trailer
//
// Every byte of a container is covered by a checksum, so any single-byte
// change is detected; reserved fields must be zero.

#include "store/container.h"

#include <algorithm>
#include <cassert>
#include <cstring>
#include <utility>

#include "base/crc32c.h"
#include "base/encoding.h"

namespace vmdedup {
namespace {

constexpr char kHeaderMagic[8] = {'V', 'M', 'D', 'D', 'C', 'T', 'R', '1'};
constexpr char kTrailerMagic[8] = {'V', 'M', 'D', 'D', 'E', 'N', 'D', '1'};
constexpr size_t kCrcOffset = 28;          // in header and trailer
constexpr size_t kRecordCrcOffset = 44;    // in a block record header
constexpr size_t kFingerprintOffset = 12;  // in a block record header
constexpr size_t kFrameCrcOffset = 12;     // in a frame record header
constexpr uint8_t kBlockKind = 0;
constexpr uint8_t kFrameKind = 1;

const uint8_t* U8(std::string_view s) { return reinterpret_cast<const uint8_t*>(s.data()); }

std::string At(const std::string& what, uint64_t offset) {
  return what + ": at offset " + std::to_string(offset) + ": ";
}

uint32_t RecordCrc(const uint8_t* header, std::span<const uint8_t> payload) {
  uint32_t crc = crc32c::Extend(0, header, kRecordCrcOffset);
  return crc32c::Mask(crc32c::Extend(crc, payload.data(), payload.size()));
}

// Fields of a record header, checked for structure (not for the checksum).
struct RecordHeader {
  uint8_t compression;
  uint32_t raw_len;
  uint32_t payload_len;
  uint32_t crc;
  Fingerprint fingerprint;
};

// `p` points at kBlockRecordHeaderSize bytes. `prefix` is "what: at offset N: ".
Status ParseRecordHeader(const uint8_t* p, RecordHeader* h, const std::string& prefix) {
  h->compression = p[0];
  h->raw_len = DecodeU32(p + 4);
  h->payload_len = DecodeU32(p + 8);
  std::memcpy(h->fingerprint.bytes.data(), p + kFingerprintOffset, h->fingerprint.bytes.size());
  h->crc = DecodeU32(p + kRecordCrcOffset);
  if (h->compression != static_cast<uint8_t>(Compression::kNone) &&
      h->compression != static_cast<uint8_t>(Compression::kZstd)) {
    return Status::Corruption(prefix + "unknown compression " + std::to_string(h->compression));
  }
  if (p[1] != kBlockKind) {
    return Status::Corruption(prefix + "record of kind " + std::to_string(p[1]) +
                              " where a block record was expected");
  }
  if (p[2] != 0 || p[3] != 0) {
    return Status::Corruption(prefix + "nonzero reserved bytes in block record");
  }
  if (h->raw_len > kMaxBlockSize) {
    return Status::Corruption(prefix + "block raw length " + std::to_string(h->raw_len) +
                              " exceeds the maximum " + std::to_string(kMaxBlockSize));
  }
  if (h->payload_len > kMaxBlockSize) {
    return Status::Corruption(prefix + "block payload length " + std::to_string(h->payload_len) +
                              " exceeds the maximum " + std::to_string(kMaxBlockSize));
  }
  if (h->compression == static_cast<uint8_t>(Compression::kNone) && h->payload_len != h->raw_len) {
    return Status::Corruption(prefix + "uncompressed block with payload length " +
                              std::to_string(h->payload_len) + " != raw length " +
                              std::to_string(h->raw_len));
  }
  return Status::OK();
}

// Validates a record lying at `record` (exactly header + payload bytes).
Status CheckRecord(std::string_view record, const std::string& prefix, RecordHeader* h) {
  if (record.size() < kBlockRecordHeaderSize) {
    return Status::Corruption(prefix + "block record truncated: " + std::to_string(record.size()) +
                              " bytes");
  }
  const uint8_t* p = U8(record);
  // Length before checksum (the checksum's extent depends on it), the
  // remaining fields only once the checksum vouches for them.
  uint32_t payload_len = DecodeU32(p + 8);
  if (payload_len != record.size() - kBlockRecordHeaderSize) {
    return Status::Corruption(prefix + "block record length " + std::to_string(record.size()) +
                              " does not match its payload length " + std::to_string(payload_len));
  }
  std::span<const uint8_t> payload(p + kBlockRecordHeaderSize, payload_len);
  if (RecordCrc(p, payload) != DecodeU32(p + kRecordCrcOffset)) {
    return Status::Corruption(prefix + "block record checksum mismatch");
  }
  return ParseRecordHeader(p, h, prefix);
}

bool ValidCompression(uint8_t c) {
  return c == static_cast<uint8_t>(Compression::kNone) ||
         c == static_cast<uint8_t>(Compression::kZstd);
}

// The size a record at `p` (at least 16 bytes available, `avail` in all)
// claims from its header, or 0 when its kind is unknown or its length
// fields are out of bounds (the caller reports that).
size_t ClaimedRecordSize(const uint8_t* p, size_t avail) {
  if (p[1] == kBlockKind) {
    if (avail < kBlockRecordHeaderSize) return 0;
    uint32_t payload_len = DecodeU32(p + 8);
    if (payload_len > kMaxBlockSize) return 0;
    return kBlockRecordHeaderSize + payload_len;
  }
  if (p[1] == kFrameKind) {
    uint32_t n = DecodeU16(p + 2);
    uint32_t payload_len = DecodeU32(p + 8);
    if (n < 2 || n > kMaxFrameBlocks || payload_len > kMaxBlockSize) return 0;
    return ContainerWriter::FrameRecordSize(n, payload_len);
  }
  return 0;
}

}  // namespace

Status RecordView::Parse(std::string_view record, const std::string& what, RecordView* v) {
  const std::string prefix = what + ": ";
  if (record.size() < kFrameRecordHeaderSize) {
    return Status::Corruption(prefix + "record truncated: " + std::to_string(record.size()) +
                              " bytes");
  }
  const uint8_t* p = U8(record);
  v->record_ = record;
  if (p[1] != kFrameKind) {
    RecordHeader h;
    RETURN_IF_ERROR(CheckRecord(record, prefix, &h));
    v->frame_ = false;
    v->table_ = nullptr;
    v->block_count_ = 1;
    v->raw_len_ = h.raw_len;
    v->fingerprint_ = h.fingerprint;
    v->compression_ = static_cast<Compression>(h.compression);
    v->payload_ = {p + kBlockRecordHeaderSize, h.payload_len};
    return Status::OK();
  }
  const uint32_t n = DecodeU16(p + 2);
  const uint32_t raw_len = DecodeU32(p + 4);
  const uint32_t payload_len = DecodeU32(p + 8);
  if (n < 2 || n > kMaxFrameBlocks) {
    return Status::Corruption(prefix + "frame record of " + std::to_string(n) + " blocks (2 to " +
                              std::to_string(kMaxFrameBlocks) + ")");
  }
  if (payload_len > kMaxBlockSize ||
      record.size() != ContainerWriter::FrameRecordSize(n, payload_len)) {
    return Status::Corruption(prefix + "frame record length " + std::to_string(record.size()) +
                              " does not match its " + std::to_string(n) +
                              " blocks and payload length " + std::to_string(payload_len));
  }
  uint32_t crc = crc32c::Extend(0, p, kFrameCrcOffset);
  crc = crc32c::Extend(crc, p + kFrameRecordHeaderSize, record.size() - kFrameRecordHeaderSize);
  if (crc32c::Mask(crc) != DecodeU32(p + kFrameCrcOffset)) {
    return Status::Corruption(prefix + "frame record checksum mismatch");
  }
  if (!ValidCompression(p[0])) {
    return Status::Corruption(prefix + "unknown compression " + std::to_string(p[0]));
  }
  if (raw_len > kMaxBlockSize) {
    return Status::Corruption(prefix + "frame raw length " + std::to_string(raw_len) +
                              " exceeds the maximum " + std::to_string(kMaxBlockSize));
  }
  if (p[0] == static_cast<uint8_t>(Compression::kNone) && payload_len != raw_len) {
    return Status::Corruption(prefix + "uncompressed frame with payload length " +
                              std::to_string(payload_len) + " != raw length " +
                              std::to_string(raw_len));
  }
  const uint8_t* table = p + kFrameRecordHeaderSize;
  uint64_t sum = 0;
  for (uint32_t i = 0; i < n; i++) {
    uint32_t len = DecodeU32(table + i * kFrameTableEntrySize + 32);
    if (len == 0) {
      return Status::Corruption(prefix + "frame block " + std::to_string(i) + " has length 0");
    }
    sum += len;
  }
  if (sum != raw_len) {
    return Status::Corruption(prefix + "frame blocks add up to " + std::to_string(sum) +
                              " bytes, its header says " + std::to_string(raw_len));
  }
  v->frame_ = true;
  v->table_ = table;
  v->block_count_ = n;
  v->raw_len_ = raw_len;
  v->fingerprint_ = Fingerprint();
  v->compression_ = static_cast<Compression>(p[0]);
  v->payload_ = {table + kFrameTableEntrySize * n, payload_len};
  return Status::OK();
}

BlockRecordInfo RecordView::info(uint32_t offset) const {
  BlockRecordInfo info;
  info.offset = offset;
  info.record_len = static_cast<uint32_t>(record_.size());
  info.raw_len = raw_len_;
  info.compression = compression_;
  info.fingerprint = fingerprint_;
  info.block_count = block_count_;
  return info;
}

RecordView::Block RecordView::block(uint32_t i) const {
  Block b;
  if (!frame_) {
    b.fingerprint = fingerprint_;
    b.raw_len = raw_len_;
    return b;
  }
  for (uint32_t k = 0; k < i; k++)
    b.plain_offset += DecodeU32(table_ + k * kFrameTableEntrySize + 32);
  const uint8_t* e = table_ + i * kFrameTableEntrySize;
  std::memcpy(b.fingerprint.bytes.data(), e, b.fingerprint.bytes.size());
  b.raw_len = DecodeU32(e + 32);
  return b;
}

Result<RecordView::Block> RecordView::Find(uint32_t index, const Fingerprint* expected,
                                           uint32_t length, const std::string& what) const {
  if (index >= block_count_) {
    return Status::Corruption(what + ": the recipe addresses block " + std::to_string(index) +
                              " of a record of " + std::to_string(block_count_));
  }
  Block b = block(index);
  if (expected != nullptr && b.fingerprint != *expected) {
    return Status::Corruption(what + ": block record holds fingerprint " + b.fingerprint.Hex() +
                              ", expected " + expected->Hex());
  }
  if (b.raw_len != length) {
    return Status::Corruption(what + ": block record holds " + std::to_string(b.raw_len) +
                              " bytes, expected " + std::to_string(length));
  }
  return b;
}

Status RecordView::DecodePrefix(std::span<uint8_t> out, const std::string& what) const {
  return DecompressPrefix(compression_, payload_, raw_len_, out, what);
}

Status DecodeBlock(std::string_view record, uint32_t index, const Fingerprint* expected,
                   std::string* plaintext, const std::string& what) {
  RecordView view;
  RETURN_IF_ERROR(RecordView::Parse(record, what, &view));
  if (index >= view.block_count()) {
    return Status::Corruption(what + ": the recipe addresses block " + std::to_string(index) +
                              " of a record of " + std::to_string(view.block_count()));
  }
  const uint32_t length = view.block(index).raw_len;
  ASSIGN_OR_RETURN(RecordView::Block b, view.Find(index, expected, length, what));
  plaintext->resize(b.plain_offset + b.raw_len);
  Status st =
      view.DecodePrefix({reinterpret_cast<uint8_t*>(plaintext->data()), plaintext->size()}, what);
  if (!st.ok()) {
    plaintext->clear();
    return st;
  }
  plaintext->erase(0, b.plain_offset);
  return Status::OK();
}

ContainerWriter::ContainerWriter(uint64_t container_id, size_t capacity)
    : id_(container_id), capacity_(std::min(capacity, kMaxContainerSize)) {
  buf_.reserve(capacity_);
  Reset(container_id);
}

bool ContainerWriter::Fits(size_t payload_len) const {
  if (payload_len > kMaxBlockSize || count_ == UINT32_MAX) return false;
  return buf_.size() + kBlockRecordHeaderSize + payload_len + kContainerTrailerSize <= capacity_;
}

BlockRecordInfo ContainerWriter::Append(const Fingerprint& fp, uint32_t raw_len, Compression c,
                                        std::span<const uint8_t> payload) {
  assert(Fits(payload.size()));
  assert(raw_len <= kMaxBlockSize);
  assert(c != Compression::kNone || payload.size() == raw_len);
  uint8_t h[kBlockRecordHeaderSize] = {};
  h[0] = static_cast<uint8_t>(c);
  EncodeU32(h + 4, raw_len);
  EncodeU32(h + 8, static_cast<uint32_t>(payload.size()));
  std::memcpy(h + kFingerprintOffset, fp.bytes.data(), fp.bytes.size());
  EncodeU32(h + kRecordCrcOffset, RecordCrc(h, payload));

  BlockRecordInfo info;
  info.offset = static_cast<uint32_t>(buf_.size());
  info.record_len = static_cast<uint32_t>(kBlockRecordHeaderSize + payload.size());
  info.raw_len = raw_len;
  info.compression = c;
  info.fingerprint = fp;
  buf_.append(reinterpret_cast<const char*>(h), sizeof(h));
  buf_.append(reinterpret_cast<const char*>(payload.data()), payload.size());
  count_++;
  blocks_++;
  return info;
}

bool ContainerWriter::FitsRecord(size_t record_len) const {
  return count_ != UINT32_MAX && buf_.size() + record_len + kContainerTrailerSize <= capacity_;
}

uint32_t ContainerWriter::AppendRecord(const RecordView& view, std::string_view record) {
  assert(FitsRecord(record.size()));
  const auto offset = static_cast<uint32_t>(buf_.size());
  buf_.append(record.data(), record.size());
  count_++;
  blocks_ += view.block_count();
  if (view.is_frame()) has_frames_ = true;
  return offset;
}

bool ContainerWriter::FitsFrame(size_t blocks, size_t payload_len) const {
  if (blocks < 2 || blocks > kMaxFrameBlocks || payload_len > kMaxBlockSize || count_ == UINT32_MAX)
    return false;
  return buf_.size() + FrameRecordSize(blocks, payload_len) + kContainerTrailerSize <= capacity_;
}

BlockRecordInfo ContainerWriter::AppendFrame(std::span<const FrameBlock> blocks, Compression c,
                                             std::span<const uint8_t> payload) {
  assert(FitsFrame(blocks.size(), payload.size()));
  uint64_t raw_len = 0;
  for (const FrameBlock& b : blocks) {
    assert(b.raw_len > 0);
    raw_len += b.raw_len;
  }
  assert(raw_len <= kMaxBlockSize);
  assert(c != Compression::kNone || payload.size() == raw_len);
  BlockRecordInfo info;
  info.offset = static_cast<uint32_t>(buf_.size());
  info.record_len = static_cast<uint32_t>(FrameRecordSize(blocks.size(), payload.size()));
  info.raw_len = static_cast<uint32_t>(raw_len);
  info.compression = c;
  info.block_count = static_cast<uint32_t>(blocks.size());

  uint8_t h[kFrameRecordHeaderSize] = {};
  h[0] = static_cast<uint8_t>(c);
  h[1] = kFrameKind;
  EncodeU16(h + 2, static_cast<uint16_t>(blocks.size()));
  EncodeU32(h + 4, info.raw_len);
  EncodeU32(h + 8, static_cast<uint32_t>(payload.size()));
  buf_.append(reinterpret_cast<const char*>(h), sizeof(h));
  for (const FrameBlock& b : blocks) {
    uint8_t e[kFrameTableEntrySize];
    std::memcpy(e, b.fingerprint.bytes.data(), b.fingerprint.bytes.size());
    EncodeU32(e + 32, b.raw_len);
    buf_.append(reinterpret_cast<const char*>(e), sizeof(e));
  }
  buf_.append(reinterpret_cast<const char*>(payload.data()), payload.size());
  uint8_t* rec = reinterpret_cast<uint8_t*>(buf_.data()) + info.offset;
  uint32_t crc = crc32c::Extend(0, rec, kFrameCrcOffset);
  crc = crc32c::Extend(crc, rec + kFrameRecordHeaderSize, info.record_len - kFrameRecordHeaderSize);
  EncodeU32(rec + kFrameCrcOffset, crc32c::Mask(crc));
  count_++;
  blocks_ += info.block_count;
  has_frames_ = true;
  return info;
}

std::string ContainerWriter::Finish() {
  FinishInPlace();
  std::string out = std::move(buf_);
  Reset(id_ + 1);
  return out;
}

std::string_view ContainerWriter::FinishInPlace() {
  if (has_frames_) {  // version 2: patch the header and its checksum
    uint8_t* h = reinterpret_cast<uint8_t*>(buf_.data());
    EncodeU32(h + 8, 2);
    EncodeU32(h + kCrcOffset, crc32c::Mask(crc32c::Value(h, kCrcOffset)));
  }
  uint8_t t[kContainerTrailerSize] = {};
  std::memcpy(t, kTrailerMagic, sizeof(kTrailerMagic));
  EncodeU32(t + 8, count_);
  EncodeU64(t + 16, buf_.size());
  EncodeU32(t + kCrcOffset, crc32c::Mask(crc32c::Value(t, kCrcOffset)));
  buf_.append(reinterpret_cast<const char*>(t), sizeof(t));
  return buf_;
}

void ContainerWriter::Reset(uint64_t next_id, std::string buffer) {
  buf_ = std::move(buffer);
  buf_.clear();
  buf_.reserve(capacity_);
  Reset(next_id);
}

void ContainerWriter::Reset(uint64_t next_id) {
  id_ = next_id;
  count_ = 0;
  blocks_ = 0;
  has_frames_ = false;
  buf_.clear();
  uint8_t h[kContainerHeaderSize] = {};
  std::memcpy(h, kHeaderMagic, sizeof(kHeaderMagic));
  EncodeU32(h + 8, 1);  // 2 once a frame record is appended (FinishInPlace)
  EncodeU32(h + 12, 0);
  EncodeU64(h + 16, id_);
  EncodeU32(h + 24, 0);
  EncodeU32(h + kCrcOffset, crc32c::Mask(crc32c::Value(h, kCrcOffset)));
  buf_.append(reinterpret_cast<const char*>(h), sizeof(h));
}

namespace {

// A record's checksum and fields, and its fingerprint against `expected`
// when given: what both decoders check before decompressing.
Status CheckRecordFor(std::string_view record, const Fingerprint* expected,
                      const std::string& prefix, RecordHeader* h) {
  RETURN_IF_ERROR(CheckRecord(record, prefix, h));
  if (expected != nullptr && h->fingerprint != *expected) {
    return Status::Corruption(prefix + "block record holds fingerprint " + h->fingerprint.Hex() +
                              ", expected " + expected->Hex());
  }
  return Status::OK();
}

}  // namespace

Status DecodeBlockRecord(std::string_view record, const Fingerprint* expected,
                         std::string* plaintext, const std::string& what) {
  RecordHeader h;
  RETURN_IF_ERROR(CheckRecordFor(record, expected, what + ": ", &h));
  std::span<const uint8_t> payload(U8(record) + kBlockRecordHeaderSize, h.payload_len);
  return Decompress(static_cast<Compression>(h.compression), payload, h.raw_len, plaintext, what);
}

Status ForEachBlockRecord(
    std::string_view container, uint64_t expected_id, const std::string& what,
    const std::function<Status(const BlockRecordInfo&, std::string_view record)>& fn) {
  const size_t size = container.size();
  if (size < kContainerHeaderSize + kContainerTrailerSize) {
    return Status::Corruption(what + ": container truncated: " + std::to_string(size) + " bytes");
  }
  if (size > kMaxContainerSize) {
    return Status::Corruption(what + ": container of " + std::to_string(size) +
                              " bytes exceeds the maximum " + std::to_string(kMaxContainerSize));
  }
  const uint8_t* p = U8(container);

  // Header.
  if (std::memcmp(p, kHeaderMagic, sizeof(kHeaderMagic)) != 0) {
    return Status::Corruption(At(what, 0) + "bad container magic");
  }
  if (crc32c::Mask(crc32c::Value(p, kCrcOffset)) != DecodeU32(p + kCrcOffset)) {
    return Status::Corruption(At(what, 0) + "container header checksum mismatch");
  }
  uint32_t version = DecodeU32(p + 8);
  if (version != 1 && version != 2) {
    return Status::Corruption(At(what, 8) + "unsupported container format version " +
                              std::to_string(version));
  }
  if (DecodeU32(p + 12) != 0 || DecodeU32(p + 24) != 0) {
    return Status::Corruption(At(what, 12) + "nonzero flags or reserved field in header");
  }
  uint64_t id = DecodeU64(p + 16);
  if (id != expected_id) {
    return Status::Corruption(At(what, 16) + "container id " + std::to_string(id) + ", expected " +
                              std::to_string(expected_id));
  }

  // Trailer, before any record, so that a truncated container calls no fn.
  const size_t trailer_at = size - kContainerTrailerSize;
  const uint8_t* t = p + trailer_at;
  if (std::memcmp(t, kTrailerMagic, sizeof(kTrailerMagic)) != 0) {
    return Status::Corruption(At(what, trailer_at) + "bad trailer magic (container truncated?)");
  }
  if (crc32c::Mask(crc32c::Value(t, kCrcOffset)) != DecodeU32(t + kCrcOffset)) {
    return Status::Corruption(At(what, trailer_at) + "container trailer checksum mismatch");
  }
  if (DecodeU32(t + 12) != 0 || DecodeU32(t + 24) != 0) {
    return Status::Corruption(At(what, trailer_at) + "nonzero reserved field in trailer");
  }
  uint64_t recorded_at = DecodeU64(t + 16);
  if (recorded_at != trailer_at) {
    return Status::Corruption(At(what, trailer_at) + "trailer says it lies at offset " +
                              std::to_string(recorded_at) + " (container truncated or extended)");
  }
  const uint32_t count = DecodeU32(t + 8);

  // Records.
  size_t pos = kContainerHeaderSize;
  uint32_t seen = 0;
  while (pos < trailer_at) {
    std::string prefix = At(what, pos);
    const size_t avail = trailer_at - pos;
    if (avail < kFrameRecordHeaderSize) {
      return Status::Corruption(prefix + "record header runs into the trailer");
    }
    const uint8_t kind = p[pos + 1];
    if (kind == kFrameKind && version < 2) {
      return Status::Corruption(prefix + "frame record in a version 1 container");
    }
    if (kind != kBlockKind && kind != kFrameKind) {
      return Status::Corruption(prefix + "unknown record kind " + std::to_string(kind));
    }
    const size_t record_len = ClaimedRecordSize(p + pos, avail);
    if (record_len == 0 || record_len > avail) {
      return Status::Corruption(prefix + "record header runs into the trailer, or its lengths " +
                                "are out of bounds");
    }
    std::string_view record = container.substr(pos, record_len);
    RecordView view;
    RETURN_IF_ERROR(RecordView::Parse(record, what + ": at offset " + std::to_string(pos), &view));
    if (seen == count) {
      return Status::Corruption(prefix + "more records than the " + std::to_string(count) +
                                " the trailer counts");
    }
    seen++;
    RETURN_IF_ERROR(fn(view.info(static_cast<uint32_t>(pos)), record));
    pos += record_len;
  }
  if (seen != count) {
    return Status::Corruption(At(what, trailer_at) + "trailer counts " + std::to_string(count) +
                              " block records, found " + std::to_string(seen));
  }
  return Status::OK();
}

Status VerifyContainerBlocks(std::string_view container, uint64_t expected_id,
                             const std::string& what,
                             const std::function<void(const VerifiedBlock&)>& fn) {
  std::string plain;
  Sha256Hasher hasher;
  return ForEachBlockRecord(
      container, expected_id, what, [&](const BlockRecordInfo& info, std::string_view record) {
        const std::string at = what + " at offset " + std::to_string(info.offset);
        RecordView view;
        RETURN_IF_ERROR(RecordView::Parse(record, at, &view));
        plain.resize(view.raw_len());
        auto* bytes = reinterpret_cast<uint8_t*>(plain.data());
        RETURN_IF_ERROR(view.DecodePrefix({bytes, plain.size()}, at));
        for (uint32_t i = 0; i < view.block_count(); i++) {
          RecordView::Block b = view.block(i);
          if (hasher.Hash({bytes + b.plain_offset, b.raw_len}) != b.fingerprint)
            return Status::Corruption(at + ": content of block " + std::to_string(i) +
                                      " does not match its fingerprint");
          fn({info.offset, info.record_len, i, b.raw_len, b.fingerprint});
        }
        return Status::OK();
      });
}

}  // namespace vmdedup
