// The Env of a LevelDB read view; see leveldb_read_view.h.
#include "store/leveldb_read_view.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <set>
#include <vector>

namespace vmdedup {
namespace {

bool EndsWith(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// A table file held open since the view was made: reads with pread on a
// descriptor the Env owns (it outlives every reader: the DB goes first).
class PinnedTable final : public leveldb::RandomAccessFile {
 public:
  PinnedTable(int fd, std::string name) : fd_(fd), name_(std::move(name)) {}
  leveldb::Status Read(uint64_t offset, size_t n, leveldb::Slice* result,
                       char* scratch) const override {
    size_t done = 0;
    while (done < n) {
      ssize_t r = ::pread(fd_, scratch + done, n - done, static_cast<off_t>(offset + done));
      if (r < 0) {
        if (errno == EINTR) continue;
        *result = leveldb::Slice(scratch, 0);
        return leveldb::Status::IOError(name_, std::strerror(errno));
      }
      if (r == 0) break;
      done += static_cast<size_t>(r);
    }
    *result = leveldb::Slice(scratch, done);
    return leveldb::Status::OK();
  }

 private:
  const int fd_;
  const std::string name_;
};

class ReadViewEnv final : public leveldb::EnvWrapper {
 public:
  ReadViewEnv(leveldb::Env* base, std::string db_dir, std::string scratch,
              std::map<std::string, int> pinned)
      : leveldb::EnvWrapper(base),
        db_dir_(std::move(db_dir)),
        scratch_(std::move(scratch)),
        pinned_(std::move(pinned)) {}

  ~ReadViewEnv() override {
    for (const auto& [name, fd] : pinned_) ::close(fd);
    std::error_code ec;
    std::filesystem::remove_all(scratch_, ec);
  }

  leveldb::Status NewSequentialFile(const std::string& f, leveldb::SequentialFile** r) override {
    std::string path;
    if (leveldb::Status s = ReadPath(f, &path); !s.ok()) return s;
    return target()->NewSequentialFile(path, r);
  }

  leveldb::Status NewRandomAccessFile(const std::string& f,
                                      leveldb::RandomAccessFile** r) override {
    std::string name;
    if (InDb(f, &name)) {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = pinned_.find(name);
      if (it != pinned_.end() && !written_.count(name) && !deleted_.count(name)) {
        *r = new PinnedTable(it->second, f);
        return leveldb::Status::OK();
      }
    }
    std::string path;
    if (leveldb::Status s = ReadPath(f, &path); !s.ok()) return s;
    return target()->NewRandomAccessFile(path, r);
  }

  leveldb::Status NewWritableFile(const std::string& f, leveldb::WritableFile** r) override {
    return target()->NewWritableFile(WritePath(f), r);
  }

  // LevelDB appends to an existing file only to reuse a log (off): a view
  // starts the file afresh in its scratch directory.
  leveldb::Status NewAppendableFile(const std::string& f, leveldb::WritableFile** r) override {
    std::string name;
    if (!InDb(f, &name)) return target()->NewAppendableFile(f, r);
    return target()->NewWritableFile(WritePath(f), r);
  }

  bool FileExists(const std::string& f) override {
    std::string name;
    if (!InDb(f, &name)) return target()->FileExists(f);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (written_.count(name)) return true;
      if (deleted_.count(name)) return false;
    }
    return target()->FileExists(f);
  }

  leveldb::Status GetChildren(const std::string& dir, std::vector<std::string>* r) override {
    if (dir != db_dir_) return target()->GetChildren(dir, r);
    std::vector<std::string> real;
    if (leveldb::Status s = target()->GetChildren(dir, &real); !s.ok()) return s;
    std::lock_guard<std::mutex> lock(mu_);
    std::set<std::string> all(written_.begin(), written_.end());
    for (const std::string& n : real)
      if (!deleted_.count(n)) all.insert(n);
    r->assign(all.begin(), all.end());
    return leveldb::Status::OK();
  }

  leveldb::Status RemoveFile(const std::string& f) override {
    std::string name;
    if (!InDb(f, &name)) return target()->RemoveFile(f);
    bool ours = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ours = written_.erase(name) > 0;
      deleted_.insert(name);
    }
    if (ours) return target()->RemoveFile(Scratch(name));
    return leveldb::Status::OK();
  }

  leveldb::Status CreateDir(const std::string& d) override {
    if (d == db_dir_) return leveldb::Status::OK();
    return target()->CreateDir(d);
  }
  leveldb::Status RemoveDir(const std::string& d) override {
    if (d == db_dir_) return leveldb::Status::OK();
    return target()->RemoveDir(d);
  }

  leveldb::Status GetFileSize(const std::string& f, uint64_t* size) override {
    std::string path;
    if (leveldb::Status s = ReadPath(f, &path); !s.ok()) return s;
    return target()->GetFileSize(path, size);
  }

