// The libnbd BlockSource: one NBD connection, to a URI or to a qemu-nbd
// started through systemd socket activation. See block_source.h.
#include <fcntl.h>
#include <libnbd.h>
#include <signal.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "base/subprocess.h"
#include "nbd-client/block_source.h"

namespace vmdedup {
namespace {

constexpr uint64_t kMaxBlockStatusChunk = 1ull << 30;  // 1 GiB a block status request
// 256 KiB a read: qemu-nbd spends 3-4x the CPU on 4 MiB requests (docs/benchmarks.md).
constexpr uint32_t kMaxReadPiece = 256u << 10;
constexpr uint32_t kQemuMaxRequest = 32u << 20;  // QEMU drops larger requests
constexpr int kDisconnectTimeoutMs = 5000;
constexpr int kCancelCheckMs = 500;  // the longest a poll waits before the cancel flag is read
constexpr const char* kAllocationContext = "base:allocation";
constexpr const char* kDirtyContextPrefix = "qemu:dirty-bitmap:";

int64_t NowMs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

std::string LastNbdError() {
  const char* e = nbd_get_error();
  if (e != nullptr && *e != '\0') return e;
  int err = nbd_get_errno();
  return err != 0 ? std::strerror(err) : "unknown libnbd error";
}

std::string Trim(const std::string& s) {
  std::string out;
  std::istringstream in(s);
  std::string line;
  while (std::getline(in, line)) {
    size_t b = line.find_first_not_of(" \t\r");
    if (b == std::string::npos) continue;
    size_t e = line.find_last_not_of(" \t\r");
    if (!out.empty()) out += ' ';
    out += line.substr(b, e - b + 1);
  }
  if (out.size() > 2000) out = out.substr(0, 2000) + "...";
  return out;
}

bool Contains(const std::string& s, const char* needle) {
  return s.find(needle) != std::string::npos;
}

// A private temporary directory holding qemu-nbd's stderr; removed on
// destruction.
class StderrCapture {
 public:
  StderrCapture() = default;
  ~StderrCapture() {
    if (dir_.empty()) return;
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  StderrCapture(const StderrCapture&) = delete;
  StderrCapture& operator=(const StderrCapture&) = delete;

  Status Create() {
    const char* tmp = std::getenv("TMPDIR");
    std::string tmpl = std::string(tmp && *tmp ? tmp : "/tmp") + "/vmdedup-qemu-nbd-XXXXXX";
    if (mkdtemp(tmpl.data()) == nullptr) {
      return Status::FromErrno(errno, "creating a temporary directory for qemu-nbd");
    }
    dir_ = tmpl;
    file_ = dir_ + "/stderr";
    return Status::OK();
  }
  const std::string& file() const { return file_; }
  // What qemu-nbd has written so far, on one line.
  std::string Read() const {
    if (file_.empty()) return "";
    std::ifstream in(file_);
    std::stringstream ss;
    ss << in.rdbuf();
    return Trim(ss.str());
  }

 private:
  std::string dir_;
  std::string file_;
};

class NbdBlockSource final : public BlockSource {
 public:
  struct Config {
    std::string describe;
    std::optional<std::string> bitmap;
    unsigned max_in_flight = 16;
    unsigned io_timeout_seconds = 0;
    const std::atomic<bool>* cancel = nullptr;
    bool subprocess = false;
    std::unique_ptr<StderrCapture> stderr_capture;  // qemu-nbd's, if we started it
  };

  NbdBlockSource(nbd_handle* h, Config config) : h_(h), config_(std::move(config)) {}
  ~NbdBlockSource() override { Close(/*graceful=*/true); }
  NbdBlockSource(const NbdBlockSource&) = delete;
  NbdBlockSource& operator=(const NbdBlockSource&) = delete;

