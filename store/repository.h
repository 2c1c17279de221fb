// Repository: one vmdedup repository — its configuration, its object store
// and the per-VM metadata stores. Layout on local disk:
//
//   REPO/vmdedup-repo            configuration record (format version, ids,
//                                segment size, chunker, compression)
//   REPO/vms/VM/meta/            the VM's metadata (LevelDB)
//   REPO/vms/VM/lock             held (flock) by the process writing the VM
//   REPO/vms/VM/data/ID.ctr      the VM's containers (objects)
//   REPO/cds/lock                held (flock) by the one `cds build` running
//                                on the repository (LockCds); holds its pid
//
// VM-centric isolation: each VM has its own metadata and containers, so one
// VM's backups never coordinate with another's. Within a VM, one writer
// (Access::kWrite) at a time; readers open read views (Access::kRead) that
// neither wait for nor block it (docs/architecture.md, "Readers and
// writers"). Nothing below REPO is ever opened through a symbolic link, and
// what is created is mode 0600 (directories 0700). A Repository is used by
// one thread; a VmStore's MetadataStore is thread-safe, its counters are not.
//
// Every write to the local disk goes through a FileSystem (the objects, the
// configuration record, the directories, each made durable before anything
// in it is relied on) or through LevelDB's Env (the metadata); tests pass
// their own of both in RepositoryOptions to model faults and power cuts.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "base/status.h"
#include "store/chunker_params.h"
#include "store/metadata_repair.h"
#include "store/metadata_store.h"
#include "store/object_store.h"
#include "store/reader_lease.h"
#include "store/records.h"

namespace leveldb {
class Env;
}

namespace vmdedup {

struct RepoConfig {
  uint32_t format_version = kRepoFormatVersion;
  std::string repo_id;  // 16 hex digits, random at init
  uint32_t segment_size = 2u << 20;
  ChunkerParams chunker;
  int compression_level = 1;
  // A backup holds two containers in memory (docs/architecture.md). 8 MiB:
  // against 32 MiB, 50 MiB less peak RSS and a third less time for a 5 %
  // incremental, as fast a first backup; 4 MiB slowed incompressible data
  // (a seal and fsync per 4 MiB). docs/benchmarks.md, "Container size".
  uint32_t container_capacity = 8u << 20;
  // The most plaintext one multi-block frame record holds; 0: one block per
  // record (every format version 1 repository). 64 KiB: 1.4 CPU-seconds
  // less a GB and 8 % less stored than one frame a block
  // (docs/benchmarks.md, "What 400 MB/s would take").
  uint32_t frame_size = 64u << 10;
};

Status ValidateRepoConfig(const RepoConfig& c);

class VmStore;
class FileSystem;

// How a repository reaches its media. Every field is optional; the
// defaults are the real ones. Nothing here is owned: each outlives the
// Repository.
struct RepositoryOptions {
  // The local object store and the repository's own files and directories
  // write through it (default: RealFileSystem()).
  FileSystem* file_system = nullptr;
  // LevelDB's Env for the VMs' metadata (default: LevelDB's own).
  leveldb::Env* leveldb_env = nullptr;
  // An object store to use instead of the local one.
  ObjectStore* objects = nullptr;
  // Every metadata store opened is passed through it (fault injection).
  std::function<std::unique_ptr<MetadataStore>(std::unique_ptr<MetadataStore>)> wrap_metadata;
};

// A repository-wide lock held through flock() on a file; released when the
// object is destroyed (or the process dies).
class RepoLock {
 public:
  ~RepoLock();
  RepoLock(const RepoLock&) = delete;
  RepoLock& operator=(const RepoLock&) = delete;

 private:
  friend class Repository;
  explicit RepoLock(int fd) : fd_(fd) {}
  int fd_ = -1;
};

class Repository {
 public:
  // Creates the repository directory (must not exist or be empty) and
  // makes it and its configuration durable.
  static Result<std::unique_ptr<Repository>> Create(const std::string& path, RepoConfig config,
                                                    RepositoryOptions options = {});
  // NotFound with a hint when PATH is not a repository.
  static Result<std::unique_ptr<Repository>> Open(const std::string& path,
                                                  RepositoryOptions options = {});
  ~Repository();

  const RepoConfig& config() const { return config_; }
  const std::string& path() const { return path_; }
  // Non-empty when Open read the configuration's copy because the record
  // itself could not be read: one line for the user.
  const std::string& config_note() const { return config_note_; }
  // Makes the configuration record and its copy (docs/format.md) both
  // present, readable and equal, writing the one that is not from the one
  // that is; says what it rewrote in `repaired`. Corruption when neither
  // can be read. `check` calls it.
  Status RepairConfigCopies(std::vector<std::string>* repaired);
  ObjectStore* objects() { return objects_; }
  // VMs whose metadata store exists, sorted.
  Result<std::vector<std::string>> ListVms();
  // Every directory under vms/, sorted: also those of first backups that
  // did not get as far as creating their metadata store (`check` sorts
  // them into leftovers and damage).
  Result<std::vector<std::string>> ListVmDirectories();