  // Only files the view wrote move (CURRENT's temporary); LevelDB's rename
  // of its LOG to LOG.old, whose result it ignores, is refused.
  leveldb::Status RenameFile(const std::string& from, const std::string& to) override {
    std::string a, b;
    const bool a_in = InDb(from, &a), b_in = InDb(to, &b);
    if (!a_in && !b_in) return target()->RenameFile(from, to);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!a_in || !b_in || !written_.count(a))
        return leveldb::Status::IOError(from, "a read view renames only the files it wrote");
    }
    leveldb::Status s = target()->RenameFile(Scratch(a), Scratch(b));
    if (s.ok()) {
      std::lock_guard<std::mutex> lock(mu_);
      written_.erase(a);
      deleted_.insert(a);
      written_.insert(b);
      deleted_.erase(b);
    }
    return s;
  }

  // The view's own LOCK, in its scratch directory: a writer's lock on the
  // store is neither taken nor waited for.
  leveldb::Status LockFile(const std::string& f, leveldb::FileLock** l) override {
    return target()->LockFile(WritePath(f), l);
  }

  leveldb::Status NewLogger(const std::string& f, leveldb::Logger** r) override {
    return target()->NewLogger(WritePath(f), r);
  }

 private:
  bool InDb(const std::string& f, std::string* name) const {
    if (f.size() <= db_dir_.size() + 1 || f.compare(0, db_dir_.size(), db_dir_) != 0 ||
        f[db_dir_.size()] != '/')
      return false;
    *name = f.substr(db_dir_.size() + 1);
    return name->find('/') == std::string::npos;
  }
  std::string Scratch(const std::string& name) const { return scratch_ + "/" + name; }
  // Where a write of `f` goes: for a file of the store, the view's scratch
  // directory (the name is the view's from now on); anything else as is.
  std::string WritePath(const std::string& f) {
    std::string name;
    if (!InDb(f, &name)) return f;
    std::lock_guard<std::mutex> lock(mu_);
    written_.insert(name);
    deleted_.erase(name);
    return Scratch(name);
  }
  // Where a read of `f` goes: the view's copy, the store's file, or
  // nowhere (deleted in the view).
  leveldb::Status ReadPath(const std::string& f, std::string* path) {
    std::string name;
    *path = f;
    if (!InDb(f, &name)) return leveldb::Status::OK();
    std::lock_guard<std::mutex> lock(mu_);
    if (written_.count(name)) {
      *path = Scratch(name);
    } else if (deleted_.count(name)) {
      return leveldb::Status::NotFound(f, "deleted in this read view");
    }
    return leveldb::Status::OK();
  }

  const std::string db_dir_;
  const std::string scratch_;
  const std::map<std::string, int> pinned_;  // table name -> descriptor
  std::mutex mu_;
  std::set<std::string> written_;  // names whose content is in scratch_
  std::set<std::string> deleted_;  // names removed in the view
};

// The open-files limit raised to its hard limit, once: a view holds every
// table file of the store open.
void RaiseOpenFilesLimit() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct rlimit rl;
    if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
      rl.rlim_cur = rl.rlim_max;
      (void)::setrlimit(RLIMIT_NOFILE, &rl);
    }
  });
}

}  // namespace

Result<std::unique_ptr<leveldb::Env>> NewLevelDbReadViewEnv(const std::string& db_dir,
                                                            leveldb::Env* base) {
  const char* tmp = std::getenv("TMPDIR");
  std::string templ =
      std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/vmdedup-view-XXXXXX";
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  if (::mkdtemp(buf.data()) == nullptr)
    return Status::FromErrno(errno, "create a scratch directory for a read view (" + templ +
                                        "; set TMPDIR to a writable directory)");
  const std::string scratch(buf.data());

  RaiseOpenFilesLimit();
  std::map<std::string, int> pinned;
  Status st;
  if (DIR* d = ::opendir(db_dir.c_str())) {
    while (struct dirent* e = ::readdir(d)) {
      const std::string name = e->d_name;
      if (!EndsWith(name, ".ldb") && !EndsWith(name, ".sst")) continue;
      int fd = ::open((db_dir + "/" + name).c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
      if (fd >= 0) {
        pinned[name] = fd;
      } else if (errno == EMFILE || errno == ENFILE) {
        break;  // the rest are opened when read, as LevelDB does
      }
      // ENOENT: compacted away meanwhile; any other error shows when read.
    }
    ::closedir(d);
  } else {
    st = Status::FromErrno(errno, "list " + db_dir);
  }
  if (!st.ok()) {
    for (const auto& [name, fd] : pinned) ::close(fd);
    std::error_code ec;
    std::filesystem::remove_all(scratch, ec);
    return st;
  }
  return std::unique_ptr<leveldb::Env>(new ReadViewEnv(base, db_dir, scratch, std::move(pinned)));
}

}  // namespace vmdedup
