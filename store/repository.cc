#include "store/repository.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>

#include "base/crc32c.h"
#include "base/encoding.h"
#include "store/chunker_params.h"
#include "store/container.h"
#include "store/file_system.h"

namespace vmdedup {
namespace fs = std::filesystem;
namespace {

constexpr char kConfigFile[] = "vmdedup-repo";
constexpr char kConfigCopyFile[] = "vmdedup-repo.copy";  // the same bytes (docs/format.md)
constexpr char kConfigMagic[8] = {'V', 'M', 'D', 'D', 'R', 'E', 'P', 'O'};

std::string RandomHex16() {
  std::random_device rd;
  uint64_t v = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  char b[17];
  std::snprintf(b, sizeof(b), "%016llx", static_cast<unsigned long long>(v));
  return b;
}

std::string EncodeConfig(const RepoConfig& c) {
  nlohmann::json j = {
      {"format_version", c.format_version},
      {"repo_id", c.repo_id},
      {"segment_size", c.segment_size},
      {"chunker", ChunkerKindName(c.chunker.kind)},
      {"chunk_avg", c.chunker.avg_size},
      {"chunk_min", c.chunker.min_size},
      {"chunk_max", c.chunker.max_size},
      {"compression_level", c.compression_level},
      {"container_capacity", c.container_capacity},
  };
  if (c.format_version >= 2) j["frame_size"] = c.frame_size;
  std::string body = j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  ByteWriter w;
  w.Bytes(kConfigMagic, 8);
  w.U32(static_cast<uint32_t>(body.size()));
  w.Bytes(body.data(), body.size());
  w.U32(crc32c::Mask(crc32c::Value(w.buffer().data(), w.buffer().size())));
  return w.Take();
}

Status DecodeConfig(const std::string& data, const std::string& path, RepoConfig* c) {
  std::string what = "repository configuration " + path;
  if (data.size() < 16 || std::memcmp(data.data(), kConfigMagic, 8) != 0)
    return Status::Corruption(what + ": not a vmdedup configuration record");
  uint32_t len = DecodeU32(reinterpret_cast<const uint8_t*>(data.data() + 8));
  if (data.size() != 16ull + len) return Status::Corruption(what + ": truncated");
  uint32_t stored = DecodeU32(reinterpret_cast<const uint8_t*>(data.data() + 12 + len));
  if (crc32c::Unmask(stored) != crc32c::Value(data.data(), 12 + len))
    return Status::Corruption(what + ": checksum mismatch");
  try {
    auto j = nlohmann::json::parse(data.substr(12, len));
    c->format_version = j.at("format_version").get<uint32_t>();
    if (c->format_version < 1 || c->format_version > kRepoFormatVersion)
      return Status::NotSupported(what + ": format version " + std::to_string(c->format_version) +
                                  ", this vmdedup reads versions 1 to " +
                                  std::to_string(kRepoFormatVersion) +
                                  " (a newer vmdedup made it)");
    c->repo_id = j.at("repo_id").get<std::string>();
    c->segment_size = j.at("segment_size").get<uint32_t>();
    ASSIGN_OR_RETURN(c->chunker.kind, ParseChunkerKind(j.at("chunker").get<std::string>()));
    c->chunker.avg_size = j.at("chunk_avg").get<uint32_t>();
    c->chunker.min_size = j.at("chunk_min").get<uint32_t>();
    c->chunker.max_size = j.at("chunk_max").get<uint32_t>();
    c->compression_level = j.at("compression_level").get<int>();
    c->container_capacity = j.at("container_capacity").get<uint32_t>();
    c->frame_size = c->format_version >= 2 ? j.at("frame_size").get<uint32_t>() : 0;
  } catch (const std::exception& e) {
    return Status::Corruption(what + ": " + e.what());
  }
  return ValidateRepoConfig(*c).WithContext(what);
}

// Writes `data` to PATH.tmp, syncs it, renames it over `path` and syncs the
// directory; every step's failure is returned, and the temporary is removed
// on failure.
Status WriteFileDurably(FileSystem& fs, const std::string& path, const std::string& data) {
  const std::string tmp = path + ".tmp";
  ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> file,
                   fs.NewWritableFile(tmp, FileSystem::CreateMode::kTruncate));
  Status st = file->Append({reinterpret_cast<const uint8_t*>(data.data()), data.size()});
  if (st.ok()) st = file->Sync();
  if (st.ok()) st = file->Close();
  file.reset();
  if (st.ok()) st = fs.Rename(tmp, path, FileSystem::RenameMode::kReplace);
  if (!st.ok()) {
    (void)fs.Remove(tmp);  // best effort
    return st;
  }
  return fs.SyncDir(fs::path(path).parent_path().string());
}

// Every record under `prefix`, decoded; the first that does not decode
// is the error.
template <typename T>
Result<std::vector<T>> ScanRecords(MetadataStore& meta, std::string_view prefix,
                                   Status (*decode)(std::string_view, std::string_view, T*)) {
  std::vector<T> out;
  Status inner;
  RETURN_IF_ERROR(meta.Scan(prefix, [&](std::string_view key, std::string_view value) {
    T r;
    inner = decode(key, value, &r);
    if (!inner.ok()) return false;
    out.push_back(std::move(r));
    return true;
  }));
  RETURN_IF_ERROR(inner);
  return out;
}

// The bytes of the file `name` below `root` (never through a link).
Result<std::string> ReadRepositoryFile(const std::string& root, const std::string& name) {
  ASSIGN_OR_RETURN(int fd, OpenBeneath(root, name, O_RDONLY));
  std::string data;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof(buf))) > 0) data.append(buf, static_cast<size_t>(n));
  const int err = errno;
  ::close(fd);
  if (n < 0) return Status::FromErrno(err, "read " + root + "/" + name);
  return data;
}