  // After connect: reads the size, limits and negotiated contexts.
  Status Init() {
    int64_t size = nbd_get_size(h_);
    if (size < 0) return Status::IOError(config_.describe + ": cannot get size: " + LastNbdError());
    size_ = static_cast<uint64_t>(size);
    has_allocation_ = nbd_can_meta_context(h_, kAllocationContext) == 1;
    if (config_.bitmap) {
      dirty_context_ = kDirtyContextPrefix + *config_.bitmap;
      has_dirty_ = nbd_can_meta_context(h_, dirty_context_.c_str()) == 1;
    }
    uint32_t piece = kMaxReadPiece;
    int64_t max = nbd_get_block_size(h_, LIBNBD_SIZE_MAXIMUM);
    if (max > 0) piece = static_cast<uint32_t>(std::min<int64_t>(piece, max));
    int64_t min = nbd_get_block_size(h_, LIBNBD_SIZE_MINIMUM);
    if (min > 1 && piece % min != 0) piece -= piece % static_cast<uint32_t>(min);
    max_piece_ = std::max<uint32_t>(piece, 1);
    return Status::OK();
  }

  uint64_t size() const override { return size_; }
  bool has_dirty_map() const override { return has_dirty_; }
  std::string Describe() const override { return config_.describe; }

  Status Allocation(uint64_t offset, uint64_t length, std::vector<Extent>* out) override {
    out->clear();
    RETURN_IF_ERROR(CheckRange(offset, length, "allocation map"));
    if (!has_allocation_) {
      // The server has no map: everything is data, which is always safe.
      AppendExtent(out, offset, length, 0);
      return Status::OK();
    }
    return BlockStatus(kAllocationContext, Extent::kHole | Extent::kZero, /*fallback=*/0, offset,
                       length, out);
  }

  Status Dirty(uint64_t offset, uint64_t length, std::vector<Extent>* out) override {
    out->clear();
    if (!has_dirty_) {
      return Status::NotSupported(
          config_.describe + ": no dirty bitmap " +
          (config_.bitmap ? "'" + *config_.bitmap + "' exported" : "was requested"));
    }
    RETURN_IF_ERROR(CheckRange(offset, length, "dirty map"));
    return BlockStatus(dirty_context_.c_str(), Extent::kDirty, /*fallback=*/Extent::kDirty, offset,
                       length, out);
  }

  Status ReadMany(std::span<const ReadRequest> requests) override {
    for (const ReadRequest& r : requests) {
      if (r.length == 0) continue;
      if (r.dst == nullptr) {
        return Status::InvalidArgument(config_.describe + ": read at offset " +
                                       std::to_string(r.offset) + " has no buffer");
      }
      if (r.length > kQemuMaxRequest) {
        return Status::InvalidArgument(config_.describe + ": read at offset " +
                                       std::to_string(r.offset) + " of " +
                                       std::to_string(r.length) + " bytes exceeds 32 MiB");
      }
      RETURN_IF_ERROR(CheckRange(r.offset, r.length, "read"));
    }
    RETURN_IF_ERROR(CheckAlive());

    ReadBatch batch;
    uint64_t seen_completed = 0;
    int64_t progress_ms = NowMs();
    auto poll = [&]() {
      Status st = PollOnce(progress_ms, batch.Describe());
      if (batch.completed != seen_completed) {
        seen_completed = batch.completed;
        progress_ms = NowMs();
      }
      return st;
    };
    const unsigned max_in_flight = std::max(1u, config_.max_in_flight);
    size_t next_request = 0;
    uint64_t next_piece = 0;  // offset within requests[next_request]
    Status submit_error;      // a read libnbd refused to send
    Status poll_error;        // the connection failed
    while (batch.error == 0) {
      while (next_request < requests.size() && next_piece >= requests[next_request].length) {
        next_request++;
        next_piece = 0;
      }
      const bool more = next_request < requests.size();
      if (!more && batch.in_flight == 0) break;
      if (more && batch.in_flight < max_in_flight) {
        const ReadRequest& r = requests[next_request];
        const uint64_t offset = r.offset + next_piece;
        const uint32_t len =
            static_cast<uint32_t>(std::min<uint64_t>(max_piece_, r.length - next_piece));
        auto* cmd = new ReadCommand{&batch, offset, len};
        batch.in_flight++;
        batch.offsets.insert(offset);
        int64_t cookie = nbd_aio_pread(
            h_, r.dst + next_piece, len, offset,
            nbd_completion_callback{.callback = OnReadDone, .user_data = cmd, .free = FreeRead}, 0);
        if (cookie < 0) {
          // libnbd has freed `cmd` without calling OnReadDone.
          const std::string nbd_error = LastNbdError();
          batch.in_flight--;
          batch.offsets.erase(batch.offsets.find(offset));
          const std::string what = "reading at offset " + std::to_string(offset);
          if (nbd_aio_is_dead(h_) == 1 || nbd_aio_is_closed(h_) == 1) {
            poll_error = ConnectionFailure(what, nbd_error);
          } else {
            submit_error = Status::IOError(config_.describe + ": " + what + ": " + nbd_error);
          }
          break;
        }
        next_piece += len;
        continue;
      }
      poll_error = poll();
      if (!poll_error.ok()) break;
    }
    // Never return while the server may still write into the caller's
    // buffers: drain what is in flight, or drop the connection.
    while (poll_error.ok() && h_ != nullptr && batch.in_flight > 0) poll_error = poll();
    if (!poll_error.ok()) {
      if (h_ != nullptr && nbd_aio_in_flight(h_) > 0) Close(/*graceful=*/false);
      return poll_error;
    }
    if (!submit_error.ok()) return submit_error;
    if (batch.error != 0) {
      Status alive = CheckAlive();
      return Status::IOError(
          config_.describe + ": read at offset " + std::to_string(batch.error_offset) + " (" +
          std::to_string(batch.error_length) + " bytes) failed: " + std::strerror(batch.error) +
          (alive.ok() ? ServerStderr() : " (" + dead_reason_ + ")"));
    }
    return Status::OK();
  }

