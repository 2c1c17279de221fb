// MetadataStore on LevelDB. Memory is bounded by a small block cache and
// write buffer (a backup holds one of these per VM it works on).

#include <dirent.h>
#include <sys/stat.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <thread>

#include "leveldb/cache.h"
#include "leveldb/db.h"
#include "leveldb/filter_policy.h"
#include "leveldb/write_batch.h"
#include "store/leveldb_log_scan.h"
#include "store/leveldb_read_view.h"
#include "store/metadata_store.h"

namespace vmdedup {
namespace {

constexpr size_t kBlockCacheBytes = 8u << 20;
constexpr size_t kWriteBufferBytes = 4u << 20;
constexpr int kMaxOpenFiles = 200;
constexpr int kBloomBitsPerKey = 10;

Status FromLevelDb(const leveldb::Status& s, const std::string& path) {
  if (s.ok()) return Status::OK();
  std::string msg = "metadata store " + path + ": " + s.ToString();
  if (s.IsNotFound()) return Status::NotFound(msg);
  if (s.IsCorruption()) return Status::Corruption(msg);
  if (s.IsInvalidArgument()) return Status::InvalidArgument(msg);
  if (s.IsNotSupportedError()) return Status::NotSupported(msg);
  if (s.IsIOError() && msg.find("No space") != std::string::npos) return Status::NoSpace(msg);
  return Status::IOError(msg);
}

bool StartsWith(const leveldb::Slice& s, std::string_view prefix) {
  return s.size() >= prefix.size() && std::memcmp(s.data(), prefix.data(), prefix.size()) == 0;
}

class LevelDbMetadataStore final : public MetadataStore {
 public:
  // `view_env`: the Env of a read view (null for the store itself).
  LevelDbMetadataStore(std::string path, std::unique_ptr<leveldb::Cache> cache,
                       std::unique_ptr<const leveldb::FilterPolicy> filter, leveldb::DB* db,
                       std::unique_ptr<leveldb::Env> view_env)
      : path_(std::move(path)),
        view_env_(std::move(view_env)),
        cache_(std::move(cache)),
        filter_(std::move(filter)),
        db_(db) {}
  // The DB goes first: it uses the cache, the filter policy and the Env
  // until closed.
  ~LevelDbMetadataStore() override { db_.reset(); }

  Status Get(std::string_view key, std::string* value) override {
    leveldb::ReadOptions ro;
    ro.verify_checksums = true;
    leveldb::Status s = db_->Get(ro, leveldb::Slice(key.data(), key.size()), value);
    if (s.IsNotFound()) return Status::NotFound("metadata key not found");
    return FromLevelDb(s, path_);
  }

  Status Write(const WriteBatch& batch, bool sync) override {
    if (view_env_ != nullptr)
      return Status::NotSupported("metadata store " + path_ +
                                  " is open as a read view: nothing can be written through it");
    leveldb::WriteBatch wb;
    for (const auto& [key, value] : batch.ops()) {
      if (value) {
        wb.Put(key, *value);
      } else {
        wb.Delete(key);
      }
    }
    leveldb::WriteOptions wo;
    wo.sync = sync;
    return FromLevelDb(db_->Write(wo, &wb), path_);
  }

  Status Scan(std::string_view prefix,
              const std::function<bool(std::string_view, std::string_view)>& fn) override {
    const leveldb::Snapshot* snap = db_->GetSnapshot();
    struct SnapshotReleaser {
      leveldb::DB* db;
      const leveldb::Snapshot* snap;
      ~SnapshotReleaser() { db->ReleaseSnapshot(snap); }
    } releaser{db_.get(), snap};
    leveldb::ReadOptions ro;
    ro.verify_checksums = true;
    ro.fill_cache = false;  // scans read once; keep the cache for point reads
    ro.snapshot = snap;
    std::unique_ptr<leveldb::Iterator> it(db_->NewIterator(ro));
    for (it->Seek(leveldb::Slice(prefix.data(), prefix.size()));
         it->Valid() && StartsWith(it->key(), prefix); it->Next()) {
      leveldb::Slice k = it->key(), v = it->value();
      if (!fn(std::string_view(k.data(), k.size()), std::string_view(v.data(), v.size()))) break;
    }
    return FromLevelDb(it->status(), path_);
  }

  uint64_t ApproximateBytes() override {
    uint64_t total = 0;
    DIR* d = ::opendir(path_.c_str());
    if (d == nullptr) return 0;
    while (struct dirent* e = ::readdir(d)) {
      struct stat sb;
      std::string p = path_ + "/" + e->d_name;
      if (::stat(p.c_str(), &sb) == 0 && S_ISREG(sb.st_mode)) {
        total += static_cast<uint64_t>(sb.st_size);
      }
    }
    ::closedir(d);
    return total;
  }

