// Fault-injecting twins of ObjectStore and MetadataStore for tests: they wrap
// a real store and, once armed, make chosen operations fail the way real
// media do (I/O error, ENOSPC, a short write that leaves a truncated object,
// a crash that drops everything after a point).
//
// Write operations (object Put, metadata Write) are counted from 1; the
// `fail_at`-th one faults:
//   kIOError     IOError; nothing is written.
//   kNoSpace     NoSpace; nothing is written.
//   kShortWrite  IOError. An object Put stores the first half of the data
//                under the final name: it models a medium that broke Put's
//                atomicity (lost tail), so tests can prove that readers
//                report the truncated object as Corruption. A metadata Write
//                is not applied at all (a torn batch is dropped on recovery).
//   kCrash       IOError for that write and every later write, Delete and
//                RemoveTemporary included (the process is "dead"); nothing
//                of them is applied. Reads keep working so a test can inspect
//                what survived (or reopen the base store, as a restart would).
// Deletes are not counted. `fail_reads` makes every read IOError while set.
//
// A FaultPlan is shared by the wrappers of one test; every field is atomic,
// so it may be re-armed while other threads use the wrappers. The wrappers
// do not own `base`, which must outlive them; they are as thread-safe as it.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "store/metadata_store.h"
#include "store/object_store.h"

namespace vmdedup {

struct FaultPlan {
  enum class Kind { kNone, kIOError, kNoSpace, kShortWrite, kCrash };
  // Operations (object Put / metadata Write) counted from 1; the fault hits
  // the `fail_at`-th write operation, and with kCrash every later one too.
  std::atomic<uint64_t> write_ops{0};
  std::atomic<uint64_t> fail_at{0};  // 0: never
  std::atomic<Kind> kind{Kind::kNone};
  std::atomic<bool> fail_reads{false};  // reads return IOError while set
  std::atomic<uint64_t> faults_injected{0};
  // What the first fault hit: an object's name, or "metadata".
  std::string FirstFault() const {
    std::lock_guard<std::mutex> lock(mu);
    return first_fault;
  }
  void NoteFault(const std::string& what) {
    std::lock_guard<std::mutex> lock(mu);
    if (first_fault.empty()) first_fault = what;
  }

 private:
  mutable std::mutex mu;
  std::string first_fault;
};

std::unique_ptr<ObjectStore> NewFaultInjectingObjectStore(ObjectStore* base,
                                                          std::shared_ptr<FaultPlan> plan);
std::unique_ptr<MetadataStore> NewFaultInjectingMetadataStore(MetadataStore* base,
                                                              std::shared_ptr<FaultPlan> plan);

}  // namespace vmdedup