 private:
  struct ReadBatch {
    unsigned in_flight = 0;
    uint64_t completed = 0;
    std::multiset<uint64_t> offsets;  // of the reads in flight
    int error = 0;
    uint64_t error_offset = 0;
    uint32_t error_length = 0;
    std::string Describe() const {
      if (offsets.empty()) return "reading";
      return "reading at offset " + std::to_string(*offsets.begin()) + " (" +
             std::to_string(in_flight) + " reads in flight)";
    }
  };
  struct ReadCommand {
    ReadBatch* batch;
    uint64_t offset;
    uint32_t length;
  };

  static int OnReadDone(void* user_data, int* error) {
    auto* cmd = static_cast<ReadCommand*>(user_data);
    ReadBatch* batch = cmd->batch;
    batch->in_flight--;
    batch->completed++;
    auto it = batch->offsets.find(cmd->offset);
    if (it != batch->offsets.end()) batch->offsets.erase(it);
    if (*error != 0 && batch->error == 0) {
      batch->error = *error;
      batch->error_offset = cmd->offset;
      batch->error_length = cmd->length;
    }
    return 1;  // retire the command
  }
  static void FreeRead(void* user_data) { delete static_cast<ReadCommand*>(user_data); }

  struct StatusCommand {
    const char* context;
    uint64_t start = 0;
    std::vector<std::pair<uint64_t, uint32_t>> entries;  // (length, flags)
    bool got = false;
    bool done = false;
    int error = 0;
  };

  static int OnExtents(void* user_data, const char* metacontext, uint64_t offset, uint32_t* entries,
                       size_t nr_entries, int* /*error*/) {
    auto* cmd = static_cast<StatusCommand*>(user_data);
    if (std::strcmp(metacontext, cmd->context) != 0 || cmd->got) return 0;
    if (offset != cmd->start) return 0;  // not ours; treated as "no answer"
    cmd->got = true;
    for (size_t i = 0; i + 1 < nr_entries; i += 2)
      cmd->entries.emplace_back(entries[i], entries[i + 1]);
    return 0;
  }
  static int OnStatusDone(void* user_data, int* error) {
    auto* cmd = static_cast<StatusCommand*>(user_data);
    cmd->done = true;
    cmd->error = *error;
    return 1;
  }

