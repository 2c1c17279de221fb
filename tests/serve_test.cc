// `vmdedup serve` with real clients: nbdinfo (size, extents against the
// snapshot's zero ranges), nbdcopy (SHA-256 against the original image, two
// clients at once), qemu-img compare, qemu-io range reads of a damaged
// container (EIO for the damaged segment only, a log line naming the
// object), QEMU started on a qcow2 overlay backed by the export (its device
// writes land in the overlay, block-stream finishes the copy), TCP with and
// without TLS-PSK, and the export of a snapshot with CDS references.
// In-process tests cover SnapshotExport and its cache directly.
// Every server is started by the test and stopped by its pid.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "base/encoding.h"
#include "base/fingerprint.h"
#include "base/subprocess.h"
#include "engine/backup_job.h"
#include "nbd-export/lru_cache.h"
#include "nbd-export/snapshot_export.h"
#include "store/container.h"
#include "store/repository.h"
#include "tests/test_util.h"

namespace vmdedup::testing {
namespace {

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kImageSize = 48 * kMiB;

using Ranges = std::vector<std::pair<uint64_t, uint64_t>>;  // [begin, end)

std::string Sha(const std::string& data) {
  return Sha256({reinterpret_cast<const uint8_t*>(data.data()), data.size()}).Hex();
}

void MustRun(const std::vector<std::string>& argv) {
  auto r = RunCommand(argv);
  ASSERT_EQ(r.exit_code, 0) << argv[0] << " " << (argv.size() > 1 ? argv[1] : "") << ": " << r.err
                            << r.out;
}

// A child process started in the background; killed (SIGKILL) if the test
// ends without stopping it.
class Child {
 public:
  // stdout is a pipe (ReadLine), stderr goes to `log_path` (or /dev/null).
  Child(const std::vector<std::string>& argv, const std::string& log_path) {
    int out[2];
    if (pipe2(out, O_CLOEXEC) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      int devnull = open("/dev/null", O_RDONLY);
      dup2(devnull, 0);
      dup2(out[1], 1);
      int log = log_path.empty() ? open("/dev/null", O_WRONLY)
                                 : open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(log, 2);
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execvp(args[0], args.data());
      _exit(127);
    }
    close(out[1]);
    out_ = out[0];
  }
  ~Child() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (out_ >= 0) close(out_);
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  pid_t pid() const { return pid_; }

  // The next line of stdout ("" on EOF or after `timeout_ms`).
  std::string ReadLine(int timeout_ms) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      size_t nl = buf_.find('\n');
      if (nl != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return line;
      }
      int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                      deadline - std::chrono::steady_clock::now())
                                      .count());
      if (left <= 0) return "";
      pollfd p{out_, POLLIN, 0};
      if (poll(&p, 1, left) <= 0) continue;
      char tmp[4096];
      ssize_t n = read(out_, tmp, sizeof(tmp));
      if (n <= 0) return "";
      buf_.append(tmp, static_cast<size_t>(n));
    }
  }

  // Sends `sig` and waits up to `timeout_ms`; the exit code (128+N when
  // killed by signal N), or -1 when it did not end in time (then killed).
  int Stop(int sig, int timeout_ms = 30000) {
    if (pid_ <= 0) return -1;
    kill(pid_, sig);
    return Wait(timeout_ms);
  }
  int Wait(int timeout_ms) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    int status = 0;
    for (;;) {
      pid_t r = waitpid(pid_, &status, WNOHANG);
      if (r == pid_) break;
      if (std::chrono::steady_clock::now() > deadline) {
        kill(pid_, SIGKILL);
        waitpid(pid_, nullptr, 0);
        pid_ = -1;
        return -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    pid_ = -1;
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    return 128 + WTERMSIG(status);
  }

 private:
  pid_t pid_ = -1;
  int out_ = -1;
  std::string buf_;
};

bool ProcessExists(pid_t pid) { return pid > 0 && (kill(pid, 0) == 0 || errno != ESRCH); }

// `vmdedup serve --json ...` running in the background.
class Server {
 public:
  Server(const std::vector<std::string>& args, const std::string& log_path) : log_(log_path) {
    std::vector<std::string> argv = {VmdedupBinary(), "serve", "--json"};
    argv.insert(argv.end(), args.begin(), args.end());
    child_ = std::make_unique<Child>(argv, log_path);
    std::string line = child_->ReadLine(120000);
    if (!line.empty()) info_ = nlohmann::json::parse(line, nullptr, false);
  }
  bool ready() const { return info_.is_object() && info_.contains("uri"); }
  std::string uri() const { return info_.value("uri", ""); }
  const nlohmann::json& info() const { return info_; }
  pid_t pid() const { return child_->pid(); }
  std::string log() const { return ReadFileBytes(log_); }
  int Stop(int sig = SIGTERM) { return child_->Stop(sig); }
  int Wait(int timeout_ms) { return child_->Wait(timeout_ms); }

 private:
  std::string log_;
  std::unique_ptr<Child> child_;
  nlohmann::json info_;
};

// Runs commands in parallel and returns their results.
std::vector<CommandResult> RunParallel(const std::vector<std::vector<std::string>>& commands) {
  std::vector<CommandResult> results(commands.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < commands.size(); i++)
    threads.emplace_back([&, i] { results[i] = RunCommand(commands[i]); });
  for (auto& t : threads) t.join();
  return results;
}

