// ObjectStore: the narrow interface through which every byte of block data
// (containers, the CDS area) reaches durable storage. Objects are immutable
// blobs named by '/'-separated paths ("vms/web1/data/000000000000002a.ctr");
// one container maps one-to-one onto one object, locally a file, at scale a
// Ceph RADOS object.
//
// Contract: Put is atomic and durable — after it returns OK the whole object
// survives a crash; after a crash during Put the name holds either nothing
// (or its previous content) but never a partial object. Reads of ranges past
// the end of an object return Corruption (the object is truncated), reads of
// a missing object NotFound.
//
// Implementations are safe to call from several threads at once.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"

namespace vmdedup {

// Many small reads of one object, cheaper than GetRange each time (a local
// store keeps the file open). The object must not change while the reader
// lives (objects are immutable once written). Safe from several threads.
class ObjectReader {
 public:
  virtual ~ObjectReader() = default;
  // Reads exactly `length` bytes at `offset`; past the end is Corruption.
  virtual Status ReadAt(uint64_t offset, uint64_t length, std::string* out) const = 0;
};

class ObjectStore {
 public:
  virtual ~ObjectStore() = default;

  virtual Status Put(const std::string& name, std::span<const uint8_t> data) = 0;
  // Like Put, but never replaces: Corruption when `name` exists, and nothing
  // is written. Containers are put this way: their ids are handed out once,
  // so a name already taken means the metadata that hands them out was lost
  // or damaged, and the object there must not be overwritten. The default
  // checks, then puts; the local store is atomic.
  virtual Status PutNew(const std::string& name, std::span<const uint8_t> data);
  virtual Status Get(const std::string& name, std::string* out) = 0;
  // Reads exactly `length` bytes at `offset`.
  virtual Status GetRange(const std::string& name, uint64_t offset, uint64_t length,
                          std::string* out) = 0;
  virtual Result<uint64_t> Size(const std::string& name) = 0;
  // A reader of `name` (NotFound when missing). The default reads through
  // GetRange; the store must outlive the reader.
  virtual Result<std::unique_ptr<ObjectReader>> OpenReader(const std::string& name);
  // Deleting a missing object is OK.
  virtual Status Delete(const std::string& name) = 0;
  // Names of all objects whose name starts with `prefix`, sorted.
  virtual Status List(const std::string& prefix, std::vector<std::string>* names) = 0;
  // Human-readable location for messages ("/srv/repo").
  virtual std::string Describe() const = 0;

  // Leftovers of Puts that never completed (the writer crashed or failed
  // between creating its temporary and renaming it). They are invisible to
  // Get and List and hold space until removed; `check` reports them as
  // reclaimable. A backend whose Put cannot leave any has none (the default).
  struct Temporary {
    std::string name;  // as RemoveTemporary takes it ("vms/a/x.ctr.tmp.812.3")
    uint64_t bytes = 0;
    int64_t age_seconds = 0;           // since last modification
    bool writer_may_be_alive = false;  // its writer may still be writing it
  };
  // Temporaries whose name starts with `prefix`, sorted by name.
  virtual Status ListTemporary(const std::string& prefix, std::vector<Temporary>* out) {
    (void)prefix;
    out->clear();
    return Status::OK();
  }
  // Removes one temporary; InvalidArgument when `name` is not a temporary's
  // name, so that it can never remove an object. A missing one is OK.
  // Callers skip temporaries whose writer may still be alive.
  virtual Status RemoveTemporary(const std::string& name) {
    return Status::InvalidArgument("not a temporary: " + name);
  }
};

// Objects as files below `root` (created if missing), written through `fs`
// (RealFileSystem() when null; not owned, outlives the store). Put creates
// the missing directories of NAME (syncing each one's parent), writes
// NAME.tmp.PID.COUNTER there, syncs it, renames it over NAME and syncs the
// directory. Object names are relative, '/'-separated, without empty, "."
// or ".." components, and their last component never contains ".tmp."
// (that marks temporaries): other names are InvalidArgument. Leftover
// temporary files of crashed writers are never listed; `ListTemporary`
// finds them; a temporary's writer "may be alive" while a process with its
// PID exists on this host. Delete does not sync the directory: a delete
// lost in a crash leaves an unreferenced object, which garbage collection
// removes again.
class FileSystem;
std::unique_ptr<ObjectStore> NewLocalObjectStore(const std::string& root, FileSystem* fs = nullptr);

}  // namespace vmdedup
