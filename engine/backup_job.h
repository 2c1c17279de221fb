// A whole `vmdedup backup` of one disk: takes the VM's lock, finds the parent
// snapshot, opens the source, decides between an incremental read through a
// dirty bitmap and a full read (and says why in one line), runs the pipeline,
// and afterwards rotates the bitmap.
//
// Sources: "file:PATH" (a raw image, read directly; a qcow2 image, served
// by a qemu-nbd started for the backup) and NBD URIs ("nbd://",
// "nbd+unix://"). For qcow2 images vmdedup keeps one persistent bitmap per
// disk series, named "vmdedup.REPOID.VM.DISK.SEQ" so that it never clashes
// with another tool's or another repository's. The rotation keeps this
// invariant: after any crash or failure, the bitmap named in the latest
// snapshot, merged with any newer vmdedup bitmap of the series, holds every
// write since that snapshot.
//
// Thread model: one call at a time per VM (the VM lock enforces it).
#pragma once

#include <atomic>
#include <functional>
#include <optional>
#include <string>

#include "base/status.h"
#include "engine/backup.h"
#include "store/repository.h"

namespace vmdedup {

struct BackupJobOptions {
  std::string vm;
  std::string disk = "disk0";
  std::string source;                 // file:PATH or an NBD URI
  std::optional<std::string> bitmap;  // caller-managed bitmap on an NBD URI
  bool full = false;                  // ignore bitmaps: read every allocated extent
  unsigned threads = 2;
  const CommonBlockIndex* cds = nullptr;
  const std::atomic<bool>* cancel = nullptr;
  std::function<void(const BackupProgress&)> progress;
  // One-line notes for the user: the read mode and why, bitmap warnings.
  std::function<void(const std::string&)> note;
};

Result<SnapshotRecord> RunBackupJob(Repository& repo, const BackupJobOptions& options);

// The name prefix of the bitmaps vmdedup owns for a disk series.
std::string SeriesBitmapPrefix(const std::string& repo_id, const std::string& vm,
                               const std::string& disk);

}  // namespace vmdedup
