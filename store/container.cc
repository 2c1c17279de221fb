// Container encoding and validation. Byte layout (all integers little
// endian; docs/format-containers.md is the full description):
//
// Header, 32 bytes, at offset 0:
//    0  magic "VMDDCTR1"          8
//    8  u32 format version (1)    4
//   12  u32 flags (0)             4
//   16  u64 container id          8
//   24  u32 reserved (0)          4
//   28  u32 masked crc32c of bytes [0, 28)
//
// Block records, back to back from offset 32; each is a 48-byte header and
// the payload (record_len = 48 + payload_len):
//    0  u8  compression (0 none, 1 zstd)
//    1  u8[3] reserved (0)
//    4  u32 raw_len (plaintext bytes, <= kMaxBlockSize)
//    8  u32 payload_len (stored bytes, <= kMaxBlockSize; == raw_len if none)
//   12  fingerprint (SHA-256 of the plaintext), 32 bytes
//   44  u32 masked crc32c of header bytes [0, 44) followed by the payload
//   48  payload
//
// Trailer, 32 bytes, at the end:
//    0  magic "VMDDEND1"          8
//    8  u32 block count           4
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

#include "base/crc32c.h"
#include "base/encoding.h"

namespace vmdedup {
namespace {

constexpr char kHeaderMagic[8] = {'V', 'M', 'D', 'D', 'C', 'T', 'R', '1'};
constexpr char kTrailerMagic[8] = {'V', 'M', 'D', 'D', 'E', 'N', 'D', '1'};
constexpr size_t kCrcOffset = 28;          // in header and trailer
constexpr size_t kRecordCrcOffset = 44;    // in a block record header
constexpr size_t kFingerprintOffset = 12;  // in a block record header

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
  if (p[1] != 0 || p[2] != 0 || p[3] != 0) {
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

void FillInfo(const RecordHeader& h, uint32_t offset, BlockRecordInfo* info) {
  info->offset = offset;
  info->record_len = static_cast<uint32_t>(kBlockRecordHeaderSize + h.payload_len);
  info->raw_len = h.raw_len;
  info->compression = static_cast<Compression>(h.compression);
  info->fingerprint = h.fingerprint;
}

}  // namespace

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
  return info;
}

std::string ContainerWriter::Finish() {
  FinishInPlace();
  std::string out = std::move(buf_);
  Reset(id_ + 1);
  return out;
}

std::string_view ContainerWriter::FinishInPlace() {
  uint8_t t[kContainerTrailerSize] = {};
  std::memcpy(t, kTrailerMagic, sizeof(kTrailerMagic));
  EncodeU32(t + 8, count_);
  EncodeU64(t + 16, buf_.size());
  EncodeU32(t + kCrcOffset, crc32c::Mask(crc32c::Value(t, kCrcOffset)));
  buf_.append(reinterpret_cast<const char*>(t), sizeof(t));
  return buf_;
}

void ContainerWriter::Reset(uint64_t next_id) {
  id_ = next_id;
  count_ = 0;
  buf_.clear();
  uint8_t h[kContainerHeaderSize] = {};
  std::memcpy(h, kHeaderMagic, sizeof(kHeaderMagic));
  EncodeU32(h + 8, kContainerFormatVersion);
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

Status DecodeBlockRecordInto(std::string_view record, const Fingerprint* expected,
                             std::span<uint8_t> out, const std::string& what) {
  RecordHeader h;
  RETURN_IF_ERROR(CheckRecordFor(record, expected, what + ": ", &h));
  if (h.raw_len != out.size()) {
    return Status::Corruption(what + ": block record holds " + std::to_string(h.raw_len) +
                              " bytes, expected " + std::to_string(out.size()));
  }
  std::span<const uint8_t> payload(U8(record) + kBlockRecordHeaderSize, h.payload_len);
  return DecompressInto(static_cast<Compression>(h.compression), payload, out, what);
}

Status ParseBlockRecordHeader(std::string_view record, BlockRecordInfo* info,
                              const std::string& what) {
  if (record.size() < kBlockRecordHeaderSize) {
    return Status::Corruption(
        what + ": block record header truncated: " + std::to_string(record.size()) + " bytes");
  }
  RecordHeader h;
  RETURN_IF_ERROR(ParseRecordHeader(U8(record), &h, what + ": "));
  FillInfo(h, 0, info);
  return Status::OK();
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
  if (version != kContainerFormatVersion) {
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
    if (trailer_at - pos < kBlockRecordHeaderSize) {
      return Status::Corruption(prefix + "block record header runs into the trailer");
    }
    uint32_t payload_len = DecodeU32(p + pos + 8);
    if (payload_len > kMaxBlockSize || trailer_at - pos - kBlockRecordHeaderSize < payload_len) {
      return Status::Corruption(prefix + "block record of payload length " +
                                std::to_string(payload_len) + " runs past the trailer");
    }
    size_t record_len = kBlockRecordHeaderSize + payload_len;
    std::string_view record = container.substr(pos, record_len);
    RecordHeader h;
    RETURN_IF_ERROR(CheckRecord(record, prefix, &h));
    if (seen == count) {
      return Status::Corruption(prefix + "more block records than the " + std::to_string(count) +
                                " the trailer counts");
    }
    seen++;
    BlockRecordInfo info;
    FillInfo(h, static_cast<uint32_t>(pos), &info);
    RETURN_IF_ERROR(fn(info, record));
    pos += record_len;
  }
  if (seen != count) {
    return Status::Corruption(At(what, trailer_at) + "trailer counts " + std::to_string(count) +
                              " block records, found " + std::to_string(seen));
  }
  return Status::OK();
}

}  // namespace vmdedup
