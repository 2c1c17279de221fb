// The multi-level dedup pipeline: reads one virtual disk from a BlockSource
// and commits one snapshot of it to a VM's store.
//
//   level 0  holes/zero extents (base:allocation) and all-zero blocks: recorded as zero
//   level 1  a segment with no dirty bit reuses the parent's segment recipe, unread;
//            inside a dirty segment, parent blocks that no dirty range touches are kept
//   level 2  a block found among the parent's blocks of the same segment, or among
//            blocks already stored by this run, is referenced
//   level 3  a block found in the CDS index is referenced in the CDS area
//   level 4  anything else is compressed and appended to the VM's containers
//
// Ordering (crash safety): a container object is durable before the catalog
// entry and recipes that reference it are written; the snapshot record, its
// segment list and the series counter appear in one synced batch, last
// (or are handed to the caller to write with other disks': commit_into).
//
// Thread model: RunBackup is called from one thread; it uses `threads`
// workers of its own for chunking, hashing and compression, and a sealer
// thread that stores full containers and then their metadata. Memory is
// bounded by the in-flight segments (about 4 × threads + 2 segments), two
// container buffers and 8 bytes per segment of the disk.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "engine/common_block_index.h"
#include "nbd-client/block_source.h"
#include "store/metadata_store.h"
#include "store/records.h"
#include "store/repository.h"

namespace vmdedup {

struct BackupProgress {
  uint64_t done_bytes = 0;  // of the virtual disk, in order
  uint64_t total_bytes = 0;
  uint64_t read_bytes = 0;
  uint64_t stored_bytes = 0;
};

struct BackupRequest {
  std::string disk;
  BlockSource* source = nullptr;
  // The previous snapshot of the series, for levels 1 and 2.
  std::optional<SnapshotRecord> parent;
  // True when the source's dirty map covers every write since `parent`.
  bool use_dirty_map = false;
  std::string read_mode;      // recorded: "incremental (...)" or "full: <reason>"
  std::string bitmap;         // recorded: bitmap that tracks writes after this snapshot
  std::string source_format;  // recorded: what an image source was read as ("raw", "qcow2")
  unsigned threads = 2;
  const CommonBlockIndex* cds = nullptr;      // null: level 3 finds nothing
  const std::atomic<bool>* cancel = nullptr;  // checked between segments
  std::function<void(const BackupProgress&)> progress;
  // One-line notes for the user (containers found unusable).
  std::function<void(const std::string&)> note;
  int64_t time = 0;               // the consistent instant; 0 = now
  std::vector<std::string> tags;  // recorded with the snapshot (forget --keep-tag)
  // Null: RunBackup commits the snapshot itself. Otherwise the final batch
  // (snapshot record, segment list, series counter) is appended here and not
  // written: the snapshot exists once the caller writes this batch with
  // sync=true, which is how several disks of one VM commit as one. The
  // containers it references are durable when RunBackup returns; the recipes
  // and catalog entries written before it become durable with that synced
  // write (the metadata store applies writes in order).
  WriteBatch* commit_into = nullptr;
};

Result<SnapshotRecord> RunBackup(Repository& repo, VmStore& vm, const BackupRequest& request);

}  // namespace vmdedup
