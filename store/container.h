// Containers: the immutable objects that hold a VM's (or the CDS area's)
// block data. A container is a header, a sequence of records and a trailer;
// docs/format.md and container.cc give the byte layout. A record is either a
// block record (one block) or, in container format version 2, a frame record
// (2 to kMaxFrameBlocks blocks compressed together as one zstd frame). A
// block is addressed by (container id, record offset, record length, block
// index) from segment recipes, so a restore reads exactly the records it
// needs without parsing the rest.
//
// ContainerWriter builds one container in memory (bounded by its capacity);
// it is used by one thread. RecordView and the decoding functions are pure
// and thread-safe; any malformed byte yields Corruption naming the
// container, never a crash.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>

#include "base/fingerprint.h"
#include "base/status.h"
#include "store/chunker_params.h"
#include "store/compression.h"

namespace vmdedup {

// Version 1: block records only; 2: frame records too. A writer writes 1
// unless it appended a frame record.
constexpr uint32_t kContainerFormatVersion = 2;
constexpr size_t kContainerHeaderSize = 32;
constexpr size_t kBlockRecordHeaderSize = 48;
constexpr size_t kFrameRecordHeaderSize = 16;
constexpr size_t kFrameTableEntrySize = 36;  // fingerprint, u32 raw length
constexpr uint32_t kMaxFrameBlocks = 256;
constexpr size_t kContainerTrailerSize = 32;
constexpr size_t kMaxContainerSize = 64u << 20;  // maps onto one RADOS object
// kMaxBlockSize (store/chunker_params.h) is the most plaintext one record
// holds (a block, or a frame's blocks together).

// A record as written or listed. For a block record, `fingerprint` and
// `raw_len` are its block's; for a frame record `block_count` > 1, `raw_len`
// is the frame's plaintext and `fingerprint` is unset (RecordView::block
// gives each block's).
struct BlockRecordInfo {
  uint32_t offset = 0;      // of the record in the container
  uint32_t record_len = 0;  // header (+ block table) + payload
  uint32_t raw_len = 0;     // plaintext length
  Compression compression = Compression::kNone;
  Fingerprint fingerprint;
  uint32_t block_count = 1;
};

// One block of a frame record being written.
struct FrameBlock {
  Fingerprint fingerprint;
  uint32_t raw_len = 0;
};

class RecordView;

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
  // The size of a frame record of `blocks` blocks and that payload.
  static size_t FrameRecordSize(size_t blocks, size_t payload_len) {
    return kFrameRecordHeaderSize + kFrameTableEntrySize * blocks + payload_len;
  }
  // True when a frame record of `blocks` blocks (2..kMaxFrameBlocks) and a
  // payload of `payload_len` bytes still fits, trailer included.
  bool FitsFrame(size_t blocks, size_t payload_len) const;
  // Appends a frame record: `blocks` (2..kMaxFrameBlocks, each at least one
  // byte, kMaxBlockSize together) and `payload`, their plaintexts back to
  // back, compressed as one (kZstd) or as they are (kNone, then
  // payload.size() is their total length). The caller checked FitsFrame;
  // asserted. The container becomes format version 2.
  BlockRecordInfo AppendFrame(std::span<const FrameBlock> blocks, Compression c,
                              std::span<const uint8_t> payload);
  // True when a record of `record_len` bytes still fits, trailer included.
  bool FitsRecord(size_t record_len) const;
  // Appends, byte for byte, a record of another container that `view`
  // parsed (its checksum verified): a record carries no container id or
  // offset, so every reference to it, block indexes included, holds in its
  // new place. The caller checked FitsRecord. Returns its offset. (gc
  // compaction.)
  uint32_t AppendRecord(const RecordView& view, std::string_view record);
  uint64_t id() const { return id_; }
  size_t size() const { return buf_.size(); }
  uint32_t block_count() const { return blocks_; }  // in all its records
  uint32_t record_count() const { return count_; }
  bool empty() const { return count_ == 0; }
  // Appends the trailer and returns the finished object bytes; the writer is
  // empty afterwards, ready for container id()+1 (or Reset to another id).
  std::string Finish();
  // Like Finish, but keeps the bytes (and the buffer's capacity) in the
  // writer: the view is valid until the next Reset, which must follow.
  std::string_view FinishInPlace();
  void Reset(uint64_t next_id);
  // Reset, writing into `buffer` from now on (its bytes dropped, its capacity
  // kept, at least the writer's capacity reserved): a caller that recycles
  // the strings Finish returns spares growing a fresh buffer each container.
  void Reset(uint64_t next_id, std::string buffer);

