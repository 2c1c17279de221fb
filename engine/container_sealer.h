// ContainerSealer: stores a backup run's finished containers, and then the
// metadata batch that references them, on a thread of its own, so that the
// run goes on chunking, hashing and compressing while a container is written
// and fsynced (about 60 ms for 32 MiB here: a tenth of a first backup's wall
// time when it was done inline).
//
// Ordering, as DESIGN.md requires: work runs in the order submitted, and a
// batch is written only once its own container and every container submitted
// before it are durable. After the first failure nothing more is written:
// later Submits and Drain return that failure.
//
// Memory: at most one submission is outstanding; Submit waits for the
// previous one first. A run therefore holds at most two container buffers,
// the one being stored and the one being filled, and TakeBuffer hands a
// stored one's back (capacity kept) for the next container.
//
// Ownership and threads: the run owns the sealer; Submit, Drain and
// TakeBuffer are called from one thread (the run's committing thread). The
// object and metadata stores must outlive it and be thread-safe (their
// contracts say so). The destructor waits for outstanding work.
#pragma once

#include <mutex>
#include <string>

#include "base/status.h"
#include "engine/thread_pool.h"
#include "store/metadata_store.h"
#include "store/object_store.h"

namespace vmdedup {

class ContainerSealer {
 public:
  // `vm` names the VM in error messages.
  ContainerSealer(ObjectStore* objects, MetadataStore* meta, std::string vm);
  ~ContainerSealer();
  ContainerSealer(const ContainerSealer&) = delete;
  ContainerSealer& operator=(const ContainerSealer&) = delete;

  // Waits for the previous submission, then queues: Put `bytes` as `object`
  // (skipped when `object` is empty), then write `batch` (skipped when empty;
  // not synced: the run's final commit is). Returns the first failure of
  // earlier work instead of queueing anything.
  Status Submit(std::string object, std::string bytes, WriteBatch batch);
  // Waits until all submitted work is done; returns the first failure.
  Status Drain();
  // The buffer of a stored container, cleared with its capacity kept; an
  // empty string when there is none yet.
  std::string TakeBuffer();

 private:
  void Store();  // runs on the sealer's thread

  ObjectStore* const objects_;
  MetadataStore* const meta_;
  const std::string vm_;
  // The outstanding submission. Written by Submit only after pool_.Wait(),
  // read by Store on the pool's thread: the pool's queue orders the two.
  std::string object_;
  std::string bytes_;
  WriteBatch batch_;
  std::mutex mu_;  // guards status_ and spare_
  Status status_;
  std::string spare_;
  ThreadPool pool_{1};  // last: destroyed (joined) before the members it uses
};

}  // namespace vmdedup
