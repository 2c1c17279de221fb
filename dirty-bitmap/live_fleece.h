// The QEMU side of a live backup, driven over QMP: finding the guest's disks
// and their dirty bitmaps, taking a point-in-time view of them (fleecing),
// exporting it over QEMU's NBD server on a private unix socket, tearing it
// all down again, and removing what an earlier, killed run left behind.
//
// Fleecing (verified on QEMU 7.2, see QEMU-NOTES.md), per disk:
//   qemu-img create -f qcow2 SCRATCH/DISK.fleece.qcow2 SIZE
//   blockdev-add qcow2 "vmdedup-tgt-I" on that file
//   transaction [ bitmap actions of every disk...,
//                 blockdev-backup sync=none ROOT -> vmdedup-tgt-I,
//                   job "vmdedup-job-I", filter "vmdedup-cbw-I" ]   (all disks: one instant)
//   blockdev-add snapshot-access "vmdedup-acc-I" on vmdedup-cbw-I
//   nbd-server-start on SCRATCH/nbd.sock (the directory is 0700, the socket 0600)
//   block-export-add "vmdedup-exp-I", export name "vmdedup-I", read-only,
//     with the disk's frozen bitmap (qemu:dirty-bitmap:NAME)
// Teardown, in this order: block-export-del (hard) and BLOCK_EXPORT_DELETED,
// blockdev-del vmdedup-acc-I, block-job-cancel vmdedup-job-I and
// BLOCK_JOB_CANCELLED, blockdev-del vmdedup-tgt-I, nbd-server-stop, the
// scratch files. Every QEMU object vmdedup creates is named "vmdedup-...".
//
// Scratch area: SCRATCH = BASE/vmdedup-live.QEMUPID.STARTTIME (one per QEMU
// process, mode 0700), holding a lock file (flock: one vmdedup per QEMU at
// a time), the NBD socket, the scratch images and a marker saying that
// vmdedup started QEMU's NBD server. A run that was killed leaves them; the
// next run on the same QEMU removes its objects (RemoveLeftovers), and any
// run removes the scratch areas of QEMU processes that no longer exist.
//
// Thread model: everything runs on the caller's thread, one QmpClient call
// at a time.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "dirty-bitmap/qmp_client.h"

namespace vmdedup {

struct LiveBitmap {
  std::string name;
  uint64_t count = 0;  // dirty bytes
  uint32_t granularity = 0;
  bool recording = false;
  bool busy = false;          // in use by an export or a job
  bool persistent = false;    // stored in the qcow2 when QEMU closes it
  bool inconsistent = false;  // not saved cleanly (QEMU crashed): only removable
};

struct LiveDisk {
  std::string name;         // the disk series name (see QueryDisks)
  std::string device;       // BlockBackend name ("" for -blockdev/-device)
  std::string qdev;         // "/machine/peripheral/vd0/virtio-backend"
  std::string qdev_id;      // "vd0" ("" for devices without an id)
  std::string root_node;    // the node the device is attached to: fleecing source
  std::string bitmap_node;  // below filters: the format node holding the bitmaps
  std::string format;       // the bitmap node's driver ("qcow2", "raw", ...)
  uint64_t size = 0;        // virtual size
  bool read_only = false;
  std::vector<LiveBitmap> bitmaps;  // on bitmap_node
  const LiveBitmap* FindBitmap(const std::string& bitmap) const;
  // True when `selector` names this disk: its series name, qdev id, qdev
  // path, BlockBackend name or either node name.
  bool Matches(const std::string& selector) const;
};

// Every block device with a medium. The series name is the device's qdev id
// (`-device ...,id=vd0`), else the BlockBackend name (`-drive id=...`),
// else the root node name; "" when none of them is usable.
Result<std::vector<LiveDisk>> QueryDisks(QmpClient& qmp);

// A process's start time in clock ticks since boot (/proc/PID/stat field
// 22); 0 when the process does not exist. With the pid it names a process
// uniquely, even after pid reuse.
uint64_t ProcessStartTime(pid_t pid);

class ScratchArea {
 public:
  // Creates or reuses BASE/vmdedup-live.PID.START for the QEMU process
  // `qemu_pid` and locks it: Busy when another vmdedup holds it. Removes the
  // scratch areas (ours, unlocked) of QEMU processes that have exited;
  // `note` tells about each. InvalidArgument when the socket path would be
  // too long for a unix socket.
  static Result<std::unique_ptr<ScratchArea>> Acquire(
      const std::string& base, pid_t qemu_pid, const std::function<void(const std::string&)>& note);
  ~ScratchArea();  // unlocks; the directory stays (Remove() deletes it)
  ScratchArea(const ScratchArea&) = delete;
  ScratchArea& operator=(const ScratchArea&) = delete;

