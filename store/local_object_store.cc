// ObjectStore over a local directory: one file per object. See object_store.h
// for the contract; this file adds how atomicity and durability are obtained
// (write a temporary, fsync, rename, fsync the directory).

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <string_view>

#include "store/object_store.h"
#include "store/sync_directory.h"

namespace vmdedup {
namespace {

// Marks a temporary: "NAME.tmp.PID.COUNTER".
constexpr std::string_view kTempMarker = ".tmp.";

// Closes a file descriptor on scope exit.
class FdCloser {
 public:
  explicit FdCloser(int fd) : fd_(fd) {}
  ~FdCloser() {
    if (fd_ >= 0) ::close(fd_);
  }
  FdCloser(const FdCloser&) = delete;
  FdCloser& operator=(const FdCloser&) = delete;
  // Gives up ownership: the descriptor stays open.
  int Release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  // Closes now and reports the error close() may return.
  int Close() {
    int fd = fd_;
    fd_ = -1;
    return fd >= 0 ? ::close(fd) : 0;
  }

 private:
  int fd_;
};

std::string_view LastComponent(std::string_view name) {
  size_t slash = name.rfind('/');
  return slash == std::string_view::npos ? name : name.substr(slash + 1);
}

bool IsTemporaryName(std::string_view name) {
  return LastComponent(name).find(kTempMarker) != std::string_view::npos;
}

// Relative, '/'-separated, no empty/"."/".." components, no NUL.
Status ValidateRelativePath(const std::string& name) {
  if (name.empty()) return Status::InvalidArgument("empty object name");
  if (name.find('\0') != std::string::npos) {
    return Status::InvalidArgument("object name contains NUL");
  }
  size_t start = 0;
  while (true) {
    size_t slash = name.find('/', start);
    std::string_view comp = std::string_view(name).substr(
        start, slash == std::string::npos ? name.npos : slash - start);
    if (comp.empty() || comp == "." || comp == "..") {
      return Status::InvalidArgument("bad object name: \"" + name + "\"");
    }
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  return Status::OK();
}

Status ValidateObjectName(const std::string& name) {
  RETURN_IF_ERROR(ValidateRelativePath(name));
  if (IsTemporaryName(name)) {
    return Status::InvalidArgument("object name must not contain \".tmp.\": " + name);
  }
  return Status::OK();
}

// Errors of the write path. ENOENT there means a directory vanished or the
// root could not be created: an I/O problem, not a missing object.
Status WriteError(int err, const std::string& what) {
  if (err == ENOENT) return Status::IOError(what + ": " + std::strerror(err));
  return Status::FromErrno(err, what);
}

// Creates `dir` and its missing ancestors below `root` (which must exist);
// each created directory is made durable by syncing its parent.
Status MakeDirs(const std::string& root, const std::string& rel_dir) {
  std::string path = root;
  size_t start = 0;
  while (start < rel_dir.size()) {
    size_t slash = rel_dir.find('/', start);
    if (slash == std::string::npos) slash = rel_dir.size();
    std::string parent = path;
    path += "/" + rel_dir.substr(start, slash - start);
    start = slash + 1;
    if (::mkdir(path.c_str(), 0755) == 0) {
      RETURN_IF_ERROR(SyncDirectory(parent));
    } else if (errno != EEXIST) {
      return WriteError(errno, "mkdir " + path);
    }
  }
  return Status::OK();
}

// Creates `root` and its ancestors (an absolute or cwd-relative path).
Status MakeRoot(const std::string& root) {
  std::string path;
  size_t start = 0;
  while (start <= root.size()) {
    size_t slash = root.find('/', start);
    if (slash == std::string::npos) slash = root.size();
    path = root.substr(0, slash);
    start = slash + 1;
    if (path.empty()) continue;
    if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) {
      return Status::FromErrno(errno, "mkdir " + path);
    }
  }
  return Status::OK();
}

Status WriteAll(int fd, const uint8_t* p, size_t n, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "write " + path);
    }
    if (w == 0) return Status::IOError("write " + path + ": wrote 0 bytes");
    p += w;
    n -= static_cast<size_t>(w);
  }
  return Status::OK();
}

