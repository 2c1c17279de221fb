// The metadata records of one VM's store and their keys: snapshot records,
// segment recipes, the container catalog and counters. docs/format.md is the
// authority on the byte layout; this file implements it.
//
// Every value is an envelope: u8 type | u8 version | body | u32 masked
// CRC-32C over (key, type, version, body). Decoding checks all of it and
// reports any mismatch as Corruption naming the key. The structs are plain
// values; the functions are pure and thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/fingerprint.h"
#include "base/status.h"
#include "store/chunker_params.h"

namespace vmdedup {

// Version 2 adds multi-block frame records (docs/format.md); 1 is still
// read and written as it was.
constexpr uint32_t kRepoFormatVersion = 2;

// Bytes each level accounted for; zero+segment+block+cds+new == size.
struct LevelStats {
  uint64_t read_bytes = 0;  // read from the source
  uint64_t zero = 0;        // level 0: holes, zero extents, all-zero blocks
  uint64_t segment = 0;     // level 1: not read, parent's recipe reused
  uint64_t block = 0;       // level 2: found among the VM's own blocks
  uint64_t cds = 0;         // level 3: found in the common data set
  uint64_t new_bytes = 0;   // stored as new blocks (before compression)
  uint64_t stored = 0;      // bytes of new records written (after compression)
  uint64_t new_blocks = 0;
  uint64_t metadata = 0;  // bytes of metadata records written
  void Add(const LevelStats& o);
};

struct SnapshotRecord {
  std::string vm;
  std::string disk;
  uint64_t seq = 0;         // 1, 2, ... within the disk series
  uint64_t parent_seq = 0;  // 0: none (first or full-independent)
  int64_t time = 0;         // unix seconds at the consistent instant
  uint64_t size = 0;        // virtual disk size
  uint32_t segment_size = 0;
  ChunkerParams chunker;
  uint64_t segment_count = 0;
  LevelStats stats;
  uint64_t duration_ms = 0;
  std::string source;        // where it was read from, for humans
  std::string read_mode;     // "incremental (bitmap X)" or "full: <reason>"
  std::string bitmap;        // the dirty bitmap that tracks writes after this snapshot
  uint64_t cds_version = 0;  // the CDS version the backup looked blocks up in; 0: none
  // What the user said the image is ("raw", "qcow2"); empty for NBD and
  // live sources, in repositories of format version 1 and in records
  // before version 3.
  std::string source_format;
  // The raw image file's exact length when it is no multiple of 512 (the
  // virtual size is rounded up to a sector, as QEMU does); 0: the size.
  uint64_t image_bytes = 0;
  // Set by `backup --tag`; kept by `forget --keep-tag` (record version 5).
  std::vector<std::string> tags;
  std::string Id() const { return vm + "/" + disk + "/" + std::to_string(seq); }
};

enum class BlockKind : uint8_t { kZero = 0, kOwn = 1, kCds = 2 };

// One block of a segment. Zero blocks carry only a length; a run of zeros is
// one entry. Own blocks live in the VM's containers, CDS blocks in the CDS
// area's containers; (container, offset, record_len) addresses the record
// and `index` the block in it (0 but in a multi-block frame record).
struct BlockRef {
  BlockKind kind = BlockKind::kZero;
  uint32_t length = 0;
  Fingerprint fingerprint;
  uint64_t container = 0;
  uint32_t offset = 0;
  uint32_t record_len = 0;
  uint32_t index = 0;
};

struct SegmentRecipe {
  uint64_t id = 0;
  uint32_t length = 0;  // sum of block lengths
  std::vector<BlockRef> blocks;
};

struct ContainerRecord {
  uint64_t id = 0;
  uint64_t size = 0;  // object bytes
  uint32_t block_count = 0;
  uint64_t raw_bytes = 0;  // plaintext bytes of its blocks
  std::string object;      // object name in the repository's ObjectStore
  std::string written_by;  // "disk/seq" of the backup that wrote it
};

// Keys.
std::string VmInfoKey();
std::string SnapshotKey(std::string_view disk, uint64_t seq);
std::string SnapshotPrefix(std::string_view disk);  // "snap/DISK/"
std::string SnapshotSegmentsKey(std::string_view disk, uint64_t seq);
std::string SegmentRecipeKey(uint64_t id);
std::string ContainerKey(uint64_t id);
std::string CounterKey(std::string_view name);  // "next/NAME"
std::string ContainerObjectName(std::string_view vm, uint64_t id);
// "vms/VM/data/ID.ctr" (and its temporaries, "...ID.ctr.tmp.*") → ID;
// false for any other name.
bool ParseContainerObjectName(std::string_view vm, std::string_view name, uint64_t* id);
std::string CdsContainerObjectName(uint64_t id);
// The object holding the record a BlockRef (own or CDS) points at.
std::string BlockObjectName(std::string_view vm, const BlockRef& ref);
constexpr std::string_view kSnapshotKeyPrefix = "snap/";
constexpr std::string_view kSegmentKeyPrefix = "seg/";
constexpr std::string_view kContainerKeyPrefix = "ctr/";
constexpr std::string_view kQuarantineKeyPrefix = "quarantine/";
std::string QuarantineKey(uint64_t container_id);
constexpr std::string_view kLostRecipeKeyPrefix = "lostseg/";
std::string LostRecipeKey(uint64_t recipe_id);

// A container `check` found damaged: backups take nothing from it.
struct QuarantineRecord {
  uint64_t container = 0;
  int64_t time = 0;  // unix seconds
  std::string reason;
};

// A segment recipe that snapshots use and `check` found missing or
// unreadable: backups read the segments using it again, never reuse it.
struct LostRecipeRecord {
  uint64_t recipe = 0;
  int64_t time = 0;  // unix seconds
  std::string reason;
};

// Encoders return the full value (envelope included) for `key`.
std::string EncodeSnapshot(std::string_view key, const SnapshotRecord& r);
Status DecodeSnapshot(std::string_view key, std::string_view value, SnapshotRecord* r);
std::string EncodeSegmentList(std::string_view key, const std::vector<uint64_t>& ids);
Status DecodeSegmentList(std::string_view key, std::string_view value, std::vector<uint64_t>* ids);
std::string EncodeSegmentRecipe(std::string_view key, const SegmentRecipe& r);
Status DecodeSegmentRecipe(std::string_view key, std::string_view value, SegmentRecipe* r);
std::string EncodeContainerRecord(std::string_view key, const ContainerRecord& r);
Status DecodeContainerRecord(std::string_view key, std::string_view value, ContainerRecord* r);
std::string EncodeCounter(std::string_view key, uint64_t v);
Status DecodeCounter(std::string_view key, std::string_view value, uint64_t* v);
std::string EncodeQuarantine(std::string_view key, const QuarantineRecord& r);
Status DecodeQuarantine(std::string_view key, std::string_view value, QuarantineRecord* r);
std::string EncodeLostRecipe(std::string_view key, const LostRecipeRecord& r);
Status DecodeLostRecipe(std::string_view key, std::string_view value, LostRecipeRecord* r);
std::string EncodeVmInfo(std::string_view key, std::string_view vm, int64_t created);
Status DecodeVmInfo(std::string_view key, std::string_view value, std::string* vm,
                    int64_t* created);
// Checks only the envelope (type byte and checksum) of any value.
Status VerifyEnvelope(std::string_view key, std::string_view value);

// Names of VMs and disks: 1-64 of [A-Za-z0-9._-], not starting with '.'.
Status ValidateName(std::string_view what, std::string_view name);
std::string SeqString(uint64_t seq);  // zero-padded, sorts numerically

}  // namespace vmdedup