  const std::string& path() const { return path_; }
  std::string NbdSocket() const { return path_ + "/nbd.sock"; }
  std::string ImagePath(size_t index) const;
  // Files other than the lock: what an earlier run left.
  std::vector<std::string> Leftovers() const;
  bool nbd_server_marked() const;
  Status MarkNbdServer(bool started);
  // Deletes every file but the lock.
  Status RemoveFiles();
  // Deletes the files and the directory (keeps holding the lock's inode
  // until destruction, which is harmless).
  Status Remove();

 private:
  ScratchArea(std::string path, int lock_fd) : path_(std::move(path)), lock_fd_(lock_fd) {}
  std::string path_;
  int lock_fd_ = -1;
};

// What QEMU objects named "vmdedup-..." exist now (exports, jobs, nodes).
struct FleeceObjects {
  std::vector<std::string> exports, jobs, nodes;
  bool empty() const { return exports.empty() && jobs.empty() && nodes.empty(); }
};
Result<FleeceObjects> QueryFleeceObjects(QmpClient& qmp);

// Removes every vmdedup fleecing object in QEMU (what a killed run left), in
// the teardown order, stops QEMU's NBD server when the scratch area says
// vmdedup started it, and deletes the scratch files. `note` says what was
// found. Call with the ScratchArea held.
Status RemoveLeftovers(QmpClient& qmp, ScratchArea& scratch,
                       const std::function<void(const std::string&)>& note);

struct FleeceDisk {
  std::string root_node;    // blockdev-backup source
  std::string bitmap_node;  // where the exported bitmap lives
  uint64_t size = 0;
  // The frozen bitmap exported with the snapshot (nullopt: none).
  std::optional<std::string> export_bitmap;
};

class FleeceSession {
 public:
  FleeceSession(QmpClient& qmp, ScratchArea& scratch) : qmp_(qmp), scratch_(scratch) {}
  ~FleeceSession();  // Teardown() when the caller did not

  // Creates a scratch image and a target node per disk.
  Status Prepare(std::vector<FleeceDisk> disks);
  // The point in time: one transaction with `bitmap_actions` (transaction
  // actions on the disks' bitmaps) and a blockdev-backup per disk. Returns
  // the instant (unix seconds).
  Result<int64_t> Cut(const std::vector<nlohmann::json>& bitmap_actions);
  // snapshot-access nodes, the NBD server and one export per disk.
  Status Export();
  // "nbd+unix:///vmdedup-I?socket=SCRATCH/nbd.sock"
  std::string Uri(size_t index) const;
  // Removes everything created so far, in the documented order, going on
  // after errors (returns the first one). Idempotent.
  Status Teardown();

 private:
  QmpClient& qmp_;
  ScratchArea& scratch_;
  std::vector<FleeceDisk> disks_;
  size_t targets_ = 0;  // vmdedup-tgt-I nodes added (0..targets_)
  bool cut_ = false;    // jobs and cbw filters exist
  size_t access_ = 0;   // vmdedup-acc-I nodes added
  bool nbd_server_ = false;
  size_t exports_ = 0;  // exports added
  bool torn_down_ = false;
};

// The QEMU names of fleecing objects, for tests and leftover detection.
std::string FleeceName(const std::string& kind, size_t index);  // "vmdedup-KIND-I"

}  // namespace vmdedup