// A minimal QMP client for the QEMU test: one JSON object per line.
class Qmp {
 public:
  bool Connect(const std::string& path) {
    for (int i = 0; i < 500 && fd_ < 0; i++) {
      int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_un sa{};
      sa.sun_family = AF_UNIX;
      std::strncpy(sa.sun_path, path.c_str(), sizeof(sa.sun_path) - 1);
      if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0) {
        fd_ = fd;
        break;
      }
      close(fd);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (fd_ < 0) return false;
    nlohmann::json greeting = Next();
    if (!greeting.contains("QMP")) return false;
    return Execute("qmp_capabilities").contains("return");
  }
  ~Qmp() {
    if (fd_ >= 0) close(fd_);
  }
  // The reply ({"return": ...} or {"error": ...}); events are kept.
  nlohmann::json Execute(const std::string& cmd, const nlohmann::json& args = nullptr) {
    nlohmann::json msg = {{"execute", cmd}};
    if (!args.is_null()) msg["arguments"] = args;
    std::string line = msg.dump() + "\n";
    if (write(fd_, line.data(), line.size()) != static_cast<ssize_t>(line.size())) return {};
    for (;;) {
      nlohmann::json j = Next();
      if (j.is_null()) return {};
      if (j.contains("event")) {
        events_.push_back(j);
        continue;
      }
      return j;
    }
  }
  // Waits for event `name` (already received ones first).
  nlohmann::json WaitEvent(const std::string& name, int timeout_ms) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      for (size_t i = 0; i < events_.size(); i++) {
        if (events_[i]["event"] == name) {
          nlohmann::json e = events_[i];
          events_.erase(events_.begin() + static_cast<long>(i));
          return e;
        }
      }
      if (std::chrono::steady_clock::now() > deadline) return {};
      nlohmann::json j = Next(200);
      if (j.contains("event")) events_.push_back(j);
    }
  }

 private:
  nlohmann::json Next(int timeout_ms = 60000) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      size_t nl = buf_.find('\n');
      if (nl != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return nlohmann::json::parse(line, nullptr, false);
      }
      int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                      deadline - std::chrono::steady_clock::now())
                                      .count());
      if (left <= 0) return {};
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, left) <= 0) continue;
      char tmp[65536];
      ssize_t n = read(fd_, tmp, sizeof(tmp));
      if (n <= 0) return {};
      buf_.append(tmp, static_cast<size_t>(n));
    }
  }
  int fd_ = -1;
  std::string buf_;
  std::vector<nlohmann::json> events_;
};

// A TCP port nobody listens on right now.
unsigned FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa));
  socklen_t len = sizeof(sa);
  getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len);
  close(fd);
  return ntohs(sa.sin_port);
}

// The zero ranges a snapshot's recipes record (segments without a recipe
// and zero blocks), merged. Opens the VM read-only: no server may run.
Ranges SnapshotZeroRanges(const std::string& repo_path, const std::string& vm_name,
                          const std::string& disk, uint64_t seq) {
  Ranges zeros;
  auto repo = Repository::Open(repo_path);
  EXPECT_TRUE(repo.ok()) << repo.status().ToString();
  if (!repo.ok()) return zeros;
  auto vm = (*repo)->OpenVm(vm_name, Repository::Access::kRead);
  EXPECT_TRUE(vm.ok()) << vm.status().ToString();
  if (!vm.ok()) return zeros;
  auto snap = (*vm)->GetSnapshot(disk, seq);
  auto ids = (*vm)->GetSnapshotSegments(disk, seq);
  EXPECT_TRUE(snap.ok() && ids.ok());
  if (!snap.ok() || !ids.ok()) return zeros;
  auto add = [&](uint64_t b, uint64_t e) {
    if (!zeros.empty() && zeros.back().second == b)
      zeros.back().second = e;
    else
      zeros.push_back({b, e});
  };
  for (uint64_t i = 0; i < ids->size(); i++) {
    uint64_t base = i * snap->segment_size;
    uint64_t len = std::min<uint64_t>(snap->segment_size, snap->size - base);
    if ((*ids)[i] == 0) {
      add(base, base + len);
      continue;
    }
    auto recipe = (*vm)->GetSegmentRecipe((*ids)[i]);
    EXPECT_TRUE(recipe.ok());
    if (!recipe.ok()) return zeros;
    uint64_t pos = base;
    for (const auto& b : recipe->blocks) {
      if (b.kind == BlockKind::kZero) add(pos, pos + b.length);
      pos += b.length;
    }
  }
  return zeros;
}

// Zero ranges of `nbdinfo --map --json` (type bit 2: zero).
Ranges MapZeroRanges(const std::string& uri, uint64_t* covered) {
  Ranges zeros;
  auto r = RunCommand({"nbdinfo", "--map", "--json", uri});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out, nullptr, false);
  EXPECT_TRUE(j.is_array()) << r.out;
  if (!j.is_array()) return zeros;
  *covered = 0;
  for (const auto& e : j) {
    uint64_t off = e["offset"].get<uint64_t>(), len = e["length"].get<uint64_t>();
    EXPECT_EQ(off, *covered) << "extents must be contiguous";
    *covered = off + len;
    if (e["type"].get<int>() & 2) {
      if (!zeros.empty() && zeros.back().second == off)
        zeros.back().second = off + len;
      else
        zeros.push_back({off, off + len});
    }
  }
  return zeros;
}

bool Covers(const Ranges& ranges, uint64_t b, uint64_t e) {
  for (const auto& [rb, re] : ranges)
    if (rb <= b && e <= re) return true;
  return false;
}

// Shared by all tests: an image with random data, a discarded range, a
// range of written zeros and an unallocated tail, backed up twice (with
// changes in between) by the vmdedup binary.
struct World {
  ScratchDir dir;
  std::string repo, image, snap1_raw, snap1_qcow2, snap2_raw;
  std::string snap1_sha, snap2_sha;
};
World* g_world = nullptr;

class ServeTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    g_world = new World;
    World& w = *g_world;
    w.repo = w.dir.Sub("repo");
    w.image = w.dir.Sub("disk.qcow2");
    w.snap1_raw = w.dir.Sub("snap1.raw");
    w.snap1_qcow2 = w.dir.Sub("snap1.qcow2");
    w.snap2_raw = w.dir.Sub("snap2.raw");
    std::string seed = w.dir.Sub("seed.raw");
    WriteFileBytes(seed, RandomBytes(24 * kMiB, 42));
    ASSERT_EQ(truncate(seed.c_str(), kImageSize), 0);
    MustRun({"qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", seed, w.image});
    unlink(seed.c_str());
    // A discarded range (a hole) and written zeros (zero blocks).
    MustRun(
        {"qemu-io", "-f", "qcow2", "-c", "discard 8M 2M", "-c", "write -P 0 14M 256k", w.image});
    MustRun({VmdedupBinary(), "init", "--chunker", "fixed",
             w.repo});  // 4 KiB blocks: the tests find blocks by offset
    MustRun({VmdedupBinary(), "backup", "-r", w.repo, "--vm", "vm1", "--disk", "vda", "-q",
             "qcow2:" + w.image});
    MustRun({"qemu-img", "convert", "-q", "-O", "raw", w.image, w.snap1_raw});
    MustRun({"cp", w.image, w.snap1_qcow2});
    MustRun({"qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", "-c", "write -P 0x77 30M 1M",
             "-c", "discard 2M 512k", w.image});
    MustRun({VmdedupBinary(), "backup", "-r", w.repo, "--vm", "vm1", "--disk", "vda", "-q",
             "qcow2:" + w.image});
    MustRun({"qemu-img", "convert", "-q", "-O", "raw", w.image, w.snap2_raw});
    w.snap1_sha = FileSha256(w.snap1_raw);
    w.snap2_sha = FileSha256(w.snap2_raw);
    ASSERT_NE(w.snap1_sha, w.snap2_sha);
  }
  static void TearDownTestSuite() {
    delete g_world;
    g_world = nullptr;
  }
  void SetUp() override {
    ASSERT_TRUE(g_world != nullptr && !g_world->snap2_sha.empty())
        << "the suite's setup failed (see its assertion above)";
  }

  World& w() { return *g_world; }
  ScratchDir dir_;
};