// The configuration record in file `name`, and its bytes.
Result<RepoConfig> ReadConfigFile(const std::string& root, const std::string& name,
                                  std::string* bytes) {
  ASSIGN_OR_RETURN(*bytes, ReadRepositoryFile(root, name));
  RepoConfig config;
  RETURN_IF_ERROR(DecodeConfig(*bytes, root + "/" + name, &config));
  return config;
}

// A lock file names its holder while it is held: the holder writes its pid
// after taking the lock, and empties the file before releasing it. The pid
// is informational only, so failures to write it are ignored.
void WriteLockHolder(int fd) {
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) < 0) {
    // Informational only.
  }
}

void ReleaseLockFile(int fd) {
  if (::ftruncate(fd, 0) != 0) {
    // Informational only.
  }
  ::close(fd);
}

// `rel` names the lock file below the repository `root`.
std::string ReadLockHolder(const std::string& root, const std::string& rel) {
  auto fd = OpenBeneath(root, rel, O_RDONLY);
  if (!fd.ok()) return "another process";
  char buf[32] = {};
  ssize_t n = ::pread(*fd, buf, sizeof(buf) - 1, 0);
  ::close(*fd);
  std::string pid(buf, n > 0 ? static_cast<size_t>(n) : 0);
  pid = pid.substr(0, pid.find('\n'));
  if (pid.empty() || pid.find_first_not_of("0123456789") != std::string::npos)
    return "another process";
  return "process " + pid;
}

// Opens (creating, mode 0600) and locks the lock file `rel` below `root`,
// never through a link. Busy when another process holds it.
Result<int> TakeLockFile(const std::string& root, const std::string& rel) {
  ASSIGN_OR_RETURN(int fd, OpenBeneath(root, rel, O_RDWR | O_CREAT, 0600));
  struct stat sb;
  if (::fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
    ::close(fd);
    return Status::Corruption(root + "/" + rel + " is not a regular file");
  }
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int err = errno;
    ::close(fd);
    if (err == EWOULDBLOCK) return Status::Busy(ReadLockHolder(root, rel));
    return Status::FromErrno(err, "lock " + root + "/" + rel);
  }
  WriteLockHolder(fd);
  return fd;
}

