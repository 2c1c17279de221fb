// PowerCut: a model of what a local file system keeps when the power fails,
// for tests. It wraps the two ways vmdedup writes to a local disk — its own
// FileSystem (the local object store, the repository's configuration) and
// LevelDB's Env (the VMs' metadata) — and records, for every file below one
// root directory, what a power cut would keep:
//
//   - a file's data is durable up to its last successful Sync; whatever was
//     appended after it is dropped or torn at a random point on a cut (and,
//     at random, the torn tail reads as zeros from a random point to its
//     end: the size reached the disk, the last pages did not, as ext4's
//     data=writeback mode allows). Pages of the tail written out of order
//     (zeros before data that made it) are not modelled;
//   - a directory entry (a file created, renamed or removed; a directory
//     created or removed) is durable only once its directory was synced;
//     a directory whose own entry is not durable is lost with all below it.
//     LevelDB's POSIX Env syncs a database's directory inside the Sync of
//     its MANIFEST file (SyncDirIfManifest in LevelDB's env_posix.cc), out
//     of the wrapper's sight: the model counts that Sync as a directory
//     sync too.
//
// Every write operation below the root (create, append, sync, rename,
// remove, mkdir, rmdir, directory sync; through either wrapper) is counted
// from 1. With ArmAt(N), the N-th fails with IOError "power cut (injected)"
// and so does every later one: the process is dead to the disk, but reads
// keep working so that it can end its work and close its files. Once
// nothing writes any more (every store closed), Apply() changes the real
// files into one state the disk could hold after that cut: files and
// entries not durable vanish, removed or replaced files that were still
// durable come back, unsynced tails are torn. The files themselves are
// written as they go (to the real disk); a file removed or replaced below
// the root is kept aside in ROOT.powercut/ until Apply() needs it.
//
// Files below the root that are written around both wrappers (lock files,
// LevelDB's LOCK and LOG) are not modelled: Apply() leaves them as they are
// (or removes them with a lost directory).
//
// Thread model: every method and the wrappers are safe from many threads;
// the wrappers serialize their operations on one mutex. Apply() must not
// run while anything writes through the wrappers.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>

#include "store/file_system.h"

namespace leveldb {
class Env;
}

namespace vmdedup::testing {

class PowerCut {
 public:
  // Models `root` (an existing directory; everything in it counts as
  // durable now). `seed` drives Apply()'s random choices.
  PowerCut(const std::string& root, uint64_t seed);
  ~PowerCut();
  PowerCut(const PowerCut&) = delete;
  PowerCut& operator=(const PowerCut&) = delete;

  FileSystem* file_system();
  leveldb::Env* leveldb_env();

  // The `n`-th write operation from now on is the cut (0: never).
  void ArmAt(uint64_t n);
  // Write operations below the root so far (the cut included).
  uint64_t operations() const;
  bool cut() const;

  struct Outcome {
    int files_dropped = 0;  // created since their directory's last sync
    int files_revived = 0;  // removed or replaced, but still durable
    int files_torn = 0;     // lost some unsynced bytes
    int files_zeroed = 0;   // of those, a range reads as zeros
    int dirs_dropped = 0;
    std::string ToString() const;
  };
  // Makes the files below the root what the disk holds after the cut (or,
  // when none happened, after a power failure now). The model then starts
  // again from that state: every file in it is durable.
  Outcome Apply();

 private:
  friend class PowerCutFileSystem;
  friend class PowerCutEnv;
  friend class PowerCutFile;

  struct Inode {
    std::string real_path;  // where its bytes are now
    uint64_t size = 0;      // bytes appended through the wrappers
    uint64_t synced = 0;    // durable prefix
  };

  // Counts an operation on `path` and runs `real` and then `update` under
  // the mutex; after the cut only IOError. Paths outside the root only run
  // `real`.
  Status Operate(const std::string& path, const std::function<Status()>& real,
                 const std::function<void()>& update);
  bool InRoot(const std::string& path) const;
  // Moves the file at live path `path` aside (its inode may still be durable).
  Status DisplaceLocked(const std::string& path);
  void RenameLocked(const std::string& from, const std::string& to);
  void SyncDirLocked(const std::string& dir);
  void ScanLocked();
  uint64_t NewInodeLocked(const std::string& path);

  const std::string root_, aside_;
  std::mt19937_64 rng_;
  std::unique_ptr<FileSystem> fs_;
  std::unique_ptr<leveldb::Env> env_;

  mutable std::mutex mu_;
  uint64_t ops_ = 0, cut_at_ = 0, next_inode_ = 1;
  bool cut_ = false;
  std::map<uint64_t, Inode> inodes_;
  std::map<std::string, uint64_t> live_, durable_;  // file path → inode
  std::set<std::string> live_dirs_, durable_dirs_;  // the root is in both
};

}  // namespace vmdedup::testing
