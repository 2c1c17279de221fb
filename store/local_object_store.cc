// ObjectStore over a local directory: one file per object. See object_store.h
// for the contract; this file adds how atomicity and durability are obtained
// (write a temporary, fsync, rename, fsync the directory), every write
// through a FileSystem.

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
#include <mutex>
#include <set>
#include <string_view>

#include "store/file_system.h"
#include "store/object_store.h"

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
  LocalObjectStore(std::string root, FileSystem* fs) : root_(std::move(root)), fs_(fs) {
    while (root_.size() > 1 && root_.back() == '/') root_.pop_back();
    // A missing root and its ancestors are created (a repository's root
    // exists already: Repository::Create made it durable). Errors surface
    // on first use, as IOError from Put.
    for (size_t slash = root_.find('/', 1);; slash = root_.find('/', slash + 1)) {
      (void)fs_->CreateDir(root_.substr(0, slash));
      if (slash == std::string::npos) break;
    }
  }

  Status Put(const std::string& name, std::span<const uint8_t> data) override {
    return PutObject(name, data, FileSystem::RenameMode::kReplace);
  }
  Status PutNew(const std::string& name, std::span<const uint8_t> data) override {
    return PutObject(name, data, FileSystem::RenameMode::kNoReplace);
  }

  Status PutObject(const std::string& name, std::span<const uint8_t> data,
                   FileSystem::RenameMode mode) {
    RETURN_IF_ERROR(ValidateObjectName(name));
    size_t slash = name.rfind('/');
    std::string dir = root_;
    if (slash != std::string::npos) {
      RETURN_IF_ERROR(MakeDirs(name.substr(0, slash)));
      dir += "/" + name.substr(0, slash);
    }
    std::string final_path = Path(name);
    std::string tmp_path;
    std::unique_ptr<WritableFile> file;
    // A leftover of an earlier process with our PID (after a reboot) may hold
    // a name: take the next counter.
    for (int attempt = 0; file == nullptr; attempt++) {
      tmp_path = final_path + std::string(kTempMarker) + std::to_string(::getpid()) + "." +
                 std::to_string(counter_.fetch_add(1));
      auto created = fs_->NewWritableFile(tmp_path, FileSystem::CreateMode::kExclusive);
      if (created.ok()) {
        file = std::move(created).value();
      } else if (!created.status().IsBusy() || attempt == 99) {
        return created.status();
      }
    }
    Status st = file->Append(data);
    if (st.ok()) st = file->Sync();
    if (st.ok()) st = file->Close();
    file.reset();
    if (st.ok()) st = fs_->Rename(tmp_path, final_path, mode);
    if (!st.ok()) {
      (void)fs_->Remove(tmp_path);  // best effort: check reports what remains
      return st;
    }
    return fs_->SyncDir(dir);
  }

  Status Get(const std::string& name, std::string* out) override {
    RETURN_IF_ERROR(ValidateObjectName(name));
    std::string path = Path(name);
    ASSIGN_OR_RETURN(int fd, OpenBeneath(root_, name, O_RDONLY, 0, "object " + name));
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
    ASSIGN_OR_RETURN(int fd, OpenBeneath(root_, name, O_RDONLY, 0, "object " + name));
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
    ASSIGN_OR_RETURN(int fd, OpenBeneath(root_, name, O_PATH, 0, "object " + name));
    struct stat sb;
    const int rc = ::fstat(fd, &sb);
    const int err = errno;
    ::close(fd);
    if (rc != 0) return Status::FromErrno(err, "stat " + Path(name));
    if (!S_ISREG(sb.st_mode)) return Status::NotFound("object " + name + ": not a file");
    return static_cast<uint64_t>(sb.st_size);
  }

  Status Delete(const std::string& name) override {
    RETURN_IF_ERROR(ValidateObjectName(name));
    return fs_->Remove(Path(name)).WithContext("delete object " + name);
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
    return fs_->Remove(Path(name)).WithContext("remove temporary " + name);
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

  // Makes the directories of `rel_dir` durable once per store: after that
  // they are known to be.
  Status MakeDirs(const std::string& rel_dir) {
    {
      std::lock_guard<std::mutex> lock(dirs_mu_);
      if (durable_dirs_.count(rel_dir)) return Status::OK();
    }
    RETURN_IF_ERROR(MakeDurableDirs(*fs_, root_, rel_dir));
    std::lock_guard<std::mutex> lock(dirs_mu_);
    durable_dirs_.insert(rel_dir);
    return Status::OK();
  }

  std::string root_;
  FileSystem* fs_;
  std::atomic<uint64_t> counter_{0};
  std::mutex dirs_mu_;
  std::set<std::string> durable_dirs_;  // directories (relative) MakeDirs made durable
};

}  // namespace

std::unique_ptr<ObjectStore> NewLocalObjectStore(const std::string& root, FileSystem* fs) {
  return std::make_unique<LocalObjectStore>(root, fs != nullptr ? fs : RealFileSystem());
}

}  // namespace vmdedup
