// The direct BlockSource of raw images: pread and lseek on one descriptor,
// with QEMU's OFD image locks. See raw_file_source.h.
#include "nbd-client/raw_file_source.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace vmdedup {
namespace {

constexpr uint32_t kMaxRequest = 32u << 20;  // the NBD source's (QEMU's) limit
constexpr uint64_t kSectorSize = 512;        // QEMU rounds a raw file's size up to it

// QEMU's image locking protocol (block/file-posix.c): a shared OFD lock on
// byte kPermBase + i means "I hold permission i", on kSharedBase + i "I do
// not share permission i"; i is the bit index of QEMU's BLK_PERM_*.
constexpr off_t kPermBase = 100;
constexpr off_t kSharedBase = 200;
constexpr int kPermConsistentRead = 0;  // BLK_PERM_CONSISTENT_READ 0x1
constexpr int kPermWrite = 1;           // BLK_PERM_WRITE 0x2
constexpr int kPermResize = 3;          // BLK_PERM_RESIZE 0x8

std::string Errno(int err) { return std::strerror(err); }

class RawFileSource final : public BlockSource {
 public:
  RawFileSource(int fd, std::string path, uint64_t file_size, bool regular)
      : fd_(fd),
        path_(std::move(path)),
        describe_("file:" + path_ + " (raw)"),
        file_size_(file_size),
        size_((file_size + kSectorSize - 1) / kSectorSize * kSectorSize),
        regular_(regular) {}
  ~RawFileSource() override { ::close(fd_); }  // releases the OFD locks
  RawFileSource(const RawFileSource&) = delete;
  RawFileSource& operator=(const RawFileSource&) = delete;

  uint64_t size() const override { return size_; }
  uint64_t content_bytes() const override { return regular_ ? file_size_ : size_; }
  bool has_dirty_map() const override { return false; }
  std::string Describe() const override { return describe_; }

  Status Allocation(uint64_t offset, uint64_t length, std::vector<Extent>* out) override {
    out->clear();
    RETURN_IF_ERROR(CheckRange(offset, length, "allocation map"));
    constexpr uint32_t kHole = Extent::kHole | Extent::kZero;
    const uint64_t end = offset + length;
    uint64_t pos = offset;
    while (pos < end) {
      if (pos >= file_size_) {
        // QEMU's padding up to the next sector: zeros.
        AppendExtent(out, pos, end - pos, kHole);
        break;
      }
      const uint64_t limit = std::min(end, file_size_);
      if (!seek_data_) {
        AppendExtent(out, pos, limit - pos, 0);
        pos = limit;
        continue;
      }
      off_t data = ::lseek(fd_, static_cast<off_t>(pos), SEEK_DATA);
      if (data < 0) {
        const int err = errno;
        if (err == ENXIO) {
          // No data at or after pos: the rest of the file is a hole, unless
          // the file shrank (then zeros would be recorded for lost data).
          Status shrunk = CheckNotShrunk(pos);
          if (!shrunk.ok()) {
            out->clear();
            return shrunk;
          }
          AppendExtent(out, pos, end - pos, kHole);
          break;
        }
        if (err == EINVAL || err == EOPNOTSUPP) {
          seek_data_ = false;  // no SEEK_DATA here: everything is data, always safe
          continue;
        }
        out->clear();
        return Status::IOError(describe_ + ": allocation map at offset " + std::to_string(pos) +
                               ": lseek(SEEK_DATA): " + Errno(err));
      }
      if (static_cast<uint64_t>(data) > pos) {
        const uint64_t hole_end = std::min<uint64_t>(static_cast<uint64_t>(data), end);
        AppendExtent(out, pos, hole_end - pos, kHole);
        pos = hole_end;
        continue;
      }
      off_t hole = ::lseek(fd_, static_cast<off_t>(pos), SEEK_HOLE);
      if (hole < 0 && errno != ENXIO) {
        const int err = errno;
        out->clear();
        return Status::IOError(describe_ + ": allocation map at offset " + std::to_string(pos) +
                               ": lseek(SEEK_HOLE): " + Errno(err));
      }
      // A hole at or before pos can only mean the file changed under us:
      // report data up to the limit, which is always safe.
      uint64_t data_end = hole > 0 && static_cast<uint64_t>(hole) > pos
                              ? std::min<uint64_t>(static_cast<uint64_t>(hole), limit)
                              : limit;
      AppendExtent(out, pos, data_end - pos, 0);
      pos = data_end;
    }
    return Status::OK();
  }

