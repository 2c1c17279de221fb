// FileSystem: the write side of a local file system. Every byte vmdedup
// makes durable on a local disk goes through one: the local object store's
// objects and directories, and the repository's configuration record
// (LevelDB writes the VMs' metadata through its own Env, which tests wrap
// the same way). A test passes its own FileSystem to model what survives a
// power cut (tests/power_cut.h): data written to a file is durable only
// once Sync returns; a directory entry (a file created, renamed or removed;
// a directory created) only once its directory is synced with SyncDir.
// Code that writes through a FileSystem therefore syncs both, in the order
// docs/format.md gives.
//
// Reads do not go through it: a power cut changes what is on disk only
// while nothing runs, so readers see the real files.
//
// Thread model: a FileSystem is safe from many threads at once; one
// WritableFile is used by one thread at a time.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "base/status.h"

namespace vmdedup {

class WritableFile {
 public:
  // Closes the file if Close was not called, ignoring errors.
  virtual ~WritableFile() = default;
  // Appends at the end of what this handle wrote.
  virtual Status Append(std::span<const uint8_t> data) = 0;
  // fsync: what was appended so far is durable when it returns OK.
  virtual Status Sync() = 0;
  // Closes the file and reports close's error; later calls fail.
  virtual Status Close() = 0;
};

class FileSystem {
 public:
  virtual ~FileSystem() = default;

  enum class CreateMode {
    kExclusive,  // the file must not exist (AlreadyExists: Busy)
    kTruncate,   // a new empty file replaces whatever is there
  };
  // Creates `path` for writing (mode 0600), never through a symbolic link
  // at `path` (Corruption). kExclusive on an existing file is Busy, so that
  // callers can pick another name.
  virtual Result<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path,
                                                                CreateMode mode) = 0;
  enum class RenameMode {
    kReplace,    // rename(2): replaces `to` atomically
    kNoReplace,  // `to` must not exist: Corruption when it does (nothing moves)
  };
  virtual Status Rename(const std::string& from, const std::string& to, RenameMode mode) = 0;
  // Removes a file; a missing one is OK.
  virtual Status Remove(const std::string& path) = 0;
  // Creates one directory (mode 0700); returns false when it already
  // existed. Its parent must exist. A symbolic link at `path` is
  // Corruption, never followed.
  virtual Result<bool> CreateDir(const std::string& path) = 0;
  // fsync of a directory: the entries created, renamed and removed in it so
  // far are durable when it returns OK.
  virtual Status SyncDir(const std::string& path) = 0;
};

// Creates each directory of `rel_dir` ("a/b/c") below `root` that is
// missing, and syncs the parent of each, so that all of them are durable:
// also where the directory existed already (another thread or process may
// have created it and not yet synced its parent).
Status MakeDurableDirs(FileSystem& fs, const std::string& root, const std::string& rel_dir);

// Corruption "PATH WHAT: vmdedup never follows links inside a repository
// (remove it; ...)": the one error for a link (or another kind of file
// than the repository holds there) found below a repository.
Status LinkInRepository(const std::string& path, const std::string& what = "is a symbolic link");

// Opens `rel` ("vms/a/lock") below the directory `root` with open(2)'s
// `flags` and `mode`, never through a symbolic link: every component of
// `rel` must be a real directory or file, and `..` cannot leave `root`
// (openat2 with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS; one openat per
// component with O_NOFOLLOW where the kernel has no openat2). A link is
// Corruption naming the path; other errors as Status::FromErrno(errno,
// `what`) (default: the path), so a missing file is NotFound. `root` itself
// may be reached through links: the user names it. The caller closes the fd.
Result<int> OpenBeneath(const std::string& root, const std::string& rel, int flags, mode_t mode = 0,
                        const std::string& what = "");

// The real file system (POSIX calls). Appends of 1 MiB and more are written
// with O_DIRECT where the file system accepts it (a new container is not
// read back soon; a buffered write of it cost up to 7x the CPU on a VM
// guest), the rest buffered. A process-wide object; never deleted.
FileSystem* RealFileSystem();

}  // namespace vmdedup
