// BlockSource over real NBD servers: qemu-nbd started by OpenImageFile,
// qemu-nbd and nbdkit started by the test for OpenNbdUri. Images are made
// with qemu-img and written with qemu-io.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "base/subprocess.h"
#include "gtest/gtest.h"
#include "nbd-client/block_source.h"
#include "tests/test_util.h"

namespace vmdedup {

// For gtest messages (found by ADL).
void PrintTo(const Extent& e, std::ostream* os) {
  *os << "{" << e.offset << ", " << e.length << ", " << e.flags << "}";
}

namespace {

using testing::RunCommand;
using testing::ScratchDir;

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * KiB;

// A server the test starts and stops by pid.
class Background {
 public:
  explicit Background(const std::vector<std::string>& argv) {
    pid_ = fork();
    if (pid_ == 0) {
      // Dies with the test, even when the test is killed.
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      int devnull = open("/dev/null", O_RDWR);
      dup2(devnull, 0);
      dup2(devnull, 1);
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execvp(args[0], args.data());
      _exit(127);
    }
  }
  ~Background() { Kill(SIGKILL); }
  pid_t pid() const { return pid_; }
  void Kill(int sig) {
    if (pid_ <= 0) return;
    kill(pid_, sig);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  // Kills without reaping (for a thread racing a read); Kill() reaps.
  void Signal(int sig) {
    if (pid_ > 0) kill(pid_, sig);
  }

 private:
  pid_t pid_ = -1;
};

bool WaitForSocket(const std::string& path) {
  for (int i = 0; i < 1000; i++) {
    struct stat st;
    if (stat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

// Children of this process (live or zombie): every server must be gone.
std::vector<std::string> ChildProcesses() {
  std::vector<std::string> children;
  DIR* d = opendir("/proc");
  if (d == nullptr) return children;
  const std::string me = std::to_string(getpid());
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    std::ifstream in(std::string("/proc/") + e->d_name + "/stat");
    std::string stat;
    std::getline(in, stat);
    size_t close = stat.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(stat.substr(close + 2));
    std::string state, ppid;
    rest >> state >> ppid;
    if (ppid == me) children.push_back(stat.substr(0, close + 1) + " " + state);
  }
  closedir(d);
  return children;
}

void MustRun(const std::vector<std::string>& argv) {
  auto r = RunCommand(argv);
  ASSERT_EQ(r.exit_code, 0) << argv[0] << " " << (argv.size() > 1 ? argv[1] : "") << ": " << r.err;
}

std::string WriteFile(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
  return path;
}

std::vector<Extent> Ex(std::initializer_list<Extent> e) { return e; }

std::string NbdUri(const std::string& socket) { return "nbd+unix:///?socket=" + socket; }

class NbdSourceTest : public ::testing::Test {
 protected:
  void TearDown() override { EXPECT_TRUE(ChildProcesses().empty()) << ChildProcesses()[0]; }

  std::unique_ptr<BlockSource> OpenFile(const std::string& path, const std::string& format,
                                        std::optional<std::string> bitmap = std::nullopt) {
    ImageFileOptions o;
    o.path = path;
    o.format = format;
    o.bitmap = bitmap;
    o.max_in_flight = 4;
    auto r = OpenImageFile(o);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    if (!r.ok()) return nullptr;
    return std::move(r).value();
  }

  // A 16 MiB qcow2 with an enabled persistent bitmap "b1", then written by
  // qemu-io (which records the writes in b1 when it closes the image).
  std::string MakeImageWithBitmap() {
    std::string img = dir_.Sub("disk.qcow2");
    MustRun({"qemu-img", "create", "-q", "-f", "qcow2", img, "16M"});
    MustRun({"qemu-img", "bitmap", "--add", img, "b1"});
    MustRun({"qemu-io", "-f", "qcow2", "-c", "write -P 0xab 1M 64k", "-c", "write -P 0xcd 4M 100k",
             "-c", "write -P 0xef 10244k 4k", img});
    return img;
  }

  ScratchDir dir_;
};

TEST_F(NbdSourceTest, QcowAllocationMap) {
  std::string img = dir_.Sub("a.qcow2");
  MustRun({"qemu-img", "create", "-q", "-f", "qcow2", img, "16M"});
  MustRun({"qemu-io", "-f", "qcow2", "-c", "write -P 0xab 1M 256k", "-c", "discard 1M 64k", "-c",
           "write -P 0xcd 12M 64k", img});
  auto src = OpenFile(img, "qcow2");
  ASSERT_TRUE(src);
  EXPECT_EQ(src->size(), 16 * MiB);
  EXPECT_EQ(src->Describe(), "file:" + img + " (qcow2)");
  EXPECT_FALSE(src->has_dirty_map());

  std::vector<Extent> ext;
  ASSERT_TRUE(src->Allocation(0, 16 * MiB, &ext).ok());
  const uint32_t kHZ = Extent::kHole | Extent::kZero;
  EXPECT_EQ(ext, Ex({{0, MiB + 64 * KiB, kHZ},
                     {MiB + 64 * KiB, 192 * KiB, 0},
                     {MiB + 256 * KiB, 12 * MiB - MiB - 256 * KiB, kHZ},
                     {12 * MiB, 64 * KiB, 0},
                     {12 * MiB + 64 * KiB, 4 * MiB - 64 * KiB, kHZ}}));

  // A range that starts and ends inside extents is clipped exactly.
  ASSERT_TRUE(src->Allocation(MiB + 100, 200 * KiB, &ext).ok());
  EXPECT_EQ(
      ext, Ex({{MiB + 100, 64 * KiB - 100, kHZ}, {MiB + 64 * KiB, 200 * KiB - 64 * KiB + 100, 0}}));

  ASSERT_TRUE(src->Allocation(0, 0, &ext).ok());
  EXPECT_TRUE(ext.empty());
  Status st = src->Allocation(16 * MiB - 4096, 8192, &ext);
  EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
  st = src->Dirty(0, MiB, &ext);
  EXPECT_EQ(st.code(), Status::Code::kNotSupported) << st.ToString();
}

TEST_F(NbdSourceTest, AllocationOfLargeSparseImageCoversEverything) {
  // 5 GiB virtual: more than one 1 GiB block status request, and more than
  // 4 GiB (32-bit lengths).
  std::string img = dir_.Sub("big.qcow2");
  MustRun({"qemu-img", "create", "-q", "-f", "qcow2", img, "5G"});
  MustRun(
      {"qemu-io", "-f", "qcow2", "-c", "write -P 1 2560M 128k", "-c", "write -P 2 4607M 1M", img});
  auto src = OpenFile(img, "qcow2");
  ASSERT_TRUE(src);
  std::vector<Extent> ext;
  ASSERT_TRUE(src->Allocation(0, src->size(), &ext).ok());
  const uint32_t kHZ = Extent::kHole | Extent::kZero;
  EXPECT_EQ(ext, Ex({{0, 2560 * MiB, kHZ},
                     {2560 * MiB, 128 * KiB, 0},
                     {2560 * MiB + 128 * KiB, 4607 * MiB - 2560 * MiB - 128 * KiB, kHZ},
                     {4607 * MiB, MiB, 0},
                     {4608 * MiB, 5120 * MiB - 4608 * MiB, kHZ}}));
}

TEST_F(NbdSourceTest, DirtyBitmapShowsExactlyTheWrittenRanges) {
  std::string img = MakeImageWithBitmap();
  auto src = OpenFile(img, "qcow2", "b1");
  ASSERT_TRUE(src);
  ASSERT_TRUE(src->has_dirty_map());
  std::vector<Extent> ext;
  ASSERT_TRUE(src->Dirty(0, src->size(), &ext).ok());
  // 64 KiB granularity: 100k dirties two granules, 4k one.
  EXPECT_EQ(ext, Ex({{0, MiB, 0},
                     {MiB, 64 * KiB, 1},
                     {MiB + 64 * KiB, 3 * MiB - 64 * KiB, 0},
                     {4 * MiB, 128 * KiB, 1},
                     {4 * MiB + 128 * KiB, 6 * MiB - 128 * KiB, 0},
                     {10 * MiB, 64 * KiB, 1},
                     {10 * MiB + 64 * KiB, 6 * MiB - 64 * KiB, 0}}));
  ASSERT_TRUE(src->Dirty(4 * MiB + 4096, 100, &ext).ok());
  EXPECT_EQ(ext, Ex({{4 * MiB + 4096, 100, 1}}));

  // The data that was written, and zeros around it.
  std::vector<uint8_t> a(64 * KiB), b(100 * KiB), c(4 * KiB), z(64 * KiB, 0xff);
  std::vector<ReadRequest> reqs = {{MiB, 64 * KiB, a.data()},
                                   {4 * MiB, 100 * KiB, b.data()},
                                   {10244 * KiB, 4 * KiB, c.data()},
                                   {8 * MiB, 64 * KiB, z.data()}};
  ASSERT_TRUE(src->ReadMany(reqs).ok());
  EXPECT_EQ(a, std::vector<uint8_t>(64 * KiB, 0xab));
  EXPECT_EQ(b, std::vector<uint8_t>(100 * KiB, 0xcd));
  EXPECT_EQ(c, std::vector<uint8_t>(4 * KiB, 0xef));
  EXPECT_EQ(z, std::vector<uint8_t>(64 * KiB, 0));
  src.reset();

  // Serving it read-only left the bitmap as it was: enabled, consistent.
  auto info = RunCommand({"qemu-img", "info", img});
  EXPECT_EQ(info.exit_code, 0) << info.err;
  EXPECT_NE(info.out.find("auto"), std::string::npos) << info.out;
  EXPECT_EQ(info.out.find("in-use"), std::string::npos) << info.out;
}

TEST_F(NbdSourceTest, ReadManyReturnsTheImageBytes) {
  // 40 MiB of random data, as raw and as qcow2.
  const std::string data = testing::RandomBytes(40 * MiB, 7);
  std::string raw = WriteFile(dir_.Sub("r.raw"), data);
  std::string qcow = dir_.Sub("r.qcow2");
  MustRun({"qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow});

  std::vector<std::pair<uint64_t, uint32_t>> ranges = {
      {0, 9 * MiB},             // split into 4 MiB pieces
      {9 * MiB + 1, 1},         // one byte
      {13 * MiB + 123, 5000},   // unaligned
      {40 * MiB - 4096, 4096},  // the last block
      {4 * MiB, 32 * MiB},      // the largest request
      {0, 0},                   // empty
  };
  for (int i = 0; i < 100; i++) ranges.emplace_back((i * 7919ull * 4096) % (39 * MiB), 64 * KiB);

  for (const auto& [path, format] : {std::pair{raw, "raw"}, std::pair{qcow, "qcow2"}}) {
    SCOPED_TRACE(format);
    auto src = OpenFile(path, format);
    ASSERT_TRUE(src);
    EXPECT_EQ(src->size(), 40 * MiB);
    std::vector<std::vector<uint8_t>> bufs;
    std::vector<ReadRequest> reqs;
    for (const auto& [off, len] : ranges) bufs.emplace_back(len);
    for (size_t i = 0; i < ranges.size(); i++) {
      reqs.push_back({ranges[i].first, ranges[i].second, bufs[i].data()});
    }
    Status st = src->ReadMany(reqs);
    ASSERT_TRUE(st.ok()) << st.ToString();
    for (size_t i = 0; i < ranges.size(); i++) {
      if (ranges[i].second == 0) continue;
      ASSERT_EQ(0, std::memcmp(bufs[i].data(), data.data() + ranges[i].first, ranges[i].second))
          << "request " << i << " at " << ranges[i].first;
    }
    EXPECT_TRUE(src->ReadMany({}).ok());

    // Bad requests fail before anything is sent; the source stays usable.
    std::vector<uint8_t> big(32 * MiB + 1);
    ReadRequest too_big{0, static_cast<uint32_t>(big.size()), big.data()};
    EXPECT_TRUE(src->ReadMany({&too_big, 1}).IsInvalidArgument());
    ReadRequest past_end{40 * MiB - 10, 20, big.data()};
    EXPECT_TRUE(src->ReadMany({&past_end, 1}).IsInvalidArgument());
    ReadRequest no_buffer{0, 10, nullptr};
    EXPECT_TRUE(src->ReadMany({&no_buffer, 1}).IsInvalidArgument());
    ReadRequest fine{0, 4096, big.data()};
    EXPECT_TRUE(src->ReadMany({&fine, 1}).ok());
  }
}

TEST_F(NbdSourceTest, RawSparseFile) {
  std::string img = dir_.Sub("s.raw");
  MustRun({"truncate", "-s", "16M", img});
  MustRun({"qemu-io", "-f", "raw", "-c", "write -P 0x11 2M 64k", img});
  auto src = OpenFile(img, "raw");
  ASSERT_TRUE(src);
  EXPECT_EQ(src->Describe(), "file:" + img + " (raw)");
  std::vector<Extent> ext;
  ASSERT_TRUE(src->Allocation(0, src->size(), &ext).ok());
  ASSERT_FALSE(ext.empty());
  uint64_t pos = 0;
  for (const Extent& e : ext) {
    EXPECT_EQ(e.offset, pos);
    pos += e.length;
    // The written range is data; the file system may report more as data.
    if (e.offset < 2 * MiB + 64 * KiB && e.offset + e.length > 2 * MiB) {
      EXPECT_EQ(e.flags, 0u) << ::testing::PrintToString(e);
    }
  }
  EXPECT_EQ(pos, 16 * MiB);
  EXPECT_EQ(ext[0].flags, Extent::kHole | Extent::kZero) << ::testing::PrintToString(ext[0]);
  std::vector<uint8_t> buf(64 * KiB);
  ReadRequest r{2 * MiB, 64 * KiB, buf.data()};
  ASSERT_TRUE(src->ReadMany({&r, 1}).ok());
  EXPECT_EQ(buf, std::vector<uint8_t>(64 * KiB, 0x11));
}

TEST_F(NbdSourceTest, MissingFileDirectoryAndBadOptions) {
  auto r = OpenImageFile({.path = dir_.Sub("nope.qcow2"), .format = "qcow2"});
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsNotFound()) << r.status().ToString();
  EXPECT_NE(r.status().message().find(dir_.Sub("nope.qcow2")), std::string::npos);

  r = OpenImageFile({.path = dir_.path(), .format = "raw"});
  EXPECT_TRUE(r.status().IsInvalidArgument()) << r.status().ToString();

  std::string raw = dir_.Sub("x.raw");
  MustRun({"truncate", "-s", "1M", raw});
  r = OpenImageFile({.path = raw, .format = "raw", .bitmap = "b1"});
  EXPECT_TRUE(r.status().IsInvalidArgument()) << r.status().ToString();
  r = OpenImageFile({.path = raw, .format = "qcow2; rm -rf /"});
  EXPECT_TRUE(r.status().IsInvalidArgument()) << r.status().ToString();
  // A raw file is not a qcow2 image.
  r = OpenImageFile({.path = raw, .format = "qcow2"});
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsInvalidArgument()) << r.status().ToString();
  EXPECT_NE(r.status().message().find("qcow2"), std::string::npos) << r.status().ToString();
}

TEST_F(NbdSourceTest, MissingBitmapIsNotFound) {
  std::string img = MakeImageWithBitmap();
  auto r = OpenImageFile({.path = img, .format = "qcow2", .bitmap = "nope"});
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsNotFound()) << r.status().ToString();
  EXPECT_NE(r.status().message().find("'nope'"), std::string::npos) << r.status().ToString();
  EXPECT_NE(r.status().message().find(img), std::string::npos) << r.status().ToString();
}

TEST_F(NbdSourceTest, InconsistentBitmapIsCorruptionAndImageStillReadable) {
  std::string img = MakeImageWithBitmap();
  {
    // A writer that dies without closing the image leaves b1 "in-use".
    std::string sock = dir_.Sub("w.sock");
    Background writer({"qemu-nbd", "--persistent", "-f", "qcow2", "-k", sock, img});
    ASSERT_TRUE(WaitForSocket(sock));
    // Once it serves, it has marked the bitmap in use.
    MustRun({"nbdinfo", "--size", NbdUri(sock)});
    writer.Kill(SIGKILL);
  }
  auto r = OpenImageFile({.path = img, .format = "qcow2", .bitmap = "b1"});
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsCorruption()) << r.status().ToString();
  EXPECT_NE(r.status().message().find("'b1'"), std::string::npos) << r.status().ToString();
  // Without the bitmap the image is served (the fallback: a full read).
  auto src = OpenFile(img, "qcow2");
  ASSERT_TRUE(src);
  std::vector<uint8_t> a(64 * KiB);
  ReadRequest req{MiB, 64 * KiB, a.data()};
  ASSERT_TRUE(src->ReadMany({&req, 1}).ok());
  EXPECT_EQ(a, std::vector<uint8_t>(64 * KiB, 0xab));
}

TEST_F(NbdSourceTest, ImageInUseIsBusy) {
  std::string img = MakeImageWithBitmap();
  std::string sock = dir_.Sub("w.sock");
  Background writer({"qemu-nbd", "-f", "qcow2", "-k", sock, img});
  ASSERT_TRUE(WaitForSocket(sock));
  auto r = OpenImageFile({.path = img, .format = "qcow2"});
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsBusy()) << r.status().ToString();
  EXPECT_NE(r.status().message().find(img), std::string::npos) << r.status().ToString();
  writer.Kill(SIGTERM);
}

TEST_F(NbdSourceTest, NbdUriWithAndWithoutBitmap) {
  std::string img = MakeImageWithBitmap();
  std::string sock = dir_.Sub("s.sock");
  Background server({"qemu-nbd", "--persistent", "-r", "-f", "qcow2", "-B", "b1", "-k", sock, img});
  ASSERT_TRUE(WaitForSocket(sock));

  auto r = OpenNbdUri({.uri = NbdUri(sock), .bitmap = "b1"});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  auto src = std::move(r).value();
  EXPECT_EQ(src->Describe(), NbdUri(sock));
  EXPECT_EQ(src->size(), 16 * MiB);
  ASSERT_TRUE(src->has_dirty_map());
  std::vector<Extent> ext;
  ASSERT_TRUE(src->Dirty(0, 2 * MiB, &ext).ok());
  EXPECT_EQ(ext, Ex({{0, MiB, 0}, {MiB, 64 * KiB, 1}, {MiB + 64 * KiB, MiB - 64 * KiB, 0}}));
  ASSERT_TRUE(src->Allocation(0, 2 * MiB, &ext).ok());
  EXPECT_EQ(ext, Ex({{0, MiB, 3}, {MiB, 64 * KiB, 0}, {MiB + 64 * KiB, MiB - 64 * KiB, 3}}));
  std::vector<uint8_t> a(64 * KiB);
  ReadRequest req{MiB, 64 * KiB, a.data()};
  ASSERT_TRUE(src->ReadMany({&req, 1}).ok());
  EXPECT_EQ(a, std::vector<uint8_t>(64 * KiB, 0xab));
  src.reset();

  // A bitmap the server does not export: no dirty map, not an error.
  r = OpenNbdUri({.uri = NbdUri(sock), .bitmap = "nope"});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_FALSE(r.value()->has_dirty_map());
  Status st = r.value()->Dirty(0, MiB, &ext);
  EXPECT_EQ(st.code(), Status::Code::kNotSupported) << st.ToString();
  EXPECT_TRUE(r.value()->Allocation(0, MiB, &ext).ok());
  r = Status::NotFound("released");  // closes the connection

  // Without a bitmap.
  r = OpenNbdUri({.uri = NbdUri(sock), .io_timeout_seconds = 30});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_FALSE(r.value()->has_dirty_map());
  r = Status::NotFound("released");

  server.Kill(SIGTERM);
  r = OpenNbdUri({.uri = NbdUri(dir_.Sub("absent.sock"))});
  EXPECT_TRUE(r.status().IsIOError()) << r.status().ToString();
}

TEST_F(NbdSourceTest, ServerThatNeverAnswersTheHandshakeTimesOut) {
  std::string img = MakeImageWithBitmap();
  std::string sock = dir_.Sub("s.sock");
  // qemu-nbd serves one client at a time (--shared=1): while the first is
  // connected, a second connection waits for the handshake.
  Background server({"qemu-nbd", "--persistent", "-r", "-f", "qcow2", "-k", sock, img});
  ASSERT_TRUE(WaitForSocket(sock));
  auto first = OpenNbdUri({.uri = NbdUri(sock), .io_timeout_seconds = 30});
  ASSERT_TRUE(first.ok()) << first.status().ToString();

  auto start = std::chrono::steady_clock::now();
  auto second = OpenNbdUri({.uri = NbdUri(sock), .io_timeout_seconds = 1});
  auto waited = std::chrono::steady_clock::now() - start;
  ASSERT_FALSE(second.ok());
  EXPECT_TRUE(second.status().IsIOError()) << second.status().ToString();
  EXPECT_NE(second.status().message().find("handshake"), std::string::npos)
      << second.status().ToString();
  EXPECT_GE(waited, std::chrono::milliseconds(900));
  EXPECT_LT(waited, std::chrono::seconds(20));  // never the default of 300 s

  // Once the first client leaves, the server serves again.
  first = Status::NotFound("released");
  auto third = OpenNbdUri({.uri = NbdUri(sock), .io_timeout_seconds = 30});
  EXPECT_TRUE(third.ok()) << third.status().ToString();
  third = Status::NotFound("released");
  server.Kill(SIGTERM);
}

TEST_F(NbdSourceTest, ShortBlockStatusRepliesAreFollowedUp) {
  // An nbdkit server that answers each block status request with a single
  // extent, up to the end of the 1 MiB block: types hole+zero, data, zero.
  const char* extents =
      "b=$(( $4 / 1048576 )); s=$(( b * 1048576 )); "
      "case $(( b % 3 )) in 0) t=hole,zero;; 1) t=;; 2) t=zero;; esac; "
      "echo \"$4 $(( s + 1048576 - $4 )) $t\"";
  std::string sock = dir_.Sub("k.sock");
  Background server({"nbdkit", "-f", "-U", sock, "eval", "get_size=echo 8M",
                     "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
                     std::string("extents=") + extents});
  ASSERT_TRUE(WaitForSocket(sock));
  auto r = OpenNbdUri({.uri = NbdUri(sock), .bitmap = "b1"});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_FALSE(r.value()->has_dirty_map());
  std::vector<Extent> ext;
  ASSERT_TRUE(r.value()->Allocation(MiB / 2, 7 * MiB, &ext).ok());
  EXPECT_EQ(ext, Ex({{MiB / 2, MiB / 2, 3},
                     {MiB, MiB, 0},
                     {2 * MiB, MiB, 2},
                     {3 * MiB, MiB, 3},
                     {4 * MiB, MiB, 0},
                     {5 * MiB, MiB, 2},
                     {6 * MiB, MiB, 3},
                     {7 * MiB, MiB / 2, 0}}));
  r = Status::NotFound("released");
  server.Kill(SIGTERM);
}

TEST_F(NbdSourceTest, ServerKilledDuringReadManyFailsWithIOError) {
  std::string sock = dir_.Sub("slow.sock");
  Background server(
      {"nbdkit", "-f", "-U", sock, "--filter=delay", "memory", "256M", "rdelay=200ms"});
  ASSERT_TRUE(WaitForSocket(sock));
  auto r = OpenNbdUri({.uri = NbdUri(sock), .max_in_flight = 8});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  auto src = std::move(r).value();

  // 256 reads of 64 KiB at 8 in flight and 200 ms each: several seconds.
  std::vector<uint8_t> buf(16 * MiB);
  std::vector<ReadRequest> reqs;
  for (uint64_t off = 0; off < buf.size(); off += 64 * KiB) {
    reqs.push_back({off, 64 * KiB, buf.data() + off});
  }
  std::thread killer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    server.Signal(SIGKILL);
  });
  auto start = std::chrono::steady_clock::now();
  Status st = src->ReadMany(reqs);
  auto elapsed = std::chrono::steady_clock::now() - start;
  killer.join();
  server.Kill(SIGKILL);
  EXPECT_TRUE(st.IsIOError()) << st.ToString();
  EXPECT_NE(st.message().find("offset"), std::string::npos) << st.ToString();
  EXPECT_LT(elapsed, std::chrono::seconds(5));