TEST_F(ServeTest, RealClientsReadAnOlderSnapshotExactly) {
  // The snapshot's zero ranges, from its recipes (read before serving: the
  // server holds the VM's metadata).
  Ranges zeros = SnapshotZeroRanges(w().repo, "vm1", "vda", 1);
  // They include the discard, the written zeros and the unallocated tail.
  EXPECT_TRUE(Covers(zeros, 8 * kMiB, 10 * kMiB));
  EXPECT_TRUE(Covers(zeros, 14 * kMiB, 14 * kMiB + 256 * kKiB));
  EXPECT_TRUE(Covers(zeros, 24 * kMiB, kImageSize));
  EXPECT_FALSE(Covers(zeros, 0, 4096));

  Server server({"-r", w().repo, "vm1/vda/1"}, dir_.Sub("serve.log"));
  ASSERT_TRUE(server.ready()) << server.log();
  const std::string uri = server.uri();
  EXPECT_EQ(server.info()["snapshot"], "vm1/vda/1");
  EXPECT_EQ(uri.rfind("nbd+unix:///?socket=", 0), 0u) << uri;

  // The socket is private.
  struct stat sb;
  std::string socket = server.info()["socket"];
  ASSERT_EQ(lstat(socket.c_str(), &sb), 0);
  EXPECT_TRUE(S_ISSOCK(sb.st_mode));
  EXPECT_EQ(sb.st_mode & 0777, 0600u);
  ASSERT_EQ(stat(std::filesystem::path(socket).parent_path().c_str(), &sb), 0);
  EXPECT_EQ(sb.st_mode & 0777, 0700u);

  // nbdinfo: size, read-only, multi-conn.
  // --no-content: the "content" field is libmagic's guess at the first
  // sector, which need not be UTF-8 (outside a UTF-8 locale), and is no
  // business of this test.
  auto info = RunCommand({"nbdinfo", "--json", "--no-content", uri});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  auto ij = nlohmann::json::parse(info.out);
  const auto& exp = ij["exports"][0];
  EXPECT_EQ(exp["export-size"].get<uint64_t>(), kImageSize);
  EXPECT_TRUE(exp["is_read_only"].get<bool>());
  EXPECT_TRUE(exp["can_multi_conn"].get<bool>());

  // nbdinfo --map: exactly the snapshot's zero ranges, over the whole disk.
  uint64_t covered = 0;
  EXPECT_EQ(MapZeroRanges(uri, &covered), zeros);
  EXPECT_EQ(covered, kImageSize);

  // nbdcopy to a file: the image as it was at snapshot 1.
  std::string out = dir_.Sub("copy.raw");
  MustRun({"nbdcopy", uri, out});
  EXPECT_EQ(FileSha256(out), w().snap1_sha);
  unlink(out.c_str());

  // qemu-img compare against the original qcow2 (as it was then).
  auto cmp = RunCommand({"qemu-img", "compare", "-f", "qcow2", "-F", "raw", w().snap1_qcow2, uri});
  EXPECT_EQ(cmp.exit_code, 0) << cmp.out << cmp.err;

  // Two clients at once, each with several connections (multi-conn).
  std::string a = dir_.Sub("a.raw"), b = dir_.Sub("b.raw");
  auto both = RunParallel({{"nbdcopy", "--connections=4", uri, a},
                           {"nbdcopy", "--connections=2", "--request-size=65536", uri, b}});
  EXPECT_EQ(both[0].exit_code, 0) << both[0].err;
  EXPECT_EQ(both[1].exit_code, 0) << both[1].err;
  EXPECT_EQ(FileSha256(a), w().snap1_sha);
  EXPECT_EQ(FileSha256(b), w().snap1_sha);

  // Stopped by pid with SIGTERM: exit 0, nbdkit and the socket gone.
  pid_t nbdkit = server.info()["pid"].get<pid_t>();
  EXPECT_EQ(server.Stop(SIGTERM), 0) << server.log();
  EXPECT_FALSE(ProcessExists(nbdkit));
  EXPECT_NE(lstat(socket.c_str(), &sb), 0);
  EXPECT_FALSE(std::filesystem::exists(std::filesystem::path(socket).parent_path()));
  EXPECT_EQ(server.log().find("error"), std::string::npos) << server.log();
}

