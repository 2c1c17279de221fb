#include "store/metadata_repair.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <ctime>
#include <filesystem>
#include <map>
#include <memory>
#include <set>

#include "leveldb/db.h"
#include "leveldb/env.h"
#include "store/container.h"
#include "store/file_system.h"
#include "store/metadata_store.h"
#include "store/object_store.h"
#include "store/records.h"
#include "store/snapshot_ledger.h"

namespace vmdedup {
namespace {

namespace fs = std::filesystem;

// Copies every regular file of `from` (but LevelDB's LOCK) into the new
// directory `to`, synced; nothing is followed through a link.
Status CopyStoreFiles(const std::string& from, const std::string& to) {
  int dir_fd = ::open(from.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (dir_fd < 0) return Status::FromErrno(errno, "open " + from);
  DIR* d = ::fdopendir(dir_fd);
  if (d == nullptr) {
    ::close(dir_fd);
    return Status::FromErrno(errno, "list " + from);
  }
  std::unique_ptr<DIR, int (*)(DIR*)> closer(d, ::closedir);
  std::vector<char> buf(1 << 20);
  while (struct dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name == "." || name == ".." || name == "LOCK") continue;
    int in = ::openat(dir_fd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (in < 0) return Status::FromErrno(errno, "open " + from + "/" + name);
    struct stat sb;
    if (::fstat(in, &sb) != 0 || !S_ISREG(sb.st_mode)) {
      ::close(in);
      return LinkInRepository(from + "/" + name, "is not a regular file");
    }
    const std::string out_path = to + "/" + name;
    int out = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (out < 0) {
      ::close(in);
      return Status::FromErrno(errno, "create " + out_path);
    }
    Status st;
    for (;;) {
      ssize_t n = ::read(in, buf.data(), buf.size());
      if (n < 0) {
        st = Status::FromErrno(errno, "read " + from + "/" + name);
        break;
      }
      if (n == 0) break;
      for (ssize_t done = 0; done < n;) {
        ssize_t w = ::write(out, buf.data() + done, static_cast<size_t>(n - done));
        if (w < 0) {
          st = Status::FromErrno(errno, "write " + out_path);
          break;
        }
        done += w;
      }
      if (!st.ok()) break;
    }
    if (st.ok() && ::fsync(out) != 0) st = Status::FromErrno(errno, "sync " + out_path);
    ::close(in);
    ::close(out);
    RETURN_IF_ERROR(st);
  }
  return Status::OK();
}

Status SyncDirectory(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "open " + path);
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  return rc == 0 ? Status::OK() : Status::FromErrno(err, "sync " + path);
}

// The hexadecimal id at the end of `key` after `prefix`, if it is one.
bool IdAfter(std::string_view key, std::string_view prefix, uint64_t* id) {
  if (!key.starts_with(prefix)) return false;
  std::string_view hex = key.substr(prefix.size());
  if (hex.size() != 16) return false;
  uint64_t v = 0;
  for (char c : hex) {
    int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (d < 0) return false;
    v = (v << 4) | static_cast<uint64_t>(d);
  }
  *id = v;
  return true;
}

// "DISK" and SEQ of a key "PREFIX DISK/SEQ".
bool DiskSeqAfter(std::string_view key, std::string_view prefix, std::string* disk, uint64_t* seq) {
  if (!key.starts_with(prefix)) return false;
  std::string_view rest = key.substr(prefix.size());
  size_t slash = rest.rfind('/');
  if (slash == std::string_view::npos || slash == 0) return false;
  std::string_view digits = rest.substr(slash + 1);
  if (digits.empty() || digits.size() > 20 ||
      digits.find_first_not_of("0123456789") != std::string_view::npos)
    return false;
  *seq = 0;
  for (char c : digits) *seq = *seq * 10 + static_cast<uint64_t>(c - '0');
  *disk = std::string(rest.substr(0, slash));
  return true;
}

// Raises every counter of the store above every id and sequence number its
// records use; returns what it raised.
Status RaiseCounters(MetadataStore& meta, MetadataRepairReport* report) {
  std::map<std::string, uint64_t> needed;  // counter name → smallest safe value
  std::map<std::string, uint64_t> current;
  auto need = [&](const std::string& name, uint64_t used) {
    uint64_t& v = needed[name];
    v = std::max(v, used + 1);
  };
  Status inner;
  RETURN_IF_ERROR(meta.Scan("", [&](std::string_view key, std::string_view value) {
    report->records++;
    if (!VerifyEnvelope(key, value).ok()) {
      report->bad_records++;
      return true;
    }
    uint64_t id = 0, seq = 0;
    std::string disk;
    if (IdAfter(key, kSegmentKeyPrefix, &id) || IdAfter(key, kLostRecipeKeyPrefix, &id)) {
      need("segment", id);
    } else if (IdAfter(key, kContainerKeyPrefix, &id) || IdAfter(key, kQuarantineKeyPrefix, &id)) {
      need("container", id);
    } else if (DiskSeqAfter(key, kSnapshotKeyPrefix, &disk, &seq)) {
      need("seq/" + disk, seq);
    } else if (DiskSeqAfter(key, "snapseg/", &disk, &seq)) {
      need("seq/" + disk, seq);
      std::vector<uint64_t> ids;
      if (DecodeSegmentList(key, value, &ids).ok())
        for (uint64_t r : ids) need("segment", r);
    } else if (key.starts_with("next/")) {
      uint64_t v = 0;
      if (DecodeCounter(key, value, &v).ok()) current[std::string(key.substr(5))] = v;
    }
    return true;
  }));
  WriteBatch batch;
  for (const auto& [name, value] : needed) {
    auto it = current.find(name);
    const uint64_t have = it == current.end() ? 1 : it->second;
    if (have >= value) continue;
    const std::string key = CounterKey(name);
    batch.Put(key, EncodeCounter(key, value));
    report->counters_raised.push_back(key + ": " + std::to_string(have) + " -> " +
                                      std::to_string(value));
  }
  if (batch.ops().empty()) return Status::OK();
  return meta.Write(batch, true);
}

std::string UtcStamp() {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y%m%dT%H%M%SZ", &tm);
  return buf;
}

}  // namespace

Result<MetadataRepairReport> RepairMetadataStore(const std::string& vm_dir, leveldb::Env* env) {
  if (env == nullptr) env = leveldb::Env::Default();
  const std::string meta_dir = vm_dir + "/meta";
  const std::string work_dir = vm_dir + "/meta.repair";
  MetadataRepairReport report;
  std::error_code ec;
  if (!fs::is_directory(fs::symlink_status(meta_dir, ec)))
    return Status::NotFound(meta_dir +
                            " does not exist: there is no metadata store to repair (the VM's "
                            "snapshots cannot be recovered from its containers alone)");

  // A store that opens and reads whole needs nothing (opened before the
  // LOCK is taken here: the store takes it itself).
  {
    auto store = OpenLevelDbMetadataStore(meta_dir, false, env);
    if (store.ok()) {
      Status scanned = (*store)->Scan("", [](std::string_view, std::string_view) { return true; });
      if (scanned.ok()) return report;
    } else if (store.status().IsBusy()) {
      return Status::Busy("metadata store " + meta_dir +
                          " is open in another process (a check): " + store.status().message());
    }
  }
  leveldb::FileLock* lock = nullptr;
  leveldb::Status locked = env->LockFile(meta_dir + "/LOCK", &lock);
  if (!locked.ok())
    return Status::Busy("metadata store " + meta_dir +
                        " is open in another process (a backup or a check): " + locked.ToString());
  struct Unlock {
    leveldb::Env* env;
    leveldb::FileLock* lock;
    ~Unlock() { (void)env->UnlockFile(lock); }
  } unlock{env, lock};

  fs::remove_all(work_dir, ec);
  if (ec) return Status::IOError("remove " + work_dir + ": " + ec.message());
  if (::mkdir(work_dir.c_str(), 0700) != 0) return Status::FromErrno(errno, "create " + work_dir);
  auto cleanup = [&] { fs::remove_all(work_dir, ec); };
  if (Status st = CopyStoreFiles(meta_dir, work_dir); !st.ok()) {
    cleanup();
    return st;
  }

  leveldb::Options options;
  options.paranoid_checks = true;  // a block that fails its checksum is dropped, never read
  options.env = env;
  leveldb::Status repaired = leveldb::RepairDB(work_dir, options);
  if (!repaired.ok()) {
    cleanup();
    return Status::Corruption("LevelDB could not rebuild a copy of " + meta_dir + ": " +
                              repaired.ToString());
  }
  // What RepairDB could not use it moved to lost/; the damaged store is
  // kept whole, and a metadata directory holds only regular files.
  fs::remove_all(work_dir + "/lost", ec);
  {
    auto store = OpenLevelDbMetadataStore(work_dir, false, env);
    if (!store.ok()) {
      cleanup();
      return store.status().WithContext("the repaired copy of " + meta_dir + " does not open");
    }
    if (Status st = RaiseCounters(**store, &report); !st.ok()) {
      cleanup();
      return st.WithContext("the repaired copy of " + meta_dir + " does not read whole");
    }
  }
  RETURN_IF_ERROR(SyncDirectory(work_dir));

  // The swap: one atomic exchange, so that a crash leaves either store in
  // place, never none; then the damaged one gets its lasting name.
  if (::renameat2(AT_FDCWD, work_dir.c_str(), AT_FDCWD, meta_dir.c_str(), RENAME_EXCHANGE) != 0) {
    int err = errno;
    cleanup();
    return Status::FromErrno(err, "exchange " + work_dir + " and " + meta_dir);
  }
  std::string kept = "meta.damaged-" + UtcStamp();
  for (int n = 2; fs::exists(fs::symlink_status(vm_dir + "/" + kept, ec)); n++)
    kept = "meta.damaged-" + UtcStamp() + "-" + std::to_string(n);
  if (::renameat2(AT_FDCWD, work_dir.c_str(), AT_FDCWD, (vm_dir + "/" + kept).c_str(),
                  RENAME_NOREPLACE) != 0)
    return Status::FromErrno(errno, "rename " + work_dir + " (the damaged store) to " + kept);
  RETURN_IF_ERROR(SyncDirectory(vm_dir));
  report.repaired = true;
  report.kept_as = kept;
  return report;
}

Status RecatalogContainers(MetadataStore& meta, ObjectStore& objects, const std::string& vm,
                           MetadataRepairReport* report) {
  std::set<uint64_t> referenced, catalogued;
  RETURN_IF_ERROR(meta.Scan("", [&](std::string_view key, std::string_view value) {
    uint64_t id = 0;
    if (IdAfter(key, kContainerKeyPrefix, &id)) {
      catalogued.insert(id);
    } else if (key.starts_with(kSegmentKeyPrefix)) {
      SegmentRecipe r;
      if (DecodeSegmentRecipe(key, value, &r).ok())
        for (const BlockRef& b : r.blocks)
          if (b.kind == BlockKind::kOwn) referenced.insert(b.container);
    }
    return true;
  }));
  WriteBatch batch;
  std::vector<uint64_t> added;
  for (uint64_t id : referenced) {
    if (catalogued.count(id)) continue;
    ContainerRecord rec;
    rec.id = id;
    rec.object = ContainerObjectName(vm, id);
    std::string data;
    if (!objects.Get(rec.object, &data).ok()) continue;  // missing or unreadable: check says so
    Status verified = VerifyContainerBlocks(data, id, rec.object, [&](const VerifiedBlock& b) {
      rec.block_count++;
      rec.raw_bytes += b.raw_len;
    });
    if (!verified.ok()) continue;
    rec.size = data.size();
    rec.written_by = "repair";
    const std::string key = ContainerKey(id);
    batch.Put(key, EncodeContainerRecord(key, rec));
    added.push_back(id);
  }
  if (added.empty()) return Status::OK();
  RETURN_IF_ERROR(meta.Write(batch, true));
  report->recatalogued.insert(report->recatalogued.end(), added.begin(), added.end());
  return Status::OK();
}

Status ReconcileLedger(MetadataStore& meta, ObjectStore& objects, const std::string& vm,
                       MetadataRepairReport* report) {
  SnapshotLedger ledger;
  auto read = ReadLedger(objects, vm);
  if (!read.ok() && !read.status().IsCorruption()) return read.status();
  if (!read.ok()) {
    report->ledger_rewritten = true;
  } else if (read->has_value()) {
    ledger = **read;
  }
  std::map<std::string, uint64_t> seq_counters;  // disk → current counter
  std::set<std::pair<std::string, uint64_t>> held;
  RETURN_IF_ERROR(meta.Scan("", [&](std::string_view key, std::string_view value) {
    std::string disk;
    uint64_t seq = 0;
    if (DiskSeqAfter(key, kSnapshotKeyPrefix, &disk, &seq)) {
      held.insert({disk, seq});
    } else if (key.starts_with("next/seq/")) {
      uint64_t v = 0;
      if (DecodeCounter(key, value, &v).ok()) seq_counters[std::string(key.substr(9))] = v;
    }
    return true;
  }));
  const SnapshotLedger before = ledger;
  for (auto& [key, state] : ledger) {
    if (state == LedgerState::kCommitted && !held.count(key)) {
      state = LedgerState::kLost;
      report->lost_snapshots.push_back(vm + "/" + key.first + "/" + std::to_string(key.second));
    }
  }
  for (const auto& key : held) ledger[key] = LedgerState::kCommitted;
  WriteBatch batch;
  std::map<std::string, uint64_t> needed;
  for (const auto& [key, state] : ledger)
    needed[key.first] = std::max(needed[key.first], key.second + 1);
  for (const auto& [disk, value] : needed) {
    auto it = seq_counters.find(disk);
    const uint64_t have = it == seq_counters.end() ? 1 : it->second;
    if (have >= value) continue;
    const std::string key = CounterKey("seq/" + disk);
    batch.Put(key, EncodeCounter(key, value));
    report->counters_raised.push_back(key + ": " + std::to_string(have) + " -> " +
                                      std::to_string(value));
  }
  if (!batch.ops().empty()) RETURN_IF_ERROR(meta.Write(batch, true));
  if (ledger == before && !report->ledger_rewritten && read.ok() && read->has_value())
    return Status::OK();
  return WriteLedger(objects, vm, ledger);
}

}  // namespace vmdedup