  enum class Access {
    // Existing VM only, as a read view (store/leveldb_read_view.h): the
    // VM as of the call, never waiting for nor blocking a backup, also on
    // a read-only repository; nothing can be written through it.
    kRead,
    // Existing VM only, its metadata store opened itself, for check (which
    // records quarantines): Busy while a backup or another check holds it.
    kInspect,
    kWrite,  // creates the VM; takes its lock (Busy if held)
  };
  Result<std::unique_ptr<VmStore>> OpenVm(const std::string& vm, Access access);

  // Salvages VM `vm`'s damaged metadata store (store/metadata_repair.h)
  // under the VM's writer lock (Busy while a backup or check holds it).
  Result<MetadataRepairReport> RepairVmMetadata(const std::string& vm);

  // The CDS lock: one `cds build` at a time per repository. Takes an
  // exclusive, non-blocking flock on REPO/cds/lock (created with its
  // directory if missing) and writes the pid into it; Busy "another cds
  // build is running on REPO" when another process holds it.
  Result<std::unique_ptr<RepoLock>> LockCds();

 private:
  Repository(std::string path, RepoConfig config, RepositoryOptions options);
  std::string path_;
  RepoConfig config_;
  std::string config_note_;
  RepositoryOptions options_;
  FileSystem* fs_;
  std::unique_ptr<ObjectStore> owned_objects_;
  ObjectStore* objects_ = nullptr;
};

// One VM's metadata with typed accessors.
class VmStore {
 public:
  ~VmStore();
  const std::string& vm() const { return vm_; }
  MetadataStore* meta() { return meta_.get(); }

  // All snapshots of `disk` (all disks when empty), by disk then seq.
  Result<std::vector<SnapshotRecord>> ListSnapshots(const std::string& disk = "");
  Result<std::vector<std::string>> ListDisks();
  Result<SnapshotRecord> GetSnapshot(const std::string& disk, uint64_t seq);
  // NotFound when the series has no snapshot.
  Result<SnapshotRecord> LatestSnapshot(const std::string& disk);
  Result<std::vector<uint64_t>> GetSnapshotSegments(const std::string& disk, uint64_t seq);
  Result<SegmentRecipe> GetSegmentRecipe(uint64_t id);
  Result<ContainerRecord> GetContainer(uint64_t id);
  // Every catalogued container, by id.
  Result<std::vector<ContainerRecord>> ListContainers();
  // The containers `check` quarantined (docs/format.md, "Quarantine").
  Result<std::set<uint64_t>> QuarantinedContainers();
  // Records (synced) that container `id` is damaged; false when it was
  // quarantined already (nothing written).
  Result<bool> QuarantineContainer(uint64_t id, const std::string& reason);
  // The containers a backup must not take records from: quarantined, or
  // catalogued but missing or not of the catalog's size. Looks at the size
  // of every catalogued container (one stat each).
  Result<std::set<uint64_t>> UnusableContainers();
  // The segment recipes `check` found missing or unreadable while snapshots
  // use them (docs/format.md, "Quarantine"): a backup reads those segments
  // again instead of reusing the recipe.
  Result<std::set<uint64_t>> LostRecipes();
  // Records (synced) that recipe `id` is lost; false when it was already.
  Result<bool> RecordLostRecipe(uint64_t id, const std::string& reason);
  Result<uint64_t> GetCounter(const std::string& name);  // 1 when never set

  // The snapshot ledger (store/snapshot_ledger.h). The ids ("vm/disk/seq")
  // of the snapshots it lists as committed that this store does not hold;
  // empty without a ledger; Corruption when the ledger does not decode.
  Result<std::vector<std::string>> SnapshotsLostFromStore();
  // Writes the ledger: what it listed, and every snapshot this store holds
  // as committed. Called by the writer after each commit.
  Status RecordCommittedSnapshots();
  // Removes snapshots (docs/format.md, "Forget"): the ledger marks them
  // forgotten, then one synced batch deletes their records. Recipes and
  // containers stay for gc.
  Status ForgetSnapshots(const std::vector<SnapshotRecord>& snapshots);
  // Snapshots the ledger marks forgotten whose records remain (a forget
  // that was interrupted): the next forget finishes them.
  Result<std::vector<SnapshotRecord>> ForgetInProgress();

  // Reserves a container id durably, so that no two objects ever share one.
  Result<uint64_t> AllocateContainerId() { return AllocateContainerIds(1); }
  // Reserves ids [first, first + n) with one synced write and returns first.
  // Ids reserved but never used are simply skipped: ids need not be dense.
  // The first call also looks at the VM's containers on disk and starts
  // above every id there, whatever the counter says (a counter that went
  // back, with lost or restored metadata, must never hand one out again).
  Result<uint64_t> AllocateContainerIds(uint64_t n);

 private:
  friend class Repository;
  VmStore(std::string vm, std::unique_ptr<MetadataStore> meta, int lock_fd, ObjectStore* objects);
  std::string vm_;
  std::unique_ptr<MetadataStore> meta_;
  std::unique_ptr<ReaderLease> lease_;  // a read view's (store/reader_lease.h)
  int lock_fd_ = -1;
  ObjectStore* objects_;
  bool ids_checked_on_disk_ = false;
};

// Parses "VM/DISK/SEQ" or "VM/DISK/latest".
struct SnapshotRef {
  std::string vm;
  std::string disk;
  std::optional<uint64_t> seq;  // empty: latest
};
Result<SnapshotRef> ParseSnapshotRef(const std::string& text);

}  // namespace vmdedup
