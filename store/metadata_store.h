// MetadataStore: an ordered key-value store for one VM's metadata (snapshot
// records, segment recipes, container catalog, counters). Locally LevelDB; at
// scale the omap of a RADOS object. Values written through it are opaque
// here; records.h gives them a type, a version and a checksum.
//
// Contract: Write applies a batch atomically; with sync=true it is durable
// when it returns. Implementations are thread-safe.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "base/status.h"

namespace leveldb {
class Env;
}

namespace vmdedup {

class WriteBatch {
 public:
  void Put(std::string key, std::string value) {
    ops_.emplace_back(std::move(key), std::move(value));
    bytes_ += ops_.back().first.size() + ops_.back().second->size();
  }
  void Delete(std::string key) { ops_.emplace_back(std::move(key), std::nullopt); }
  // Appends every operation of `other`, in order.
  void Append(const WriteBatch& other) {
    ops_.insert(ops_.end(), other.ops_.begin(), other.ops_.end());
    bytes_ += other.bytes_;
  }
  bool empty() const { return ops_.empty(); }
  size_t bytes() const { return bytes_; }
  void Clear() {
    ops_.clear();
    bytes_ = 0;
  }
  const std::vector<std::pair<std::string, std::optional<std::string>>>& ops() const {
    return ops_;
  }

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> ops_;
  size_t bytes_ = 0;
};

class MetadataStore {
 public:
  virtual ~MetadataStore() = default;
  // NotFound when the key is absent.
  virtual Status Get(std::string_view key, std::string* value) = 0;
  virtual Status Write(const WriteBatch& batch, bool sync) = 0;
  // Calls `fn` for every key starting with `prefix`, in key order, until it
  // returns false. A consistent view as of the call; `fn` may call into the
  // store (its writes are not seen by this scan).
  virtual Status Scan(
      std::string_view prefix,
      const std::function<bool(std::string_view key, std::string_view value)>& fn) = 0;
  // Bytes the store occupies on its medium (approximate).
  virtual uint64_t ApproximateBytes() = 0;
};

// LevelDB in directory `path`, through LevelDB's Env `env` (its default
// when null; not owned, outlives the store). Busy when another process (or
// another handle in this process) has it open; NotFound when it does not
// exist and `create_if_missing` is false. Bounded memory: 8 MiB block
// cache, 4 MiB write buffer. ApproximateBytes is the size of the files in
// `path`.
Result<std::unique_ptr<MetadataStore>> OpenLevelDbMetadataStore(const std::string& path,
                                                                bool create_if_missing,
                                                                leveldb::Env* env = nullptr);

// A read view of the LevelDB store in `path` (store/leveldb_read_view.h):
// never writes to it and never takes or waits for its LOCK, so that it
// opens on a read-only file system and while a backup writes the store
// (the view is the store as of the call). Write is NotSupported. NotFound
// when there is no store; a failure to open (a writer switching files
// meanwhile) is retried a few times before it is returned.
Result<std::unique_ptr<MetadataStore>> OpenLevelDbReadView(const std::string& path,
                                                           leveldb::Env* env = nullptr);

}  // namespace vmdedup
