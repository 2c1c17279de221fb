// apply_diff_bench: writes the difference between two raw images (or a
// seeded random churn) into a target image over NBD, the way a guest's
// writes would arrive, so that the dirty bitmap QEMU keeps in a qcow2 image
// records exactly what changed.
//
// Usage:
//   apply_diff_bench [OPTIONS] OLD.raw NEW.raw TARGET
//       compares OLD and NEW in --chunk pieces (default 64 KiB) and writes
//       every changed piece of NEW into TARGET; a changed piece that is all
//       zero in NEW is sent as an NBD zero request (--trim: a trim request).
//       OLD may be "none": an all-zero image (then every non-zero piece of
//       NEW is written; use it to fill a fresh image).
//   apply_diff_bench [OPTIONS] --churn PCT --alloc-from IMG.raw TARGET
//       writes PCT % of IMG's allocated bytes as random (incompressible)
//       --chunk pieces at distinct random chunk-aligned allocated places
//       (seeded by --seed: the same arguments write the same bytes).
//
// TARGET is an image path, served writable for the run by a qemu-nbd that
// libnbd starts (systemd socket activation: `qemu-nbd -f FORMAT PATH`); it
// exits when we disconnect, and only then are the image's persistent
// bitmaps saved. Or an NBD URI (nbd://..., nbd+unix://...).
//
// Options:
//   --format F      TARGET's format when it is a path (default qcow2)
//   --chunk N       comparison and write unit in bytes (default 65536)
//   --offset N      write at TARGET offset N + image offset (default 0)
//   --trim          send zero pieces as trim instead of write-zeroes
//   --seed S        random churn seed (default 1)
//   --dry-run       compare only, write nothing
//
// Prints one JSON object: what was compared, written and zeroed, and the
// seconds taken. Exit 0 on success, 1 on failure, 2 on bad usage.
#include <fcntl.h>
#include <libnbd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

struct Args {
  std::string old_path, new_path, target, alloc_from;
  std::string format = "qcow2";
  uint64_t chunk = 64 * 1024;
  uint64_t offset = 0;
  double churn_pct = -1;
  uint64_t seed = 1;
  bool trim = false;
  bool dry_run = false;
};

[[noreturn]] void Die(const std::string& msg, int code = 1) {
  std::fprintf(stderr, "apply_diff_bench: %s\n", msg.c_str());
  std::exit(code);
}

[[noreturn]] void NbdDie(const std::string& what) {
  Die(what + ": " + (nbd_get_error() ? nbd_get_error() : "unknown libnbd error"));
}

void Usage() {
  std::fprintf(
      stderr,
      "usage: apply_diff_bench [--format F] [--chunk N] [--offset N] [--trim] [--dry-run]\n"
      "                        OLD.raw|none NEW.raw TARGET\n"
      "       apply_diff_bench [--chunk N] [--seed S] --churn PCT --alloc-from IMG.raw TARGET\n");
  std::exit(2);
}

// Data extents [begin, end) of a (sparse) file, from SEEK_DATA/SEEK_HOLE.
std::vector<std::pair<uint64_t, uint64_t>> DataExtents(int fd, uint64_t size) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  off_t pos = 0;
  while (static_cast<uint64_t>(pos) < size) {
    off_t data = lseek(fd, pos, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break;
      Die(std::string("lseek SEEK_DATA: ") + std::strerror(errno));
    }
    off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole < 0) hole = static_cast<off_t>(size);
    out.push_back({static_cast<uint64_t>(data), static_cast<uint64_t>(hole)});
    pos = hole;
  }
  return out;
}