  Status Dirty(uint64_t, uint64_t, std::vector<Extent>* out) override {
    out->clear();
    return Status::NotSupported(describe_ + ": raw images have no dirty bitmap");
  }

  Status ReadMany(std::span<const ReadRequest> requests) override {
    for (const ReadRequest& r : requests) {
      if (r.length == 0) continue;
      if (r.dst == nullptr) {
        return Status::InvalidArgument(describe_ + ": read at offset " + std::to_string(r.offset) +
                                       " has no buffer");
      }
      if (r.length > kMaxRequest) {
        return Status::InvalidArgument(describe_ + ": read at offset " + std::to_string(r.offset) +
                                       " of " + std::to_string(r.length) + " bytes exceeds 32 MiB");
      }
      RETURN_IF_ERROR(CheckRange(r.offset, r.length, "read"));
    }
    for (const ReadRequest& r : requests) RETURN_IF_ERROR(ReadOne(r));
    return Status::OK();
  }

 private:
  Status ReadOne(const ReadRequest& r) {
    const uint64_t end = r.offset + r.length;
    const uint64_t file_end = std::min(end, file_size_);
    uint64_t pos = r.offset;
    while (pos < file_end) {
      ssize_t n = ::pread(fd_, r.dst + (pos - r.offset), file_end - pos, static_cast<off_t>(pos));
      if (n < 0) {
        const int err = errno;
        if (err == EINTR) continue;
        return Status::IOError(describe_ + ": read at offset " + std::to_string(pos) + ": " +
                               Errno(err));
      }
      if (n == 0) {
        return Status::IOError(describe_ + ": read at offset " + std::to_string(pos) +
                               ": unexpected end of file (the image was " +
                               std::to_string(file_size_) +
                               " bytes when opened; truncated since?)");
      }
      pos += static_cast<uint64_t>(n);
    }
    if (end > file_end) {
      // The padding up to the sector boundary.
      const uint64_t from = std::max(r.offset, file_end);
      std::memset(r.dst + (from - r.offset), 0, end - from);
    }
    return Status::OK();
  }

  // IOError when the regular file is now shorter than when it was opened.
  Status CheckNotShrunk(uint64_t pos) const {
    struct stat st;
    if (!regular_) return Status::OK();
    if (::fstat(fd_, &st) != 0) {
      const int err = errno;
      return Status::IOError(describe_ + ": fstat: " + Errno(err));
    }
    if (static_cast<uint64_t>(st.st_size) < file_size_) {
      return Status::IOError(describe_ + ": allocation map at offset " + std::to_string(pos) +
                             ": the image shrank from " + std::to_string(file_size_) + " to " +
                             std::to_string(st.st_size) + " bytes since it was opened");
    }
    return Status::OK();
  }

  Status CheckRange(uint64_t offset, uint64_t length, const char* what) const {
    if (offset > size_ || length > size_ - offset) {
      return Status::InvalidArgument(
          describe_ + ": " + what + " [" + std::to_string(offset) + ", +" + std::to_string(length) +
          ") is beyond the end of the disk (" + std::to_string(size_) + " bytes)");
    }
    return Status::OK();
  }