TEST_F(ServeTest, LatestOnAGivenSocketAndSigint) {
  std::string socket = dir_.Sub("my.sock");
  Server server({"-r", w().repo, "vm1/vda/latest", "--socket", socket, "--cache", "4M"},
                dir_.Sub("serve.log"));
  ASSERT_TRUE(server.ready()) << server.log();
  EXPECT_EQ(server.uri(), "nbd+unix:///?socket=" + socket);
  EXPECT_EQ(server.info()["snapshot"], "vm1/vda/2");
  struct stat sb;
  ASSERT_EQ(lstat(socket.c_str(), &sb), 0);
  EXPECT_EQ(sb.st_mode & 0777, 0600u);
  // A small cache (2 segments) still reads everything right.
  std::string out = dir_.Sub("copy.raw");
  MustRun({"nbdcopy", server.uri(), out});
  EXPECT_EQ(FileSha256(out), w().snap2_sha);

  // A server holds no lock on the VM: a second server of it runs at the
  // same time and serves its own snapshot exactly.
  {
    Server second({"-r", w().repo, "vm1/vda/1"}, dir_.Sub("serve2.log"));
    ASSERT_TRUE(second.ready()) << second.log();
    std::string out1 = dir_.Sub("copy1.raw");
    MustRun({"nbdcopy", second.uri(), out1});
    EXPECT_EQ(FileSha256(out1), w().snap1_sha);
    EXPECT_EQ(second.Stop(SIGTERM), 0) << second.log();
  }
  // Its socket is refused to another server.
  auto same =
      RunCommand({VmdedupBinary(), "serve", "-r", w().repo, "vm1/vda/1", "--socket", socket});
  EXPECT_NE(same.exit_code, 0);

  // Clients killed with many requests in flight do not take the server
  // down (nbdkit 1.32.4-1.33.9 abort then unless run with --threads=1).
  for (int i = 0; i < 6; i++) {
    Child copy({"nbdcopy", "--request-size=262144", server.uri(), "null:"}, "");
    std::this_thread::sleep_for(std::chrono::milliseconds(20 + 30 * i));
    copy.Stop(SIGKILL);
  }
  auto size = RunCommand({"nbdinfo", "--size", server.uri()});
  EXPECT_EQ(size.out, std::to_string(kImageSize) + "\n") << size.err << server.log();

  EXPECT_EQ(server.Stop(SIGINT), 0) << server.log();
  EXPECT_NE(lstat(socket.c_str(), &sb), 0);
}

TEST_F(ServeTest, DamagedContainerFailsOnlyItsBlocksWithEio) {
  std::string repo = dir_.Sub("repo");
  MustRun({"cp", "-a", w().repo, repo});
  // The first container written (by snapshot 1), and its first record.
  std::vector<std::string> containers;
  for (const auto& e : std::filesystem::directory_iterator(repo + "/vms/vm1/data"))
    containers.push_back(e.path().string());
  ASSERT_FALSE(containers.empty());
  std::sort(containers.begin(), containers.end());
  const std::string ctr = containers[0];
  std::string bytes = ReadFileBytes(ctr);
  ASSERT_GT(bytes.size(), 32u + 48u + 64u);
  // Its fingerprints: one (a block record) or a frame record's table.
  const auto* rec = reinterpret_cast<const uint8_t*>(bytes.data()) + 32;
  std::vector<Fingerprint> fps;
  size_t payload_at = 0;
  uint32_t payload_len = DecodeU32(rec + 8);
  if (rec[1] == 1) {  // frame record: 16-byte header, n table entries of 36 bytes
    const uint32_t n = DecodeU16(rec + 2);
    ASSERT_GE(n, 2u);
    for (uint32_t i = 0; i < n; i++) {
      Fingerprint fp;
      std::memcpy(fp.bytes.data(), rec + 16 + 36 * i, 32);
      fps.push_back(fp);
    }
    payload_at = 32 + 16 + 36 * n;
  } else {
    Fingerprint fp;
    std::memcpy(fp.bytes.data(), rec + 12, 32);
    fps.push_back(fp);
    payload_at = 32 + 48;
  }
  // Which 4 KiB blocks of the disk it holds (the data is random: unique),
  // the record's blocks lie back to back in the disk.
  std::string image = ReadFileBytes(w().snap1_raw);
  auto locate = [&](const Fingerprint& fp) {
    for (uint64_t off = 0; off + 4096 <= image.size(); off += 4096)
      if (Sha256({reinterpret_cast<const uint8_t*>(image.data() + off), 4096}) == fp) return off;
    return uint64_t{UINT64_MAX};
  };
  const uint64_t damaged = locate(fps.front());
  ASSERT_NE(damaged, UINT64_MAX);
  const uint64_t damaged_end = damaged + 4096 * fps.size();
  ASSERT_EQ(locate(fps.back()), damaged_end - 4096);
  ASSERT_EQ(damaged / (2 * kMiB), (damaged_end - 1) / (2 * kMiB));
  // Flip one byte inside the record's payload.
  bytes[payload_at + payload_len / 2] ^= 0x40;
  std::filesystem::permissions(ctr, std::filesystem::perms::owner_write,
                               std::filesystem::perm_options::add);
  WriteFileBytes(ctr, bytes);

  Server server({"-r", repo, "vm1/vda/1"}, dir_.Sub("serve.log"));
  ASSERT_TRUE(server.ready()) << server.log();
  auto qemu_io = [&](const std::string& cmd) {
    return RunCommand({"qemu-io", "-r", "-f", "raw", "-c", cmd, server.uri()});
  };
  // The block next to the record's, in the same segment, still reads, with
  // the right content: a small read decodes only the records it touches.
  const uint64_t neighbour = damaged % (2 * kMiB) >= 4096 ? damaged - 4096 : damaged_end;
  ASSERT_EQ(neighbour / (2 * kMiB), damaged / (2 * kMiB));
  auto near = qemu_io("read -v " + std::to_string(neighbour) + " 16");
  EXPECT_NE(near.out.find("read 16/16 bytes"), std::string::npos) << near.out << near.err;
  char near_dump[32];
  std::snprintf(near_dump, sizeof(near_dump), "%08llx:  %02x %02x",
                static_cast<unsigned long long>(neighbour),
                static_cast<unsigned char>(image[neighbour]),
                static_cast<unsigned char>(image[neighbour + 1]));
  EXPECT_NE(near.out.find(near_dump), std::string::npos) << near.out;
  // Every block of the damaged record: EIO.
  for (uint64_t at : {damaged, damaged_end - 4096}) {
    auto bad = qemu_io("read " + std::to_string(at) + " 4096");
    EXPECT_NE(bad.out.find("Input/output error"), std::string::npos) << bad.out << bad.err;
    EXPECT_EQ(bad.out.find("read 4096/4096 bytes"), std::string::npos) << bad.out;
  }
  // Other segments read fine, with the right content.
  const uint64_t other = damaged < 16 * kMiB ? 20 * kMiB : 4 * kMiB;
  auto good = qemu_io("read -v " + std::to_string(other) + " 16");
  EXPECT_NE(good.out.find("read 16/16 bytes"), std::string::npos) << good.out << good.err;
  char dump[32];
  std::snprintf(dump, sizeof(dump), "%08llx:  %02x %02x", static_cast<unsigned long long>(other),
                static_cast<unsigned char>(image[other]),
                static_cast<unsigned char>(image[other + 1]));
  EXPECT_NE(good.out.find(dump), std::string::npos) << good.out;
  // A whole copy fails rather than delivering wrong data.
  auto copy = RunCommand({"nbdcopy", server.uri(), dir_.Sub("copy.raw")});
  EXPECT_NE(copy.exit_code, 0);
  EXPECT_EQ(server.Stop(), 0);
  // The log names the snapshot and the damaged object.
  std::string log = server.log();
  std::string object = "vms/vm1/data/" + std::filesystem::path(ctr).filename().string();
  EXPECT_NE(log.find("snapshot vm1/vda/1"), std::string::npos) << log;
  EXPECT_NE(log.find(object), std::string::npos) << log;
  EXPECT_NE(log.find("Corruption"), std::string::npos) << log;
}

