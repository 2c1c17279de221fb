// RealFileSystem: FileSystem over POSIX calls; see file_system.h.
#include "store/file_system.h"

#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace vmdedup {
namespace {

// Errors of the write path. ENOENT there means a directory vanished or was
// never made: an I/O problem, not a missing object.
Status WriteError(int err, const std::string& what) {
  if (err == ENOENT) return Status::IOError(what + ": " + std::strerror(err));
  return Status::FromErrno(err, what);
}

Status WriteAll(int fd, const uint8_t* p, size_t n, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return WriteError(errno, "write " + path);
    }
    if (w == 0) return Status::IOError("write " + path + ": wrote 0 bytes");
    p += w;
    n -= static_cast<size_t>(w);
  }
  return Status::OK();
}

// Appends of at least kDirectMin bytes (containers) are written with
// O_DIRECT through an aligned bounce buffer: a buffered write copies every
// byte into fresh page-cache pages, which cost up to 7x the CPU of the
// direct write on a VM guest, and a new container is not read back soon.
constexpr size_t kDirectMin = 1u << 20;
constexpr size_t kDirectAlign = 4096;  // a multiple of every logical block size
constexpr size_t kDirectBounce = 4u << 20;

struct AlignedFree {
  void operator()(uint8_t* p) const { std::free(p); }
};

// Writes `n` bytes at the file's offset: the aligned part with O_DIRECT
// where the file system accepts it and the offset is aligned, the rest (the
// tail, or all of it where O_DIRECT is refused) buffered.
Status WriteAllDirect(int fd, uint64_t offset, const uint8_t* p, size_t n,
                      const std::string& path) {
  const int flags = ::fcntl(fd, F_GETFL);
  if (n < kDirectMin || offset % kDirectAlign != 0 || flags < 0 ||
      ::fcntl(fd, F_SETFL, flags | O_DIRECT) != 0) {
    return WriteAll(fd, p, n, path);
  }
  thread_local std::unique_ptr<uint8_t, AlignedFree> bounce(
      static_cast<uint8_t*>(std::aligned_alloc(kDirectAlign, kDirectBounce)));
  size_t done = 0;
  const size_t aligned = n - n % kDirectAlign;
  while (bounce != nullptr && done < aligned) {
    const size_t len = std::min(kDirectBounce, aligned - done);
    std::memcpy(bounce.get(), p + done, len);
    ssize_t w = ::write(fd, bounce.get(), len);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EINVAL) break;  // O_DIRECT refused after all: buffered
    if (w < 0) return WriteError(errno, "write " + path);
    if (w == 0) return Status::IOError("write " + path + ": wrote 0 bytes");
    done += static_cast<size_t>(w);
    if (done % kDirectAlign != 0) break;  // a short write: finish buffered
  }
  if (::fcntl(fd, F_SETFL, flags) != 0) return WriteError(errno, "fcntl " + path);
  return WriteAll(fd, p + done, n - done, path);
}

class RealWritableFile final : public WritableFile {
 public:
  RealWritableFile(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  ~RealWritableFile() override {
    if (fd_ >= 0) ::close(fd_);
  }
  Status Append(std::span<const uint8_t> data) override {
    if (fd_ < 0) return Status::Internal("append to closed file " + path_);
    RETURN_IF_ERROR(WriteAllDirect(fd_, size_, data.data(), data.size(), path_));
    size_ += data.size();
    return Status::OK();
  }
  Status Sync() override {
    if (fd_ < 0) return Status::Internal("sync of closed file " + path_);
    if (::fsync(fd_) != 0) return WriteError(errno, "fsync " + path_);
    return Status::OK();
  }
  Status Close() override {
    if (fd_ < 0) return Status::Internal("close of closed file " + path_);
    int rc = ::close(fd_);
    fd_ = -1;
    if (rc != 0) return WriteError(errno, "close " + path_);
    return Status::OK();
  }

 private:
  int fd_;
  std::string path_;
  uint64_t size_ = 0;
};

class RealFileSystemImpl final : public FileSystem {
 public:
  Result<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path,
                                                        CreateMode mode) override {
    const int how = mode == CreateMode::kExclusive ? O_EXCL : O_TRUNC;
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | how | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0 && errno == EEXIST) return Status::Busy("create " + path + ": it exists");
    if (fd < 0 && errno == ELOOP) return LinkInRepository(path);
    if (fd < 0) return WriteError(errno, "create " + path);
    return std::unique_ptr<WritableFile>(new RealWritableFile(fd, path));
  }

  Status Rename(const std::string& from, const std::string& to, RenameMode mode) override {
    if (mode == RenameMode::kReplace) {
      if (::rename(from.c_str(), to.c_str()) != 0)
        return WriteError(errno, "rename " + from + " to " + to);
      return Status::OK();
    }
    if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) == 0)
      return Status::OK();
    int err = errno;
    if (err == EINVAL || err == ENOSYS) {
      // A file system without RENAME_NOREPLACE: link(2) never replaces
      // either; the source's name goes after.
      if (::link(from.c_str(), to.c_str()) == 0) {
        ::unlink(from.c_str());
        return Status::OK();
      }
      err = errno;
    }
    if (err == EEXIST)
      return Status::Corruption("rename " + from + " to " + to + ": " + to +
                                " exists already, and is never replaced");
    return WriteError(err, "rename " + from + " to " + to);
  }

  Status Remove(const std::string& path) override {
    if (::unlink(path.c_str()) != 0 && errno != ENOENT)
      return Status::FromErrno(errno, "remove " + path);
    return Status::OK();
  }

  Result<bool> CreateDir(const std::string& path) override {
    if (::mkdir(path.c_str(), 0700) == 0) return true;
    if (errno == EEXIST) {
      struct stat sb;
      if (::lstat(path.c_str(), &sb) == 0 && S_ISDIR(sb.st_mode)) return false;
      if (S_ISLNK(sb.st_mode)) return LinkInRepository(path);
      return Status::IOError("mkdir " + path + ": exists and is not a directory");
    }
    return WriteError(errno, "mkdir " + path);
  }

  // Filesystems that cannot sync directories (EINVAL) are accepted.
  Status SyncDir(const std::string& path) override {
    int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return WriteError(errno, "open directory " + path);
    Status st;
    if (::fsync(fd) != 0 && errno != EINVAL) st = WriteError(errno, "fsync " + path);
    ::close(fd);
    return st;
  }
};

}  // namespace

