// Containers: the immutable objects that hold a VM's (or the CDS area's)
// block data. A container is a header, a sequence of block records and a
// trailer; docs/format.md (docs/format-containers.md until merged) and
// container.cc give the byte layout. A block is addressed by
// (container id, record offset, record length) from segment recipes, so a
// restore reads exactly one record without parsing the rest.
//
// ContainerWriter builds one container in memory (bounded by its capacity);
// it is used by one thread. The decoding functions are pure and thread-safe;
// any malformed byte yields Corruption naming the container, never a crash.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>

#include "base/fingerprint.h"
#include "base/status.h"
#include "store/compression.h"

namespace vmdedup {

constexpr uint32_t kContainerFormatVersion = 1;
constexpr size_t kContainerHeaderSize = 32;
constexpr size_t kBlockRecordHeaderSize = 48;
constexpr size_t kContainerTrailerSize = 32;
constexpr size_t kMaxContainerSize = 64u << 20;  // maps onto one RADOS object
constexpr uint32_t kMaxBlockSize = 1u << 20;

struct BlockRecordInfo {
  uint32_t offset = 0;      // of the record in the container
  uint32_t record_len = 0;  // header + payload
  uint32_t raw_len = 0;     // plaintext length
  Compression compression = Compression::kNone;
  Fingerprint fingerprint;
};

class ContainerWriter {
 public:
  // `capacity` is the size (clamped to kMaxContainerSize) past which Fits()
  // refuses; it bounds the finished object, trailer included.
  ContainerWriter(uint64_t container_id, size_t capacity);
  // True when a record with a payload of `payload_len` still fits, trailer
  // included. Always false for payloads above kMaxBlockSize, and for every
  // payload when `capacity` is too small for one record.
  bool Fits(size_t payload_len) const;
  // Appends a record; the caller checked Fits(), raw_len <= kMaxBlockSize and,
  // for kNone, payload.size() == raw_len (asserted). Returns where it went.
  BlockRecordInfo Append(const Fingerprint& fp, uint32_t raw_len, Compression c,
                         std::span<const uint8_t> payload);
  uint64_t id() const { return id_; }
  size_t size() const { return buf_.size(); }
  uint32_t block_count() const { return count_; }
  bool empty() const { return count_ == 0; }
  // Appends the trailer and returns the finished object bytes; the writer is
  // empty afterwards, ready for container id()+1 (or Reset to another id).
  std::string Finish();
  // Like Finish, but keeps the bytes (and the buffer's capacity) in the
  // writer: the view is valid until the next Reset, which must follow.
  std::string_view FinishInPlace();
  void Reset(uint64_t next_id);

 private:
  uint64_t id_;
  size_t capacity_;
  std::string buf_;
  uint32_t count_ = 0;
};

// Decodes one record read from a container: checks that `record` is exactly
// one whole record (read with the record length from the recipe), its
// checksum and fields, decompresses it to exactly raw_len bytes and, when
// `expected` is not null, checks that the record's fingerprint is
// `*expected`. `what` names the container and the record's offset in errors.
// Does not re-hash the plaintext (see check --read-data).
Status DecodeBlockRecord(std::string_view record, const Fingerprint* expected,
                         std::string* plaintext, const std::string& what);
// The same, decompressing straight into `out`, which must hold exactly the
// record's plaintext length (a different raw_len is Corruption).
Status DecodeBlockRecordInto(std::string_view record, const Fingerprint* expected,
                             std::span<uint8_t> out, const std::string& what);
// Parses only a record's header (checksum of the header is verified together
// with the payload, so this is for listing, not trusting). Checks the fields'
// bounds; `info->offset` is left 0 (unknown here).
Status ParseBlockRecordHeader(std::string_view record, BlockRecordInfo* info,
                              const std::string& what);

// Validates a whole container (header and its id, trailer, every record's
// checksum and fields, the record count) and calls `fn` for each record in
// order. Header and trailer are checked before the first call, so a truncated
// container calls `fn` never; a corrupt record stops the walk with Corruption
// after `fn` has seen the records before it. Payloads are not decompressed.
// `fn` may return a non-OK Status to stop; that Status is returned.
Status ForEachBlockRecord(
    std::string_view container, uint64_t expected_id, const std::string& what,
    const std::function<Status(const BlockRecordInfo&, std::string_view record)>& fn);

}  // namespace vmdedup