  Status BlockStatus(const char* context, uint32_t mask, uint32_t fallback, uint64_t offset,
                     uint64_t length, std::vector<Extent>* out) {
    RETURN_IF_ERROR(CheckAlive());
    const uint64_t end = offset + length;
    uint64_t pos = offset;
    while (pos < end) {
      const uint64_t chunk_end = pos + std::min(kMaxBlockStatusChunk, end - pos);
      StatusCommand cmd;
      cmd.context = context;
      cmd.start = pos;
      const std::string what = std::string(context) + " at offset " + std::to_string(pos);
      const int64_t issued_ms = NowMs();
      int64_t cookie = nbd_aio_block_status(
          h_, chunk_end - pos, pos,
          nbd_extent_callback{.callback = OnExtents, .user_data = &cmd, .free = nullptr},
          nbd_completion_callback{.callback = OnStatusDone, .user_data = &cmd, .free = nullptr}, 0);
      if (cookie < 0) {
        out->clear();
        return ConnectionFailure("block status " + what, LastNbdError());
      }
      while (!cmd.done) {
        Status st = PollOnce(issued_ms, "block status " + what);
        if (!st.ok()) {
          // PollOnce has closed the connection if `cmd` was still in flight.
          if (!cmd.done && h_ != nullptr) Close(/*graceful=*/false);
          out->clear();
          return st;
        }
      }
      if (cmd.error != 0) {
        out->clear();
        Status alive = CheckAlive();
        return Status::IOError(config_.describe + ": block status " + what +
                               " failed: " + std::strerror(cmd.error) +
                               (alive.ok() ? ServerStderr() : " (" + dead_reason_ + ")"));
      }
      uint64_t p = pos;
      for (const auto& [len, flags] : cmd.entries) {
        if (p >= chunk_end) break;
        if (len == 0) continue;
        const uint64_t e = std::min<uint64_t>(p + len, chunk_end);
        AppendExtent(out, p, e - p, flags & mask);
        p = e;
      }
      if (p == pos) {
        // No answer for this context (allowed by the protocol): assume the
        // safe value (data / dirty) for the whole chunk.
        AppendExtent(out, pos, chunk_end - pos, fallback);
        p = chunk_end;
      }
      pos = p;
    }
    return Status::OK();
  }

  // One nbd_poll; fails on a connection error, or when nothing has completed
  // since `progress_ms` (NowMs() of the last completion) for
  // io_timeout_seconds, which closes the connection.
  Status PollOnce(int64_t progress_ms, const std::string& what) {
    int timeout = kCancelCheckMs;
    if (config_.io_timeout_seconds > 0) {
      int64_t left = progress_ms + int64_t{config_.io_timeout_seconds} * 1000 - NowMs();
      if (left <= 0) {
        Status st =
            Status::IOError(config_.describe + ": " + what + ": no reply from the server in " +
                            std::to_string(config_.io_timeout_seconds) + " s");
        dead_reason_ = st.message();
        Close(/*graceful=*/false);
        return st;
      }
      timeout = static_cast<int>(std::min<int64_t>(left, kCancelCheckMs));
    }
    if (nbd_poll(h_, timeout) < 0) return ConnectionFailure(what, LastNbdError());
    if (config_.cancel != nullptr && config_.cancel->load()) {
      Status st = Status::Aborted(config_.describe + ": " + what + ": interrupted");
      dead_reason_ = st.message();
      Close(/*graceful=*/false);
      return st;
    }
    return Status::OK();
  }

  // The connection is unusable: remember why, drop it, and report.
  Status ConnectionFailure(const std::string& what, const std::string& nbd_error) {
    Status st = Status::IOError(config_.describe + ": " + what + ": " + nbd_error + ServerStderr());
    if (h_ != nullptr &&
        (nbd_aio_is_dead(h_) == 1 || nbd_aio_is_closed(h_) == 1 || nbd_aio_in_flight(h_) > 0)) {
      dead_reason_ = st.message();
      Close(/*graceful=*/false);
    }
    return st;
  }

  // Fails when the connection is gone (closing a handle that died since).
  Status CheckAlive() {
    if (h_ != nullptr && (nbd_aio_is_dead(h_) == 1 || nbd_aio_is_closed(h_) == 1)) {
      dead_reason_ = "the server closed the connection" + ServerStderr();
      Close(/*graceful=*/false);
    }
    if (h_ == nullptr) {
      return Status::IOError(config_.describe + ": connection lost: " + dead_reason_);
    }
    return Status::OK();
  }

