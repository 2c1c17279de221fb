#include "engine/restore.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "base/subprocess.h"
#include "engine/snapshot_reader.h"

namespace vmdedup {
namespace {

Status PwriteAll(int fd, const uint8_t* p, size_t n, uint64_t off, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::pwrite(fd, p, n, static_cast<off_t>(off));
    if (w < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "write " + path);
    }
    p += w;
    n -= static_cast<size_t>(w);
    off += static_cast<uint64_t>(w);
  }
  return Status::OK();
}

// Writes the raw image into `fd` (`path` for messages): a new sparse file
// of `file_length` bytes (zero ranges are holes already), or a block device
// written in place (`zero_fill`: zero ranges are written as zeros).
Status WriteRaw(SnapshotReader& reader, int fd, const std::string& path, bool zero_fill,
                uint64_t file_length, const RestoreRequest& req, RestoreResult* result) {
  const SnapshotRecord& snap = reader.snapshot();
  Status st;
  if (!zero_fill && ::ftruncate(fd, static_cast<off_t>(snap.size)) != 0)
    st = Status::FromErrno(errno, "resize " + path);

  std::atomic<uint64_t> next{0};
  std::atomic<uint64_t> written{0};
  std::atomic<uint64_t> done_segments{0};
  std::mutex mu;  // guards st
  auto worker = [&]() {
    Sha256Hasher hasher;
    std::vector<uint8_t> buf(snap.segment_size);
    std::vector<std::pair<uint32_t, uint32_t>> data;
    for (;;) {
      {
        std::lock_guard<std::mutex> lock(mu);
        if (!st.ok()) return;
      }
      if (req.cancel && req.cancel->load()) {
        std::lock_guard<std::mutex> lock(mu);
        if (st.ok()) st = Status::Aborted("restore interrupted");
        return;
      }
      uint64_t i = next.fetch_add(1);
      if (i >= reader.segment_count()) return;
      Status s;
      const uint64_t base = i * snap.segment_size;
      const uint64_t length = std::min<uint64_t>(snap.segment_size, snap.size - base);
      if (!reader.SegmentIsZero(i)) {
        s = reader.ReadSegment(i, buf.data(), hasher, &data);
        for (size_t k = 0; s.ok() && k < data.size(); k++) {
          s = PwriteAll(fd, buf.data() + data[k].first, data[k].second - data[k].first,
                        base + data[k].first, path);
          written += data[k].second - data[k].first;
        }
      } else {
        data.clear();
      }
      if (s.ok() && zero_fill) {
        // The gaps between the data ranges read as zeros: write them.
        uint64_t pos = 0;
        data.push_back({static_cast<uint32_t>(length), static_cast<uint32_t>(length)});
        for (size_t k = 0; s.ok() && k < data.size(); k++) {
          if (data[k].first > pos) {
            std::fill(buf.begin(), buf.begin() + (data[k].first - pos), 0);
            s = PwriteAll(fd, buf.data(), data[k].first - pos, base + pos, path);
          }
          pos = std::max<uint64_t>(pos, data[k].second);
        }
      }
      done_segments++;
      if (!s.ok()) {
        std::lock_guard<std::mutex> lock(mu);
        if (st.ok()) st = s;
        return;
      }
    }
  };
  if (st.ok()) {
    std::vector<std::thread> threads;
    const unsigned n = std::max(1u, req.threads);
    unsigned finished = 0;  // workers that returned; guarded by mu
    std::condition_variable finished_cv;
    for (unsigned t = 0; t < n; t++) {
      threads.emplace_back([&] {
        worker();
        std::lock_guard<std::mutex> lock(mu);
        finished++;
        finished_cv.notify_all();
      });
    }
    if (req.progress) {
      // A progress report every 250 ms, and one as soon as the workers end.
      for (bool running = true; running;) {
        {
          std::unique_lock<std::mutex> lock(mu);
          running = !finished_cv.wait_for(lock, std::chrono::milliseconds(250),
                                          [&] { return finished == n || !st.ok(); });
        }
        RestoreProgress p;
        p.total_bytes = snap.size;
        p.done_bytes = std::min(snap.size, done_segments.load() * snap.segment_size);
        p.written_bytes = written.load();
        req.progress(p);
      }
    }
    for (auto& t : threads) t.join();
  }
  // A raw image file whose length is no multiple of 512: its exact length
  // (what lay past it, in the sector's padding, was zeros).
  if (st.ok() && !zero_fill && file_length != snap.size &&
      ::ftruncate(fd, static_cast<off_t>(file_length)) != 0)
    st = Status::FromErrno(errno, "resize " + path);
  if (st.ok() && ::fsync(fd) != 0) st = Status::FromErrno(errno, "fsync " + path);
  result->size = zero_fill ? snap.size : file_length;
  result->written_bytes = written.load();
  return st;
}

}  // namespace