// Objects of at least kDirectMin bytes (containers) are written with
// O_DIRECT through an aligned bounce buffer: a buffered write copies every
// byte into fresh page-cache pages, which cost up to 7x the CPU of the direct
// write on a VM guest, and a new container is not read back soon.
constexpr size_t kDirectMin = 1u << 20;
constexpr size_t kDirectAlign = 4096;  // a multiple of every logical block size
constexpr size_t kDirectBounce = 4u << 20;

struct AlignedFree {
  void operator()(uint8_t* p) const { std::free(p); }
};

// Writes `n` bytes at the file's offset: the aligned part with O_DIRECT where
// the filesystem accepts it, the rest (the tail, or all of it where
// O_DIRECT is refused) buffered. The caller fsyncs.
Status WriteAllDirect(int fd, const uint8_t* p, size_t n, const std::string& path) {
  const int flags = ::fcntl(fd, F_GETFL);
  if (n < kDirectMin || flags < 0 || ::fcntl(fd, F_SETFL, flags | O_DIRECT) != 0) {
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
    if (w < 0) return Status::FromErrno(errno, "write " + path);
    if (w == 0) return Status::IOError("write " + path + ": wrote 0 bytes");
    done += static_cast<size_t>(w);
    if (done % kDirectAlign != 0) break;  // a short write: finish buffered
  }
  if (::fcntl(fd, F_SETFL, flags) != 0) return Status::FromErrno(errno, "fcntl " + path);
  return WriteAll(fd, p + done, n - done, path);
}

// Reads exactly `n` bytes at `offset`; a short file is Corruption (truncated).
Status PreadAll(int fd, uint64_t offset, size_t n, char* out, const std::string& name,
                uint64_t size) {
  size_t done = 0;
  while (done < n) {
    ssize_t r = ::pread(fd, out + done, n - done, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "read " + name);
    }
    if (r == 0) {
      return Status::Corruption("object " + name + " truncated: read " + std::to_string(done) +
                                " of " + std::to_string(n) + " bytes at offset " +
                                std::to_string(offset) + ", size " + std::to_string(size));
    }
    done += static_cast<size_t>(r);
  }
  return Status::OK();
}

// One open object file; pread is safe from several threads.
class FileObjectReader final : public ObjectReader {
 public:
  FileObjectReader(int fd, std::string name, uint64_t size)
      : fd_(fd), name_(std::move(name)), size_(size) {}
  ~FileObjectReader() override { ::close(fd_); }
  Status ReadAt(uint64_t offset, uint64_t length, std::string* out) const override {
    if (offset > size_ || length > size_ - offset) {
      return Status::Corruption("object " + name_ + " truncated: range [" + std::to_string(offset) +
                                ", +" + std::to_string(length) + ") past its size " +
                                std::to_string(size_));
    }
    out->resize(length);
    Status st = PreadAll(fd_, offset, length, out->data(), name_, size_);
    if (!st.ok()) out->clear();
    return st;
  }

 private:
  int fd_;
  std::string name_;
  uint64_t size_;
};

// A temporary's writer may be alive while its PID exists on this host.
bool WriterMayBeAlive(std::string_view temp_name) {
  std::string_view last = LastComponent(temp_name);
  size_t marker = last.rfind(kTempMarker);
  if (marker == std::string_view::npos) return false;
  std::string_view rest = last.substr(marker + kTempMarker.size());
  long pid = 0;
  size_t i = 0;
  for (; i < rest.size() && rest[i] >= '0' && rest[i] <= '9' && pid < (1L << 30); i++) {
    pid = pid * 10 + (rest[i] - '0');
  }
  if (i == 0 || pid <= 0 || pid >= (1L << 30)) return false;
  return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM;
}

class LocalObjectStore final : public ObjectStore {
 public:
  explicit LocalObjectStore(std::string root) : root_(std::move(root)) {
    while (root_.size() > 1 && root_.back() == '/') root_.pop_back();
    // Errors surface on first use, as IOError from Put.
    (void)MakeRoot(root_);
  }