// A VM's directory and its metadata directory must be real directories,
// and everything in the latter a regular file: LevelDB opens and creates
// files there by name, and would follow a link planted by whoever can
// write the repository (root truncating any file). Corruption names the
// entry; NotFound when `vms/VM/meta` does not exist.
Status RefuseLinksInVm(const std::string& root, const std::string& vm) {
  for (const std::string& rel : {"vms/" + vm, "vms/" + vm + "/data"}) {
    struct stat sb;
    const std::string path = root + "/" + rel;
    if (::lstat(path.c_str(), &sb) != 0) continue;  // missing: nothing to follow
    if (!S_ISDIR(sb.st_mode))
      return LinkInRepository(path,
                              S_ISLNK(sb.st_mode) ? "is a symbolic link" : "is not a directory");
  }
  ASSIGN_OR_RETURN(int dir_fd, OpenBeneath(root, "vms/" + vm + "/meta", O_RDONLY | O_DIRECTORY));
  DIR* d = ::fdopendir(dir_fd);
  if (d == nullptr) {
    ::close(dir_fd);
    return Status::FromErrno(errno, "list " + root + "/vms/" + vm + "/meta");
  }
  Status st;
  while (struct dirent* e = ::readdir(d)) {
    const std::string_view name = e->d_name;
    if (name == "." || name == "..") continue;
    struct stat sb;
    if (::fstatat(dir_fd, e->d_name, &sb, AT_SYMLINK_NOFOLLOW) != 0) continue;  // gone
    if (!S_ISREG(sb.st_mode)) {
      st = LinkInRepository(root + "/vms/" + vm + "/meta/" + std::string(name),
                            S_ISLNK(sb.st_mode) ? "is a symbolic link" : "is not a regular file");
      break;
    }
  }
  ::closedir(d);
  return st;
}

// Who holds a VM's metadata open when opening it failed Busy. A writer (a
// backup) also holds the lock file and wrote its pid there (and empties it
// when it lets go); a check holds only the metadata, so the lock file names
// no one then. (Readers hold nothing: they read through read views.)
// `we_hold_lock`: the caller is a writer that has just taken the lock file
// itself.
std::string MetadataHolder(const std::string& root, const std::string& lock_rel,
                           bool we_hold_lock) {
  if (!we_hold_lock) {
    auto fd = OpenBeneath(root, lock_rel, O_RDONLY);
    if (fd.ok()) {
      const bool writer = ::flock(*fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
      ::close(*fd);
      if (writer) return ReadLockHolder(root, lock_rel) + " (a backup of it is running)";
    }
  }
  return "another vmdedup process that inspects it (a check)";
}

}  // namespace

Status ValidateRepoConfig(const RepoConfig& c) {
  if (c.segment_size < (64u << 10) || c.segment_size > (64u << 20) ||
      (c.segment_size & (c.segment_size - 1)) != 0)
    return Status::InvalidArgument(
        "segment size must be a power of two from 64 KiB to 64 MiB, got " +
        std::to_string(c.segment_size));
  if (c.compression_level < -7 || c.compression_level > 19 || c.compression_level == 0)
    return Status::InvalidArgument(
        "compression level must be 1 to 19 (or -7 to -1 for zstd's fast levels), got " +
        std::to_string(c.compression_level));
  if (c.container_capacity < (1u << 20) || c.container_capacity > (64u << 20))
    return Status::InvalidArgument("container capacity must be 1 to 64 MiB");
  if (c.frame_size != 0 && (c.frame_size < (4u << 10) || c.frame_size > kMaxBlockSize))
    return Status::InvalidArgument(
        "frame size must be 0 (one block a frame) or 4 KiB to 1 MiB, got " +
        std::to_string(c.frame_size));
  if (c.format_version < 2 && c.frame_size != 0)
    return Status::InvalidArgument("a format version 1 repository has no multi-block frames");
  if (c.chunker.max_size > c.segment_size)
    return Status::InvalidArgument("the largest block must not exceed the segment size");
  return ValidateChunkerParams(c.chunker);
}

Repository::Repository(std::string path, RepoConfig config, RepositoryOptions options)
    : path_(std::move(path)),
      config_(std::move(config)),
      options_(std::move(options)),
      fs_(options_.file_system != nullptr ? options_.file_system : RealFileSystem()) {}
Repository::~Repository() = default;