  Status CheckRange(uint64_t offset, uint64_t length, const char* what) const {
    if (offset > size_ || length > size_ - offset) {
      return Status::InvalidArgument(config_.describe + ": " + what + " [" +
                                     std::to_string(offset) + ", +" + std::to_string(length) +
                                     ") is beyond the end of the disk (" + std::to_string(size_) +
                                     " bytes)");
    }
    return Status::OK();
  }

  // " (qemu-nbd: ...)" with what the qemu-nbd we started printed, if anything.
  std::string ServerStderr() const {
    if (!config_.stderr_capture) return "";
    std::string s = config_.stderr_capture->Read();
    return s.empty() ? "" : " (qemu-nbd: " + s + ")";
  }

  // Disconnects (politely when `graceful` and the connection is healthy),
  // stops a qemu-nbd we started and frees the handle. Callbacks of commands
  // still in flight are freed by nbd_close.
  void Close(bool graceful) {
    if (h_ == nullptr) return;
    if (graceful && nbd_aio_is_ready(h_) == 1 && nbd_aio_in_flight(h_) == 0 &&
        nbd_aio_disconnect(h_, 0) == 0) {
      const int64_t deadline = NowMs() + kDisconnectTimeoutMs;
      while (nbd_aio_is_closed(h_) != 1 && nbd_aio_is_dead(h_) != 1) {
        int64_t left = deadline - NowMs();
        if (left <= 0 || nbd_poll(h_, static_cast<int>(left)) < 0) break;
      }
      if (nbd_aio_is_closed(h_) != 1 && config_.subprocess) nbd_kill_subprocess(h_, SIGKILL);
    } else if (config_.subprocess) {
      // qemu-nbd exits when the socket closes; a hung one must not hang us
      // in nbd_close's waitpid. It serves read-only, so killing is harmless.
      nbd_kill_subprocess(h_, SIGKILL);
    }
    nbd_close(h_);
    h_ = nullptr;
    if (dead_reason_.empty()) dead_reason_ = "connection closed";
  }

  nbd_handle* h_;
  Config config_;
  uint64_t size_ = 0;
  bool has_allocation_ = false;
  bool has_dirty_ = false;
  std::string dirty_context_;
  uint32_t max_piece_ = kMaxReadPiece;
  std::string dead_reason_;
};

// Creates a handle asking for base:allocation and the bitmap's context.
Result<nbd_handle*> CreateHandle(const std::optional<std::string>& bitmap,
                                 const std::string& describe) {
  if (bitmap && bitmap->empty()) {
    return Status::InvalidArgument(describe + ": empty dirty bitmap name");
  }
  nbd_handle* h = nbd_create();
  if (h == nullptr) return Status::IOError(describe + ": nbd_create: " + LastNbdError());
  bool ok = nbd_set_pread_initialize(h, false) == 0 &&
            nbd_add_meta_context(h, kAllocationContext) == 0 &&
            (!bitmap || nbd_add_meta_context(h, (kDirtyContextPrefix + *bitmap).c_str()) == 0);
  if (!ok) {
    Status st = Status::IOError(describe + ": setting up libnbd: " + LastNbdError());
    nbd_close(h);
    return st;
  }
  return h;
}

Status CheckReadableImage(const std::string& path) {
  if (path.empty()) return Status::InvalidArgument("empty image path");
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return Status::NotFound("image " + path + " does not exist");
    return Status::FromErrno(errno, "image " + path);
  }
  if (S_ISDIR(st.st_mode)) {
    return Status::InvalidArgument(path + " is a directory, not a disk image");
  }
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT) return Status::NotFound("image " + path + " does not exist");
    return Status::IOError("image " + path + " is not readable: " + std::strerror(err));
  }
  ::close(fd);
  return Status::OK();
}

bool ValidFormat(const std::string& format) {
  if (format.empty()) return false;
  return std::all_of(format.begin(), format.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
  });
}