 private:
  uint64_t id_;
  size_t capacity_;
  std::string buf_;
  uint32_t count_ = 0;   // records
  uint32_t blocks_ = 0;  // blocks in them
  bool has_frames_ = false;
};

// A record of either kind whose checksum and fields have been verified
// (Parse); it views the record's bytes, which must outlive it.
class RecordView {
 public:
  struct Block {
    Fingerprint fingerprint;
    uint32_t raw_len = 0;
    uint32_t plain_offset = 0;  // where it starts in the record's plaintext
  };
  // Checks that `record` is exactly one whole record (block or frame), its
  // checksum and fields. `what` names the container and offset in errors.
  static Status Parse(std::string_view record, const std::string& what, RecordView* view);

  bool is_frame() const { return frame_; }
  uint32_t block_count() const { return block_count_; }
  uint32_t raw_len() const { return raw_len_; }  // all blocks
  Compression compression() const { return compression_; }
  BlockRecordInfo info(uint32_t offset) const;
  // Block i (< block_count()); O(i) for a frame record.
  Block block(uint32_t i) const;
  // Block `index` checked against the recipe's `expected` fingerprint (when
  // not null) and `length`: Corruption naming `what` when it differs or the
  // record has no such block.
  Result<Block> Find(uint32_t index, const Fingerprint* expected, uint32_t length,
                     const std::string& what) const;
  // Decompresses the first out.size() (<= raw_len()) bytes of the plaintext.
  Status DecodePrefix(std::span<uint8_t> out, const std::string& what) const;

 private:
  std::string_view record_;
  std::span<const uint8_t> payload_;
  const uint8_t* table_ = nullptr;  // frame records: the block table
  Fingerprint fingerprint_;         // block records: the block's
  uint32_t raw_len_ = 0;
  uint32_t block_count_ = 1;
  bool frame_ = false;
  Compression compression_ = Compression::kNone;
};

// Decodes block `index` of a record of either kind (read with the record
// length from the recipe) into `plaintext`, checking the record and the
// block's fingerprint against `expected` (when not null). Decompresses a
// frame only up to the end of that block. Does not re-hash the plaintext.
Status DecodeBlock(std::string_view record, uint32_t index, const Fingerprint* expected,
                   std::string* plaintext, const std::string& what);

// Decodes one block record read from a container (a frame record is
// Corruption: use DecodeBlock or RecordView): checks that `record` is exactly
// one whole record (read with the record length from the recipe), its
// checksum and fields, decompresses it to exactly raw_len bytes and, when
// `expected` is not null, checks that the record's fingerprint is
// `*expected`. `what` names the container and the record's offset in errors.
// Does not re-hash the plaintext (see check --read-data).
Status DecodeBlockRecord(std::string_view record, const Fingerprint* expected,
                         std::string* plaintext, const std::string& what);
// Validates a whole container (header and its id, trailer, every record's
// checksum and fields, the record count; no frame record in a version 1
// container) and calls `fn` for each record (block or frame) in order.
// Header and trailer are checked before the first call, so a truncated
// container calls `fn` never; a corrupt record stops the walk with
// Corruption after `fn` has seen the records before it. Payloads are not
// decompressed. `fn` may return a non-OK Status to stop; that Status is
// returned.
Status ForEachBlockRecord(
    std::string_view container, uint64_t expected_id, const std::string& what,
    const std::function<Status(const BlockRecordInfo&, std::string_view record)>& fn);

// One block of a container that VerifyContainerBlocks found sound.
struct VerifiedBlock {
  uint32_t offset = 0;      // of its record
  uint32_t record_len = 0;  // of its record
  uint32_t index = 0;       // in its record (0 but in a frame record)
  uint32_t raw_len = 0;
  Fingerprint fingerprint;
};
// ForEachBlockRecord, and every block of every record decompressed and
// re-hashed against its fingerprint (Corruption naming the record and the
// block when one does not match); `fn` sees each sound block in order.
Status VerifyContainerBlocks(std::string_view container, uint64_t expected_id,
                             const std::string& what,
                             const std::function<void(const VerifiedBlock&)>& fn);

}  // namespace vmdedup