Result<std::unique_ptr<Repository>> Repository::Create(const std::string& path, RepoConfig config,
                                                       RepositoryOptions options) {
  config.format_version = kRepoFormatVersion;
  RETURN_IF_ERROR(ValidateRepoConfig(config));
  std::error_code ec;
  if (fs::exists(path, ec)) {
    if (!fs::is_directory(path, ec))
      return Status::InvalidArgument(path + " exists and is not a directory");
    if (!fs::is_empty(path, ec))
      return Status::InvalidArgument(path +
                                     " is not empty; vmdedup init needs a new or empty directory");
  }
  FileSystem& fsys = options.file_system != nullptr ? *options.file_system : *RealFileSystem();
  // The repository's directory and its missing parents, each durable in
  // its parent; then vms/ and the configuration, durable in it.
  const std::string abs = fs::absolute(path, ec).lexically_normal().string();
  if (ec) return Status::FromErrno(ec.value(), "resolve " + path);
  for (size_t slash = abs.find('/', 1);; slash = abs.find('/', slash + 1)) {
    const std::string dir = abs.substr(0, slash);
    if (dir.empty()) break;
    // Directories that exist are the user's (and may be links, as the
    // repository's own path may): only what is missing is created.
    if (fs::is_directory(dir, ec)) continue;
    ASSIGN_OR_RETURN(bool created, fsys.CreateDir(dir));
    if (created) RETURN_IF_ERROR(fsys.SyncDir(fs::path(dir).parent_path().string()));
    if (slash == std::string::npos) break;
  }
  ASSIGN_OR_RETURN(bool created, fsys.CreateDir(path + "/vms"));
  (void)created;
  config.repo_id = RandomHex16();
  config.format_version = kRepoFormatVersion;
  const std::string record = EncodeConfig(config);
  RETURN_IF_ERROR(WriteFileDurably(fsys, path + "/" + kConfigFile, record));
  RETURN_IF_ERROR(WriteFileDurably(fsys, path + "/" + kConfigCopyFile, record));
  return Open(path, std::move(options));
}

Result<std::unique_ptr<Repository>> Repository::Open(const std::string& path,
                                                     RepositoryOptions options) {
  // The record, or else its copy (one line says so); a repository made
  // before the copy existed has only the record.
  std::string bytes;
  auto primary = ReadConfigFile(path, kConfigFile, &bytes);
  RepoConfig config;
  std::string note;
  if (primary.ok()) {
    config = std::move(primary).value();
  } else {
    auto copy = ReadConfigFile(path, kConfigCopyFile, &bytes);
    if (primary.status().IsNotFound() && copy.status().IsNotFound()) {
      std::error_code ec;
      if (!fs::exists(path, ec))
        return Status::NotFound("repository " + path +
                                " does not exist; create it with 'vmdedup init " + path + "'");
      return Status::NotFound(path + " is not a vmdedup repository (no " + kConfigFile +
                              "); create one with 'vmdedup init'");
    }
    if (!copy.ok())
      return primary.status().WithContext("the repository's configuration, and its copy " +
                                          std::string(kConfigCopyFile) + " (" +
                                          copy.status().ToString() + "), cannot be read");
    config = std::move(copy).value();
    note = "warning: " + primary.status().ToString() + "; read its copy " + path + "/" +
           kConfigCopyFile + " instead (run 'vmdedup check' to rewrite it)";
  }
  std::unique_ptr<Repository> repo(new Repository(path, config, std::move(options)));
  repo->config_note_ = std::move(note);
  if (repo->options_.objects == nullptr) {
    repo->owned_objects_ = NewLocalObjectStore(path, repo->fs_);
    repo->objects_ = repo->owned_objects_.get();
  } else {
    repo->objects_ = repo->options_.objects;
  }
  return repo;
}

Result<std::vector<std::string>> Repository::ListVms() {
  ASSIGN_OR_RETURN(std::vector<std::string> dirs, ListVmDirectories());
  std::vector<std::string> vms;
  std::error_code ec;
  for (const std::string& vm : dirs)
    if (!fs::is_symlink(path_ + "/vms/" + vm, ec) &&
        fs::exists(path_ + "/vms/" + vm + "/meta/CURRENT", ec))
      vms.push_back(vm);
  return vms;
}

Result<std::vector<std::string>> Repository::ListVmDirectories() {
  std::vector<std::string> vms;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(path_ + "/vms", ec)) {
    // Links are listed too, for check to report: OpenVm refuses them.
    const std::string name = entry.path().filename().string();
    std::error_code sec;
    const auto st = entry.symlink_status(sec);
    if ((fs::is_directory(st) || fs::is_symlink(st)) && ValidateName("VM", name).ok())
      vms.push_back(name);
  }
  if (ec) return Status::FromErrno(ec.value(), "list " + path_ + "/vms");
  std::sort(vms.begin(), vms.end());
  return vms;
}

