// Restore: writes a snapshot to an image file, bit-exact, sparse where the
// snapshot is zero. The output is built under PATH.partial and renamed over
// PATH only when complete and synced, so a failed restore never leaves a
// half-written image under the requested name.
//
// Thread model: RestoreToFile runs on the caller's thread with `threads`
// workers of its own, each reading segments through a shared SnapshotReader.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>

#include "base/status.h"
#include "store/records.h"
#include "store/repository.h"

namespace vmdedup {

struct RestoreProgress {
  uint64_t done_bytes = 0;
  uint64_t total_bytes = 0;
  uint64_t written_bytes = 0;  // non-zero bytes written
};

struct RestoreRequest {
  std::string path;
  std::string format = "raw";  // "raw" or "qcow2"
  bool force = false;          // replace an existing file, or write into a block device
  unsigned mode = 0600;        // of a new file, whatever the umask
  unsigned threads = 2;
  const std::atomic<bool>* cancel = nullptr;
  std::function<void(const RestoreProgress&)> progress;
};

struct RestoreResult {
  uint64_t size = 0;
  uint64_t written_bytes = 0;
};

Result<RestoreResult> RestoreToFile(Repository& repo, VmStore& vm, const SnapshotRecord& snapshot,
                                    const RestoreRequest& request);

}  // namespace vmdedup
