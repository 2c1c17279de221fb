#include "store/reader_lease.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <random>

#include "store/file_system.h"

namespace vmdedup {
namespace {

bool CannotWrite(const Status& st) {
  return st.message().find("Read-only file system") != std::string::npos ||
         st.message().find("Permission denied") != std::string::npos ||
         st.message().find("Operation not permitted") != std::string::npos;
}

}  // namespace

Result<std::unique_ptr<ReaderLease>> ReaderLease::Take(const std::string& root,
                                                       const std::string& vm) {
  const std::string dir_rel = "vms/" + vm + "/readers";
  {
    auto vm_dir = OpenBeneath(root, "vms/" + vm, O_RDONLY | O_DIRECTORY);
    if (!vm_dir.ok()) return vm_dir.status();
    int rc = ::mkdirat(*vm_dir, "readers", 0700);
    int err = errno;
    ::close(*vm_dir);
    if (rc != 0 && err != EEXIST) {
      Status st = Status::FromErrno(err, "create " + root + "/" + dir_rel);
      if (CannotWrite(st)) return std::unique_ptr<ReaderLease>();
      return st;
    }
  }
  std::random_device rd;
  char nonce[17];
  std::snprintf(nonce, sizeof(nonce), "%08x%08x", rd(), rd());
  const std::string rel = dir_rel + "/" + std::to_string(::getpid()) + "." + nonce;
  auto fd = OpenBeneath(root, rel, O_RDWR | O_CREAT | O_EXCL, 0600);
  if (!fd.ok()) {
    if (CannotWrite(fd.status())) return std::unique_ptr<ReaderLease>();
    return fd.status();
  }
  if (::flock(*fd, LOCK_SH) != 0) {
    int err = errno;
    ::close(*fd);
    return Status::FromErrno(err, "lock " + root + "/" + rel);
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::write(*fd, pid.data(), pid.size()) < 0) {
    // Informational only.
  }
  return std::unique_ptr<ReaderLease>(new ReaderLease(root, rel, *fd));
}

ReaderLease::~ReaderLease() {
  // The name first: a gc that lists the directory after this sees nothing.
  auto dir = OpenBeneath(root_, rel_.substr(0, rel_.rfind('/')), O_RDONLY | O_DIRECTORY);
  if (dir.ok()) {
    (void)::unlinkat(*dir, rel_.substr(rel_.rfind('/') + 1).c_str(), 0);
    ::close(*dir);
  }
  ::close(fd_);
}

Result<std::vector<std::string>> LiveReaders(const std::string& root, const std::string& vm) {
  std::vector<std::string> live;
  const std::string dir_rel = "vms/" + vm + "/readers";
  auto dir_fd = OpenBeneath(root, dir_rel, O_RDONLY | O_DIRECTORY);
  if (!dir_fd.ok()) {
    if (dir_fd.status().IsNotFound()) return live;
    return dir_fd.status();
  }
  DIR* d = ::fdopendir(*dir_fd);
  if (d == nullptr) {
    ::close(*dir_fd);
    return Status::FromErrno(errno, "list " + root + "/" + dir_rel);
  }
  std::vector<std::string> names;
  while (struct dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  for (const std::string& name : names) {
    int fd = ::openat(::dirfd(d), name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) continue;  // gone meanwhile
    struct stat sb;
    if (::fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
      ::close(fd);
      ::closedir(d);
      return LinkInRepository(root + "/" + dir_rel + "/" + name, "is not a regular file");
    }
    if (::flock(fd, LOCK_EX | LOCK_NB) == 0) {
      // Nobody holds it: a reader that died.
      (void)::unlinkat(::dirfd(d), name.c_str(), 0);
      ::close(fd);
      continue;
    }
    ::close(fd);
    live.push_back("process " + name.substr(0, name.find('.')));
  }
  ::closedir(d);
  return live;
}

}  // namespace vmdedup