TEST_F(ServeTest, QemuRunsOnAnOverlayOfTheExportAndBlockStreamFinishesTheCopy) {
  ASSERT_TRUE(FindProgram("qemu-system-x86_64"))
      << "qemu-system-x86_64 is missing: scripts/setup.sh test installs it";
  Server server({"-r", w().repo, "vm1/vda/1"}, dir_.Sub("serve.log"));
  ASSERT_TRUE(server.ready()) << server.log();
  std::string socket = server.info()["socket"];
  std::string overlay = dir_.Sub("overlay.qcow2");
  MustRun({"qemu-img", "create", "-q", "-f", "qcow2", "-b", server.uri(), "-F", "raw", overlay});

  std::string qmp_path = dir_.Sub("qmp.sock");
  std::string blockdev = nlohmann::json({{"driver", "qcow2"},
                                         {"node-name", "disk0"},
                                         {"file", {{"driver", "file"}, {"filename", overlay}}}})
                             .dump();
  Child qemu({"qemu-system-x86_64", "-accel", "tcg", "-display", "none", "-nodefaults", "-m", "64",
              "-qmp", "unix:" + qmp_path + ",server=on,wait=off", "-blockdev", blockdev, "-device",
              "virtio-blk-pci,drive=disk0,id=vda"},
             dir_.Sub("qemu.log"));
  Qmp qmp;
  ASSERT_TRUE(qmp.Connect(qmp_path)) << ReadFileBytes(dir_.Sub("qemu.log"));

  // The device's disk is the overlay, backed by the export.
  auto blocks = qmp.Execute("query-block");
  ASSERT_TRUE(blocks.contains("return")) << blocks.dump();
  bool found = false;
  for (const auto& b : blocks["return"]) {
    if (!b.contains("inserted")) continue;
    const auto& ins = b["inserted"];
    EXPECT_EQ(ins["node-name"], "disk0");
    EXPECT_NE(ins.value("backing_file", "").find(socket), std::string::npos) << b.dump();
    EXPECT_EQ(ins["image"]["backing-image"]["format"], "raw") << b.dump();
    found = true;
  }
  EXPECT_TRUE(found) << blocks.dump();

  // A write through the device lands in the overlay.
  auto hmp =
      qmp.Execute("human-monitor-command",
                  {{"command-line",
                    "qemu-io -d /machine/peripheral/vda/virtio-backend \"write -P 0xab 1M 64k\""}});
  ASSERT_TRUE(hmp.contains("return")) << hmp.dump();
  std::string expected = ReadFileBytes(w().snap1_raw);
  std::memset(expected.data() + kMiB, 0xab, 64 * kKiB);
  const std::string expected_sha = Sha(expected);

  // What QEMU's block layer reads (overlay over the export), through its
  // own NBD server: the snapshot plus the guest's write.
  std::string qsock = dir_.Sub("qemu-nbd.sock");
  auto r =
      qmp.Execute("nbd-server-start", {{"addr", {{"type", "unix"}, {"data", {{"path", qsock}}}}}});
  ASSERT_TRUE(r.contains("return")) << r.dump();
  r = qmp.Execute("block-export-add", {{"type", "nbd"},
                                       {"id", "exp0"},
                                       {"node-name", "disk0"},
                                       {"name", "disk0"},
                                       {"writable", false}});
  ASSERT_TRUE(r.contains("return")) << r.dump();
  const std::string quri = "nbd+unix:///disk0?socket=" + qsock;
  std::string out = dir_.Sub("through-qemu.raw");
  MustRun({"nbdcopy", quri, out});
  EXPECT_EQ(FileSha256(out), expected_sha);
  unlink(out.c_str());

  // block-stream pulls everything from the export into the overlay.
  r = qmp.Execute("block-stream", {{"job-id", "stream0"}, {"device", "disk0"}});
  ASSERT_TRUE(r.contains("return")) << r.dump();
  auto done = qmp.WaitEvent("BLOCK_JOB_COMPLETED", 300000);
  ASSERT_FALSE(done.is_null());
  EXPECT_FALSE(done["data"].contains("error")) << done.dump();
  blocks = qmp.Execute("query-block");
  for (const auto& b : blocks["return"]) {
    if (b.contains("inserted")) {
      EXPECT_FALSE(b["inserted"].contains("backing_file")) << b.dump();
    }
  }

  // The export is no longer needed: stop it, QEMU still reads everything.
  EXPECT_EQ(server.Stop(), 0) << server.log();
  MustRun({"nbdcopy", quri, out});
  EXPECT_EQ(FileSha256(out), expected_sha);

  qmp.Execute("quit");
  EXPECT_EQ(qemu.Wait(30000), 0);
  auto img = RunCommand({"qemu-img", "info", "--output=json", overlay});
  EXPECT_EQ(nlohmann::json::parse(img.out).count("backing-filename"), 0u) << img.out;
}

