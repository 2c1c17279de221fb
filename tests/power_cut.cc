// PowerCut; see power_cut.h.
#include "tests/power_cut.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <vector>

#include "leveldb/env.h"

namespace vmdedup::testing {
namespace fs = std::filesystem;

namespace {

std::string Parent(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos || slash == 0 ? "/" : path.substr(0, slash);
}

std::string Basename(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// Collapses "//" and drops a trailing '/', so that the same file always has
// the same name in the model.
std::string Normal(const std::string& path) {
  std::string out;
  for (char c : path) {
    if (c == '/' && !out.empty() && out.back() == '/') continue;
    out += c;
  }
  while (out.size() > 1 && out.back() == '/') out.pop_back();
  return out;
}

Status FromLevelDb(const leveldb::Status& s) {
  if (s.ok()) return Status::OK();
  if (s.IsNotFound()) return Status::NotFound(s.ToString());
  return Status::IOError(s.ToString());
}

leveldb::Status ToLevelDb(const Status& s) {
  if (s.ok()) return leveldb::Status::OK();
  if (s.IsNotFound()) return leveldb::Status::NotFound(s.message());
  return leveldb::Status::IOError(s.message());
}

// The directories (sorted, parents first) or the regular files below
// `root`; symbolic links are neither.
std::vector<std::string> Walk(const std::string& root, bool dirs) {
  std::vector<std::string> out;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(root, ec); !ec && it != fs::end(it);
       it.increment(ec)) {
    if (it->is_symlink(ec)) continue;
    if (dirs ? it->is_directory(ec) : it->is_regular_file(ec))
      out.push_back(Normal(it->path().string()));
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

// One file written through either wrapper. `inode` is 0 outside the root.
class PowerCutFile {
 public:
  PowerCutFile(PowerCut* pc, std::string path, uint64_t inode)
      : pc_(pc), path_(std::move(path)), inode_(inode) {}

  Status Append(size_t n, const std::function<Status()>& real) {
    return pc_->Operate(path_, real, [&] { pc_->inodes_[inode_].size += n; });
  }
  // `manifest`: LevelDB's POSIX Env syncs the directory in this Sync too.
  Status Sync(const std::function<Status()>& real, bool manifest) {
    return pc_->Operate(path_, real, [&] {
      PowerCut::Inode& in = pc_->inodes_[inode_];
      in.synced = in.size;
      if (manifest) pc_->SyncDirLocked(Parent(path_));
    });
  }
  bool cut() const { return pc_->cut(); }

 private:
  PowerCut* pc_;
  std::string path_;
  uint64_t inode_;
};

class PowerCutFileSystem final : public FileSystem {
 public:
  explicit PowerCutFileSystem(PowerCut* pc) : pc_(pc), real_(RealFileSystem()) {}

  class File final : public WritableFile {
   public:
    File(PowerCut* pc, std::unique_ptr<WritableFile> real, std::string path, uint64_t inode)
        : real_(std::move(real)), file_(pc, std::move(path), inode) {}
    Status Append(std::span<const uint8_t> data) override {
      return file_.Append(data.size(), [&] { return real_->Append(data); });
    }
    Status Sync() override {
      return file_.Sync([&] { return real_->Sync(); }, /*manifest=*/false);
    }
    Status Close() override { return real_->Close(); }

   private:
    std::unique_ptr<WritableFile> real_;
    PowerCutFile file_;
  };

  Result<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& p,
                                                        CreateMode mode) override {
    const std::string path = Normal(p);
    std::unique_ptr<WritableFile> file;
    uint64_t inode = 0;
    Status st = pc_->Operate(
        path,
        [&]() -> Status {
          if (mode == CreateMode::kTruncate && pc_->live_.count(path))
            RETURN_IF_ERROR(pc_->DisplaceLocked(path));
          ASSIGN_OR_RETURN(file, real_->NewWritableFile(path, mode));
          return Status::OK();
        },
        [&] { inode = pc_->NewInodeLocked(path); });
    if (!st.ok()) return st;
    return std::unique_ptr<WritableFile>(new File(pc_, std::move(file), path, inode));
  }

  Status Rename(const std::string& f, const std::string& t, RenameMode mode) override {
    const std::string from = Normal(f), to = Normal(t);
    return pc_->Operate(
        from,
        [&]() -> Status {
          if (mode == RenameMode::kNoReplace) return real_->Rename(from, to, mode);
          if (pc_->live_.count(to)) RETURN_IF_ERROR(pc_->DisplaceLocked(to));
          return real_->Rename(from, to, mode);
        },
        [&] { pc_->RenameLocked(from, to); });
  }

  Status Remove(const std::string& p) override {
    const std::string path = Normal(p);
    return pc_->Operate(
        path,
        [&] { return pc_->live_.count(path) ? pc_->DisplaceLocked(path) : real_->Remove(path); },
        [] {});
  }

  Result<bool> CreateDir(const std::string& p) override {
    const std::string path = Normal(p);
    bool created = false;
    Status st = pc_->Operate(
        path,
        [&]() -> Status {
          ASSIGN_OR_RETURN(created, real_->CreateDir(path));
          return Status::OK();
        },
        [&] {
          if (created) pc_->live_dirs_.insert(path);
        });
    if (!st.ok()) return st;
    return created;
  }

  Status SyncDir(const std::string& p) override {
    const std::string path = Normal(p);
    return pc_->Operate(
        path, [&] { return real_->SyncDir(path); }, [&] { pc_->SyncDirLocked(path); });
  }

 private:
  PowerCut* pc_;
  FileSystem* real_;
};

// LevelDB's own Env, wrapped: every call LevelDB makes to change a file
// goes to the model first.
class PowerCutEnv final : public leveldb::EnvWrapper {
 public:
  explicit PowerCutEnv(PowerCut* pc) : leveldb::EnvWrapper(leveldb::Env::Default()), pc_(pc) {}

  class File final : public leveldb::WritableFile {
   public:
    File(PowerCut* pc, leveldb::WritableFile* real, std::string path, uint64_t inode)
        : real_(real),
          manifest_(Basename(path).rfind("MANIFEST", 0) == 0),
          file_(pc, std::move(path), inode) {}
    leveldb::Status Append(const leveldb::Slice& data) override {
      return ToLevelDb(file_.Append(data.size(), [&] { return FromLevelDb(real_->Append(data)); }));
    }
    // Moves LevelDB's buffer to the OS: no change to what is durable, but a
    // dead process writes nothing.
    leveldb::Status Flush() override {
      if (file_.cut()) return leveldb::Status::IOError("power cut (injected)");
      return real_->Flush();
    }
    leveldb::Status Sync() override {
      return ToLevelDb(file_.Sync([&] { return FromLevelDb(real_->Sync()); }, manifest_));
    }
    leveldb::Status Close() override { return real_->Close(); }

   private:
    std::unique_ptr<leveldb::WritableFile> real_;
    const bool manifest_;
    PowerCutFile file_;
  };

  leveldb::Status NewWritableFile(const std::string& f, leveldb::WritableFile** result) override {
    return NewFile(f, result, /*append=*/false);
  }
  leveldb::Status NewAppendableFile(const std::string& f, leveldb::WritableFile** result) override {
    return NewFile(f, result, /*append=*/true);
  }

  leveldb::Status RemoveFile(const std::string& f) override {
    const std::string path = Normal(f);
    return ToLevelDb(pc_->Operate(
        path,
        [&] {
          return pc_->live_.count(path) ? pc_->DisplaceLocked(path)
                                        : FromLevelDb(target()->RemoveFile(path));
        },
        [] {}));
  }
  leveldb::Status DeleteFile(const std::string& f) override { return RemoveFile(f); }

  leveldb::Status CreateDir(const std::string& d) override {
    const std::string path = Normal(d);
    return ToLevelDb(pc_->Operate(
        path, [&] { return FromLevelDb(target()->CreateDir(path)); },
        [&] { pc_->live_dirs_.insert(path); }));
  }
  leveldb::Status RemoveDir(const std::string& d) override {
    const std::string path = Normal(d);
    return ToLevelDb(pc_->Operate(
        path, [&] { return FromLevelDb(target()->RemoveDir(path)); },
        [&] { pc_->live_dirs_.erase(path); }));
  }
  leveldb::Status DeleteDir(const std::string& d) override { return RemoveDir(d); }

  leveldb::Status RenameFile(const std::string& f, const std::string& t) override {
    const std::string from = Normal(f), to = Normal(t);
    return ToLevelDb(pc_->Operate(
        from,
        [&]() -> Status {
          if (pc_->live_.count(to)) RETURN_IF_ERROR(pc_->DisplaceLocked(to));
          return FromLevelDb(target()->RenameFile(from, to));
        },
        [&] { pc_->RenameLocked(from, to); }));
  }

 private:
  leveldb::Status NewFile(const std::string& f, leveldb::WritableFile** result, bool append) {
    const std::string path = Normal(f);
    leveldb::WritableFile* real = nullptr;
    uint64_t inode = 0;
    Status st = pc_->Operate(
        path,
        [&]() -> Status {
          if (!append && pc_->live_.count(path)) RETURN_IF_ERROR(pc_->DisplaceLocked(path));
          return FromLevelDb(append ? target()->NewAppendableFile(path, &real)
                                    : target()->NewWritableFile(path, &real));
        },
        [&] {
          auto it = pc_->live_.find(path);
          inode = append && it != pc_->live_.end() ? it->second : pc_->NewInodeLocked(path);
        });
    if (!st.ok()) return ToLevelDb(st);
    *result = new File(pc_, real, path, inode);
    return leveldb::Status::OK();
  }

  PowerCut* pc_;
};

PowerCut::PowerCut(const std::string& root, uint64_t seed)
    : root_(Normal(fs::absolute(root).string())),
      aside_(root_ + ".powercut"),
      rng_(seed),
      fs_(new PowerCutFileSystem(this)),
      env_(new PowerCutEnv(this)) {
  std::error_code ec;
  fs::create_directories(aside_, ec);
  std::lock_guard<std::mutex> lock(mu_);
  ScanLocked();
}

PowerCut::~PowerCut() {
  std::error_code ec;
  fs::remove_all(aside_, ec);
}

FileSystem* PowerCut::file_system() { return fs_.get(); }
leveldb::Env* PowerCut::leveldb_env() { return env_.get(); }

void PowerCut::ArmAt(uint64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  cut_at_ = n == 0 ? 0 : ops_ + n;
}

uint64_t PowerCut::operations() const {
  std::lock_guard<std::mutex> lock(mu_);
  return ops_;
}

bool PowerCut::cut() const {
  std::lock_guard<std::mutex> lock(mu_);
  return cut_;
}

bool PowerCut::InRoot(const std::string& path) const {
  return path == root_ || (path.size() > root_.size() &&
                           path.compare(0, root_.size(), root_) == 0 && path[root_.size()] == '/');
}

Status PowerCut::Operate(const std::string& path, const std::function<Status()>& real,
                         const std::function<void()>& update) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!InRoot(path)) return real();
  if (cut_) return Status::IOError("power cut (injected): " + path);
  if (++ops_ == cut_at_) {
    cut_ = true;
    return Status::IOError("power cut (injected) at operation " + std::to_string(ops_) + ": " +
                           path);
  }
  Status st = real();
  if (st.ok()) update();
  return st;
}

uint64_t PowerCut::NewInodeLocked(const std::string& path) {
  const uint64_t id = next_inode_++;
  inodes_[id] = Inode{path, 0, 0};
  live_[path] = id;
  return id;
}

Status PowerCut::DisplaceLocked(const std::string& path) {
  const uint64_t id = live_.at(path);
  const std::string aside = aside_ + "/" + std::to_string(id);
  if (::rename(path.c_str(), aside.c_str()) != 0)
    return Status::FromErrno(errno, "power cut model: move " + path + " aside");
  inodes_[id].real_path = aside;
  live_.erase(path);
  return Status::OK();
}

void PowerCut::RenameLocked(const std::string& from, const std::string& to) {
  auto it = live_.find(from);
  if (it == live_.end()) return;  // not modelled (LevelDB's LOG)
  const uint64_t id = it->second;
  live_.erase(it);
  live_[to] = id;
  inodes_[id].real_path = to;
}

void PowerCut::SyncDirLocked(const std::string& dir) {
  for (auto it = durable_.begin(); it != durable_.end();)
    it = Parent(it->first) == dir ? durable_.erase(it) : std::next(it);
  for (const auto& [path, id] : live_)
    if (Parent(path) == dir) durable_[path] = id;
  for (auto it = durable_dirs_.begin(); it != durable_dirs_.end();)
    it = *it != root_ && Parent(*it) == dir ? durable_dirs_.erase(it) : std::next(it);
  for (const std::string& d : live_dirs_)
    if (d != root_ && Parent(d) == dir) durable_dirs_.insert(d);
}

void PowerCut::ScanLocked() {
  inodes_.clear();
  live_.clear();
  durable_.clear();
  live_dirs_ = {root_};
  durable_dirs_ = {root_};
  for (const std::string& path : Walk(root_, /*dirs=*/true)) {
    live_dirs_.insert(path);
    durable_dirs_.insert(path);
  }
  for (const std::string& path : Walk(root_, /*dirs=*/false)) {
    std::error_code ec;
    const uint64_t id = NewInodeLocked(path);
    inodes_[id].size = inodes_[id].synced = fs::file_size(path, ec);
    durable_[path] = id;
  }
}

std::string PowerCut::Outcome::ToString() const {
  return std::to_string(files_dropped) + " files dropped, " + std::to_string(files_revived) +
         " revived, " + std::to_string(files_torn) + " torn (" + std::to_string(files_zeroed) +
         " with zeros), " + std::to_string(dirs_dropped) + " directories dropped";
}

PowerCut::Outcome PowerCut::Apply() {
  std::lock_guard<std::mutex> lock(mu_);
  Outcome out;
  auto dir_survives = [&](std::string d) {
    while (true) {
      if (!durable_dirs_.count(d)) return false;
      if (d == root_) return true;
      d = Parent(d);
    }
  };
  std::map<std::string, uint64_t> keep;
  for (const auto& [path, id] : durable_)
    if (dir_survives(Parent(path))) keep[path] = id;
  std::set<std::string> keep_dirs;
  for (const std::string& d : durable_dirs_)
    if (dir_survives(d)) keep_dirs.insert(d);

  // Survivors not in place (renamed or moved aside since) are staged; an
  // inode durable under two names gets a copy for the second.
  std::error_code ec;
  std::vector<std::pair<std::string, std::string>> staged;  // staged → final path
  std::set<uint64_t> used;
  for (const auto& [path, id] : keep) {
    Inode& in = inodes_[id];
    const bool first = used.insert(id).second;
    if (first && in.real_path == path) continue;
    const std::string stage = aside_ + "/staged-" + std::to_string(staged.size());
    if (first) {
      fs::rename(in.real_path, stage, ec);
      if (!ec) in.real_path = stage;
    } else {
      fs::copy_file(in.real_path, stage, ec);
    }
    if (ec) continue;  // the model lost the file: the checks after the cut will say so
    staged.emplace_back(stage, path);
    auto live = live_.find(path);
    if (live == live_.end() || live->second != id) out.files_revived++;
  }

  // What is not durable goes: files the model knows (not the others: lock
  // files, LevelDB's LOCK and LOG), and every directory not durable with
  // all below it.
  for (const std::string& f : Walk(root_, /*dirs=*/false)) {
    auto live = live_.find(f);
    if (live == live_.end()) continue;
    auto k = keep.find(f);
    if (k != keep.end() && k->second == live->second && inodes_[k->second].real_path == f) continue;
    fs::remove(f, ec);
    if (k == keep.end()) out.files_dropped++;
  }
  for (const std::string& d : Walk(root_, /*dirs=*/true)) {
    if (keep_dirs.count(d) || !fs::exists(d, ec)) continue;
    fs::remove_all(d, ec);
    out.dirs_dropped++;
  }
  for (const std::string& d : keep_dirs) fs::create_directory(d, ec);
  for (const auto& [stage, path] : staged) {
    fs::rename(stage, path, ec);
    if (!ec) inodes_[keep[path]].real_path = path;
  }

  // Unsynced tails: torn at a random point, and at random what is left of
  // them reads as zeros from a random point on.
  for (const auto& [path, id] : keep) {
    struct stat sb;
    if (::stat(path.c_str(), &sb) != 0) continue;
    const uint64_t size = static_cast<uint64_t>(sb.st_size);
    const uint64_t synced = std::min(inodes_[id].synced, size);
    if (size == synced) continue;
    const uint64_t cut = std::uniform_int_distribution<uint64_t>(synced, size)(rng_);
    if (cut < size) {
      if (::truncate(path.c_str(), static_cast<off_t>(cut)) != 0) continue;
      out.files_torn++;
    }
    if (cut > synced && (rng_() & 1)) {
      const uint64_t a = std::uniform_int_distribution<uint64_t>(synced, cut - 1)(rng_);
      const uint64_t b = cut;
      std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
      f.seekp(static_cast<std::streamoff>(a));
      const std::string zeros(b - a, '\0');
      f.write(zeros.data(), static_cast<std::streamsize>(zeros.size()));
      out.files_zeroed++;
    }
  }

  ops_ = 0;
  cut_at_ = 0;
  cut_ = false;
  ScanLocked();
  return out;
}

}  // namespace vmdedup::testing