  // The source stays dead, without hanging or crashing.
  std::vector<Extent> ext;
  EXPECT_TRUE(src->ReadMany(reqs).IsIOError());
  EXPECT_TRUE(src->Allocation(0, MiB, &ext).IsIOError());
}

TEST_F(NbdSourceTest, SilentServerTimesOut) {
  std::string sock = dir_.Sub("stuck.sock");
  Background server({"nbdkit", "-f", "-U", sock, "--filter=delay", "memory", "64M", "rdelay=30"});
  ASSERT_TRUE(WaitForSocket(sock));
  auto r = OpenNbdUri({.uri = NbdUri(sock), .io_timeout_seconds = 1});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  std::vector<uint8_t> buf(MiB);
  ReadRequest req{0, MiB, buf.data()};
  auto start = std::chrono::steady_clock::now();
  Status st = r.value()->ReadMany({&req, 1});
  EXPECT_TRUE(st.IsIOError()) << st.ToString();
  EXPECT_NE(st.message().find("no reply"), std::string::npos) << st.ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  r = Status::NotFound("released");
  server.Kill(SIGKILL);
}

TEST_F(NbdSourceTest, QemuNbdKilledBetweenCallsFailsWithIOError) {
  std::string img = MakeImageWithBitmap();
  auto src = OpenFile(img, "qcow2");
  ASSERT_TRUE(src);
  // The qemu-nbd that OpenImageFile started is our only child.
  std::vector<std::string> children = ChildProcesses();
  ASSERT_EQ(children.size(), 1u);
  EXPECT_NE(children[0].find("qemu-nbd"), std::string::npos) << children[0];
  pid_t pid = std::stoi(children[0]);
  kill(pid, SIGKILL);
  std::vector<uint8_t> buf(MiB);
  ReadRequest req{0, MiB, buf.data()};
  Status st = src->ReadMany({&req, 1});
  EXPECT_TRUE(st.IsIOError()) << st.ToString();
  std::vector<Extent> ext;
  EXPECT_TRUE(src->Allocation(0, MiB, &ext).IsIOError());
  src.reset();  // reaps qemu-nbd; TearDown checks
}

}  // namespace
}  // namespace vmdedup