Status MakeDurableDirs(FileSystem& fs, const std::string& root, const std::string& rel_dir) {
  std::string path = root;
  size_t start = 0;
  while (start < rel_dir.size()) {
    size_t slash = rel_dir.find('/', start);
    if (slash == std::string::npos) slash = rel_dir.size();
    const std::string parent = path;
    path += "/" + rel_dir.substr(start, slash - start);
    start = slash + 1;
    RETURN_IF_ERROR(fs.CreateDir(path).status());
    RETURN_IF_ERROR(fs.SyncDir(parent));
  }
  return Status::OK();
}

Result<int> OpenBeneath(const std::string& root, const std::string& rel, int flags, mode_t mode,
                        const std::string& what) {
  const std::string path = root + "/" + rel;
  auto failed = [&](int err) -> Status {
    if (err == ELOOP || err == EXDEV)
      return LinkInRepository(path, "is, or passes through, a symbolic link");
    return Status::FromErrno(err, what.empty() ? path : what);
  };
  if (rel.empty() || rel[0] == '/') return Status::InvalidArgument("bad path below " + root);
  int root_fd = ::open(root.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (root_fd < 0) return Status::FromErrno(errno, root);
  open_how how;
  std::memset(&how, 0, sizeof(how));
  how.flags = static_cast<uint64_t>(flags | O_NOFOLLOW | O_CLOEXEC);
  how.mode = (flags & O_CREAT) != 0 ? mode : 0;
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
  long fd = ::syscall(SYS_openat2, root_fd, rel.c_str(), &how, sizeof(how));
  int err = fd < 0 ? errno : 0;
  if (fd < 0 && (err == ENOSYS || err == EPERM)) {
    // No openat2 (Linux < 5.6, or filtered): one openat per component,
    // none of them followed.
    int dir = ::dup(root_fd);
    size_t start = 0;
    fd = -1;
    err = dir < 0 ? errno : 0;
    while (dir >= 0) {
      const size_t slash = rel.find('/', start);
      const std::string part = rel.substr(start, slash - start);
      if (part == "..") {
        err = EXDEV;
        break;
      }
      if (slash == std::string::npos) {
        fd = ::openat(dir, part.c_str(), flags | O_NOFOLLOW | O_CLOEXEC, mode);
        err = fd < 0 ? errno : 0;
        break;
      }
      int next = ::openat(dir, part.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      err = next < 0 ? errno : 0;
      ::close(dir);
      dir = next;
      start = slash + 1;
    }
    if (dir >= 0) ::close(dir);
  }
  ::close(root_fd);
  if (fd < 0) return failed(err);
  // O_PATH | O_NOFOLLOW opens a trailing link itself rather than failing.
  struct stat sb;
  if ((flags & O_PATH) != 0 && ::fstat(static_cast<int>(fd), &sb) == 0 && S_ISLNK(sb.st_mode)) {
    ::close(static_cast<int>(fd));
    return failed(ELOOP);
  }
  return static_cast<int>(fd);
}

Status LinkInRepository(const std::string& path, const std::string& what) {
  return Status::Corruption(path + " " + what +
                            ": vmdedup never follows links inside a repository (remove it; "
                            "docs/operations.md, \"Damage\")");
}

FileSystem* RealFileSystem() {
  static FileSystem* const fs = new RealFileSystemImpl();
  return fs;
}

}  // namespace vmdedup
