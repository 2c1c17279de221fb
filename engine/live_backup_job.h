// A live backup of a running QEMU guest, driven over QMP: every selected
// disk of the VM is read from one instant (fleecing, one QMP transaction for
// all disks) while the guest keeps writing, each into a new snapshot of its
// disk series. The snapshots of all disks are committed together, in one
// synced metadata batch after the last disk was read: a backup of the VM
// appears whole or not at all.
//
// Dirty bitmaps: per disk series, vmdedup keeps one persistent bitmap in
// QEMU named as for image sources (engine/series_bitmaps.h: the series'
// prefix, the seq of the snapshot it follows and a nonce), on the disk's
// format node (below filters). At the instant of a backup the transaction
// adds NEW (a new name for the new seq) and
// disables OLD (the parent snapshot's bitmap), so OLD holds exactly the
// writes since the parent and is exported with the snapshot; NEW records from
// the instant on.
//   - success: the snapshot records NEW; OLD is removed.
//   - failure (NBD or QEMU error, SIGINT/SIGTERM, disk full): OLD is enabled
//     again, NEW merged into it, NEW removed (one transaction), so OLD,
//     still named by the latest snapshot, holds every write since it.
//   - a killed vmdedup leaves OLD disabled and NEW recording: the next run
//     merges such newer bitmaps of the series into OLD and enables it (one
//     transaction) before anything else, and removes bitmaps of older
//     snapshots.
// Invariant: at any moment, the bitmap named by the latest snapshot of a
// series, merged with the series' bitmaps of higher seq, holds every write
// since that snapshot. Over-reading is allowed, missing a write never is.
//
// OLD is used as the dirty map only when it exists, is consistent, records
// (or was recovered as above), is the one the parent snapshot names and the
// disk's size is unchanged; otherwise one line says why and the whole
// allocated disk is read (level 2 keeps what is stored small), and NEW
// starts afresh.
//
// Leftovers of a killed run (fleecing nodes, jobs, exports, NBD server,
// scratch files) are removed before anything else; SIGINT/SIGTERM (the
// cancel flag) stop the read, and the run tears down just the same.
//
// Thread model: one call at a time per VM (the VM lock) and per QEMU
// process (the scratch area's lock).
#pragma once

#include <atomic>
#include <functional>
#include <string>
#include <vector>

#include "base/status.h"
#include "engine/backup.h"
#include "store/repository.h"

namespace vmdedup {

struct LiveBackupOptions {
  std::string vm;
  std::string qmp_socket;          // QEMU's QMP unix socket
  std::vector<std::string> disks;  // series name, qdev id, drive or node name; empty: all writable
  bool full = false;               // read every allocated extent (bitmaps still rotate)
  std::vector<std::string> tags;   // recorded with every disk's snapshot
  unsigned threads = 2;
  // Where the scratch area lives (see dirty-bitmap/live_fleece.h); empty:
  // $TMPDIR, else /var/tmp. QEMU writes the old content of every block the
  // guest overwrites during the backup there.
  std::string scratch_dir;
  // Freeze the guest's filesystems through qemu-guest-agent around the
  // instant; an agent that does not answer within fsfreeze_timeout_ms gets a
  // warning and the backup goes on (crash-consistent).
  bool fsfreeze = false;
  std::string qga_socket;
  int fsfreeze_timeout_ms = 2000;
  const CommonBlockIndex* cds = nullptr;
  const std::atomic<bool>* cancel = nullptr;
  std::function<void(const std::string& disk, const BackupProgress&)> progress;
  // One-line notes for the user: each disk's read mode and why, warnings.
  std::function<void(const std::string&)> note;
};

// The snapshots committed, one per disk, in the order of the disks. On an
// error no snapshot is recorded, for any disk; what the run stored is left
// for `check` to report as reclaimable.
Result<std::vector<SnapshotRecord>> RunLiveBackupJob(Repository& repo,
                                                     const LiveBackupOptions& options);

}  // namespace vmdedup