Result<std::unique_ptr<VmStore>> Repository::OpenVm(const std::string& vm, Access access) {
  RETURN_IF_ERROR(ValidateName("VM", vm));
  std::string dir = path_ + "/vms/" + vm;
  std::error_code ec;
  int lock_fd = -1;
  std::unique_ptr<ReaderLease> lease;
  if (access != Access::kWrite) {
    Status links = RefuseLinksInVm(path_, vm);
    if (links.IsNotFound())
      return Status::NotFound("VM '" + vm + "' has no backups in repository " + path_);
    RETURN_IF_ERROR(links);
    // Before the view is opened: gc deletes nothing a lease holder's view
    // may read.
    if (access == Access::kRead) {
      ASSIGN_OR_RETURN(lease, ReaderLease::Take(path_, vm));
    }
  } else {
    // The VM's directory and its metadata's: LevelDB syncs what it writes
    // inside the latter, but not its entry, so both are made durable here.
    RETURN_IF_ERROR(MakeDurableDirs(*fs_, path_, "vms/" + vm + "/meta")
                        .WithContext("create the directories of VM '" + vm + "'"));
    auto lock = TakeLockFile(path_, "vms/" + vm + "/lock");
    if (!lock.ok()) {
      if (lock.status().IsBusy())
        return Status::Busy("VM '" + vm + "' is locked by " + lock.status().message() +
                            " (a backup of it is running); wait for it to finish");
      return lock.status();
    }
    lock_fd = *lock;
    if (Status links = RefuseLinksInVm(path_, vm); !links.ok()) {
      ReleaseLockFile(lock_fd);
      return links;
    }
    // A new metadata store is made only for a VM that has nothing stored: a
    // VM whose containers outlived its metadata (meta/CURRENT or all of
    // meta/ lost) is damaged, and a fresh store would bury its history.
    if (!fs::exists(dir + "/meta/CURRENT", ec)) {
      std::vector<std::string> objects;
      std::vector<ObjectStore::Temporary> temps;
      Status listed = objects_->List("vms/" + vm + "/data/", &objects);
      if (listed.ok()) listed = objects_->ListTemporary("vms/" + vm + "/data/", &temps);
      if (!listed.ok() || !objects.empty() || !temps.empty()) {
        ReleaseLockFile(lock_fd);
        if (!listed.ok()) return listed.WithContext("list the containers of VM '" + vm + "'");
        return Status::Corruption(
            "VM '" + vm + "' has " + std::to_string(objects.size() + temps.size()) +
            " container file(s) but no metadata store (" + dir +
            "/meta/CURRENT is missing): its snapshots cannot be read, and nothing is written "
            "to it; 'vmdedup repair -r " +
            path_ + " --vm " + vm +
            "' rebuilds a store that lost only CURRENT or MANIFEST (docs/operations.md, "
            "\"Damage\")");
      }
    }
  }
  auto meta =
      access == Access::kRead
          ? OpenLevelDbReadView(dir + "/meta", options_.leveldb_env)
          : OpenLevelDbMetadataStore(dir + "/meta", access == Access::kWrite, options_.leveldb_env);
  if (!meta.ok()) {
    if (lock_fd >= 0) ReleaseLockFile(lock_fd);
    if (meta.status().IsBusy())
      return Status::Busy("VM '" + vm + "' is in use by " +
                          MetadataHolder(path_, "vms/" + vm + "/lock", lock_fd >= 0) +
                          "; retry when it has finished");
    return meta.status().WithContext("open metadata of VM '" + vm + "'");
  }
  std::unique_ptr<MetadataStore> store = std::move(meta).value();
  if (options_.wrap_metadata) store = options_.wrap_metadata(std::move(store));
  std::unique_ptr<VmStore> vs(new VmStore(vm, std::move(store), lock_fd, objects_));
  vs->lease_ = std::move(lease);
  if (access == Access::kWrite) {
    std::string value;
    Status st = vs->meta()->Get(VmInfoKey(), &value);
    if (st.IsNotFound()) {
      WriteBatch b;
      int64_t now = std::chrono::duration_cast<std::chrono::seconds>(
                        std::chrono::system_clock::now().time_since_epoch())
                        .count();
      b.Put(VmInfoKey(), EncodeVmInfo(VmInfoKey(), vm, now));
      RETURN_IF_ERROR(vs->meta()->Write(b, true));
    } else if (!st.ok()) {
      return st;
    }
    // Metadata that lost committed snapshots is damaged: written to, it
    // would hand their sequence numbers out again (store/snapshot_ledger.h).
    const std::string repair = "'vmdedup repair -r " + path_ + " --vm " + vm + "'";
    auto lost = vs->SnapshotsLostFromStore();
    if (!lost.ok())
      return lost.status().WithContext("VM '" + vm + "': nothing is written to it; " + repair +
                                       " writes the ledger again from its metadata");
    if (!lost->empty()) {
      std::string ids;
      for (size_t i = 0; i < lost->size() && i < 5; i++) ids += (i ? ", " : "") + (*lost)[i];
      if (lost->size() > 5) ids += ", ...";
      return Status::Corruption(
          "VM '" + vm + "' lost " + std::to_string(lost->size()) + " committed snapshot(s) (" +
          ids +
          "): its snapshot ledger lists them, its metadata store has no record of them (a lost "
          "log file, or metadata put back from an older copy); nothing is written to it. " +
          repair + " salvages what is left and records the loss (docs/operations.md, \"Damage\")");
    }
  }
  return vs;
}

