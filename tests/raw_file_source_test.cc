// The direct reader of raw images (nbd-client/raw_file_source.h): its
// allocation map, size and bytes against what qemu-nbd -f raw serves for the
// same file (through nbdinfo and OpenImageFile), its errors, and QEMU's image
// locks both ways with the real qemu-nbd, qemu-io and qemu-system.
#include "nbd-client/raw_file_source.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "gtest/gtest.h"
#include "nbd-client/block_source.h"
#include "tests/test_util.h"

namespace vmdedup {

// For gtest messages (found by ADL).
void PrintTo(const Extent& e, std::ostream* os) {
  *os << "{" << e.offset << ", " << e.length << ", " << e.flags << "}";
}

namespace {

using testing::FileSha256;
using testing::RandomBytes;
using testing::RunCommand;
using testing::RunShell;
using testing::ScratchDir;

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * KiB;
constexpr uint32_t kHole = Extent::kHole | Extent::kZero;

bool Has(const Status& st, const std::string& text) {
  return st.message().find(text) != std::string::npos;
}

// A process the test starts (stdout and stderr to `log`) and kills by pid.
class Background {
 public:
  Background(const std::vector<std::string>& argv, const std::string& log)
      : pid_(testing::SpawnLogged(argv, log)) {}
  ~Background() { Kill(); }
  bool started() const { return pid_ > 0; }
  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  int pid_;
};

// True when /proc/locks shows a lock of any process covering `byte` of
// `path` (without taking one).
bool HoldsLock(const std::string& path, uint64_t byte) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) return false;
  std::ifstream in("/proc/locks");
  std::string line;
  const std::string inode = ":" + std::to_string(st.st_ino);
  while (std::getline(in, line)) {
    // "1: OFDLCK ADVISORY  READ -1 fe:00:1066329 100 101"
    std::istringstream f(line);
    std::string id, kind, mode, type, pid, dev, start, end;
    if (!(f >> id >> kind >> mode >> type >> pid >> dev >> start >> end)) continue;
    if (dev.size() < inode.size() || dev.compare(dev.size() - inode.size(), inode.size(), inode))
      continue;
    if (std::stoull(start) <= byte && (end == "EOF" || byte <= std::stoull(end))) return true;
  }
  return false;
}

