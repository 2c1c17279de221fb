// End-to-end tests of `vmdedup backup ... qemu:QMP_SOCKET` and `vmdedup
// status` against a real qemu-system-x86_64 (KVM when usable, else TCG)
// whose guest has no OS: "guest" writes go through the virtio device's own
// BlockBackend (HMP qemu-io -d /machine/peripheral/ID/virtio-backend) on a
// second QMP monitor of the test's own, and the test keeps a mirror of every
// disk's content to compare restores with (checked against the image after
// QEMU quits).
//
// Each disk is a qcow2 node "fmt-ID" under a throttle filter "thr-ID" (its
// read limit is raised and lowered at run time) attached to virtio-blk
// device ID, so that backups can be made deliberately slow.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <thread>

#include "base/fingerprint.h"
#include "dirty-bitmap/qmp_client.h"
#include "tests/test_util.h"

namespace vmdedup::testing {
namespace {

using nlohmann::json;
using namespace std::chrono_literals;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1 << 20;

bool KvmUsable() {
  int fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (fd < 0) return false;
  ::close(fd);
  return true;
}

std::string Sha(const std::string& data) {
  return Sha256({reinterpret_cast<const uint8_t*>(data.data()), data.size()}).Hex();
}

// SHA-256 of a file's content, read in one go (FileSha256 reads byte by
// byte, which takes seconds for 64 MiB under the sanitizers).
std::string FileSha(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return "";
  std::string data(static_cast<size_t>(in.tellg()), '\0');
  in.seekg(0);
  in.read(data.data(), static_cast<std::streamsize>(data.size()));
  return Sha(data);
}

struct DiskSpec {
  std::string id;  // device id: the disk series name
  uint64_t size;
  uint64_t data;  // bytes of random data at the start
  uint64_t seed;
};

// A QEMU guest without an OS, with virtio disks on qcow2 images.
class Guest {
 public:
  Guest(const ScratchDir& dir, std::vector<DiskSpec> disks, bool with_qga_chardev = false)
      : dir_(dir), specs_(std::move(disks)), qga_(with_qga_chardev) {
    for (const auto& d : specs_) {
      std::string raw = dir_.Sub(d.id + ".seed");
      std::string content = RandomBytes(d.data, d.seed);
      content.resize(d.size, '\0');
      {
        std::ofstream out(raw, std::ios::binary | std::ios::trunc);
        out.write(content.data(), static_cast<std::streamsize>(content.size()));
      }
      auto r = RunCommand({"qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, Image(d.id)});
      EXPECT_EQ(r.exit_code, 0) << r.err;
      ::unlink(raw.c_str());
      mirrors_.push_back(std::move(content));
    }
  }
  ~Guest() { Kill(); }

  std::string Image(const std::string& id) const { return dir_.Sub(id + ".qcow2"); }
  std::string Socket() const { return dir_.Sub("vmdedup.qmp"); }
  std::string QgaSocket() const { return dir_.Sub("qga.sock"); }
  pid_t pid() const { return pid_; }
  QmpClient& qmp() { return *qmp_; }

  void Start() {
    ::unlink(Socket().c_str());
    ::unlink(dir_.Sub("test.qmp").c_str());
    std::vector<std::string> argv = {"qemu-system-x86_64",
                                     "-nodefaults",
                                     "-display",
                                     "none",
                                     "-machine",
                                     "pc",
                                     "-accel",
                                     KvmUsable() ? "kvm" : "tcg",
                                     "-m",
                                     "64",
                                     "-qmp",
                                     "unix:" + Socket() + ",server=on,wait=off",
                                     "-qmp",
                                     "unix:" + dir_.Sub("test.qmp") + ",server=on,wait=off",
                                     "-object",
                                     "throttle-group,id=tg0"};
    for (const auto& d : specs_) {
      argv.insert(
          argv.end(),
          {"-blockdev",
           "driver=qcow2,node-name=fmt-" + d.id + ",file.driver=file,file.filename=" + Image(d.id),
           "-blockdev",
           "driver=throttle,node-name=thr-" + d.id + ",throttle-group=tg0,file=fmt-" + d.id,
           "-device", "virtio-blk-pci,drive=thr-" + d.id + ",id=" + d.id});
    }
    if (qga_) {
      ::unlink(QgaSocket().c_str());
      argv.insert(
          argv.end(),
          {"-chardev", "socket,path=" + QgaSocket() + ",server=on,wait=off,id=qga0", "-device",
           "virtio-serial", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"});
    }
    pid_ = SpawnLogged(argv, dir_.Sub("qemu.log"));
    for (int i = 0; i < 400 && !qmp_; i++) {
      auto q = QmpClient::Connect(dir_.Sub("test.qmp"), 5000);
      if (q.ok())
        qmp_ = std::move(q).value();
      else
        std::this_thread::sleep_for(25ms);
    }
    ASSERT_NE(qmp_, nullptr) << "QEMU did not start; see " << dir_.Sub("qemu.log");
  }

  void Kill() {
    qmp_.reset();
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
  }

  // A clean shutdown: QEMU stores the persistent bitmaps in the images.
  void Quit() {
    ASSERT_TRUE(qmp_->Execute("quit").ok());
    qmp_.reset();
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

  // A guest write of `pattern` bytes, also applied to the mirror.
  void Write(size_t disk, int pattern, uint64_t offset, uint64_t length) {
    char cmd[256];
    std::snprintf(cmd, sizeof(cmd),
                  "qemu-io -d /machine/peripheral/%s/virtio-backend \"write -P 0x%02x %llu %llu\"",
                  specs_[disk].id.c_str(), pattern, static_cast<unsigned long long>(offset),
                  static_cast<unsigned long long>(length));
    auto r = qmp_->HumanMonitorCommand(cmd);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    std::memset(mirrors_[disk].data() + offset, pattern, length);
  }

  void Resize(size_t disk, uint64_t size) {
    // On the top node: a filter above a resized node would keep its old size.
    auto r =
        qmp_->Execute("block_resize", {{"node-name", "thr-" + specs_[disk].id}, {"size", size}});
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    mirrors_[disk].resize(size, '\0');
  }

  // Limits reads of every disk to `bps` bytes a second (0: unlimited).
  void Throttle(uint64_t bps) {
    auto r = qmp_->Execute(
        "qom-set",
        {{"path", "/objects/tg0"}, {"property", "limits"}, {"value", {{"bps-read", bps}}}});
    ASSERT_TRUE(r.ok()) << r.status().ToString();
  }

  const std::string& Mirror(size_t disk) const { return mirrors_[disk]; }
  std::string MirrorSha(size_t disk) const { return Sha(mirrors_[disk]); }

  // The guest-visible content of an image (QEMU must not be running).
  std::string ImageSha(size_t disk) {
    std::string raw = dir_.Sub("image.raw");
    auto r = RunCommand({"qemu-img", "convert", "-O", "raw", Image(specs_[disk].id), raw});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::string sha = FileSha(raw);
    ::unlink(raw.c_str());
    return sha;
  }

  // What the block layer looks like: node names, exports and jobs.
  std::vector<std::string> Graph() {
    std::vector<std::string> out;
    auto g = qmp_->Execute("x-debug-query-block-graph");
    EXPECT_TRUE(g.ok()) << g.status().ToString();
    if (g.ok())
      for (const auto& n : (*g)["nodes"])
        out.push_back(n["type"].get<std::string>() + ":" + n["name"].get<std::string>());
    auto exports = qmp_->Execute("query-block-exports");
    if (exports.ok())
      for (const auto& e : *exports) out.push_back("export:" + e["id"].get<std::string>());
    auto jobs = qmp_->Execute("query-block-jobs");
    if (jobs.ok())
      for (const auto& j : *jobs) out.push_back("job:" + j["device"].get<std::string>());
    std::sort(out.begin(), out.end());
    return out;
  }

  bool HasFleeceExport() {
    auto e = qmp_->Execute("query-block-exports");
    if (!e.ok()) return false;
    for (const auto& x : *e)
      if (x["id"].get<std::string>().rfind("vmdedup-", 0) == 0) return true;
    return false;
  }

  bool Running() {
    auto st = qmp_->Execute("query-status");
    return st.ok() && (*st)["status"] == "running";
  }

 private:
  const ScratchDir& dir_;
  std::vector<DiskSpec> specs_;
  bool qga_;
  std::vector<std::string> mirrors_;
  pid_t pid_ = -1;
  std::unique_ptr<QmpClient> qmp_;
};

// A vmdedup running in the background, its output in files.
class Background {
 public:
  Background(const ScratchDir& dir, std::vector<std::string> args) : dir_(dir) {
    args.insert(args.begin(), VmdedupBinary());
    pid_ = fork();
    if (pid_ == 0) {
      int out = ::open(dir_.Sub("bg.out").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      int err = ::open(dir_.Sub("bg.err").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      dup2(out, 1);
      dup2(err, 2);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
  }
  ~Background() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  pid_t pid() const { return pid_; }
  bool Exited() {
    if (pid_ <= 0) return true;
    int status;
    pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      pid_ = -1;
      return true;
    }
    return false;
  }
  CommandResult Wait() {
    if (pid_ > 0) {
      int status;
      ::waitpid(pid_, &status, 0);
      exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      pid_ = -1;
    }
    CommandResult r;
    r.exit_code = exit_code_;
    std::ifstream o(dir_.Sub("bg.out")), e(dir_.Sub("bg.err"));
    r.out.assign(std::istreambuf_iterator<char>(o), std::istreambuf_iterator<char>());
    r.err.assign(std::istreambuf_iterator<char>(e), std::istreambuf_iterator<char>());
    return r;
  }

 private:
  const ScratchDir& dir_;
  pid_t pid_ = -1;
  int exit_code_ = -1;
};

class LiveBackupTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(RunShell("command -v qemu-system-x86_64 >/dev/null").exit_code, 0)
        << "qemu-system-x86_64 is missing: scripts/setup.sh test installs it";
    repo_ = dir_.Sub("repo");
    scratch_ = dir_.Sub("scratch");
    ASSERT_EQ(::mkdir(scratch_.c_str(), 0700), 0);
    auto r = Vmdedup({"init", repo_, "--chunker", "fixed"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }

  CommandResult Vmdedup(std::vector<std::string> args) {
    args.insert(args.begin(), VmdedupBinary());
    return RunCommand(args);
  }

  std::vector<std::string> BackupArgs(Guest& g, const std::vector<std::string>& extra = {}) {
    std::vector<std::string> a = {"backup", "-r",     repo_,           "--vm",
                                  "vm1",    "--json", "--scratch-dir", scratch_};
    a.insert(a.end(), extra.begin(), extra.end());
    a.push_back("qemu:" + g.Socket());
    return a;
  }

  // A successful backup: its snapshots (one per disk).
  json Backup(Guest& g, const std::vector<std::string>& extra = {}) {
    auto r = Vmdedup(BackupArgs(g, extra));
    last_note_ = r.err;
    EXPECT_EQ(r.exit_code, 0) << r.err;
    if (r.exit_code != 0) return json::array({json::object()});
    return json::parse(r.out);
  }

  std::string RestoreSha(const std::string& snapshot) {
    std::string out = dir_.Sub("restored.raw");
    auto r = Vmdedup({"restore", "-r", repo_, snapshot, "--to", out, "--force"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::string sha = FileSha(out);
    ::unlink(out.c_str());
    return sha;
  }

  void ExpectCheckClean() {
    auto r = Vmdedup({"check", "-r", repo_, "--read-data", "--json"});
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    if (r.exit_code == 0) {
      EXPECT_TRUE(json::parse(r.out)["ok"].get<bool>()) << r.out;
    }
  }

  void ExpectNoScratchFiles() {
    std::vector<std::string> left;
    for (const auto& e : std::filesystem::recursive_directory_iterator(scratch_))
      left.push_back(e.path().string());
    EXPECT_TRUE(left.empty()) << "left in the scratch directory: " << json(left).dump();
  }

  json Status(Guest& g) {
    auto r = Vmdedup({"status", "-r", repo_, "--json", "qemu:" + g.Socket()});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.exit_code == 0 ? json::parse(r.out) : json::object();
  }

  std::vector<std::string> VmdedupBitmaps(Guest& g, size_t disk) {
    std::vector<std::string> out;
    json s = Status(g);
    if (!s.contains("disks")) return out;
    for (const auto& b : s["disks"][disk]["bitmaps"])
      if (b["vmdedup"].get<bool>()) out.push_back(b["name"]);
    return out;
  }

  // Waits until a backup's fleecing export exists (the reading starts).
  static bool WaitForFleece(Guest& g, Background& bg) {
    for (int i = 0; i < 3000; i++) {
      if (g.HasFleeceExport()) return true;
      if (bg.Exited()) return false;
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }

  ScratchDir dir_;
  std::string repo_, scratch_;
  std::string last_note_;
};

bool Contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

TEST_F(LiveBackupTest, FullThenChainedIncrementalsReadOnlyDirtyExtentsAndRestoreBitExact) {
  Guest g(dir_, {{"vd0", 64 * kMiB, 16 * kMiB, 1}});
  g.Start();
  const auto graph = g.Graph();
  std::vector<std::string> shas = {g.MirrorSha(0)};
  auto s1 = Backup(g)[0];
  EXPECT_TRUE(Contains(last_note_, "vm1/vd0: full: first backup of vm1/vd0")) << last_note_;
  EXPECT_EQ(s1["id"], "vm1/vd0/1");
  EXPECT_EQ(s1["read_bytes"].get<uint64_t>(), 16 * kMiB);

  const std::vector<std::vector<std::tuple<int, uint64_t, uint64_t>>> rounds = {
      {{0x11, 1 * kMiB, 64 * kKiB}, {0x12, 5 * kMiB, 128 * kKiB}, {0x13, 40 * kMiB, 64 * kKiB}},
      {{0x21, 2 * kMiB, 64 * kKiB}, {0x22, 1 * kMiB, 64 * kKiB}},
      {{0x31, 0, 64 * kKiB}, {0x32, 63 * kMiB, 64 * kKiB}, {0x33, 12 * kMiB, 192 * kKiB}},
  };
  const std::vector<uint64_t> dirty = {256 * kKiB, 128 * kKiB, 320 * kKiB};
  for (size_t i = 0; i < rounds.size(); i++) {
    for (auto [p, off, len] : rounds[i]) g.Write(0, p, off, len);
    shas.push_back(g.MirrorSha(0));
    auto s = Backup(g)[0];
    EXPECT_TRUE(Contains(last_note_, "incremental: dirty bitmap")) << last_note_;
    EXPECT_EQ(s["parent"], "vm1/vd0/" + std::to_string(i + 1));
    EXPECT_EQ(s["read_bytes"].get<uint64_t>(), dirty[i]) << s.dump();
    EXPECT_EQ(s["zero"].get<uint64_t>() + s["segment"].get<uint64_t>() +
                  s["block"].get<uint64_t>() + s["cds"].get<uint64_t>() + s["new"].get<uint64_t>(),
              s["size"].get<uint64_t>());
  }
  for (size_t i = 0; i < shas.size(); i++)
    EXPECT_EQ(RestoreSha("vm1/vd0/" + std::to_string(i + 1)), shas[i]) << "snapshot " << i + 1;
  ExpectCheckClean();
  EXPECT_EQ(g.Graph(), graph);
  ExpectNoScratchFiles();

  // status: the one bitmap of the series, the writes since the last backup
  // and the last snapshot.
  g.Write(0, 0x41, 30 * kMiB, 64 * kKiB);
  json st = Status(g);
  ASSERT_EQ(st["disks"].size(), 1u) << st.dump();
  const json& d = st["disks"][0];
  EXPECT_EQ(d["name"], "vd0");
  EXPECT_EQ(d["bitmap_node"], "fmt-vd0");
  ASSERT_EQ(d["bitmaps"].size(), 1u) << st.dump();
  // Named by the series' prefix, the seq of the snapshot it follows and a
  // nonce; the snapshot names exactly this one.
  EXPECT_TRUE(std::regex_match(d["bitmaps"][0]["name"].get<std::string>(),
                               std::regex("vmdedup\\.[0-9a-f]{16}\\.4\\.[0-9a-f]{8}")))
      << st.dump();
  EXPECT_EQ(d["bitmaps"][0]["dirty_bytes"].get<uint64_t>(), 64 * kKiB);
  EXPECT_TRUE(d["bitmaps"][0]["recording"].get<bool>());
  ASSERT_EQ(d["series"].size(), 1u) << st.dump();
  EXPECT_EQ(d["series"][0]["last_snapshot"], "vm1/vd0/4");
  EXPECT_EQ(d["series"][0]["last_bitmap"], d["bitmaps"][0]["name"]);
  auto text = Vmdedup({"status", "-r", repo_, "qemu:" + g.Socket()});
  EXPECT_EQ(text.exit_code, 0) << text.err;
  EXPECT_TRUE(Contains(text.out, "dirty 64.0 KiB")) << text.out;
  EXPECT_TRUE(Contains(text.out, "last snapshot vm1/vd0/4")) << text.out;

  // A damaged series of another VM, with no bitmap on this guest's disk, is
  // not this disk's business: status leaves it out and succeeds, unless that
  // VM is the one asked about.
  {
    const std::string other = dir_.Sub("other.raw");
    std::ofstream(other) << std::string(256 * 1024, 'o');
    auto b = Vmdedup({"backup", "-r", repo_, "--vm", "other", "--disk", "vd0", "raw:" + other});
    ASSERT_EQ(b.exit_code, 0) << b.err;
    ASSERT_EQ(testing::DamageSnapshotRecord(repo_, "other", "vd0", 1), "");
    auto unrelated = Vmdedup({"status", "-r", repo_, "--json", "qemu:" + g.Socket()});
    EXPECT_EQ(unrelated.exit_code, 0) << unrelated.out << unrelated.err;
    json uj = json::parse(unrelated.out);
    ASSERT_EQ(uj["disks"][0]["series"].size(), 1u) << unrelated.out;
    EXPECT_EQ(uj["disks"][0]["series"][0]["last_snapshot"], "vm1/vd0/4") << unrelated.out;
    auto asked = Vmdedup({"status", "-r", repo_, "--vm", "other", "--json", "qemu:" + g.Socket()});
    EXPECT_EQ(asked.exit_code, 1) << asked.out << asked.err;
    json aj = json::parse(asked.out);
    ASSERT_EQ(aj["disks"][0]["series"].size(), 1u) << asked.out;
    EXPECT_EQ(aj["disks"][0]["series"][0]["series"], "other/vd0") << asked.out;
    EXPECT_TRUE(aj["disks"][0]["series"][0].contains("error")) << asked.out;
  }

  // A series of this disk whose snapshots cannot be read is shown with its
  // error, and status fails, rather than leaving the series out.
  ASSERT_EQ(testing::DamageSnapshotRecord(repo_, "vm1", "vd0", 4), "");
  auto damaged = Vmdedup({"status", "-r", repo_, "--json", "qemu:" + g.Socket()});
  EXPECT_EQ(damaged.exit_code, 1) << damaged.out << damaged.err;
  json dj = json::parse(damaged.out);
  ASSERT_EQ(dj["disks"][0]["series"].size(), 1u) << damaged.out;
  const json& ds = dj["disks"][0]["series"][0];
  EXPECT_EQ(ds["series"], "vm1/vd0");
  ASSERT_TRUE(ds.contains("error")) << damaged.out;
  EXPECT_TRUE(Contains(ds["error"], "Corruption")) << damaged.out;
  auto damaged_text = Vmdedup({"status", "-r", repo_, "qemu:" + g.Socket()});
  EXPECT_EQ(damaged_text.exit_code, 1) << damaged_text.err;
  EXPECT_TRUE(Contains(damaged_text.out, "series vm1/vd0  cannot be read: Corruption"))
      << damaged_text.out;
  EXPECT_TRUE(Contains(damaged_text.err, "'vmdedup check'")) << damaged_text.err;

  // The mirror the restores were compared with is what the guest wrote.
  std::string mirror = g.MirrorSha(0);
  g.Quit();
  EXPECT_EQ(g.ImageSha(0), mirror);
}

// Which of the writer's rounds a 64 KiB region of a restored image shows
// (the round's pattern byte, see PointInTime...); 0: none (original data).
int RoundIn(const std::string& file, uint64_t offset) {
  std::ifstream in(file, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(offset));
  std::string buf(64 * kKiB, '\0');
  in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
  if (std::all_of(buf.begin(), buf.end(), [&](char c) { return c == buf[0]; }) && buf[0] != 0)
    return static_cast<unsigned char>(buf[0]);
  return 0;
}

TEST_F(LiveBackupTest, PointInTimeAcrossTwoDisksWhileTheGuestKeepsWriting) {
  const uint64_t size = 32 * kMiB;
  Guest g(dir_, {{"vd0", size, 16 * kMiB, 2}, {"vd1", size, 16 * kMiB, 3}});
  g.Start();
  const auto graph = g.Graph();
  const std::string before0 = g.MirrorSha(0), before1 = g.MirrorSha(1);
  // 32 MiB to read at 12 MiB/s: the guest writes for over 2 s of it.
  g.Throttle(12 * kMiB);
  // Round k writes pattern k to the first and then the last 64 KiB of the
  // written area of both disks, and elsewhere.
  auto writer = [&](Background& bg, int* rounds) {
    for (int k = 1; k < 250 && !bg.Exited(); k++) {
      for (size_t d = 0; d < 2; d++) {
        g.Write(d, k, 0, 64 * kKiB);
        g.Write(d, k, (static_cast<uint64_t>(k) * kMiB) % (15 * kMiB), 64 * kKiB);
        g.Write(d, k, 16 * kMiB - 64 * kKiB, 64 * kKiB);
      }
      *rounds = k;
      std::this_thread::sleep_for(10ms);
    }
  };
  Background bg(dir_, BackupArgs(g, {"--threads", "1"}));
  ASSERT_TRUE(WaitForFleece(g, bg)) << bg.Wait().err;
  int rounds = 0;
  writer(bg, &rounds);
  auto r = bg.Wait();
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_GE(rounds, 5) << "the guest hardly wrote during the backup";
  auto snaps = json::parse(r.out);
  ASSERT_EQ(snaps.size(), 2u) << r.out;
  EXPECT_EQ(snaps[0]["id"], "vm1/vd0/1");
  EXPECT_EQ(snaps[1]["id"], "vm1/vd1/1");
  EXPECT_EQ(snaps[0]["time"], snaps[1]["time"]);  // one instant for both disks
  // Both disks restore exactly as they were at the transaction: nothing the
  // guest wrote during the backup, on either disk.
  EXPECT_EQ(RestoreSha("vm1/vd0/1"), before0);
  EXPECT_EQ(RestoreSha("vm1/vd1/1"), before1);
  g.Throttle(0);
  EXPECT_EQ(g.Graph(), graph);
  ExpectNoScratchFiles();

  // Negative control: the same read without fleecing (QEMU exporting the
  // live disk) while the guest writes gives a mix, which the comparison
  // above would catch.
  const std::string before_ctl = g.MirrorSha(0);
  ASSERT_TRUE(
      g.qmp()
          .Execute("nbd-server-start",
                   {{"addr", {{"type", "unix"}, {"data", {{"path", dir_.Sub("ctl.sock")}}}}}})
          .ok());
  ASSERT_TRUE(g.qmp()
                  .Execute("block-export-add", {{"type", "nbd"},
                                                {"id", "ctl"},
                                                {"node-name", "thr-vd0"},
                                                {"name", "live"},
                                                {"writable", false}})
                  .ok());
  g.Throttle(8 * kMiB);
  Background ctl(dir_, {"backup", "-r", repo_, "--vm", "ctl", "--disk", "d", "--threads", "1",
                        "nbd+unix:///live?socket=" + dir_.Sub("ctl.sock")});
  int ctl_rounds = 0;
  writer(ctl, &ctl_rounds);
  auto cr = ctl.Wait();
  ASSERT_EQ(cr.exit_code, 0) << cr.err;
  g.Throttle(0);
  std::string out = dir_.Sub("ctl.raw");
  ASSERT_EQ(Vmdedup({"restore", "-r", repo_, "ctl/d/1", "--to", out}).exit_code, 0);
  EXPECT_NE(FileSha(out), before_ctl) << "the control read did not see the guest's writes";
  // A genuine mix: the start of the disk was read before writes that the
  // end of the disk shows, although each round wrote the start first.
  EXPECT_LT(RoundIn(out, 0), RoundIn(out, 16 * kMiB - 64 * kKiB))
      << "rounds " << ctl_rounds << ": start shows round " << RoundIn(out, 0) << ", end "
      << RoundIn(out, 16 * kMiB - 64 * kKiB);
  ASSERT_TRUE(g.qmp().Execute("block-export-del", {{"id", "ctl"}, {"mode", "hard"}}).ok());
  ASSERT_TRUE(g.qmp().Execute("nbd-server-stop").ok());
}

TEST_F(LiveBackupTest, TwoDisksCommitTogetherOrNotAtAll) {
  // vd0 holds 256 KiB of data and vd1 24 MiB: read at 2 MiB/s, vd0 is done
  // well within a second and vd1 takes about 12 s.
  Guest g(dir_, {{"vd0", 16 * kMiB, 256 * kKiB, 11}, {"vd1", 32 * kMiB, 24 * kMiB, 12}});
  g.Start();
  const auto graph = g.Graph();
  g.Throttle(2 * kMiB);
  Background bg(dir_, BackupArgs(g, {"--threads", "1"}));
  ASSERT_TRUE(WaitForFleece(g, bg)) << bg.Wait().err;
  // Long after vd0 was read and stored, while vd1 is being read.
  std::this_thread::sleep_for(4s);
  ASSERT_FALSE(bg.Exited()) << "the backup ended before the test could interrupt it";
  ::kill(bg.pid(), SIGTERM);
  auto r = bg.Wait();
  EXPECT_EQ(r.exit_code, 130) << r.err;
  // Neither disk has a snapshot: the VM's backup is whole or absent.
  auto list = Vmdedup({"snapshots", "-r", repo_, "--json"});
  ASSERT_EQ(list.exit_code, 0) << list.err;
  EXPECT_FALSE(Contains(list.out, "vm1/")) << list.out;
  EXPECT_EQ(g.Graph(), graph);
  ExpectNoScratchFiles();
  ExpectCheckClean();  // what vd0's read stored is reclaimable, not an error
  auto check = Vmdedup({"check", "-r", repo_, "--json"});
  ASSERT_EQ(check.exit_code, 0) << check.out << check.err;
  EXPECT_GT(json::parse(check.out)["reclaimable_bytes"].get<uint64_t>(), 0u) << check.out;

  g.Throttle(0);
  auto snaps = Backup(g);
  ASSERT_EQ(snaps.size(), 2u) << snaps.dump();
  EXPECT_EQ(snaps[0]["id"], "vm1/vd0/1");
  EXPECT_EQ(snaps[1]["id"], "vm1/vd1/1");
  EXPECT_EQ(RestoreSha("vm1/vd0/1"), g.MirrorSha(0));
  EXPECT_EQ(RestoreSha("vm1/vd1/1"), g.MirrorSha(1));
  ExpectCheckClean();
}

TEST_F(LiveBackupTest, DiskSelectionAndClearErrors) {
  Guest g(dir_, {{"vd0", 8 * kMiB, 1 * kMiB, 4}, {"vd1", 8 * kMiB, 1 * kMiB, 5}});
  g.Start();
  auto one = Backup(g, {"--disk", "vd1"});
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0]["id"], "vm1/vd1/1");
  auto by_node = Backup(g, {"--disk", "fmt-vd0"});
  ASSERT_EQ(by_node.size(), 1u);
  EXPECT_EQ(by_node[0]["id"], "vm1/vd0/1");
  // --full reads everything but keeps the bitmaps rotating.
  g.Write(0, 0x91, 2 * kMiB, 64 * kKiB);
  auto full = Backup(g, {"--full"});
  ASSERT_EQ(full.size(), 2u);
  EXPECT_TRUE(Contains(last_note_, "vm1/vd0: full: --full given")) << last_note_;
  EXPECT_EQ(full[0]["read_bytes"].get<uint64_t>(), 1 * kMiB + 64 * kKiB);  // all allocated data
  g.Write(1, 0x92, 3 * kMiB, 64 * kKiB);
  auto inc = Backup(g);
  ASSERT_EQ(inc.size(), 2u);
  EXPECT_EQ(inc[0]["read_bytes"].get<uint64_t>(), 0u);
  EXPECT_EQ(inc[1]["read_bytes"].get<uint64_t>(), 64 * kKiB);
  EXPECT_EQ(RestoreSha("vm1/vd1/3"), g.MirrorSha(1));
  auto bad = Vmdedup(BackupArgs(g, {"--disk", "nosuch"}));
  EXPECT_EQ(bad.exit_code, 2) << bad.err;
  EXPECT_TRUE(Contains(bad.err, "no such disk (disks: vd0, vd1)")) << bad.err;
  auto gone = Vmdedup({"backup", "-r", repo_, "--vm", "vm1", "qemu:" + dir_.Sub("none.qmp")});
  EXPECT_EQ(gone.exit_code, 1);
  EXPECT_TRUE(Contains(gone.err, "connecting to QEMU")) << gone.err;
  auto nofreeze = Vmdedup(BackupArgs(g, {"--fsfreeze"}));
  EXPECT_EQ(nofreeze.exit_code, 2);
  EXPECT_TRUE(Contains(nofreeze.err, "--qga")) << nofreeze.err;
  ExpectNoScratchFiles();
}

TEST_F(LiveBackupTest, QemuKilledMidBackupThenRestartedGivesFullReadThenIncremental) {
  Guest g(dir_, {{"vd0", 32 * kMiB, 16 * kMiB, 6}});
  g.Start();
  Backup(g);
  // A clean restart stores the bitmap in the image; the restarted QEMU
  // loads it (and marks it in use in the image).
  g.Quit();
  g.Start();
  g.Write(0, 0x51, 0, 16 * kMiB);
  g.Throttle(4 * kMiB);
  Background bg(dir_, BackupArgs(g));
  ASSERT_TRUE(WaitForFleece(g, bg)) << bg.Wait().err;
  std::this_thread::sleep_for(300ms);
  g.Kill();
  auto r = bg.Wait();
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_TRUE(Contains(r.err, "QEMU went away during the backup")) << r.err;
  auto list = Vmdedup({"snapshots", "-r", repo_, "--json"});
  EXPECT_TRUE(Contains(list.out, "vm1/vd0/1")) << list.out;
  EXPECT_FALSE(Contains(list.out, "vm1/vd0/2")) << list.out;
  ExpectCheckClean();
  ExpectNoScratchFiles();

  // The same images in a new QEMU: the bitmap is inconsistent.
  g.Start();
  const auto graph = g.Graph();
  auto s2 = Backup(g)[0];
  EXPECT_TRUE(Contains(last_note_, "is inconsistent")) << last_note_;
  EXPECT_EQ(s2["id"], "vm1/vd0/2");
  EXPECT_EQ(s2["read_bytes"].get<uint64_t>(), 16 * kMiB);
  EXPECT_LE(s2["new"].get<uint64_t>(), 64 * kKiB);  // one repeated pattern: level 2
  EXPECT_EQ(RestoreSha("vm1/vd0/2"), g.MirrorSha(0));
  g.Write(0, 0x52, 20 * kMiB, 64 * kKiB);
  auto s3 = Backup(g)[0];
  EXPECT_TRUE(Contains(last_note_, "incremental")) << last_note_;
  EXPECT_EQ(s3["read_bytes"].get<uint64_t>(), 64 * kKiB);
  EXPECT_EQ(RestoreSha("vm1/vd0/3"), g.MirrorSha(0));
  EXPECT_EQ(VmdedupBitmaps(g, 0).size(), 1u);
  EXPECT_EQ(g.Graph(), graph);
  ExpectNoScratchFiles();
  ExpectCheckClean();
}

TEST_F(LiveBackupTest, SigtermMidBackupTearsDownAndTheNextBackupIsStillIncremental) {
  Guest g(dir_, {{"vd0", 32 * kMiB, 16 * kMiB, 7}});
  g.Start();
  const auto graph = g.Graph();
  Backup(g);
  g.Write(0, 0x61, 0, 8 * kMiB);
  g.Throttle(1 * kMiB);
  Background bg(dir_, BackupArgs(g));
  ASSERT_TRUE(WaitForFleece(g, bg)) << bg.Wait().err;
  g.Write(0, 0x62, 20 * kMiB, 64 * kKiB);  // during the backup: recorded by the new bitmap
  ::kill(bg.pid(), SIGTERM);
  auto r = bg.Wait();
  EXPECT_EQ(r.exit_code, 130) << r.err;
  EXPECT_TRUE(Contains(r.err, "interrupted")) << r.err;
  // The guest runs on, the block graph is as before, nothing is left.
  EXPECT_TRUE(g.Running());
  EXPECT_EQ(g.Graph(), graph);
  ExpectNoScratchFiles();
  EXPECT_EQ(VmdedupBitmaps(g, 0).size(), 1u);
  g.Throttle(0);
  g.Write(0, 0x63, 24 * kMiB, 64 * kKiB);
  auto s2 = Backup(g)[0];
  EXPECT_EQ(s2["id"], "vm1/vd0/2");
  EXPECT_TRUE(Contains(last_note_, "incremental")) << last_note_;
  EXPECT_EQ(s2["read_bytes"].get<uint64_t>(), 8 * kMiB + 128 * kKiB);
  EXPECT_EQ(RestoreSha("vm1/vd0/2"), g.MirrorSha(0));
  EXPECT_EQ(g.Graph(), graph);
  ExpectNoScratchFiles();
  ExpectCheckClean();
}

TEST_F(LiveBackupTest, SigkillMidBackupLeavesLeftoversTheNextRunRemoves) {
  Guest g(dir_, {{"vd0", 32 * kMiB, 16 * kMiB, 8}});
  g.Start();
  const auto graph = g.Graph();
  Backup(g);
  g.Write(0, 0x71, 0, 8 * kMiB);
  g.Throttle(1 * kMiB);
  Background bg(dir_, BackupArgs(g));
  ASSERT_TRUE(WaitForFleece(g, bg)) << bg.Wait().err;
  g.Write(0, 0x72, 20 * kMiB, 64 * kKiB);
  ::kill(bg.pid(), SIGKILL);
  EXPECT_EQ(bg.Wait().exit_code, 128 + SIGKILL);
  EXPECT_TRUE(g.Running());
  EXPECT_NE(g.Graph(), graph);  // the fleecing objects are still there
  EXPECT_TRUE(g.HasFleeceExport());
  EXPECT_EQ(VmdedupBitmaps(g, 0).size(), 2u)
      << Status(g).dump();  // the old one (disabled) and the new one
  // The scratch area is private: the directory 0700, the NBD socket 0600.
  int areas = 0;
  for (const auto& e : std::filesystem::directory_iterator(scratch_)) {
    areas++;
    struct stat dst, sst;
    ASSERT_EQ(::stat(e.path().c_str(), &dst), 0);
    EXPECT_EQ(dst.st_mode & 0777, 0700u) << e.path();
    ASSERT_EQ(::stat((e.path() / "nbd.sock").c_str(), &sst), 0);
    EXPECT_TRUE(S_ISSOCK(sst.st_mode));
    EXPECT_EQ(sst.st_mode & 0777, 0600u);
  }
  EXPECT_EQ(areas, 1);
  auto st = Vmdedup({"status", "qemu:" + g.Socket()});
  EXPECT_TRUE(Contains(st.out, "left by an interrupted backup")) << st.out;
  g.Throttle(0);
  g.Write(0, 0x73, 24 * kMiB, 64 * kKiB);
  auto s2 = Backup(g)[0];
  EXPECT_TRUE(Contains(last_note_, "removing what an interrupted vmdedup run left")) << last_note_;
  EXPECT_TRUE(Contains(last_note_, "(left by an interrupted backup) into")) << last_note_;
  EXPECT_TRUE(Contains(last_note_, "incremental")) << last_note_;
  EXPECT_EQ(s2["read_bytes"].get<uint64_t>(), 8 * kMiB + 128 * kKiB);
  EXPECT_EQ(RestoreSha("vm1/vd0/2"), g.MirrorSha(0));
  EXPECT_EQ(g.Graph(), graph);
  EXPECT_EQ(VmdedupBitmaps(g, 0).size(), 1u);
  ExpectNoScratchFiles();

  // vmdedup killed, then QEMU killed too: the scratch files of a QEMU that
  // is gone are removed by the next run on any QEMU.
  g.Throttle(1 * kMiB);
  g.Write(0, 0x74, 0, 8 * kMiB);
  Background bg2(dir_, BackupArgs(g));
  ASSERT_TRUE(WaitForFleece(g, bg2)) << bg2.Wait().err;
  ::kill(bg2.pid(), SIGKILL);
  bg2.Wait();
  g.Kill();
  EXPECT_FALSE(std::filesystem::is_empty(scratch_));
  g.Start();
  auto s3 = Backup(g)[0];
  EXPECT_TRUE(Contains(last_note_, "removed the scratch files of an earlier vmdedup run"))
      << last_note_;
  // The bitmaps lived in that QEMU's memory only: gone.
  EXPECT_TRUE(Contains(last_note_, "is missing")) << last_note_;
  EXPECT_EQ(RestoreSha("vm1/vd0/3"), g.MirrorSha(0));
  ExpectNoScratchFiles();
  ExpectCheckClean();
}

TEST_F(LiveBackupTest, MissingBitmapAndResizedDiskFallBackToFullReadThenIncremental) {
  Guest g(dir_, {{"vd0", 32 * kMiB, 8 * kMiB, 9}});
  g.Start();
  Backup(g);
  // Someone removes vmdedup's bitmap.
  auto names = VmdedupBitmaps(g, 0);
  ASSERT_EQ(names.size(), 1u);
  ASSERT_TRUE(
      g.qmp().Execute("block-dirty-bitmap-remove", {{"node", "fmt-vd0"}, {"name", names[0]}}).ok());
  g.Write(0, 0x81, 1 * kMiB, 64 * kKiB);
  auto s2 = Backup(g)[0];
  EXPECT_TRUE(Contains(last_note_, "full: bitmap " + names[0] + " is missing")) << last_note_;
  EXPECT_EQ(s2["read_bytes"].get<uint64_t>(), 8 * kMiB);
  EXPECT_LE(s2["new"].get<uint64_t>(), 64 * kKiB);  // level 2 keeps storage small
  EXPECT_EQ(RestoreSha("vm1/vd0/2"), g.MirrorSha(0));
  g.Write(0, 0x82, 2 * kMiB, 64 * kKiB);
  auto s3 = Backup(g)[0];
  EXPECT_TRUE(Contains(last_note_, "incremental")) << last_note_;
  EXPECT_EQ(s3["read_bytes"].get<uint64_t>(), 64 * kKiB);

  // The disk grows.
  g.Resize(0, 48 * kMiB);
  g.Write(0, 0x83, 40 * kMiB, 64 * kKiB);
  auto s4 = Backup(g)[0];
  EXPECT_TRUE(Contains(last_note_, "full: disk size changed from 32.0 MiB to 48.0 MiB"))
      << last_note_;
  EXPECT_EQ(s4["size"].get<uint64_t>(), 48 * kMiB);
  EXPECT_EQ(s4["read_bytes"].get<uint64_t>(), 8 * kMiB + 64 * kKiB);
  EXPECT_EQ(RestoreSha("vm1/vd0/4"), g.MirrorSha(0));
  g.Write(0, 0x84, 5 * kMiB, 64 * kKiB);
  auto s5 = Backup(g)[0];
  EXPECT_TRUE(Contains(last_note_, "incremental")) << last_note_;
  EXPECT_EQ(s5["read_bytes"].get<uint64_t>(), 64 * kKiB);
  EXPECT_EQ(RestoreSha("vm1/vd0/5"), g.MirrorSha(0));
  EXPECT_EQ(VmdedupBitmaps(g, 0).size(), 1u);
  ExpectCheckClean();
}

// A guest agent on a unix socket that answers sync, freeze and thaw and
// notes whether the fleecing job existed when each arrived.
class FakeAgent {
 public:
  FakeAgent(const std::string& path, Guest& g) : g_(g) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    EXPECT_EQ(::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    EXPECT_EQ(::listen(fd_, 1), 0);
    thread_ = std::thread([this] { Serve(); });
  }
  ~FakeAgent() {
    ::shutdown(fd_, SHUT_RDWR);
    thread_.join();
    ::close(fd_);
  }
  std::vector<std::string> log;

 private:
  void Serve() {
    int c = ::accept(fd_, nullptr, nullptr);
    if (c < 0) return;
    std::string buf;
    char tmp[4096];
    for (;;) {
      size_t nl;
      while ((nl = buf.find('\n')) == std::string::npos) {
        ssize_t n = ::read(c, tmp, sizeof(tmp));
        if (n <= 0) {
          ::close(c);
          return;
        }
        buf.append(tmp, static_cast<size_t>(n));
      }
      std::string line = buf.substr(0, nl);
      buf.erase(0, nl + 1);
      size_t start = line.find('{');
      if (start == std::string::npos) continue;
      json req = json::parse(line.substr(start));
      std::string cmd = req["execute"];
      std::string reply;
      if (cmd == "guest-sync-delimited") {
        reply = "\xff" + json({{"return", req["arguments"]["id"]}}).dump() + "\n";
      } else {
        // The test's main thread is blocked waiting for vmdedup: the
        // monitor is free for this thread.
        auto jobs = g_.qmp().Execute("query-block-jobs");
        bool fleecing = jobs.ok() && !jobs->empty();
        log.push_back(cmd + (fleecing ? " during" : " before"));
        reply = json({{"return", 1}}).dump() + "\n";
      }
      if (::write(c, reply.data(), reply.size()) < 0) break;
    }
    ::close(c);
  }
  Guest& g_;
  int fd_ = -1;
  std::thread thread_;
};

TEST_F(LiveBackupTest, FsfreezeAroundTheInstantAndASilentAgentOnlyWarns) {
  Guest g(dir_, {{"vd0", 16 * kMiB, 4 * kMiB, 10}}, /*with_qga_chardev=*/true);
  g.Start();
  {
    FakeAgent agent(dir_.Sub("fake-qga.sock"), g);
    auto r = Vmdedup(BackupArgs(g, {"--fsfreeze", "--qga", dir_.Sub("fake-qga.sock")}));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_TRUE(Contains(r.err, "froze 1 guest filesystem(s)")) << r.err;
    // Frozen before the transaction, thawed after it (the job exists).
    EXPECT_EQ(agent.log, (std::vector<std::string>{"guest-fsfreeze-freeze before",
                                                   "guest-fsfreeze-thaw during"}));
  }
  // The guest has no OS, so nothing answers on its agent channel.
  auto start = std::chrono::steady_clock::now();
  auto r = Vmdedup(BackupArgs(g, {"--fsfreeze", "--qga", g.QgaSocket()}));
  auto took = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(Contains(r.err, "warning: --fsfreeze")) << r.err;
  EXPECT_TRUE(Contains(r.err, "without freezing")) << r.err;
  EXPECT_GE(took, 2s);
  EXPECT_LT(took, 20s);
  EXPECT_TRUE(Contains(r.err, "incremental")) << r.err;
  ExpectNoScratchFiles();
}

}  // namespace
}  // namespace vmdedup::testing