void PreadFull(int fd, uint8_t* buf, size_t n, uint64_t off) {
  size_t done = 0;
  while (done < n) {
    ssize_t r = pread(fd, buf + done, n - done, static_cast<off_t>(off + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      Die(std::string("pread: ") + std::strerror(errno));
    }
    if (r == 0) {  // past EOF reads as zeros
      std::memset(buf + done, 0, n - done);
      return;
    }
    done += static_cast<size_t>(r);
  }
}

bool AllZero(const uint8_t* p, size_t n) {
  static const uint8_t zeros[64 * 1024] = {};
  while (n > 0) {
    size_t k = std::min(n, sizeof(zeros));
    if (std::memcmp(p, zeros, k) != 0) return false;
    p += k;
    n -= k;
  }
  return true;
}

uint64_t FileSize(int fd) {
  off_t end = lseek(fd, 0, SEEK_END);
  if (end < 0) Die(std::string("lseek SEEK_END: ") + std::strerror(errno));
  return static_cast<uint64_t>(end);
}

class Target {
 public:
  Target(const Args& a) : dry_(a.dry_run) {
    if (dry_) return;
    h_ = nbd_create();
    if (!h_) NbdDie("nbd_create");
    if (a.target.rfind("nbd://", 0) == 0 || a.target.rfind("nbd+unix://", 0) == 0) {
      if (nbd_connect_uri(h_, a.target.c_str()) == -1) NbdDie("connect " + a.target);
    } else {
      std::string fmt = "--format=" + a.format;
      std::string path = a.target;
      const char* argv[] = {"qemu-nbd", fmt.c_str(), "--cache=writeback", path.c_str(), nullptr};
      if (nbd_connect_systemd_socket_activation(h_, const_cast<char**>(argv)) == -1)
        NbdDie("start qemu-nbd on " + a.target);
    }
    if (nbd_is_read_only(h_) == 1) Die("target " + a.target + " is read-only");
    size_ = static_cast<uint64_t>(nbd_get_size(h_));
  }
  ~Target() {
    if (!h_) return;
    if (nbd_flush(h_, 0) == -1) NbdDie("flush");
    nbd_shutdown(h_, 0);
    nbd_close(h_);  // waits for the qemu-nbd it started: the bitmap is saved on exit
  }
  uint64_t size() const { return size_; }
  void Write(const uint8_t* buf, uint64_t len, uint64_t off) {
    if (dry_) return;
    if (nbd_pwrite(h_, buf, len, off, 0) == -1) NbdDie("write at " + std::to_string(off));
  }
  void Zero(uint64_t len, uint64_t off, bool trim) {
    if (dry_) return;
    int r = trim ? nbd_trim(h_, len, off, 0) : nbd_zero(h_, len, off, 0);
    if (r == -1) NbdDie(std::string(trim ? "trim" : "zero") + " at " + std::to_string(off));
  }

 private:
  bool dry_;
  nbd_handle* h_ = nullptr;
  uint64_t size_ = UINT64_MAX;
};

struct Counts {
  uint64_t compared = 0, changed_chunks = 0, written = 0, zeroed = 0, write_requests = 0;
};

void ApplyDiff(const Args& a, Target& t, Counts& c) {
  int nfd = open(a.new_path.c_str(), O_RDONLY);
  if (nfd < 0) Die("open " + a.new_path + ": " + std::strerror(errno));
  int ofd = -1;
  if (a.old_path != "none") {
    ofd = open(a.old_path.c_str(), O_RDONLY);
    if (ofd < 0) Die("open " + a.old_path + ": " + std::strerror(errno));
  }
  const uint64_t size = FileSize(nfd);
  if (ofd >= 0 && FileSize(ofd) != size) Die("OLD and NEW differ in size");
  if (a.offset + size > t.size()) Die("target is smaller than offset + image size");

  // Pieces where either image has data (holes in both are equal).
  auto ext = DataExtents(nfd, size);
  if (ofd >= 0) {
    auto oe = DataExtents(ofd, size);
    ext.insert(ext.end(), oe.begin(), oe.end());
  }
  std::vector<uint64_t> pieces;  // chunk indices to compare, sorted, unique
  for (auto [b, e] : ext)
    for (uint64_t i = b / a.chunk; i * a.chunk < e; i++) pieces.push_back(i);
  std::sort(pieces.begin(), pieces.end());
  pieces.erase(std::unique(pieces.begin(), pieces.end()), pieces.end());

  constexpr uint64_t kBatch = 4u << 20;  // read 4 MiB of consecutive chunks at a time
  std::vector<uint8_t> nb(kBatch + a.chunk), ob(kBatch + a.chunk);
  size_t i = 0;
  while (i < pieces.size()) {
    size_t j = i + 1;  // a run of consecutive chunks, at most kBatch long
    while (j < pieces.size() && pieces[j] == pieces[j - 1] + 1 && (j - i + 1) * a.chunk <= kBatch)
      j++;
    const uint64_t off = pieces[i] * a.chunk;
    const uint64_t len = std::min<uint64_t>((j - i) * a.chunk, size - off);
    PreadFull(nfd, nb.data(), len, off);
    if (ofd >= 0)
      PreadFull(ofd, ob.data(), len, off);
    else
      std::memset(ob.data(), 0, len);
    for (uint64_t p = 0; p < len; p += a.chunk) {
      const uint64_t n = std::min(a.chunk, len - p);
      c.compared += n;
      if (std::memcmp(nb.data() + p, ob.data() + p, n) == 0) continue;
      c.changed_chunks++;
      c.write_requests++;
      if (AllZero(nb.data() + p, n)) {
        t.Zero(n, a.offset + off + p, a.trim);
        c.zeroed += n;
      } else {
        t.Write(nb.data() + p, n, a.offset + off + p);
        c.written += n;
      }
    }
    i = j;
  }
  close(nfd);
  if (ofd >= 0) close(ofd);
}

void ApplyChurn(const Args& a, Target& t, Counts& c) {
  int fd = open(a.alloc_from.c_str(), O_RDONLY);
  if (fd < 0) Die("open " + a.alloc_from + ": " + std::strerror(errno));
  const uint64_t size = FileSize(fd);
  if (a.offset + size > t.size()) Die("target is smaller than offset + image size");
  uint64_t allocated = 0;
  std::vector<uint64_t> pieces;
  for (auto [b, e] : DataExtents(fd, size)) {
    allocated += e - b;
    for (uint64_t i = b / a.chunk; i * a.chunk < e; i++)
      if (pieces.empty() || pieces.back() != i) pieces.push_back(i);
  }
  close(fd);
  const uint64_t want = static_cast<uint64_t>(static_cast<double>(allocated) * a.churn_pct / 100.0);
  const size_t n = std::min<size_t>(pieces.size(), (want + a.chunk - 1) / a.chunk);
  std::mt19937_64 rng(a.seed);
  std::shuffle(pieces.begin(), pieces.end(), rng);
  pieces.resize(n);
  std::sort(pieces.begin(), pieces.end());
  std::vector<uint8_t> buf(a.chunk);
  for (uint64_t idx : pieces) {
    for (size_t k = 0; k + 8 <= buf.size(); k += 8) {
      uint64_t v = rng();
      std::memcpy(buf.data() + k, &v, 8);
    }
    const uint64_t off = idx * a.chunk;
    const uint64_t len = std::min(a.chunk, size - off);
    t.Write(buf.data(), len, a.offset + off);
    c.compared += len;
    c.changed_chunks++;
    c.write_requests++;
    c.written += len;
  }
  std::fprintf(stderr, "apply_diff_bench: churn %.2f%% of %llu allocated bytes: %zu pieces\n",
               a.churn_pct, static_cast<unsigned long long>(allocated), n);
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  std::vector<std::string> pos;
  for (int i = 1; i < argc; i++) {
    std::string s = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) Usage();
      return argv[++i];
    };
    if (s == "--format")
      a.format = next();
    else if (s == "--chunk")
      a.chunk = std::strtoull(next().c_str(), nullptr, 0);
    else if (s == "--offset")
      a.offset = std::strtoull(next().c_str(), nullptr, 0);
    else if (s == "--trim")
      a.trim = true;
    else if (s == "--dry-run")
      a.dry_run = true;
    else if (s == "--seed")
      a.seed = std::strtoull(next().c_str(), nullptr, 0);
    else if (s == "--churn")
      a.churn_pct = std::strtod(next().c_str(), nullptr);
    else if (s == "--alloc-from")
      a.alloc_from = next();
    else if (s == "-h" || s == "--help")
      Usage();
    else if (!s.empty() && s[0] == '-')
      Usage();
    else
      pos.push_back(s);
  }
  if (a.chunk == 0 || a.chunk > (32u << 20) || a.chunk % 512 != 0) Die("bad --chunk", 2);
  const bool churn = a.churn_pct >= 0;
  if (churn ? (pos.size() != 1 || a.alloc_from.empty()) : pos.size() != 3) Usage();
  a.target = pos.back();
  if (!churn) {
    a.old_path = pos[0];
    a.new_path = pos[1];
  }

  auto start = std::chrono::steady_clock::now();
  Counts c;
  {
    Target t(a);
    if (churn)
      ApplyChurn(a, t, c);
    else
      ApplyDiff(a, t, c);
  }  // disconnect: qemu-nbd exits and saves the bitmaps
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf(
      "{\"mode\":\"%s\",\"chunk\":%llu,\"compared_bytes\":%llu,\"changed_chunks\":%llu,"
      "\"written_bytes\":%llu,\"zeroed_bytes\":%llu,\"requests\":%llu,\"seconds\":%.3f}\n",
      churn ? "churn" : "diff", static_cast<unsigned long long>(a.chunk),
      static_cast<unsigned long long>(c.compared),
      static_cast<unsigned long long>(c.changed_chunks), static_cast<unsigned long long>(c.written),
      static_cast<unsigned long long>(c.zeroed), static_cast<unsigned long long>(c.write_requests),
      secs);
  return 0;
}