// Waits (up to 30 s) until some process holds a lock on `byte` of `path`:
// a qemu-nbd or a VM takes its locks only after it listens on its sockets.
bool WaitForLock(const std::string& path, uint64_t byte) {
  for (int i = 0; i < 600; i++) {
    if (HoldsLock(path, byte)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

class RawFileSourceTest : public ::testing::Test {
 protected:
  // Writes `bytes` at `offset` of `path` (created if missing).
  static void PWrite(const std::string& path, uint64_t offset, const std::string& bytes) {
    int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    ASSERT_GE(fd, 0) << strerror(errno);
    ASSERT_EQ(pwrite(fd, bytes.data(), bytes.size(), static_cast<off_t>(offset)),
              static_cast<ssize_t>(bytes.size()));
    close(fd);
  }

  // 16 MiB, sparse, with data at 0 (4 KiB), 1 MiB (64 KiB), 5 MiB + 100
  // (10 bytes: the file system allocates their whole 4 KiB block) and in the
  // last 4 KiB.
  std::string MakeSparse() {
    std::string path = dir_.Sub("sparse.raw");
    EXPECT_EQ(RunCommand({"truncate", "-s", "16M", path}).exit_code, 0);
    PWrite(path, 0, RandomBytes(4 * KiB, 1));
    PWrite(path, MiB, RandomBytes(64 * KiB, 2));
    PWrite(path, 5 * MiB + 100, "hello12345");
    PWrite(path, 16 * MiB - 4 * KiB, RandomBytes(4 * KiB, 3));
    return path;
  }

  static std::unique_ptr<BlockSource> Open(const std::string& path) {
    auto r = OpenRawFile(path);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? std::move(r).value() : nullptr;
  }

  // What qemu-nbd -r -f raw reports for the whole image, through nbdinfo.
  std::vector<Extent> QemuNbdMap(const std::string& path) {
    auto r = RunCommand(
        {"nbdinfo", "--map", "--json", "--", "[", "qemu-nbd", "-r", "-f", "raw", path, "]"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::vector<Extent> out;
    if (r.exit_code != 0) return out;
    for (const auto& e : nlohmann::json::parse(r.out))
      out.push_back({e.at("offset").get<uint64_t>(), e.at("length").get<uint64_t>(),
                     e.at("type").get<uint32_t>()});
    return out;
  }

  static std::string FileBytes(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

  ScratchDir dir_;
};

TEST_F(RawFileSourceTest, SparseFileMapIsExactAndMatchesQemuNbd) {
  std::string path = MakeSparse();
  auto src = Open(path);
  ASSERT_TRUE(src);
  EXPECT_EQ(src->size(), 16 * MiB);
  EXPECT_EQ(src->Describe(), "file:" + path + " (raw)");
  std::vector<Extent> ext;
  ASSERT_TRUE(src->Allocation(0, 16 * MiB, &ext).ok());
  const std::vector<Extent> expected = {
      {0, 4 * KiB, 0},
      {4 * KiB, MiB - 4 * KiB, kHole},
      {MiB, 64 * KiB, 0},
      {MiB + 64 * KiB, 4 * MiB - 64 * KiB, kHole},
      {5 * MiB, 4 * KiB, 0},
      {5 * MiB + 4 * KiB, 11 * MiB - 8 * KiB, kHole},
      {16 * MiB - 4 * KiB, 4 * KiB, 0},
  };
  EXPECT_EQ(ext, expected);
  EXPECT_EQ(ext, QemuNbdMap(path));

  // Ranges that start and end inside extents are cut exactly.
  ASSERT_TRUE(src->Allocation(100, MiB + 100, &ext).ok());
  EXPECT_EQ(ext, (std::vector<Extent>{
                     {100, 4 * KiB - 100, 0}, {4 * KiB, MiB - 4 * KiB, kHole}, {MiB, 200, 0}}));
  ASSERT_TRUE(src->Allocation(2 * MiB, MiB, &ext).ok());
  EXPECT_EQ(ext, (std::vector<Extent>{{2 * MiB, MiB, kHole}}));
  ASSERT_TRUE(src->Allocation(16 * MiB - 1, 1, &ext).ok());
  EXPECT_EQ(ext, (std::vector<Extent>{{16 * MiB - 1, 1, 0}}));
  ASSERT_TRUE(src->Allocation(16 * MiB, 0, &ext).ok());
  EXPECT_TRUE(ext.empty());

  // Beyond the end.
  Status st = src->Allocation(16 * MiB - 4 * KiB, 4 * KiB + 1, &ext);
  EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
  EXPECT_TRUE(Has(st, path)) << st.ToString();
  st = src->Allocation(17 * MiB, 1, &ext);
  EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
}

TEST_F(RawFileSourceTest, TrailingHoleAndOddSizeMatchQemuNbd) {
  // A hole up to the end of the file, and a size that is no multiple of 512:
  // QEMU rounds it up and serves zeros (a hole) in the padding.
  std::string path = dir_.Sub("odd.raw");
  const std::string head = RandomBytes(8 * KiB, 7);
  PWrite(path, 0, head);
  ASSERT_EQ(truncate(path.c_str(), 3 * MiB + 1000), 0);
  auto src = Open(path);
  ASSERT_TRUE(src);
  const uint64_t size = 3 * MiB + 1024;
  EXPECT_EQ(src->size(), size);
  std::vector<Extent> ext;
  ASSERT_TRUE(src->Allocation(0, size, &ext).ok());
  EXPECT_EQ(ext, (std::vector<Extent>{{0, 8 * KiB, 0}, {8 * KiB, size - 8 * KiB, kHole}}));
  EXPECT_EQ(ext, QemuNbdMap(path));

  // A short file whose last sector is partly data.
  std::string tiny = dir_.Sub("tiny.raw");
  PWrite(tiny, 0, RandomBytes(1000, 8));
  auto t = Open(tiny);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->size(), 1024u);
  ASSERT_TRUE(t->Allocation(0, 1024, &ext).ok());
  EXPECT_EQ(ext, (std::vector<Extent>{{0, 1000, 0}, {1000, 24, kHole}}));
  EXPECT_EQ(ext, QemuNbdMap(tiny));
  // The padding reads as zeros, after the file's last bytes.
  std::vector<uint8_t> buf(40, 0xee);
  ReadRequest req{990, 34, buf.data()};
  ASSERT_TRUE(t->ReadMany({&req, 1}).ok());
  const std::string bytes = FileBytes(tiny);
  EXPECT_EQ(std::string(buf.begin(), buf.begin() + 10), bytes.substr(990, 10));
  EXPECT_EQ(std::vector<uint8_t>(buf.begin() + 10, buf.begin() + 34), std::vector<uint8_t>(24, 0));
  EXPECT_EQ(buf[34], 0xee);  // nothing written past the request
}

TEST_F(RawFileSourceTest, ReadsExactBytesLikeQemuNbd) {
  std::string path = MakeSparse();
  PWrite(path, 7 * MiB + 3, RandomBytes(3 * MiB + 5, 9));  // data across several MiB
  const std::string file = FileBytes(path);
  ASSERT_EQ(file.size(), 16 * MiB);
  auto src = Open(path);
  ASSERT_TRUE(src);
  auto nbd = OpenImageFile({.path = path, .format = "raw"});
  ASSERT_TRUE(nbd.ok()) << nbd.status().ToString();
  EXPECT_EQ(src->size(), (*nbd)->size());

  // Odd offsets and lengths, holes, data, both ends of the disk, and an
  // empty request without a buffer.
  const std::vector<std::pair<uint64_t, uint32_t>> ranges = {
      {0, 1},          {1, 4095},          {4095, 2},          {100, 2 * MiB},
      {MiB - 7, 13},   {5 * MiB + 99, 12}, {7 * MiB, 4 * MiB}, {16 * MiB - 4097, 4097},
      {3 * MiB + 1, 0}};
  std::vector<std::vector<uint8_t>> ours(ranges.size()), theirs(ranges.size());
  std::vector<ReadRequest> a, b;
  for (size_t i = 0; i < ranges.size(); i++) {
    ours[i].assign(ranges[i].second, 0x5a);
    theirs[i].assign(ranges[i].second, 0xa5);
    a.push_back({ranges[i].first, ranges[i].second, ranges[i].second ? ours[i].data() : nullptr});
    b.push_back({ranges[i].first, ranges[i].second, ranges[i].second ? theirs[i].data() : nullptr});
  }
  ASSERT_TRUE(src->ReadMany(a).ok());
  ASSERT_TRUE((*nbd)->ReadMany(b).ok());
  for (size_t i = 0; i < ranges.size(); i++) {
    const auto [off, len] = ranges[i];
    EXPECT_EQ(std::string(ours[i].begin(), ours[i].end()), file.substr(off, len))
        << "read at " << off << " +" << len;
    EXPECT_EQ(ours[i], theirs[i]) << "read at " << off << " +" << len;
  }

  // Same allocation map as the qemu-nbd source, window by window.
  for (uint64_t w = 0; w < 16 * MiB; w += 3 * MiB) {
    const uint64_t len = std::min<uint64_t>(3 * MiB, 16 * MiB - w);
    std::vector<Extent> x, y;
    ASSERT_TRUE(src->Allocation(w, len, &x).ok());
    ASSERT_TRUE((*nbd)->Allocation(w, len, &y).ok());
    EXPECT_EQ(x, y) << "window at " << w;
  }

  EXPECT_FALSE(src->has_dirty_map());
  std::vector<Extent> ext = {{1, 2, 3}};
  Status st = src->Dirty(0, MiB, &ext);
  EXPECT_EQ(st.code(), Status::Code::kNotSupported) << st.ToString();
  EXPECT_TRUE(ext.empty());
}

TEST_F(RawFileSourceTest, BadRequestsAreInvalidArgument) {
  std::string path = dir_.Sub("big.raw");
  ASSERT_EQ(RunCommand({"truncate", "-s", "64M", path}).exit_code, 0);
  auto src = Open(path);
  ASSERT_TRUE(src);
  std::vector<uint8_t> buf((32 << 20) + 1);
  auto read = [&](uint64_t off, uint32_t len, uint8_t* dst) {
    ReadRequest r{off, len, dst};
    return src->ReadMany({&r, 1});
  };
  Status st = read(64 * MiB - 10, 11, buf.data());
  EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
  EXPECT_TRUE(Has(st, path) && Has(st, "beyond the end")) << st.ToString();
  st = read(65 * MiB, 1, buf.data());
  EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
  st = read(0, (32 << 20) + 1, buf.data());
  EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
  EXPECT_TRUE(Has(st, "32 MiB")) << st.ToString();
  st = read(4096, 4096, nullptr);
  EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
  EXPECT_TRUE(Has(st, "no buffer")) << st.ToString();
  // Exactly 32 MiB is fine (zeros: the file is one hole).
  std::fill(buf.begin(), buf.end(), 0x77);
  ASSERT_TRUE(read(32 * MiB, 32 << 20, buf.data()).ok());
  EXPECT_EQ(std::count(buf.begin(), buf.end() - 1, 0), static_cast<long>(32 << 20));
  EXPECT_EQ(buf.back(), 0x77);
}

TEST_F(RawFileSourceTest, OpenErrorsNameThePath) {
  std::string missing = dir_.Sub("nope.raw");
  auto r = OpenRawFile(missing);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsNotFound()) << r.status().ToString();
  EXPECT_TRUE(Has(r.status(), missing)) << r.status().ToString();

  r = OpenRawFile(dir_.path());
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsInvalidArgument()) << r.status().ToString();
  EXPECT_TRUE(Has(r.status(), dir_.path()) && Has(r.status(), "directory"))
      << r.status().ToString();

  // A FIFO is refused at once (opening it must not wait for a writer).
  std::string fifo = dir_.Sub("fifo");
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  r = OpenRawFile(fifo);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsInvalidArgument()) << r.status().ToString();
  EXPECT_TRUE(Has(r.status(), fifo)) << r.status().ToString();

  r = OpenRawFile("");
  EXPECT_TRUE(r.status().IsInvalidArgument()) << r.status().ToString();

  // Unreadable (not testable as root, who reads anything).
  if (geteuid() != 0) {
    std::string locked = dir_.Sub("noread.raw");
    PWrite(locked, 0, "x");
    ASSERT_EQ(chmod(locked.c_str(), 0), 0);
    r = OpenRawFile(locked);
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(r.status().IsIOError()) << r.status().ToString();
    EXPECT_TRUE(Has(r.status(), locked)) << r.status().ToString();
  }
}

TEST_F(RawFileSourceTest, FileTruncatedAfterOpenIsIOErrorNamingTheOffset) {
  std::string path = dir_.Sub("shrinks.raw");
  PWrite(path, 0, RandomBytes(8 * MiB, 11));
  auto src = Open(path);
  ASSERT_TRUE(src);
  ASSERT_EQ(src->size(), 8 * MiB);
  ASSERT_EQ(truncate(path.c_str(), 3 * MiB + 100), 0);
  std::vector<uint8_t> buf(MiB);
  // Starts before the new end: 100 bytes come, then the end of the file.
  ReadRequest r{3 * MiB, static_cast<uint32_t>(MiB), buf.data()};
  Status st = src->ReadMany({&r, 1});
  EXPECT_TRUE(st.IsIOError()) << st.ToString();
  EXPECT_TRUE(Has(st, path)) << st.ToString();
  EXPECT_TRUE(Has(st, "offset " + std::to_string(3 * MiB + 100))) << st.ToString();
  // Starts past it.
  r = {6 * MiB, 4096, buf.data()};
  st = src->ReadMany({&r, 1});
  EXPECT_TRUE(st.IsIOError()) << st.ToString();
  EXPECT_TRUE(Has(st, "offset " + std::to_string(6 * MiB))) << st.ToString();
  // The part that is still there reads fine.
  r = {MiB, 4096, buf.data()};
  EXPECT_TRUE(src->ReadMany({&r, 1}).ok());
  // The lost part is no hole: the map fails instead of promising zeros.
  std::vector<Extent> ext;
  st = src->Allocation(0, 8 * MiB, &ext);
  EXPECT_TRUE(st.IsIOError()) << st.ToString();
  EXPECT_TRUE(Has(st, path) && Has(st, "shrank")) << st.ToString();
  EXPECT_TRUE(ext.empty());
}

// Takes one shared OFD lock on `byte` of `path` through a descriptor of its
// own, as another QEMU process would.
class OfdLock {
 public:
  OfdLock(const std::string& path, off_t byte) {
    fd_ = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    struct flock fl;
    memset(&fl, 0, sizeof(fl));
    fl.l_type = F_RDLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = byte;
    fl.l_len = 1;
    ok_ = fd_ >= 0 && fcntl(fd_, F_OFD_SETLK, &fl) == 0;
  }
  ~OfdLock() {
    if (fd_ >= 0) close(fd_);
  }
  bool ok() const { return ok_; }

 private:
  int fd_ = -1;
  bool ok_ = false;
};

TEST_F(RawFileSourceTest, QemuLockBytesDecideBusy) {
  std::string path = dir_.Sub("locks.raw");
  ASSERT_EQ(RunCommand({"truncate", "-s", "1M", path}).exit_code, 0);
  {
    // The bytes it holds while open (no one else has the file open): those
    // of a consistent reader that shares neither write nor resize.
    auto src = Open(path);
    ASSERT_TRUE(src);
    for (uint64_t byte : {100, 201, 203}) EXPECT_TRUE(HoldsLock(path, byte)) << byte;
    for (uint64_t byte : {101, 102, 103, 200, 202}) EXPECT_FALSE(HoldsLock(path, byte)) << byte;
  }
  for (uint64_t byte : {100, 201, 203}) EXPECT_FALSE(HoldsLock(path, byte)) << byte;
  // Somebody holds write (101) or resize (103), or does not share
  // consistent reads (200): Busy.
  for (off_t byte : {101, 103, 200}) {
    OfdLock other(path, byte);
    ASSERT_TRUE(other.ok());
    auto r = OpenRawFile(path);
    ASSERT_FALSE(r.ok()) << "byte " << byte;
    EXPECT_TRUE(r.status().IsBusy()) << byte << ": " << r.status().ToString();
    EXPECT_TRUE(Has(r.status(), path) && Has(r.status(), "running VM")) << r.status().ToString();
  }
  // Readers and permissions we share: fine (another reader of ours too).
  OfdLock reader(path, 100), unchanged(path, 102), no_resize(path, 203);
  ASSERT_TRUE(reader.ok() && unchanged.ok() && no_resize.ok());
  auto a = Open(path);
  auto b = Open(path);
  EXPECT_TRUE(a && b);
}

TEST_F(RawFileSourceTest, WritableQemuProcessesMakeItBusy) {
  std::string path = MakeSparse();
  {
    // A writable qemu-nbd.
    std::string sock = dir_.Sub("w.sock");
    Background writer({"qemu-nbd", "-f", "raw", "--persistent", "-k", sock, path},
                      dir_.Sub("qemu-nbd.log"));
    ASSERT_TRUE(writer.started());
    ASSERT_TRUE(WaitForLock(path, 101)) << FileBytes(dir_.Sub("qemu-nbd.log"));
    auto r = OpenRawFile(path);
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(r.status().IsBusy()) << r.status().ToString();
    EXPECT_TRUE(Has(r.status(), path)) << r.status().ToString();
    EXPECT_TRUE(Has(r.status(), "open for writing")) << r.status().ToString();
  }
  // Gone: the image opens again.
  EXPECT_TRUE(Open(path));

  // A paused VM with the image as its disk. Wait until it holds its write
  // lock (as /proc/locks shows; opening a source meanwhile would keep the VM
  // from starting), then try once.
  ASSERT_EQ(RunShell("command -v qemu-system-x86_64 >/dev/null").exit_code, 0)
      << "qemu-system-x86_64 is missing: scripts/setup.sh test installs it";
  Background vm({"qemu-system-x86_64", "-S", "-display", "none", "-machine", "accel=tcg", "-m",
                 "64", "-nodefaults", "-drive", "file=" + path + ",format=raw,if=virtio"},
                dir_.Sub("vm.log"));
  ASSERT_TRUE(vm.started());
  ASSERT_TRUE(WaitForLock(path, 101)) << FileBytes(dir_.Sub("vm.log"));
  auto r = OpenRawFile(path);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsBusy()) << r.status().ToString();
  EXPECT_TRUE(Has(r.status(), "running VM")) << r.status().ToString();
}

TEST_F(RawFileSourceTest, OpenSourceKeepsWritersOutButNotReaders) {
  std::string path = MakeSparse();
  const std::string before = FileSha256(path);
  {
    auto src = Open(path);
    ASSERT_TRUE(src);
    auto w = RunCommand({"qemu-io", "-f", "raw", "-c", "write -P 0x42 0 4k", path});
    EXPECT_NE(w.exit_code, 0) << w.out << w.err;
    EXPECT_NE(w.err.find("lock"), std::string::npos) << w.err;
    // Nor a resize.
    auto rs = RunCommand({"qemu-img", "resize", "-f", "raw", path, "32M"});
    EXPECT_NE(rs.exit_code, 0) << rs.out << rs.err;
    EXPECT_NE(rs.err.find("lock"), std::string::npos) << rs.err;
    EXPECT_EQ(FileSha256(path), before);
    // Readers are welcome: qemu-io -r, and qemu-nbd -r through OpenImageFile.
    auto r = RunCommand({"qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", path});
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    auto nbd = OpenImageFile({.path = path, .format = "raw"});
    EXPECT_TRUE(nbd.ok()) << nbd.status().ToString();
    // A VM does not start on it (timeout: a VM that did would stay paused).
    auto vm = RunCommand({"timeout", "30", "qemu-system-x86_64", "-S", "-display", "none",
                          "-machine", "accel=tcg", "-m", "64", "-nodefaults", "-drive",
                          "file=" + path + ",format=raw,if=virtio"});
    EXPECT_EQ(vm.exit_code, 1) << vm.err;
    EXPECT_NE(vm.err.find("lock"), std::string::npos) << vm.err;
  }
  // Closed: the locks are gone with the descriptor.
  auto w = RunCommand({"qemu-io", "-f", "raw", "-c", "write -P 0x42 0 4k", path});
  EXPECT_EQ(w.exit_code, 0) << w.out << w.err;
  EXPECT_NE(FileSha256(path), before);
}

// The backup job reads raw images itself: no qemu-nbd is started (one that
// fails is first in PATH), and the snapshot restores bit-exactly. A raw image
// in use by a writer fails the backup with Busy (exit code 4).
TEST_F(RawFileSourceTest, BackupOfRawImageStartsNoQemuNbd) {
  std::string path = MakeSparse();
  std::string bin = dir_.Sub("bin");
  ASSERT_EQ(mkdir(bin.c_str(), 0755), 0);
  {
    std::ofstream out(bin + "/qemu-nbd");
    out << "#!/bin/sh\ntouch '" << dir_.Sub("qemu-nbd-ran") << "'\nexit 1\n";
  }
  ASSERT_EQ(chmod((bin + "/qemu-nbd").c_str(), 0755), 0);
  const std::string repo = dir_.Sub("repo");
  const std::string vmdedup = testing::VmdedupBinary();
  const std::string env = "PATH='" + bin + "':\"$PATH\" ";
  auto init = RunCommand({vmdedup, "init", repo});
  ASSERT_EQ(init.exit_code, 0) << init.err;
  auto b = RunShell(env + "'" + vmdedup + "' backup -r '" + repo +
                    "' --vm v --disk d --json 'raw:" + path + "'");
  ASSERT_EQ(b.exit_code, 0) << b.err;
  EXPECT_NE(access(dir_.Sub("qemu-nbd-ran").c_str(), F_OK), 0) << "qemu-nbd was started";
  auto s = nlohmann::json::parse(b.out);
  EXPECT_EQ(s["size"].get<uint64_t>(), 16 * MiB);
  EXPECT_EQ(s["read_bytes"].get<uint64_t>(), 4 * KiB + 64 * KiB + 4 * KiB + 4 * KiB);
  std::string out = dir_.Sub("restored.raw");
  auto rs = RunCommand({vmdedup, "restore", "-r", repo, "v/d/1", "--to", out});
  ASSERT_EQ(rs.exit_code, 0) << rs.err;
  EXPECT_EQ(FileSha256(out), FileSha256(path));

  std::string sock = dir_.Sub("w.sock");
  Background writer({"qemu-nbd", "-f", "raw", "--persistent", "-k", sock, path},
                    dir_.Sub("qemu-nbd.log"));
  ASSERT_TRUE(WaitForLock(path, 101));
  b = RunCommand({vmdedup, "backup", "-r", repo, "--vm", "v", "--disk", "d", "raw:" + path});
  EXPECT_EQ(b.exit_code, 4) << b.err;
  EXPECT_NE(b.err.find("running VM"), std::string::npos) << b.err;
}

}  // namespace
}  // namespace vmdedup