// Maps a qemu-nbd start failure to a Status naming the image and bitmap.
Status QemuNbdStartError(const ImageFileOptions& options, const std::string& qemu_msg,
                         const std::string& nbd_error) {
  const std::string& path = options.path;
  const std::string detail = qemu_msg.empty() ? nbd_error : qemu_msg;
  if (Contains(qemu_msg, "Failed to get") && Contains(qemu_msg, "lock")) {
    return Status::Busy("image " + path +
                        " is in use by another process (a running VM?); cannot serve it "
                        "read-only: " +
                        detail);
  }
  if (options.bitmap) {
    const std::string& b = *options.bitmap;
    if (Contains(qemu_msg, "not found")) {
      return Status::NotFound("dirty bitmap '" + b + "' not found in image " + path + ": " +
                              detail);
    }
    if (Contains(qemu_msg, "inconsistent")) {
      return Status::Corruption("dirty bitmap '" + b + "' in image " + path +
                                " is inconsistent (its writer did not close the image cleanly) "
                                "and cannot be used: " +
                                detail);
    }
  }
  if (Contains(qemu_msg, "No such file or directory")) {
    return Status::NotFound("image " + path + ": " + detail);
  }
  if (Contains(qemu_msg, "Permission denied")) {
    return Status::IOError("image " + path + " is not readable: " + detail);
  }
  if (Contains(qemu_msg, "Image is not in") || Contains(qemu_msg, "Unknown driver") ||
      Contains(qemu_msg, "Unsupported") || Contains(qemu_msg, "not in qcow2 format")) {
    return Status::InvalidArgument("image " + path + " cannot be opened as " + options.format +
                                   ": " + detail);
  }
  return Status::IOError("cannot serve image " + path + " with qemu-nbd: " + detail);
}

// Drives an aio connect to the end of the handshake. A server that accepts
// but never answers (qemu-nbd busy with its one allowed client) fails after
// `timeout_seconds` (0: wait forever). Returns the libnbd error text.
Status WaitConnected(nbd_handle* h, unsigned timeout_seconds, const std::atomic<bool>* cancel) {
  const int64_t deadline = timeout_seconds > 0 ? NowMs() + int64_t{timeout_seconds} * 1000 : -1;
  for (;;) {
    if (nbd_aio_is_ready(h) == 1) return Status::OK();
    if (nbd_aio_is_dead(h) == 1 || nbd_aio_is_closed(h) == 1) {
      return Status::IOError("connection closed during the handshake");
    }
    if (cancel != nullptr && cancel->load()) return Status::Aborted("interrupted");
    int timeout = kCancelCheckMs;
    if (deadline >= 0) {
      int64_t left = deadline - NowMs();
      if (left <= 0) {
        return Status::IOError("no handshake from the server in " +
                               std::to_string(timeout_seconds) + " s");
      }
      timeout = static_cast<int>(std::min<int64_t>(left, kCancelCheckMs));
    }
    if (nbd_poll(h, timeout) < 0) return Status::IOError(LastNbdError());
  }
}

}  // namespace

void AppendExtent(std::vector<Extent>* out, uint64_t offset, uint64_t length, uint32_t flags) {
  if (length == 0) return;
  if (!out->empty()) {
    Extent& last = out->back();
    if (last.flags == flags && last.offset + last.length == offset) {
      last.length += length;
      return;
    }
  }
  out->push_back(Extent{offset, length, flags});
}

bool IsNbdUri(std::string_view text) {
  for (std::string_view scheme :
       {"nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://"})
    if (text.starts_with(scheme)) return true;
  return false;
}

Result<std::unique_ptr<BlockSource>> OpenNbdUri(const NbdUriOptions& options) {
  ASSIGN_OR_RETURN(nbd_handle * h, CreateHandle(options.bitmap, options.uri));
  NbdBlockSource::Config config;
  config.describe = options.uri;
  config.bitmap = options.bitmap;
  config.max_in_flight = options.max_in_flight;
  config.io_timeout_seconds = options.io_timeout_seconds;
  config.cancel = options.cancel;
  Status connected = nbd_aio_connect_uri(h, options.uri.c_str()) == 0
                         ? WaitConnected(h, options.io_timeout_seconds, options.cancel)
                         : Status::IOError(LastNbdError());
  if (!connected.ok()) {
    nbd_close(h);
    return connected.WithContext("cannot connect to " + options.uri);
  }
  auto source = std::make_unique<NbdBlockSource>(h, std::move(config));
  RETURN_IF_ERROR(source->Init());
  return std::unique_ptr<BlockSource>(std::move(source));
}

