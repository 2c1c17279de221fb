// SyncDirectory; see sync_directory.h.
#include "store/sync_directory.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace vmdedup {
namespace {

Status DirError(int err, const std::string& what) {
  if (err == ENOENT) return Status::IOError(what + ": " + std::strerror(err));
  return Status::FromErrno(err, what);
}

}  // namespace

Status SyncDirectory(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return DirError(errno, "open directory " + dir);
  Status st;
  if (::fsync(fd) != 0 && errno != EINVAL) st = DirError(errno, "fsync " + dir);
  ::close(fd);
  return st;
}

}  // namespace vmdedup
