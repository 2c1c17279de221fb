// Garbage collection of VM stores (`vmdedup gc`), to the rule in
// docs/format.md, "Garbage collection": under the VM's writer lock, the
// records live are those a recipe that a snapshot's segment list names
// references; recipes no snapshot names, containers with no live record,
// objects the catalog does not know and that nothing references, and
// temporaries of dead writers are removed, metadata first (one synced
// batch), objects after, so that a crash leaves only what the next gc
// removes. A VM whose liveness is not known whole (a record that does not
// decode, a missing recipe or segment list, a ledger naming a committed
// snapshot the store lacks) is left untouched, and so is a VM a reader
// holds a lease on (store/reader_lease.h).
//
// Compaction: while more than max_unused_percent of the VM's container
// bytes are unused, the least live containers are rewritten: their live
// records are copied, byte for byte, into new containers (durable first),
// then one synced batch re-points the recipes (same ids) and swaps the
// catalog records, then the old containers are deleted. Readers are looked
// for again right before any object is deleted: one that appeared keeps
// the old objects, which the next gc removes.
//
// Not yet: the CDS area and retroactive CDS reclaim (issue 16).
//
// Thread model: one thread; one VM at a time.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "base/status.h"
#include "store/repository.h"

namespace vmdedup {

struct GcOptions {
  std::string vm;  // empty: every VM
  bool dry_run = false;
  // Partly live containers are rewritten (their live records copied into
  // new containers) while more than this share of the VM's container
  // bytes is unused, the least live first (restic's --max-unused).
  double max_unused_percent = 10;
  double lock_wait_seconds = 0;  // for a VM a backup holds
  const std::atomic<bool>* cancel = nullptr;
  std::function<void(const std::string&)> progress;
};

struct GcVmReport {
  std::string vm;
  // Empty when the VM was collected (or would be, in a dry run); else why
  // nothing of it was deleted.
  std::string skipped;
  std::vector<std::string> readers;  // lease holders that deferred it
  uint64_t forgets_finished = 0;     // snapshots of interrupted forgets removed
  uint64_t recipes_removed = 0;
  uint64_t containers_removed = 0;
  uint64_t leftovers_removed = 0;    // uncatalogued objects and temporaries
  uint64_t containers_repacked = 0;  // partly live, their live records copied
  uint64_t bytes_written = 0;        // the new containers' bytes
  uint64_t bytes_freed = 0;          // object bytes removed, less bytes_written
  uint64_t live_bytes = 0;           // plaintext bytes of live blocks in the VM's containers
  uint64_t stored_bytes = 0;         // the VM's container bytes after gc
  uint64_t unused_bytes = 0;         // of those, in records nothing references (compaction)
};

struct GcReport {
  std::vector<GcVmReport> vms;
  uint64_t bytes_freed = 0;
  bool complete() const;  // every VM in scope was collected
};

Result<GcReport> CollectGarbage(Repository& repo, const GcOptions& options);

}  // namespace vmdedup