Result<MetadataRepairReport> Repository::RepairVmMetadata(const std::string& vm) {
  RETURN_IF_ERROR(ValidateName("VM", vm));
  auto lock = TakeLockFile(path_, "vms/" + vm + "/lock");
  if (!lock.ok()) {
    if (lock.status().IsBusy())
      return Status::Busy("VM '" + vm + "' is locked by " + lock.status().message() +
                          " (a backup of it is running); wait for it to finish");
    if (lock.status().IsNotFound())
      return Status::NotFound("VM '" + vm + "' has no backups in repository " + path_);
    return lock.status();
  }
  struct Release {
    int fd;
    ~Release() { ReleaseLockFile(fd); }
  } release{*lock};
  RETURN_IF_ERROR(RefuseLinksInVm(path_, vm));
  ASSIGN_OR_RETURN(MetadataRepairReport report,
                   RepairMetadataStore(path_ + "/vms/" + vm, options_.leveldb_env));
  ASSIGN_OR_RETURN(auto meta, OpenLevelDbMetadataStore(path_ + "/vms/" + vm + "/meta", false,
                                                       options_.leveldb_env));
  RETURN_IF_ERROR(RecatalogContainers(*meta, *objects_, vm, &report));
  RETURN_IF_ERROR(ReconcileLedger(*meta, *objects_, vm, &report));
  return report;
}

Status Repository::RepairConfigCopies(std::vector<std::string>* repaired) {
  std::string primary_bytes, copy_bytes;
  auto primary = ReadConfigFile(path_, kConfigFile, &primary_bytes);
  auto copy = ReadConfigFile(path_, kConfigCopyFile, &copy_bytes);
  if (primary.ok() && copy.ok() && primary_bytes == copy_bytes) return Status::OK();
  if (!primary.ok() && !copy.ok())
    return primary.status().WithContext("neither the configuration nor its copy can be read");
  // The one that reads well is written over the other (both carry a
  // checksum; when both read well but differ, the record wins).
  const bool from_primary = primary.ok();
  const std::string& good = from_primary ? primary_bytes : copy_bytes;
  const char* target = from_primary ? kConfigCopyFile : kConfigFile;
  const Status& why = from_primary ? copy.status() : primary.status();
  RETURN_IF_ERROR(WriteFileDurably(*fs_, path_ + "/" + target, good)
                      .WithContext("rewrite " + path_ + "/" + target));
  repaired->push_back(std::string(target) + " rewritten from " +
                      (from_primary ? kConfigFile : kConfigCopyFile) +
                      (why.ok()           ? std::string(" (they differed)")
                       : why.IsNotFound() ? std::string(" (there was none)")
                                          : " (" + why.ToString() + ")"));
  return Status::OK();
}

RepoLock::~RepoLock() {
  if (fd_ >= 0) ReleaseLockFile(fd_);
}

Result<std::unique_ptr<RepoLock>> Repository::LockCds() {
  RETURN_IF_ERROR(MakeDurableDirs(*fs_, path_, "cds"));
  auto fd = TakeLockFile(path_, "cds/lock");
  if (!fd.ok()) {
    if (fd.status().IsBusy())
      return Status::Busy("another cds build is running on " + path_ + " (" +
                          fd.status().message() + "); wait for it to finish");
    return fd.status();
  }
  return std::unique_ptr<RepoLock>(new RepoLock(*fd));
}

VmStore::VmStore(std::string vm, std::unique_ptr<MetadataStore> meta, int lock_fd,
                 ObjectStore* objects)
    : vm_(std::move(vm)), meta_(std::move(meta)), lock_fd_(lock_fd), objects_(objects) {}

VmStore::~VmStore() {
  meta_.reset();  // close the database before releasing the lock (or the lease)
  lease_.reset();
  if (lock_fd_ >= 0) ReleaseLockFile(lock_fd_);
}