  Status Put(const std::string& name, std::span<const uint8_t> data) override {
    RETURN_IF_ERROR(ValidateObjectName(name));
    size_t slash = name.rfind('/');
    std::string dir = root_;
    if (slash != std::string::npos) {
      RETURN_IF_ERROR(MakeDirs(root_, name.substr(0, slash)));
      dir += "/" + name.substr(0, slash);
    }
    std::string final_path = Path(name);
    std::string tmp_path;
    int fd = -1;
    // A leftover of an earlier process with our PID (after a reboot) may hold
    // a name: take the next counter.
    for (int attempt = 0; fd < 0 && attempt < 100; attempt++) {
      tmp_path = final_path + std::string(kTempMarker) + std::to_string(::getpid()) + "." +
                 std::to_string(counter_.fetch_add(1));
      fd = ::open(tmp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
      if (fd < 0 && errno != EEXIST) break;
    }
    if (fd < 0) return WriteError(errno, "create " + tmp_path);
    FdCloser closer(fd);
    Status st = WriteAllDirect(fd, data.data(), data.size(), tmp_path);
    if (st.ok() && ::fsync(fd) != 0) st = WriteError(errno, "fsync " + tmp_path);
    if (st.ok() && closer.Close() != 0) st = WriteError(errno, "close " + tmp_path);
    if (st.ok() && ::rename(tmp_path.c_str(), final_path.c_str()) != 0) {
      st = WriteError(errno, "rename " + tmp_path + " to " + final_path);
    }
    if (!st.ok()) {
      closer.Close();
      ::unlink(tmp_path.c_str());
      return st;
    }
    return SyncDirectory(dir);
  }

  Status Get(const std::string& name, std::string* out) override {
    RETURN_IF_ERROR(ValidateObjectName(name));
    std::string path = Path(name);
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Status::FromErrno(errno, "object " + name);
    FdCloser closer(fd);
    struct stat sb;
    if (::fstat(fd, &sb) != 0) return Status::FromErrno(errno, "stat " + path);
    if (!S_ISREG(sb.st_mode)) return Status::NotFound("object " + name + ": not a file");
    uint64_t size = static_cast<uint64_t>(sb.st_size);
    out->resize(size);
    Status st = PreadAll(fd, 0, size, out->data(), name, size);
    if (!st.ok()) out->clear();
    return st;
  }

  Status GetRange(const std::string& name, uint64_t offset, uint64_t length,
                  std::string* out) override {
    ASSIGN_OR_RETURN(std::unique_ptr<ObjectReader> reader, OpenReader(name));
    return reader->ReadAt(offset, length, out);
  }

  Result<std::unique_ptr<ObjectReader>> OpenReader(const std::string& name) override {
    RETURN_IF_ERROR(ValidateObjectName(name));
    std::string path = Path(name);
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Status::FromErrno(errno, "object " + name);
    FdCloser closer(fd);
    struct stat sb;
    if (::fstat(fd, &sb) != 0) return Status::FromErrno(errno, "stat " + path);
    if (!S_ISREG(sb.st_mode)) return Status::NotFound("object " + name + ": not a file");
    closer.Release();
    return std::unique_ptr<ObjectReader>(
        new FileObjectReader(fd, name, static_cast<uint64_t>(sb.st_size)));
  }

  Result<uint64_t> Size(const std::string& name) override {
    RETURN_IF_ERROR(ValidateObjectName(name));
    struct stat sb;
    if (::stat(Path(name).c_str(), &sb) != 0) return Status::FromErrno(errno, "object " + name);
    if (!S_ISREG(sb.st_mode)) return Status::NotFound("object " + name + ": not a file");
    return static_cast<uint64_t>(sb.st_size);
  }

  Status Delete(const std::string& name) override {
    RETURN_IF_ERROR(ValidateObjectName(name));
    if (::unlink(Path(name).c_str()) != 0 && errno != ENOENT) {
      return Status::FromErrno(errno, "delete object " + name);
    }
    return Status::OK();
  }

  Status List(const std::string& prefix, std::vector<std::string>* names) override {
    names->clear();
    RETURN_IF_ERROR(Walk(prefix, [&](const std::string& rel, const struct stat&) {
      if (!IsTemporaryName(rel)) names->push_back(rel);
    }));
    std::sort(names->begin(), names->end());
    return Status::OK();
  }

  Status ListTemporary(const std::string& prefix, std::vector<Temporary>* out) override {
    out->clear();
    time_t now = ::time(nullptr);
    RETURN_IF_ERROR(Walk(prefix, [&](const std::string& rel, const struct stat& sb) {
      if (!IsTemporaryName(rel)) return;
      Temporary t;
      t.name = rel;
      t.bytes = static_cast<uint64_t>(sb.st_size);
      t.age_seconds = std::max<int64_t>(0, static_cast<int64_t>(now - sb.st_mtime));
      t.writer_may_be_alive = WriterMayBeAlive(rel);
      out->push_back(std::move(t));
    }));
    std::sort(out->begin(), out->end(),
              [](const Temporary& a, const Temporary& b) { return a.name < b.name; });
    return Status::OK();
  }

  Status RemoveTemporary(const std::string& name) override {
    RETURN_IF_ERROR(ValidateRelativePath(name));
    if (!IsTemporaryName(name)) return Status::InvalidArgument("not a temporary: " + name);
    if (::unlink(Path(name).c_str()) != 0 && errno != ENOENT) {
      return Status::FromErrno(errno, "remove temporary " + name);
    }
    return Status::OK();
  }

  std::string Describe() const override { return root_; }

 private:
  std::string Path(const std::string& name) const { return root_ + "/" + name; }

  // Calls `fn` for every regular file below root whose relative name starts
  // with `prefix`, in no particular order (callers sort).
  template <typename Fn>
  Status Walk(const std::string& prefix, Fn&& fn) {
    // Only the directory named by the prefix up to its last '/' can hold
    // matches: start there instead of at the root.
    size_t slash = prefix.rfind('/');
    std::string start_rel = slash == std::string::npos ? "" : prefix.substr(0, slash);
    if (!start_rel.empty() && !ValidateRelativePath(start_rel).ok()) {
      return Status::InvalidArgument("bad list prefix: \"" + prefix + "\"");
    }
    return WalkDir(start_rel, prefix, fn);
  }

  template <typename Fn>
  Status WalkDir(const std::string& rel_dir, const std::string& prefix, Fn& fn) {
    std::string dir_path = rel_dir.empty() ? root_ : Path(rel_dir);
    DIR* d = ::opendir(dir_path.c_str());
    if (d == nullptr) {
      // A prefix naming a directory that does not exist matches nothing.
      if (errno == ENOENT || errno == ENOTDIR) return Status::OK();
      return Status::FromErrno(errno, "list " + dir_path);
    }
    std::vector<std::string> entries;
    errno = 0;
    while (struct dirent* e = ::readdir(d)) {
      std::string_view n = e->d_name;
      if (n == "." || n == "..") continue;
      entries.emplace_back(n);
    }
    int err = errno;
    ::closedir(d);
    if (err != 0) return Status::FromErrno(err, "list " + dir_path);
    for (const std::string& n : entries) {
      std::string rel = rel_dir.empty() ? n : rel_dir + "/" + n;
      struct stat sb;
      if (::lstat(Path(rel).c_str(), &sb) != 0) {
        if (errno == ENOENT) continue;  // removed meanwhile
        return Status::FromErrno(errno, "stat " + Path(rel));
      }
      if (S_ISDIR(sb.st_mode)) {
        // Prune subtrees that cannot match: `rel/` and `prefix` must agree
        // on their common length.
        std::string as_dir = rel + "/";
        size_t common = std::min(as_dir.size(), prefix.size());
        if (as_dir.compare(0, common, prefix, 0, common) != 0) continue;
        RETURN_IF_ERROR(WalkDir(rel, prefix, fn));
      } else if (S_ISREG(sb.st_mode)) {
        if (rel.compare(0, prefix.size(), prefix) == 0) fn(rel, sb);
      }
    }
    return Status::OK();
  }

  std::string root_;
  std::atomic<uint64_t> counter_{0};
};

}  // namespace

std::unique_ptr<ObjectStore> NewLocalObjectStore(const std::string& root) {
  return std::make_unique<LocalObjectStore>(root);
}

}  // namespace vmdedup