Result<std::unique_ptr<BlockSource>> OpenImageFile(const ImageFileOptions& options) {
  if (!ValidFormat(options.format)) {
    return Status::InvalidArgument("image " + options.path + ": bad format '" + options.format +
                                   "'");
  }
  if (options.bitmap && options.format != "qcow2") {
    return Status::InvalidArgument("image " + options.path + ": dirty bitmaps need qcow2, not " +
                                   options.format);
  }
  RETURN_IF_ERROR(CheckReadableImage(options.path));
  std::optional<std::string> qemu_nbd = FindProgram("qemu-nbd");
  if (!qemu_nbd) return ProgramNotFound("qemu-nbd");
  std::optional<std::string> shell = FindProgram("/bin/sh");
  if (!shell) return Status::NotFound("/bin/sh not found");

  auto capture = std::make_unique<StderrCapture>();
  RETURN_IF_ERROR(capture->Create());

  // An absolute path: qemu would read "proto:rest" as a protocol prefix.
  std::error_code ec;
  std::string abs_path = std::filesystem::absolute(options.path, ec).string();
  if (ec) abs_path = options.path;

  // qemu-nbd inherits our stderr from libnbd; to report its error messages
  // it runs under `sh -c 'exec "$@" 2>FILE'`. exec keeps the pid, which the
  // socket activation protocol (LISTEN_PID) needs. The arguments are passed
  // as positional parameters, never parsed by the shell.
  //
  // qemu-nbd must not outlive vmdedup (a leftover server holds the image and
  // blocks every later backup of it): setpriv(1) sets a parent-death signal
  // (SIGKILL) before exec, and the shell then checks that its parent is
  // still this process, which closes the race with a kill before the
  // signal was set. The parent-death signal follows the thread that forked
  // (libnbd forks on the caller's thread): open image files on a thread
  // that outlives the source.
  std::vector<std::string> args;
  if (std::optional<std::string> setpriv = FindProgram("setpriv")) {
    args = {*setpriv,
            "--pdeathsig",
            "KILL",
            "--",
            *shell,
            "-c",
            "[ \"$PPID\" = \"$1\" ] || exit 1; shift; exec \"$@\" 2>\"$0\"",
            capture->file(),
            std::to_string(getpid())};
  } else {
    args = {*shell, "-c", "exec \"$@\" 2>\"$0\"", capture->file()};
  }
  args.insert(args.end(), {*qemu_nbd, "--read-only", "--format=" + options.format});
  if (options.bitmap) {
    args.push_back("--bitmap=" + *options.bitmap);
  }
  args.push_back(abs_path);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  const std::string describe = "file:" + options.path + " (" + options.format + ")";
  ASSIGN_OR_RETURN(nbd_handle * h, CreateHandle(options.bitmap, describe));
  Status connected = nbd_aio_connect_systemd_socket_activation(h, argv.data()) == 0
                         ? WaitConnected(h, options.io_timeout_seconds, options.cancel)
                         : Status::IOError(LastNbdError());
  if (!connected.ok()) {
    // Usually qemu-nbd has printed its error and exited; a hung one is
    // killed. nbd_close reaps it.
    nbd_kill_subprocess(h, SIGKILL);
    nbd_close(h);
    if (connected.code() == Status::Code::kAborted)
      return connected.WithContext("image " + options.path);
    return QemuNbdStartError(options, capture->Read(), connected.message());
  }

  NbdBlockSource::Config config;
  config.describe = describe;
  config.bitmap = options.bitmap;
  config.max_in_flight = options.max_in_flight;
  config.io_timeout_seconds = options.io_timeout_seconds;
  config.cancel = options.cancel;
  config.subprocess = true;
  config.stderr_capture = std::move(capture);
  auto source = std::make_unique<NbdBlockSource>(h, std::move(config));
  RETURN_IF_ERROR(source->Init());
  return std::unique_ptr<BlockSource>(std::move(source));
}

}  // namespace vmdedup