Result<std::vector<SnapshotRecord>> VmStore::ListSnapshots(const std::string& disk) {
  std::string prefix = disk.empty() ? std::string(kSnapshotKeyPrefix) : SnapshotPrefix(disk);
  return ScanRecords<SnapshotRecord>(*meta_, prefix, DecodeSnapshot);
}

Result<std::vector<std::string>> VmStore::ListDisks() {
  ASSIGN_OR_RETURN(auto snaps, ListSnapshots());
  std::vector<std::string> disks;
  for (const auto& s : snaps)
    if (disks.empty() || disks.back() != s.disk) disks.push_back(s.disk);
  return disks;
}

Result<SnapshotRecord> VmStore::GetSnapshot(const std::string& disk, uint64_t seq) {
  std::string key = SnapshotKey(disk, seq);
  std::string value;
  Status st = meta_->Get(key, &value);
  if (st.IsNotFound())
    return Status::NotFound("snapshot " + vm_ + "/" + disk + "/" + std::to_string(seq) +
                            " does not exist; 'vmdedup snapshots --vm " + vm_ + "' lists them");
  RETURN_IF_ERROR(st);
  SnapshotRecord r;
  RETURN_IF_ERROR(DecodeSnapshot(key, value, &r));
  return r;
}

Result<SnapshotRecord> VmStore::LatestSnapshot(const std::string& disk) {
  ASSIGN_OR_RETURN(auto snaps, ListSnapshots(disk));
  if (snaps.empty())
    return Status::NotFound("disk series " + vm_ + "/" + disk + " has no snapshot");
  return snaps.back();
}

Result<std::vector<uint64_t>> VmStore::GetSnapshotSegments(const std::string& disk, uint64_t seq) {
  std::string key = SnapshotSegmentsKey(disk, seq);
  std::string value;
  Status st = meta_->Get(key, &value);
  if (st.IsNotFound())
    return Status::Corruption("segment list of snapshot " + vm_ + "/" + disk + "/" +
                              std::to_string(seq) + " is missing");
  RETURN_IF_ERROR(st);
  std::vector<uint64_t> ids;
  RETURN_IF_ERROR(DecodeSegmentList(key, value, &ids));
  return ids;
}

Result<SegmentRecipe> VmStore::GetSegmentRecipe(uint64_t id) {
  std::string key = SegmentRecipeKey(id);
  std::string value;
  Status st = meta_->Get(key, &value);
  if (st.IsNotFound())
    return Status::Corruption("segment recipe " + key + " of VM '" + vm_ + "' is missing");
  RETURN_IF_ERROR(st);
  SegmentRecipe r;
  RETURN_IF_ERROR(DecodeSegmentRecipe(key, value, &r));
  if (r.id != id)
    return Status::Corruption("segment recipe " + key + " holds id " + std::to_string(r.id));
  return r;
}

Result<ContainerRecord> VmStore::GetContainer(uint64_t id) {
  std::string key = ContainerKey(id);
  std::string value;
  Status st = meta_->Get(key, &value);
  if (st.IsNotFound())
    return Status::NotFound("container " + key + " of VM '" + vm_ + "' is not in the catalog");
  RETURN_IF_ERROR(st);
  ContainerRecord r;
  RETURN_IF_ERROR(DecodeContainerRecord(key, value, &r));
  return r;
}

Result<std::vector<ContainerRecord>> VmStore::ListContainers() {
  return ScanRecords<ContainerRecord>(*meta_, kContainerKeyPrefix, DecodeContainerRecord);
}

Result<std::set<uint64_t>> VmStore::QuarantinedContainers() {
  ASSIGN_OR_RETURN(std::vector<QuarantineRecord> records,
                   ScanRecords<QuarantineRecord>(*meta_, kQuarantineKeyPrefix, DecodeQuarantine));
  std::set<uint64_t> out;
  for (const QuarantineRecord& r : records) out.insert(r.container);
  return out;
}

namespace {

int64_t NowSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Writes `value` under `key` (synced) unless the key is there; false then.
Result<bool> PutIfAbsent(MetadataStore& meta, const std::string& key, const std::string& value) {
  std::string existing;
  Status st = meta.Get(key, &existing);
  if (st.ok()) return false;
  if (!st.IsNotFound()) return st;
  WriteBatch b;
  b.Put(key, value);
  RETURN_IF_ERROR(meta.Write(b, true));
  return true;
}

}  // namespace