TEST_F(ServeTest, TcpNeedsTlsPskOrInsecureTcp) {
  unsigned port = FreePort();
  // Any TCP listener, loopback included, needs TLS or an explicit
  // --insecure-tcp: any local user can connect to a loopback port.
  for (const std::string bind : {"127.0.0.1", "0.0.0.0"}) {
    auto r = RunCommand({VmdedupBinary(), "serve", "-r", w().repo, "vm1/vda/1", "--port",
                         std::to_string(port), "--bind", bind});
    EXPECT_EQ(r.exit_code, 2) << bind;
    EXPECT_NE(r.err.find("requires --tls-psk FILE"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("--insecure-tcp"), std::string::npos) << r.err;
  }
  {
    Server server({"-r", w().repo, "vm1/vda/1", "--port", std::to_string(port), "--insecure-tcp"},
                  dir_.Sub("tcp.log"));
    ASSERT_TRUE(server.ready()) << server.log();
    EXPECT_EQ(server.uri(), "nbd://127.0.0.1:" + std::to_string(port));
    EXPECT_NE(server.log().find("without TLS (--insecure-tcp)"), std::string::npos) << server.log();
    auto size = RunCommand({"nbdinfo", "--size", server.uri()});
    EXPECT_EQ(size.out, std::to_string(kImageSize) + "\n") << size.err;
    EXPECT_EQ(server.Stop(), 0);
  }

  std::string psk = dir_.Sub("keys.psk");
  WriteFileBytes(psk, "alice:000102030405060708090a0b0c0d0e0f\n");
  // A key file others can read is served, with a warning.
  chmod(psk.c_str(), 0644);
  port = FreePort();
  {
    Server loose({"-r", w().repo, "vm1/vda/1", "--port", std::to_string(port), "--tls-psk", psk},
                 dir_.Sub("loose.log"));
    ASSERT_TRUE(loose.ready()) << loose.log();
    EXPECT_NE(loose.log().find("is readable by every user (mode 0644)"), std::string::npos)
        << loose.log();
    EXPECT_EQ(loose.Stop(), 0);
  }
  chmod(psk.c_str(), 0600);
  port = FreePort();
  Server server({"-r", w().repo, "vm1/vda/1", "--port", std::to_string(port), "--tls-psk", psk},
                dir_.Sub("tls.log"));
  ASSERT_TRUE(server.ready()) << server.log();
  EXPECT_EQ(server.log().find("warning"), std::string::npos) << server.log();
  EXPECT_EQ(server.uri(), "nbds://127.0.0.1:" + std::to_string(port));
  EXPECT_TRUE(server.info()["tls"].get<bool>());
  auto plain = RunCommand({"nbdinfo", "--size", "nbd://127.0.0.1:" + std::to_string(port)});
  EXPECT_NE(plain.exit_code, 0);
  auto tls =
      RunCommand({"nbdinfo", "--size",
                  "nbds://alice@127.0.0.1:" + std::to_string(port) + "/?tls-psk-file=" + psk});
  EXPECT_EQ(tls.out, std::to_string(kImageSize) + "\n") << tls.err;
  EXPECT_EQ(server.Stop(), 0);
}

TEST_F(ServeTest, BadUsageAndHelp) {
  auto help = RunCommand({VmdedupBinary(), "serve", "--help"});
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_NE(help.out.find("Exit codes:"), std::string::npos);
  auto r = RunCommand({VmdedupBinary(), "serve", "-r", w().repo, "vm1/vda/9"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  r = RunCommand({VmdedupBinary(), "serve", "-r", w().repo, "nosuchvm/vda/1"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("nosuchvm"), std::string::npos) << r.err;
  r = RunCommand(
      {VmdedupBinary(), "serve", "-r", w().repo, "vm1/vda/1", "--socket", "/x", "--port", "10809"});
  EXPECT_EQ(r.exit_code, 2);
  r = RunCommand({VmdedupBinary(), "serve", "-r", w().repo, "vm1/vda/1", "--port", "99999"});
  EXPECT_EQ(r.exit_code, 2);
  r = RunCommand({VmdedupBinary(), "serve", "-r", w().repo, "vm1/vda/1", "--port", "10809",
                  "--bind", "example.com"});
  EXPECT_EQ(r.exit_code, 2);
  // Sizes are digits and a unit: a negative one never reaches nbdkit.
  for (const std::string bad : {"-5", " 5", "+5", "", "99999999999T", "18446744073709551616"}) {
    r = RunCommand({VmdedupBinary(), "serve", "-r", w().repo, "vm1/vda/1", "--cache", bad});
    EXPECT_EQ(r.exit_code, 2) << bad << ": " << r.err;
    EXPECT_NE(r.err.find("size"), std::string::npos) << r.err;
  }
  // A path that is not a socket is never replaced.
  std::string file = dir_.Sub("not-a-socket");
  WriteFileBytes(file, "keep");
  r = RunCommand({VmdedupBinary(), "serve", "-r", w().repo, "vm1/vda/1", "--socket", file});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_EQ(ReadFileBytes(file), "keep");
}

// The plugin run by nbdkit by hand: its tuning keys are checked, and an
// export with read-ahead off and one decoder, or with deep read-ahead, still
// serves exact bytes.
TEST_F(ServeTest, PluginKeysReadaheadAndDecoders) {
  std::string env;
#ifdef VMDEDUP_NBDKIT_PRELOAD
  env = std::string("LD_PRELOAD=") + VMDEDUP_NBDKIT_PRELOAD + " ASAN_OPTIONS=detect_leaks=0 ";
#endif
  auto nbdkit_on = [&](const std::string& sock) {
    return env + "nbdkit -f -U '" + sock + "' --readonly '" + VMDEDUP_NBDKIT_PLUGIN + "' repo='" +
           w().repo + "' vm1/vda/1 ";
  };
  // A key wrongly accepted would leave the server running: bounded.
  const std::string nbdkit = "timeout 60 env " + nbdkit_on(dir_.Sub("nbdkit.sock"));
  for (const char* bad : {"decoders=0", "decoders=65", "readahead=x", "readahead=-1"}) {
    auto r = RunShell(nbdkit + bad);
    EXPECT_NE(r.exit_code, 0) << bad;
    EXPECT_NE(r.err.find(std::string(bad) + ": expected a number"), std::string::npos)
        << bad << ": " << r.err;
  }
  auto r = RunShell(nbdkit + "nosuchkey=1");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("readahead=, decoders="), std::string::npos) << r.err;
  int n = 0;
  for (const char* keys : {"readahead=0 decoders=1", "readahead=16 decoders=3"}) {
    std::string out = dir_.Sub("copy" + std::to_string(n) + ".raw");
    std::string sock = dir_.Sub("server" + std::to_string(n++) + ".sock");
    // The server in the background (stopped by its pid), one copy through it.
    r = RunShell(nbdkit_on(sock) + keys + " & p=$!; for i in $(seq 1 300); do [ -S '" + sock +
                 "' ] && break; sleep 0.1; done; nbdcopy 'nbd+unix:///?socket=" + sock + "' '" +
                 out + "'; rc=$?; kill $p; wait $p; exit $rc");
    ASSERT_EQ(r.exit_code, 0) << keys << ": " << r.err;
    EXPECT_EQ(FileSha256(out), w().snap1_sha) << keys;
  }
}

// A CDS index over blocks the test stored in the CDS area itself.
class TestCds final : public CommonBlockIndex {
 public:
  std::optional<BlockRef> Lookup(const Fingerprint& fp) const override {
    auto it = map.find(fp);
    if (it == map.end()) return std::nullopt;
    return it->second;
  }
  std::map<Fingerprint, BlockRef> map;
};

TEST_F(ServeTest, SnapshotWithCdsReferences) {
  std::string repo_path = dir_.Sub("cds-repo");
  MustRun({VmdedupBinary(), "init", "--chunker", "fixed", repo_path});
  // Half of the image's first 4 MiB goes to the CDS area beforehand.
  std::string image = ReadFileBytes(w().snap1_raw);
  TestCds cds;
  {
    auto repo = Repository::Open(repo_path);
    ASSERT_TRUE(repo.ok()) << repo.status().ToString();
    ContainerWriter writer(7, 32 * kMiB);
    for (uint64_t off = 0; off < 4 * kMiB; off += 8192) {
      std::span<const uint8_t> block(reinterpret_cast<const uint8_t*>(image.data() + off), 4096);
      Fingerprint fp = Sha256(block);
      BlockRecordInfo info = writer.Append(fp, 4096, Compression::kNone, block);
      BlockRef ref;
      ref.kind = BlockKind::kCds;
      ref.length = 4096;
      ref.fingerprint = fp;
      ref.container = 7;
      ref.offset = info.offset;
      ref.record_len = info.record_len;
      cds.map[fp] = ref;
    }
    std::string object = writer.Finish();
    BlockRef any = cds.map.begin()->second;
    ASSERT_TRUE((*repo)
                    ->objects()
                    ->Put(BlockObjectName("vmc", any),
                          {reinterpret_cast<const uint8_t*>(object.data()), object.size()})
                    .ok());
    BackupJobOptions o;
    o.vm = "vmc";
    o.disk = "vda";
    o.source = "raw:" + w().snap1_raw;
    o.cds = &cds;
    auto snap = RunBackupJob(**repo, o);
    ASSERT_TRUE(snap.ok()) << snap.status().ToString();
    EXPECT_EQ(snap->stats.cds, 2 * kMiB);
  }
  Server server({"-r", repo_path, "vmc/vda/latest"}, dir_.Sub("serve.log"));
  ASSERT_TRUE(server.ready()) << server.log();
  std::string out = dir_.Sub("copy.raw");
  MustRun({"nbdcopy", server.uri(), out});
  EXPECT_EQ(FileSha256(out), w().snap1_sha);
  EXPECT_EQ(server.Stop(), 0);
}

// In-process: the export under many threads, with a cache of two segments.
TEST_F(ServeTest, SmallRandomReadsDecodeOnlyTheirBlocksAndSequentialReadsWholeSegments) {
  auto e = SnapshotExport::Open(w().repo, "vm1/vda/1", ExportOptions{});
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  SnapshotExport& ex = **e;
  const std::string image = ReadFileBytes(w().snap1_raw);
  std::mt19937_64 rng(5);
  std::vector<uint8_t> buf(64 * kKiB);
  int mismatches = 0;
  for (int i = 0; i < 200; i++) {
    // Unaligned reads of 1 byte to 64 KiB inside the random data (first 24
    // MiB), never continuing the previous one.
    uint64_t len = 1 + rng() % buf.size();
    uint64_t off = (rng() % (24 * kMiB - len)) | 1;
    ASSERT_TRUE(ex.Read(buf.data(), len, off).ok()) << off;
    if (std::memcmp(buf.data(), image.data() + off, len) != 0) mismatches++;
  }
  EXPECT_EQ(mismatches, 0);
  ExportStats st = ex.stats();
  EXPECT_GE(st.range_reads, 150u);  // the rest fell into the hole or the zeros
  EXPECT_EQ(st.decoded_segments, 0u);
  // A sequential reader: its reads after the first decode whole segments.
  for (uint64_t off = 4 * kMiB; off < 4 * kMiB + 4 * buf.size(); off += buf.size()) {
    ASSERT_TRUE(ex.Read(buf.data(), buf.size(), off).ok());
    EXPECT_EQ(std::memcmp(buf.data(), image.data() + off, buf.size()), 0) << off;
  }
  EXPECT_GE(ex.stats().decoded_segments, 1u);
}

TEST_F(ServeTest, SnapshotExportParallelReadsWithinTheCacheBudget) {
  ExportOptions options;
  options.cache_bytes = 4 * kMiB;
  options.decoders = 2;
  auto e = SnapshotExport::Open(w().repo, "vm1/vda/1", options);
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  SnapshotExport& ex = **e;
  const std::string image = ReadFileBytes(w().snap1_raw);
  ASSERT_EQ(ex.size(), image.size());
  std::atomic<int> mismatches{0}, errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; t++) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      std::vector<uint8_t> buf(3 * kMiB);
      for (int i = 0; i < 60; i++) {
        // Reads crossing segment boundaries; half of them near each other.
        uint64_t len = 1 + rng() % buf.size();
        uint64_t off = (i % 2 ? rng() % (8 * kMiB) : rng()) % (image.size() - len);
        Status st = ex.Read(buf.data(), len, off);
        if (!st.ok()) {
          errors++;
          continue;
        }
        if (std::memcmp(buf.data(), image.data() + off, len) != 0) mismatches++;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(mismatches.load(), 0);
  ExportStats st = ex.stats();
  EXPECT_LE(st.segments.bytes, 4 * kMiB);
  EXPECT_GT(st.segments.evictions, 0u);
  EXPECT_GT(st.segments.hits + st.segments.waits, 0u);
  // Beyond the end: InvalidArgument, no crash.
  uint8_t b;
  EXPECT_TRUE(ex.Read(&b, 1, ex.size()).IsInvalidArgument());
  // Extents: first-only stops inside the first segment; full walk covers all.
  std::vector<std::tuple<uint64_t, uint64_t, bool>> ext;
  auto collect = [&](uint64_t o, uint64_t l, bool z) {
    ext.emplace_back(o, l, z);
    return Status::OK();
  };
  ASSERT_TRUE(ex.Extents(8 * kMiB + 100, 1, true, collect).ok());
  ASSERT_EQ(ext.size(), 1u);
  EXPECT_EQ(ext[0], std::make_tuple(8 * kMiB + 100, 2 * kMiB - 100, true));
  ext.clear();
  ASSERT_TRUE(ex.Extents(0, ex.size(), false, collect).ok());
  uint64_t pos = 0;
  for (const auto& [o, l, z] : ext) {
    EXPECT_EQ(o, pos);
    pos = o + l;
  }
  EXPECT_EQ(pos, ex.size());
  // A sequential reader gets segments decoded ahead of it (one export of a
  // VM at a time: its metadata store admits one opener).
  e->reset();
  {
    ExportOptions seq_options;
    seq_options.cache_bytes = 32 * kMiB;
    auto seq = SnapshotExport::Open(w().repo, "vm1/vda/1", seq_options);
    ASSERT_TRUE(seq.ok()) << seq.status().ToString();
    std::vector<uint8_t> buf(256 * kKiB);
    for (uint64_t off = 0; off < 24 * kMiB; off += buf.size()) {
      ASSERT_TRUE((*seq)->Read(buf.data(), buf.size(), off).ok());
      ASSERT_EQ(std::memcmp(buf.data(), image.data() + off, buf.size()), 0) << off;
    }
    EXPECT_GT((*seq)->stats().readahead_segments, 0u);
  }
}

// A sequential pass does not fill the cache: segments decoded for it leave
// once their data has been read (across the image's holes too), while a
// random reader's segments stay.
TEST_F(ServeTest, SequentialReaderDropsSegmentsBehindIt) {
  const std::string image = ReadFileBytes(w().snap1_raw);
  ExportOptions options;
  options.cache_bytes = 64 * kMiB;  // room for every segment
  std::vector<uint8_t> buf(256 * kKiB);
  {
    auto e = SnapshotExport::Open(w().repo, "vm1/vda/1", options);
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    // Data segments 0-3 and 5-11; segment 4 (8-10 MiB) is a hole, skipped
    // as a client following the extents would.
    uint64_t readahead_before = 0;
    for (int pass = 0; pass < 2; pass++) {
      for (uint64_t off = 0; off < 24 * kMiB; off += buf.size()) {
        if (off >= 8 * kMiB && off < 10 * kMiB) continue;
        ASSERT_TRUE((*e)->Read(buf.data(), buf.size(), off).ok());
        ASSERT_EQ(std::memcmp(buf.data(), image.data() + off, buf.size()), 0) << off;
      }
      ExportStats st = (*e)->stats();
      // All but segment 0 (nothing before it) left behind the reader, the
      // one after the hole included.
      EXPECT_EQ(st.segments.dropped, 10u * (pass + 1)) << pass;
      EXPECT_LE(st.segments.bytes, 2 * kMiB) << pass;
      EXPECT_EQ(st.segments.evictions, 0u);
      // Read-ahead worked in both passes, and decoded (almost) nothing the
      // reader had already left behind: 11 data segments, then 10 again.
      EXPECT_GT(st.readahead_segments, readahead_before) << pass;
      readahead_before = st.readahead_segments;
      EXPECT_GE(st.decoded_segments, pass == 0 ? 11u : 21u);
      EXPECT_LE(st.decoded_segments, pass == 0 ? 13u : 25u);
    }
  }
  {
    // A random reader: whole segments, none after the one before it.
    auto e = SnapshotExport::Open(w().repo, "vm1/vda/1", options);
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    std::vector<uint8_t> seg(2 * kMiB);
    for (uint64_t index : {10, 7, 2, 10, 7}) {
      ASSERT_TRUE((*e)->Read(seg.data(), seg.size(), index * 2 * kMiB).ok());
      ASSERT_EQ(std::memcmp(seg.data(), image.data() + index * 2 * kMiB, seg.size()), 0);
    }
    ExportStats st = (*e)->stats();
    EXPECT_EQ(st.segments.dropped, 0u);
    EXPECT_EQ(st.segments.bytes, 6 * kMiB);
    EXPECT_EQ(st.segments.hits, 2u);
  }
}

TEST(LruCacheTest, SingleFlightEvictionAndErrorsNotCached) {
  LruCache<std::string> cache(10, [](const std::string& s) { return uint64_t{s.size()}; });
  std::atomic<int> loads{0};
  auto loader = [&](uint64_t key) {
    return [&, key]() -> Result<std::shared_ptr<const std::string>> {
      loads++;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      return std::make_shared<const std::string>(4, static_cast<char>('a' + key));
    };
  };
  // Eight threads miss on one key at once: one load.
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; i++)
    threads.emplace_back([&] {
      auto r = cache.GetOrLoad(1, loader(1));
      EXPECT_TRUE(r.ok());
      EXPECT_EQ(**r, "bbbb");
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(loads.load(), 1);
  // Budget 10: keys 1, 2 fit; 3 evicts the least recently used (2, since 1
  // was just used).
  ASSERT_TRUE(cache.GetOrLoad(2, loader(2)).ok());
  ASSERT_NE(cache.Find(1), nullptr);
  ASSERT_TRUE(cache.GetOrLoad(3, loader(3)).ok());
  EXPECT_EQ(cache.Find(2), nullptr);
  EXPECT_NE(cache.Find(1), nullptr);
  EXPECT_LE(cache.stats().bytes, 10u);
  // Errors reach every waiter and are not cached.
  int fails = 0;
  auto failing = [&]() -> Result<std::shared_ptr<const std::string>> {
    fails++;
    return Status::Corruption("bad");
  };
  EXPECT_TRUE(cache.GetOrLoad(9, failing).status().IsCorruption());
  EXPECT_TRUE(cache.GetOrLoad(9, failing).status().IsCorruption());
  EXPECT_EQ(fails, 2);
  // A value larger than the budget is returned but not kept.
  auto big = cache.GetOrLoad(5, []() -> Result<std::shared_ptr<const std::string>> {
    return std::make_shared<const std::string>(64, 'x');
  });
  ASSERT_TRUE(big.ok());
  EXPECT_EQ(cache.Find(5), nullptr);
}

}  // namespace
}  // namespace vmdedup::testing