 private:
  std::string path_;
  std::unique_ptr<leveldb::Env> view_env_;  // destroyed last (declared first)
  std::unique_ptr<leveldb::Cache> cache_;
  std::unique_ptr<const leveldb::FilterPolicy> filter_;
  std::unique_ptr<leveldb::DB> db_;
};

}  // namespace

namespace {

// Opens the store in `path` through `env` (LevelDB's default when null);
// `view_env`, when given, is the Env of a read view, owned by the store.
Result<std::unique_ptr<MetadataStore>> OpenStore(const std::string& path, bool create_if_missing,
                                                 leveldb::Env* env,
                                                 std::unique_ptr<leveldb::Env> view_env) {
  std::unique_ptr<leveldb::Cache> cache(leveldb::NewLRUCache(kBlockCacheBytes));
  std::unique_ptr<const leveldb::FilterPolicy> filter(
      leveldb::NewBloomFilterPolicy(kBloomBitsPerKey));
  leveldb::Options options;
  options.create_if_missing = create_if_missing;
  options.paranoid_checks = true;
  options.block_cache = cache.get();
  options.filter_policy = filter.get();
  options.write_buffer_size = kWriteBufferBytes;
  options.max_open_files = kMaxOpenFiles;
  if (env != nullptr) options.env = env;
  if (view_env != nullptr) options.env = view_env.get();
  leveldb::DB* db = nullptr;
  leveldb::Status s = leveldb::DB::Open(options, path, &db);
  if (s.IsCorruption()) {
    // A power cut can leave the log's tail (batches written after its last
    // sync, never acknowledged as durable) torn or partly zero, which
    // paranoid recovery refuses. When that is all the damage in the logs,
    // recovery without paranoid checks drops those records and rewrites
    // the log without them, and the store opens with its checks on again.
    // Damage before whole records (under synced data) is never dropped: it
    // is reported.
    auto logs = ScanLevelDbLogs(path);
    if (logs.ok() && *logs == LevelDbLogState::kTornTail) {
      leveldb::Options lenient = options;
      lenient.paranoid_checks = false;
      s = leveldb::DB::Open(lenient, path, &db);
      if (s.ok()) {
        delete db;
        db = nullptr;
        s = leveldb::DB::Open(options, path, &db);
      }
    }
  }
  if (!s.ok()) {
    std::string msg = s.ToString();
    // LevelDB reports its LOCK file held, by this process ("already held by
    // process") or another (fcntl: "Resource temporarily unavailable"), as
    // IOError "lock PATH/LOCK: ...".
    if (s.IsIOError() && msg.find("lock ") != std::string::npos &&
        msg.find("/LOCK") != std::string::npos &&
        (msg.find("already held") != std::string::npos ||
         msg.find("temporarily unavailable") != std::string::npos)) {
      return Status::Busy("metadata store " + path +
                          " is in use (its LOCK is held by another process or handle): " + msg);
    }
    if (s.IsInvalidArgument() && msg.find("does not exist") != std::string::npos) {
      return Status::NotFound("metadata store " + path + " does not exist");
    }
    return FromLevelDb(s, path);
  }
  return std::unique_ptr<MetadataStore>(
      new LevelDbMetadataStore(path, std::move(cache), std::move(filter), db, std::move(view_env)));
}

}  // namespace

Result<std::unique_ptr<MetadataStore>> OpenLevelDbMetadataStore(const std::string& path,
                                                                bool create_if_missing,
                                                                leveldb::Env* env) {
  return OpenStore(path, create_if_missing, env, nullptr);
}

Result<std::unique_ptr<MetadataStore>> OpenLevelDbReadView(const std::string& path,
                                                           leveldb::Env* env) {
  leveldb::Env* base = env != nullptr ? env : leveldb::Env::Default();
  // A writer may be switching to a new MANIFEST, or appending to it, while
  // the view reads it: what fails then (a file gone, a record cut short)
  // is tried again a few times before it is reported.
  constexpr int kAttempts = 5;
  for (int attempt = 1;; attempt++) {
    ASSIGN_OR_RETURN(std::unique_ptr<leveldb::Env> view_env, NewLevelDbReadViewEnv(path, base));
    auto store = OpenStore(path, /*create_if_missing=*/false, base, std::move(view_env));
    if (store.ok() || attempt >= kAttempts || store.status().IsNotFound() ||
        store.status().IsInvalidArgument())
      return store;
    std::this_thread::sleep_for(std::chrono::milliseconds(100 * attempt));
  }
}

}  // namespace vmdedup