  const int fd_;
  const std::string path_;
  const std::string describe_;
  const uint64_t file_size_;  // bytes in the file (or the device) when opened
  const uint64_t size_;       // file_size_ rounded up to a sector, as QEMU does
  const bool regular_;        // a regular file (else a block device)
  bool seek_data_ = true;     // cleared when the file system lacks SEEK_DATA
};

// One byte-range lock request or test on a single byte.
struct flock OneByte(short type, off_t byte) {
  struct flock fl;
  std::memset(&fl, 0, sizeof(fl));
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  return fl;
}

// Takes part in QEMU's image locking as a consistent reader that shares
// neither write nor resize permission (what qemu-nbd --read-only takes for a
// qcow2 image): lock first, then test, as QEMU does, so that of two
// processes racing at least one sees the other.
Status LockLikeQemu(int fd, const std::string& path) {
  for (off_t byte :
       {kPermBase + kPermConsistentRead, kSharedBase + kPermWrite, kSharedBase + kPermResize}) {
    struct flock fl = OneByte(F_RDLCK, byte);
    if (::fcntl(fd, F_OFD_SETLK, &fl) != 0) {
      const int err = errno;
      if (err == EAGAIN || err == EACCES) {
        return Status::Busy("image " + path +
                            " is in use by another process (a running VM?): it holds an exclusive "
                            "lock on byte " +
                            std::to_string(byte) +
                            "; cannot read it consistently: back the VM up live or stop it");
      }
      return Status::IOError("image " + path + ": cannot take QEMU's shared lock on byte " +
                             std::to_string(byte) + ": " + Errno(err));
    }
  }
  struct Check {
    off_t byte;
    const char* what;
  };
  for (const Check& c :
       {Check{kPermBase + kPermWrite, "has it open for writing"},
        Check{kPermBase + kPermResize, "may resize it"},
        Check{kSharedBase + kPermConsistentRead, "does not share consistent reads"}}) {
    // Our own locks (this open file description) never conflict.
    struct flock fl = OneByte(F_WRLCK, c.byte);
    if (::fcntl(fd, F_OFD_GETLK, &fl) != 0) {
      const int err = errno;
      return Status::IOError("image " + path + ": cannot test QEMU's lock on byte " +
                             std::to_string(c.byte) + ": " + Errno(err));
    }
    if (fl.l_type != F_UNLCK) {
      return Status::Busy("image " + path + " is in use by another process (a running VM?) that " +
                          c.what + " (QEMU lock byte " + std::to_string(c.byte) +
                          "); cannot read it consistently: back the VM up live or stop it");
    }
  }
  return Status::OK();
}

}  // namespace

Result<std::unique_ptr<BlockSource>> OpenRawFile(const std::string& path) {
  if (path.empty()) return Status::InvalidArgument("empty image path");
  // O_NONBLOCK: opening a FIFO must not hang (it is refused below).
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return Status::NotFound("image " + path + " does not exist");
    return Status::IOError("image " + path + " is not readable: " + Errno(err));
  }
  auto fail = [fd](Status st) {
    ::close(fd);
    return st;
  };
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    return fail(Status::IOError("image " + path + ": fstat: " + Errno(err)));
  }
  if (S_ISDIR(st.st_mode)) {
    return fail(Status::InvalidArgument(path + " is a directory, not a disk image"));
  }
  uint64_t file_size = 0;
  if (S_ISREG(st.st_mode)) {
    file_size = static_cast<uint64_t>(st.st_size);
  } else if (S_ISBLK(st.st_mode)) {
    if (::ioctl(fd, BLKGETSIZE64, &file_size) != 0) {
      const int err = errno;
      return fail(
          Status::IOError("image " + path + ": cannot get the block device's size: " + Errno(err)));
    }
  } else {
    return fail(Status::InvalidArgument(path + " is neither a regular file nor a block device"));
  }
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0) {
    const int err = errno;
    return fail(Status::IOError("image " + path + ": fcntl(F_SETFL): " + Errno(err)));
  }
  Status locked = LockLikeQemu(fd, path);
  if (!locked.ok()) return fail(locked);
  return std::unique_ptr<BlockSource>(
      std::make_unique<RawFileSource>(fd, path, file_size, S_ISREG(st.st_mode)));
}

}  // namespace vmdedup
