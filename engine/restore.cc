#include "engine/restore.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
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

// Writes the raw image into `path` (which must not exist).
Status WriteRaw(SnapshotReader& reader, const std::string& path, const RestoreRequest& req,
                RestoreResult* result) {
  const SnapshotRecord& snap = reader.snapshot();
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return Status::FromErrno(errno, "create " + path);
  Status st;
  if (::ftruncate(fd, static_cast<off_t>(snap.size)) != 0)
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
      if (!reader.SegmentIsZero(i)) {
        s = reader.ReadSegment(i, buf.data(), hasher, &data);
        uint64_t base = i * snap.segment_size;
        for (size_t k = 0; s.ok() && k < data.size(); k++) {
          s = PwriteAll(fd, buf.data() + data[k].first, data[k].second - data[k].first,
                        base + data[k].first, path);
          written += data[k].second - data[k].first;
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
    unsigned n = std::max(1u, req.threads);
    for (unsigned t = 0; t < n; t++) threads.emplace_back(worker);
    if (req.progress) {
      for (;;) {
        bool running = done_segments.load() < reader.segment_count();
        {
          std::lock_guard<std::mutex> lock(mu);
          if (!st.ok()) running = false;
        }
        RestoreProgress p;
        p.total_bytes = snap.size;
        p.done_bytes = std::min(snap.size, done_segments.load() * snap.segment_size);
        p.written_bytes = written.load();
        req.progress(p);
        if (!running) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(250));
      }
    }
    for (auto& t : threads) t.join();
  }
  if (st.ok() && ::fsync(fd) != 0) st = Status::FromErrno(errno, "fsync " + path);
  ::close(fd);
  result->size = snap.size;
  result->written_bytes = written.load();
  return st;
}

}  // namespace

Result<RestoreResult> RestoreToFile(Repository& repo, VmStore& vm, const SnapshotRecord& snapshot,
                                    const RestoreRequest& req) {
  if (req.format != "raw" && req.format != "qcow2")
    return Status::InvalidArgument("restore format must be raw or qcow2, not '" + req.format + "'");
  struct stat sb;
  if (::stat(req.path.c_str(), &sb) == 0 && !req.force)
    return Status::InvalidArgument(req.path + " exists; use --force to replace it");
  ASSIGN_OR_RETURN(auto reader, SnapshotReader::Open(repo, vm, snapshot));
  const std::string partial = req.path + ".partial";
  const std::string raw_path = req.format == "raw" ? partial : req.path + ".partial.raw";
  ::unlink(partial.c_str());
  ::unlink(raw_path.c_str());
  RestoreResult result;
  Status st = WriteRaw(*reader, raw_path, req, &result);
  if (st.ok() && req.format == "qcow2") {
    auto out =
        RunProcess({"qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw_path, partial});
    if (!out.ok())
      st = out.status();
    else if (!out->success())
      st = Status::IOError("qemu-img convert to qcow2 failed: " + out->ErrorSummary());
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