Result<RestoreResult> RestoreToFile(Repository& repo, VmStore& vm, const SnapshotRecord& snapshot,
                                    const RestoreRequest& req) {
  if (req.format != "raw" && req.format != "qcow2")
    return Status::InvalidArgument("restore format must be raw or qcow2, not '" + req.format + "'");
  if (req.path.empty()) return Status::InvalidArgument("restore needs a target: --to PATH");
  if (req.mode > 0777)
    return Status::InvalidArgument("--mode must be an octal file mode (0600), not " +
                                   std::to_string(req.mode));
  // What is at PATH decides how it is written. A regular file (or nothing)
  // gets a new file renamed over it; a block device is written in place
  // (never replaced by a file); anything else is refused, as is a symbolic
  // link to anything but a block device.
  struct stat target, link;
  const bool exists = ::lstat(req.path.c_str(), &link) == 0;
  bool block_device = false;
  if (exists) {
    if (!req.force) return Status::InvalidArgument(req.path + " exists; use --force to replace it");
    if (::stat(req.path.c_str(), &target) != 0)
      return Status::FromErrno(errno, "restore target " + req.path);
    block_device = S_ISBLK(target.st_mode);
    if (S_ISLNK(link.st_mode) && !block_device)
      return Status::InvalidArgument(req.path +
                                     " is a symbolic link: give the path of the file itself");
    if (!block_device && !S_ISREG(target.st_mode))
      return Status::InvalidArgument(
          req.path +
          " is not a regular file or a block device (a directory, FIFO, socket or character "
          "device): vmdedup restores only into those");
    if (block_device && req.format != "raw")
      return Status::InvalidArgument(req.path +
                                     " is a block device: restore into it with --format raw");
  }
  ASSIGN_OR_RETURN(auto reader, SnapshotReader::Open(repo, vm, snapshot));
  RestoreResult result;
  if (block_device) {
    // O_EXCL on a block device: refused while it is mounted or held.
    int fd = ::open(req.path.c_str(), O_WRONLY | O_EXCL | O_CLOEXEC);
    if (fd < 0) return Status::FromErrno(errno, "open block device " + req.path + " (in use?)");
    uint64_t device_size = 0;
    Status st;
    if (::ioctl(fd, BLKGETSIZE64, &device_size) != 0)
      st = Status::FromErrno(errno, "size of block device " + req.path);
    else if (device_size < snapshot.size)
      st = Status::InvalidArgument("block device " + req.path + " holds " +
                                   std::to_string(device_size) + " bytes, snapshot " +
                                   snapshot.Id() + " needs " + std::to_string(snapshot.size));
    if (st.ok())
      st = WriteRaw(*reader, fd, req.path, /*zero_fill=*/true, snapshot.size, req, &result);
    ::close(fd);
    if (!st.ok()) return st.WithContext("restore " + snapshot.Id() + " to " + req.path);
    return result;
  }
  const std::string partial = req.path + ".partial";
  const std::string raw_path = req.format == "raw" ? partial : req.path + ".partial.raw";
  ::unlink(partial.c_str());
  ::unlink(raw_path.c_str());
  const mode_t mode = static_cast<mode_t>(req.mode);
  int fd = ::open(raw_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  if (fd < 0) return Status::FromErrno(errno, "create " + raw_path);
  // The mode exactly, whatever the umask.
  Status st =
      ::fchmod(fd, mode) == 0 ? Status::OK() : Status::FromErrno(errno, "chmod " + raw_path);
  // The exact length of a raw image of odd length; qcow2's virtual size is
  // whole sectors anyway.
  const uint64_t file_length =
      req.format == "raw" && snapshot.image_bytes != 0 ? snapshot.image_bytes : snapshot.size;
  if (st.ok()) st = WriteRaw(*reader, fd, raw_path, /*zero_fill=*/false, file_length, req, &result);
  ::close(fd);
  if (st.ok() && req.format == "qcow2") {
    auto out =
        RunProcess({"qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw_path, partial});
    if (!out.ok())
      st = out.status();
    else if (!out->success())
      st = Status::IOError("qemu-img convert to qcow2 failed: " + out->ErrorSummary());
    if (st.ok() && ::chmod(partial.c_str(), mode) != 0)
      st = Status::FromErrno(errno, "chmod " + partial);
    ::unlink(raw_path.c_str());
  }
  if (!st.ok()) {
    ::unlink(raw_path.c_str());
    ::unlink(partial.c_str());
    return st.WithContext("restore " + snapshot.Id() + " to " + req.path);
  }
  if (::rename(partial.c_str(), req.path.c_str()) != 0) {
    Status e = Status::FromErrno(errno, "rename " + partial + " to " + req.path);
    ::unlink(partial.c_str());
    return e;
  }
  return result;
}

}  // namespace vmdedup
