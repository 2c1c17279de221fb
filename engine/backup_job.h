// A whole `vmdedup backup` of one disk: takes the VM's lock, finds the parent
// snapshot, opens the source, decides between an incremental read through a
// dirty bitmap and a full read (and says why in one line), runs the pipeline,
// and afterwards rotates the bitmap.
//
// Sources: image files, "raw:PATH" (read directly) and "qcow2:PATH" (served
// by a qemu-nbd started for the backup), or "file:PATH" whose format comes
// from `format` or the series' latest snapshot, never from probing
// (engine/image_source.h); and NBD URIs ("nbd://", "nbd+unix://"). For
// qcow2 images vmdedup keeps one persistent bitmap per disk series, named
// so that no other series, repository copy or tool can be taken for it
// (engine/series_bitmaps.h). The rotation keeps this invariant: after any
// crash or failure, the bitmap named in the latest snapshot, merged with
// any newer vmdedup bitmap of the series, holds every write since that
// snapshot.
//
// Thread model: one call at a time per VM (the VM lock enforces it).
#pragma once

#include <atomic>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "engine/backup.h"
#include "store/repository.h"

namespace vmdedup {

struct BackupJobOptions {
  std::string vm;
  std::string disk = "disk0";
  std::string source;                 // raw:PATH, qcow2:PATH, file:PATH or an NBD URI
  std::string format;                 // file:PATH: "raw" or "qcow2" ("": the series')
  bool backing_chain = false;         // read a qcow2 image's backing chain
  std::optional<std::string> bitmap;  // caller-managed bitmap on an NBD URI
  bool full = false;                  // ignore bitmaps: read every allocated extent
  std::vector<std::string> tags;      // recorded with the snapshot
  unsigned threads = 2;
  const CommonBlockIndex* cds = nullptr;
  const std::atomic<bool>* cancel = nullptr;  // also ends a wait on an NBD server
  // An NBD server (or qemu-nbd) that stays silent this long fails the
  // backup; 0: wait forever.
  unsigned io_timeout_seconds = 300;
  std::function<void(const BackupProgress&)> progress;
  // One-line notes for the user: the read mode and why, bitmap warnings.
  std::function<void(const std::string&)> note;
};

Result<SnapshotRecord> RunBackupJob(Repository& repo, const BackupJobOptions& options);

}  // namespace vmdedup
