// Reader leases (docs/format.md, "Garbage collection"): a process that
// reads a VM's snapshots through a read view (restore, serve, cds build)
// holds a lease on the VM while it reads, a file vms/VM/readers/PID.NONCE
// it holds flock(LOCK_SH) on. Garbage collection deletes nothing of a VM
// while a lease on it is held: the view may read any container it
// references. The flock, not the file, is the lease: a reader that dies
// leaves its file unlocked, and gc removes it.
//
// A repository the reader cannot write (a read-only mount, another user's)
// gives no lease: nothing can collect it from here either.
// Thread model: a ReaderLease is owned by one VmStore; LiveReaders may run
// from any thread.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "base/status.h"

namespace vmdedup {

class ReaderLease {
 public:
  // Takes a lease on VM `vm` of the repository at `root`; null (and OK)
  // when the repository cannot be written. A link anywhere on the way is
  // Corruption, never followed.
  static Result<std::unique_ptr<ReaderLease>> Take(const std::string& root, const std::string& vm);
  ~ReaderLease();  // removes the file, then lets the lock go
  ReaderLease(const ReaderLease&) = delete;
  ReaderLease& operator=(const ReaderLease&) = delete;

 private:
  ReaderLease(std::string root, std::string rel, int fd)
      : root_(std::move(root)), rel_(std::move(rel)), fd_(fd) {}
  std::string root_, rel_;
  int fd_;
};

// The readers holding a lease on VM `vm` ("process 812"), after removing
// the files of leases nobody holds any more.
Result<std::vector<std::string>> LiveReaders(const std::string& root, const std::string& vm);

}  // namespace vmdedup