Result<bool> VmStore::QuarantineContainer(uint64_t id, const std::string& reason) {
  const std::string key = QuarantineKey(id);
  return PutIfAbsent(*meta_, key, EncodeQuarantine(key, {id, NowSeconds(), reason}));
}

Result<std::set<uint64_t>> VmStore::LostRecipes() {
  ASSIGN_OR_RETURN(std::vector<LostRecipeRecord> records,
                   ScanRecords<LostRecipeRecord>(*meta_, kLostRecipeKeyPrefix, DecodeLostRecipe));
  std::set<uint64_t> out;
  for (const LostRecipeRecord& r : records) out.insert(r.recipe);
  return out;
}

Result<bool> VmStore::RecordLostRecipe(uint64_t id, const std::string& reason) {
  const std::string key = LostRecipeKey(id);
  return PutIfAbsent(*meta_, key, EncodeLostRecipe(key, {id, NowSeconds(), reason}));
}

Result<std::set<uint64_t>> VmStore::UnusableContainers() {
  ASSIGN_OR_RETURN(std::set<uint64_t> out, QuarantinedContainers());
  ASSIGN_OR_RETURN(std::vector<ContainerRecord> catalog, ListContainers());
  for (const ContainerRecord& c : catalog) {
    Result<uint64_t> size = objects_->Size(c.object);
    if (size.ok() && *size == c.size) continue;
    if (!size.ok() && !size.status().IsNotFound() && !size.status().IsCorruption())
      return size.status();
    out.insert(c.id);
  }
  return out;
}

Result<uint64_t> VmStore::GetCounter(const std::string& name) {
  std::string key = CounterKey(name);
  std::string value;
  Status st = meta_->Get(key, &value);
  if (st.IsNotFound()) return uint64_t{1};
  RETURN_IF_ERROR(st);
  uint64_t v = 0;
  RETURN_IF_ERROR(DecodeCounter(key, value, &v));
  return v;
}

Result<uint64_t> VmStore::AllocateContainerIds(uint64_t n) {
  if (n == 0) return Status::InvalidArgument("reserve 0 container ids");
  ASSIGN_OR_RETURN(uint64_t id, GetCounter("container"));
  if (!ids_checked_on_disk_) {
    const std::string prefix = "vms/" + vm_ + "/data/";
    std::vector<std::string> names;
    RETURN_IF_ERROR(objects_->List(prefix, &names));
    std::vector<ObjectStore::Temporary> temps;
    RETURN_IF_ERROR(objects_->ListTemporary(prefix, &temps));
    for (const auto& t : temps) names.push_back(t.name);
    uint64_t on_disk = 0;
    for (const std::string& name : names) {
      uint64_t taken = 0;
      if (ParseContainerObjectName(vm_, name, &taken) && taken >= id && taken != UINT64_MAX)
        on_disk = std::max(on_disk, taken + 1);
    }
    if (on_disk > id) id = on_disk;
    ids_checked_on_disk_ = true;
  }
  WriteBatch b;
  b.Put(CounterKey("container"), EncodeCounter(CounterKey("container"), id + n));
  RETURN_IF_ERROR(meta_->Write(b, true));
  return id;
}

Result<SnapshotRef> ParseSnapshotRef(const std::string& text) {
  SnapshotRef ref;
  size_t a = text.find('/');
  size_t b = a == std::string::npos ? a : text.find('/', a + 1);
  if (a == std::string::npos || b == std::string::npos ||
      text.find('/', b + 1) != std::string::npos)
    return Status::InvalidArgument("snapshot '" + text +
                                   "' must be written VM/DISK/N or VM/DISK/latest");
  ref.vm = text.substr(0, a);
  ref.disk = text.substr(a + 1, b - a - 1);
  std::string seq = text.substr(b + 1);
  RETURN_IF_ERROR(ValidateName("VM", ref.vm));
  RETURN_IF_ERROR(ValidateName("disk", ref.disk));
  if (seq != "latest") {
    if (seq.empty() || seq.find_first_not_of("0123456789") != std::string::npos || seq.size() > 18)
      return Status::InvalidArgument("snapshot number '" + seq + "' in '" + text +
                                     "' must be a positive number or 'latest'");
    ref.seq = std::stoull(seq);
    if (*ref.seq == 0) return Status::InvalidArgument("snapshot numbers start at 1");
  }
  return ref;
}

}  // namespace vmdedup
