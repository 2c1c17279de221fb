// Process crash tests of `vmdedup backup` with the real binary and the real
// qemu-img / qemu-io / qemu-nbd (DESIGN.md "Crash safety", docs/format.md
// "Write order and crash safety"):
//
//  - RandomKills: a chain of incremental backups of a qcow2 image, most of
//    them SIGKILLed: after a random delay spread over a backup's measured
//    duration, or (one in three) 0-20 ms after the run's container file
//    appears, with guest-like writes and discards in between. After every
//    kill: `check` finds no damage, no snapshot appears except possibly the
//    one the killed run committed, the newest snapshot restores bit-exactly,
//    and regularly a backup runs to completion, is incremental (the dirty
//    bitmaps were recovered, not dropped) and restores bit-exactly. At the
//    end every snapshot restores bit-exactly and `check --read-data` is clean.
//    A SIGTERM makes a backup exit 130 with no snapshot; the next one works.
//  - KillAfterEachQemuImgStep: deterministic crash points. A qemu-img
//    wrapper first in PATH SIGKILLs vmdedup right after its k-th qemu-img
//    call, for every k of a normal incremental backup and of a backup that
//    recovers from a crash; the next backup must stay incremental and exact.
//
//  - KillWhileQemuNbdStartsLeavesNoServerBehind: vmdedup killed while its
//    qemu-nbd starts; the qemu-nbd must die with it (a leftover server would
//    hold the image and block every later backup of it).
//
// Processes the killed vmdedup leaves behind (qemu-img, qemu-nbd) are
// re-parented to this test (a child subreaper), which waits for them before
// touching the image again; a survivor fails the test and is killed by pid.
// VMDEDUP_CRASH_SEED replays another seed.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <dirent.h>
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "base/fingerprint.h"
#include "tests/test_util.h"

extern char** environ;

namespace vmdedup::testing {
namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kDefaultSeed = 0x5eed2024;

int DecodeWaitStatus(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

// The content of a file ("" when it cannot be read); never throws (files in
// /proc vanish while they are read).
std::string ReadFile(const std::string& path) {
  std::string out;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  char buf[1 << 16];
  while (true) {
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return out;
}

// Names in a directory (empty when it does not exist).
std::set<std::string> DirEntries(const std::string& dir) {
  std::set<std::string> out;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = readdir(d)) out.insert(e->d_name);
  closedir(d);
  return out;
}

// This process's live children (from /proc): pid and command line.
struct ProcInfo {
  pid_t pid;
  std::string cmdline;  // arguments separated by spaces
};
std::vector<ProcInfo> LiveChildren() {
  std::vector<ProcInfo> out;
  DIR* d = opendir("/proc");
  if (d == nullptr) return out;
  const pid_t self = getpid();
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    std::string dir = std::string("/proc/") + e->d_name;
    std::string stat = ReadFile(dir + "/stat");
    size_t paren = stat.rfind(')');
    if (paren == std::string::npos) continue;
    std::istringstream rest(stat.substr(paren + 1));
    std::string state;
    long ppid = 0;
    rest >> state >> ppid;
    if (ppid != self || state == "Z") continue;
    std::string cmd = ReadFile(dir + "/cmdline");
    std::replace(cmd.begin(), cmd.end(), '\0', ' ');
    out.push_back({static_cast<pid_t>(std::atol(e->d_name)), cmd});
  }
  closedir(d);
  return out;
}

// A child process started by the test; killed (by pid) and reaped if the
// test leaves early.
class Child {
 public:
  // Runs argv (argv[0] an absolute path) with stdin from /dev/null and
  // stdout+stderr into `log`; `env` entries NAME=VALUE are added/replaced.
  Child(const std::vector<std::string>& argv, const std::string& log,
        const std::vector<std::string>& env = {}) {
    // Everything the child needs is built before fork.
    std::vector<std::string> envs = env;
    for (char** e = environ; *e; e++) {
      std::string entry = *e;
      std::string name = entry.substr(0, entry.find('='));
      bool replaced = std::any_of(env.begin(), env.end(), [&](const std::string& x) {
        return x.substr(0, x.find('=')) == name;
      });
      if (!replaced) envs.push_back(entry);
    }
    std::vector<char*> args, envp;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    for (const auto& e : envs) envp.push_back(const_cast<char*>(e.c_str()));
    envp.push_back(nullptr);
    int out = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int in = open("/dev/null", O_RDONLY | O_CLOEXEC);
    pid_ = fork();
    if (pid_ == 0) {
      if (out < 0 || in < 0) _exit(126);
      dup2(in, 0);
      dup2(out, 1);
      dup2(out, 2);
      execve(args[0], args.data(), envp.data());
      _exit(127);
    }
    if (out >= 0) close(out);
    if (in >= 0) close(in);
  }
  ~Child() {
    if (pid_ > 0 && !done_) {
      kill(pid_, SIGKILL);
      Wait();
    }
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  pid_t pid() const { return pid_; }
  bool running() const { return pid_ > 0 && !done_; }
  // Waits until the child exits or `deadline` passes; true when it exited.
  bool WaitUntil(Clock::time_point deadline) {
    while (!done_) {
      int status = 0;
      pid_t r = waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        done_ = true;
        exit_code_ = DecodeWaitStatus(status);
        break;
      }
      if (r < 0 && errno != EINTR) {
        done_ = true;
        break;
      }
      if (Clock::now() >= deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return true;
  }
  int Wait() {
    while (!done_) {
      int status = 0;
      pid_t r = waitpid(pid_, &status, 0);
      if (r == pid_) {
        exit_code_ = DecodeWaitStatus(status);
        done_ = true;
      } else if (r < 0 && errno != EINTR) {
        done_ = true;
      }
    }
    return exit_code_;
  }
  void Signal(int sig) {
    if (running()) kill(pid_, sig);
  }
  int exit_code() const { return exit_code_; }

 private:
  pid_t pid_ = -1;
  bool done_ = false;
  int exit_code_ = -1;
};

struct Snap {
  uint64_t seq = 0;
  std::string read_mode;
  std::string bitmap;
};

class CrashTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // Orphans of a killed vmdedup (qemu-img, qemu-nbd) become our children.
    ASSERT_EQ(prctl(PR_SET_CHILD_SUBREAPER, 1), 0) << std::strerror(errno);
    repo_ = dir_.Sub("repo");
    image_ = dir_.Sub("disk.qcow2");
    log_ = dir_.Sub("backup.log");
    const char* s = std::getenv("VMDEDUP_CRASH_SEED");
    seed_ = s && *s ? std::strtoull(s, nullptr, 0) : kDefaultSeed;
    std::cout << "crash test seed: " << seed_ << " (set VMDEDUP_CRASH_SEED to replay)" << std::endl;
    RecordProperty("seed", std::to_string(seed_));
    rng_.seed(seed_);
    auto r = Vmdedup({"init", repo_, "--chunker", "fixed"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }

  void TearDown() override {
    ReapOrphans();
    prctl(PR_SET_CHILD_SUBREAPER, 0);
  }

  CommandResult Vmdedup(std::vector<std::string> args) {
    args.insert(args.begin(), VmdedupBinary());
    return RunCommand(args);
  }

  // Waits for every remaining child: what killed runs left behind
  // (qemu-img finishing a bitmap step, qemu-nbd noticing its client is
  // gone). Survivors after 20 s (5 s for a qemu-nbd of our image) are
  // killed by pid and fail the test.
  void ReapOrphans() {
    const auto start = Clock::now();
    while (true) {
      int status;
      pid_t p = waitpid(-1, &status, WNOHANG);
      if (p > 0) continue;
      if (p < 0 && errno == EINTR) continue;
      if (p < 0) return;  // ECHILD: nothing left
      const auto elapsed = Clock::now() - start;
      if (elapsed > std::chrono::seconds(2)) {
        auto kids = LiveChildren();
        bool only_leaked_nbd =
            !kids.empty() && std::all_of(kids.begin(), kids.end(), [&](const ProcInfo& k) {
              return k.cmdline.find("qemu-nbd") != std::string::npos &&
                     k.cmdline.find(image_) != std::string::npos;
            });
        if (elapsed > std::chrono::seconds(only_leaked_nbd ? 5 : 20)) {
          for (const ProcInfo& k : kids) {
            ADD_FAILURE() << "process " << k.pid << " left by a killed backup is still running "
                          << std::chrono::duration_cast<std::chrono::seconds>(elapsed).count()
                          << " s later: " << k.cmdline;
            kill(k.pid, SIGKILL);
          }
          while (waitpid(-1, &status, 0) > 0 || errno == EINTR) {
          }
          return;
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }

  // A qcow2 image of `size` whose first `data` bytes are random.
  void MakeImage(uint64_t size, uint64_t data) {
    image_size_ = size;
    std::string raw = dir_.Sub("seed.raw");
    {
      std::ofstream out(raw, std::ios::binary | std::ios::trunc);
      std::string bytes = RandomBytes(data, seed_);
      out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    }
    ASSERT_EQ(truncate(raw.c_str(), static_cast<off_t>(size)), 0);
    auto r = RunCommand({"qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image_});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    std::string raw_sha = FileSha256(raw);
    unlink(raw.c_str());
    sha_ = ImageSha();
    EXPECT_EQ(sha_, raw_sha);
  }

  std::string ImageSha() {
    std::string raw = dir_.Sub("current.raw");
    unlink(raw.c_str());
    auto r = RunCommand({"qemu-img", "convert", "-O", "raw", image_, raw});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::string sha = FileSha256(raw);
    unlink(raw.c_str());
    EXPECT_EQ(sha.size(), 64u);
    return sha;
  }

  uint64_t Rand(uint64_t lo, uint64_t hi) {  // [lo, hi]
    return std::uniform_int_distribution<uint64_t>(lo, hi)(rng_);
  }

  // Guest-like changes: random data, a pattern, zeroes, discards; cluster
  // aligned or not. Updates sha_.
  // With `new_data`, the first change is random data (the next backup
  // stores a container).
  void Modify(bool new_data = false) {
    std::vector<std::string> argv = {"qemu-io", "-f", "qcow2"};
    int ops = static_cast<int>(Rand(1, 3));
    for (int i = 0; i < ops; i++) {
      uint64_t kind = Rand(0, 9);
      if (new_data && i == 0) kind = 0;
      uint64_t len = Rand(1, image_size_ / kMiB * 16 / 12) * 64 * 1024;  // up to 1/12 of the disk
      if (kind >= 7) len = Rand(1, 16) * 4096;  // small, not cluster aligned
      uint64_t off = Rand(0, (image_size_ - len) / 4096) * 4096;
      std::string where = std::to_string(off) + " " + std::to_string(len);
      if (kind < 4) {
        std::string pattern = dir_.Sub("pattern" + std::to_string(i) + ".bin");
        std::ofstream out(pattern, std::ios::binary | std::ios::trunc);
        std::string bytes = RandomBytes(len, rng_());
        out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
        out.close();
        argv.insert(argv.end(), {"-c", "write -q -s " + pattern + " " + where});
      } else if (kind < 6) {
        argv.insert(argv.end(),
                    {"-c", "write -q -P " + std::to_string(Rand(1, 255)) + " " + where});
      } else if (kind < 7) {
        argv.insert(argv.end(), {"-c", "write -q -z " + where});
      } else {
        argv.insert(argv.end(), {"-c", "discard -q " + where});
      }
    }
    argv.push_back(image_);
    auto r = RunCommand(argv);
    ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
    ASSERT_TRUE(r.err.empty()) << r.err;
    sha_ = ImageSha();
  }

  std::vector<std::string> BackupArgv() {
    return {VmdedupBinary(), "backup", "-r",        repo_, "--vm",   "vm1",
            "--disk",        "vda",    "--threads", "1",   "--json", "qcow2:" + image_};
  }

  std::vector<Snap> Snapshots() {
    auto r = Vmdedup({"snapshots", "-r", repo_, "--vm", "vm1", "--json"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::vector<Snap> out;
    std::istringstream in(r.out);
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty()) continue;
      auto j = nlohmann::json::parse(line);
      out.push_back({j["seq"].get<uint64_t>(), j["read_mode"].get<std::string>(),
                     j["bitmap"].get<std::string>()});
    }
    return out;
  }

  std::string RestoreSha(uint64_t seq) {
    std::string out = dir_.Sub("restored.raw");
    auto r = Vmdedup(
        {"restore", "-r", repo_, "vm1/vda/" + std::to_string(seq), "--to", out, "--force", "-q"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::string sha = FileSha256(out);
    unlink(out.c_str());
    return sha;
  }

  // Runs `check`, which must find no damage (leftovers of killed runs are
  // reclaimable); returns the number of snapshots it saw.
  uint64_t CheckOk(bool read_data, const std::string& when) {
    std::vector<std::string> args = {"check", "-r", repo_, "--json"};
    if (read_data) args.push_back("--read-data");
    auto r = Vmdedup(args);
    EXPECT_EQ(r.exit_code, 0) << when << "\n" << r.out << r.err;
    if (r.exit_code != 0) return ~uint64_t{0};
    auto j = nlohmann::json::parse(r.out);
    EXPECT_TRUE(j["ok"].get<bool>()) << when << "\n" << r.out;
    EXPECT_EQ(j["vms"].get<uint64_t>(), 1u) << r.out;
    for (const auto& f : j["findings"]) {
      EXPECT_EQ(f["kind"].get<std::string>(), "reclaimable") << when << "\n" << f.dump();
    }
    reclaimable_findings_ += j["findings"].size();
    // Leftovers (objects, temporaries, unreferenced containers, recipes)
    // only accumulate: no garbage collection runs here.
    const uint64_t bytes = j["reclaimable_bytes"].get<uint64_t>();
    const size_t findings = j["findings"].size();
    if (bytes > last_reclaimable_bytes_ || findings > last_findings_) runs_leaving_leftovers_++;
    last_reclaimable_bytes_ = std::max(last_reclaimable_bytes_, bytes);
    last_findings_ = std::max(last_findings_, findings);
    return j["snapshots"].get<uint64_t>();
  }

  void ExpectCheckOk(bool read_data, const std::string& when) {
    EXPECT_EQ(CheckOk(read_data, when), expected_.size()) << when;
  }

  // After a run that ended (killed or not): the snapshots are the committed
  // ones plus at most the one this run committed, which must then hold the
  // image as it was when the run started. `count` is the number of
  // snapshots `check` saw, when known: the listing is needed only when a
  // snapshot was added.
  void SyncSnapshots(const std::string& attempt_sha, bool killed, const std::string& when,
                     std::optional<uint64_t> count = std::nullopt) {
    if (count && *count == expected_.size()) {
      if (killed)
        killed_before_commit_++;
      else
        ADD_FAILURE() << when << ": the backup exited 0 without a snapshot\n" << ReadFile(log_);
      return;
    }
    auto snaps = Snapshots();
    ASSERT_GE(snaps.size(), expected_.size()) << when;
    ASSERT_LE(snaps.size(), expected_.size() + 1) << when;
    size_t i = 0;
    for (const auto& [seq, sha] : expected_) {
      ASSERT_EQ(snaps[i].seq, seq) << when;
      i++;
    }
    if (snaps.size() == expected_.size() + 1) {
      const Snap& s = snaps.back();
      EXPECT_EQ(s.seq, expected_.empty() ? 1u : expected_.rbegin()->first + 1) << when;
      expected_[s.seq] = attempt_sha;
      latest_ = s;
      if (killed) killed_after_commit_++;
    } else if (killed) {
      killed_before_commit_++;
    } else {
      ADD_FAILURE() << when << ": the backup exited 0 without a snapshot\n" << ReadFile(log_);
    }
  }

  // Durations of backups that ran to completion, for the kill window.
  void NoteDuration(Clock::duration d) {
    durations_us_.push_back(std::chrono::duration_cast<std::chrono::microseconds>(d).count());
  }
  // The kill delays spread over a bit more than the median of the last
  // uncrashed backups (they vary with the amount changed and the machine's
  // load), so that kills also land in the last steps (commit, bitmap
  // rotation) and a few runs finish first.
  int64_t KillWindowUs() const {
    std::vector<int64_t> last(durations_us_.end() - std::min<size_t>(durations_us_.size(), 7),
                              durations_us_.end());
    std::sort(last.begin(), last.end());
    return last.empty() ? 1000000 : last[last.size() / 2] * 6 / 5;
  }

  // The vmdedup bitmaps of the image after a completed backup: exactly the
  // one the latest snapshot names, enabled and consistent.
  void ExpectOnlyLatestBitmap(const std::string& when) {
    auto info = RunCommand({"qemu-img", "info", "--output=json", image_});
    ASSERT_EQ(info.exit_code, 0) << info.err;
    auto j = nlohmann::json::parse(info.out);
    std::vector<std::string> ours;
    auto& data = j["format-specific"]["data"];
    if (data.contains("bitmaps")) {
      for (const auto& b : data["bitmaps"]) {
        std::string name = b["name"].get<std::string>();
        if (name.rfind("vmdedup.", 0) != 0) continue;
        ours.push_back(name);
        auto flags = b["flags"].dump();
        EXPECT_NE(flags.find("auto"), std::string::npos) << when << ": " << name << " " << flags;
        EXPECT_EQ(flags.find("in-use"), std::string::npos) << when << ": " << name << " " << flags;
      }
    }
    EXPECT_EQ(ours, std::vector<std::string>{latest_.bitmap}) << when << "\n" << info.out;
  }

  // A backup that must run to completion and continue the bitmap chain.
  void CompleteBackup(const std::string& when, bool expect_incremental = true) {
    std::string attempt_sha = sha_;
    Child c(BackupArgv(), log_);
    auto start = Clock::now();
    int rc = c.Wait();
    NoteDuration(Clock::now() - start);
    ReapOrphans();
    ASSERT_EQ(rc, 0) << when << "\n" << ReadFile(log_);
    size_t before = expected_.size();
    ASSERT_NO_FATAL_FAILURE(SyncSnapshots(attempt_sha, false, when));
    ASSERT_EQ(expected_.size(), before + 1) << when;
    if (expect_incremental) {
      EXPECT_EQ(latest_.read_mode.rfind("incremental", 0), 0u)
          << when << ": the dirty bitmap was not recovered after the crash: " << latest_.read_mode;
    }
    EXPECT_EQ(RestoreSha(latest_.seq), attempt_sha) << when << ": snapshot " << latest_.seq;
    ExpectOnlyLatestBitmap(when);
    completed_++;
  }

  void ExpectAllSnapshotsRestore(const std::string& when) {
    for (const auto& [seq, sha] : expected_)
      EXPECT_EQ(RestoreSha(seq), sha) << when << ": snapshot vm1/vda/" << seq;
  }

  ScratchDir dir_;
  std::string repo_, image_, log_;
  uint64_t seed_ = 0;
  uint64_t image_size_ = 0;
  std::mt19937_64 rng_;
  std::string sha_;                           // the image's content now
  std::map<uint64_t, std::string> expected_;  // committed seq -> image SHA-256
  Snap latest_;
  int killed_before_commit_ = 0, killed_after_commit_ = 0, completed_ = 0;
  int finished_before_kill_ = 0;
  std::vector<int64_t> durations_us_;
  size_t reclaimable_findings_ = 0;
  uint64_t last_reclaimable_bytes_ = 0;
  size_t last_findings_ = 0;
  int runs_leaving_leftovers_ = 0;
  int data_phase_kills_ = 0;
};

TEST_F(CrashTest, RandomKillsLeaveEverySnapshotRestorableAndIncrementalsExact) {
  constexpr int kIterations = 55;
  auto test_start = Clock::now();
  // 48 MiB with 24 MiB of data: a backup takes long enough under ASan for
  // the kills to land in every phase.
  ASSERT_NO_FATAL_FAILURE(MakeImage(48 * kMiB, 24 * kMiB));
  // The first backup (full), then uncrashed incrementals to calibrate the
  // kill window (it keeps following the durations of uncrashed runs).
  ASSERT_NO_FATAL_FAILURE(CompleteBackup("first backup", /*expect_incremental=*/false));
  durations_us_.clear();  // a full read is no model for the incrementals
  for (int i = 0; i < 2; i++) {
    ASSERT_NO_FATAL_FAILURE(Modify());
    ASSERT_NO_FATAL_FAILURE(CompleteBackup("calibration backup"));
  }
  std::cout << "calibrated: kill window 0.." << KillWindowUs() / 1000 << " ms" << std::endl;

  bool must_complete = false;
  for (int i = 0; i < kIterations; i++) {
    const std::string when =
        "iteration " + std::to_string(i) + " (seed " + std::to_string(seed_) + ")";
    // One run in three is killed in its data phase: a random 0-10 ms after
    // its first container file (temporary or final) appears, i.e. while the
    // container is written or between it and the commit, which a delay
    // spread over the whole run hits only rarely. The others are killed
    // after a delay spread over a whole backup's duration.
    const bool data_phase = Rand(0, 2) == 0;
    // Writes also land between killed runs, while the image holds whatever
    // bitmap state the kill left.
    if (i == 0 || data_phase || Rand(0, 1) == 1) {
      ASSERT_NO_FATAL_FAILURE(Modify(/*new_data=*/data_phase));
    }
    const std::string attempt_sha = sha_;
    const int64_t window_us = KillWindowUs();
    const int64_t delay_us = static_cast<int64_t>(Rand(0, static_cast<uint64_t>(window_us)));
    // (With 0-20 ms, one run on a loaded machine had only 7 of the 9 data
    // phase kills required below: the others finished first.)
    const int64_t after_data_us = static_cast<int64_t>(Rand(0, 10000));
    bool killed = false;
    {
      const std::string data_dir = repo_ + "/vms/vm1/data";
      const std::set<std::string> known = DirEntries(data_dir);
      auto start = Clock::now();
      Child c(BackupArgv(), log_);
      ASSERT_GT(c.pid(), 0);
      bool kill_now = false;
      if (data_phase) {
        auto give_up = start + std::chrono::microseconds(3 * window_us);
        bool seen = false;
        while (!seen &&
               !c.WaitUntil(std::min(give_up, Clock::now() + std::chrono::microseconds(300)))) {
          for (const std::string& e : DirEntries(data_dir))
            if (!known.count(e)) seen = true;
          if (Clock::now() >= give_up) break;
        }
        if (seen && !c.WaitUntil(Clock::now() + std::chrono::microseconds(after_data_us))) {
          data_phase_kills_++;
          kill_now = true;
        } else if (c.running()) {
          kill_now = true;  // no container in sight: kill it anyway
        }
      } else {
        kill_now = !c.WaitUntil(start + std::chrono::microseconds(delay_us));
      }
      if (kill_now) {
        c.Signal(SIGKILL);
        killed = true;
      }
      int rc = c.Wait();
      if (killed && rc == 0) killed = false;  // it finished just before the kill
      if (killed) {
        ASSERT_EQ(rc, 128 + SIGKILL) << when;
      } else {
        ASSERT_EQ(rc, 0) << when << "\n" << ReadFile(log_);
        NoteDuration(Clock::now() - start);
        finished_before_kill_++;
      }
    }
    ReapOrphans();
    size_t before = expected_.size();
    uint64_t count = CheckOk(/*read_data=*/i % 10 == 9, when);
    ASSERT_FALSE(HasFailure()) << when;
    ASSERT_NO_FATAL_FAILURE(SyncSnapshots(attempt_sha, killed, when, count));
    const bool committed = expected_.size() > before;
    // Restoring every snapshot after every kill would take far longer than
    // 4 minutes under ASan on 2 cores (about 40 snapshots of 48 MiB by the
    // end): the newest one is restored after every kill (it shares blocks
    // and recipes with the older ones), each one right after its backup,
    // and all of them at the end.
    EXPECT_EQ(RestoreSha(expected_.rbegin()->first), expected_.rbegin()->second)
        << when << ": newest snapshot " << expected_.rbegin()->first;
    if (committed && killed) must_complete = true;
    if (must_complete || i % 4 == 3) {
      if (Rand(0, 1) == 1) {
        ASSERT_NO_FATAL_FAILURE(Modify());
      }
      ASSERT_NO_FATAL_FAILURE(CompleteBackup(when + ", completing backup"));
      must_complete = false;
    }
    ASSERT_FALSE(HasFailure()) << when;
  }

  // SIGTERM: exit 130, no snapshot, and the next backup is incremental.
  {
    ASSERT_NO_FATAL_FAILURE(Modify());
    const std::string attempt_sha = sha_;
    Child c(BackupArgv(), log_);
    ASSERT_GT(c.pid(), 0);
    // Once the VM lock holds the child's pid, its signal handlers are
    // installed and the pipeline (which notices the signal) is still ahead.
    const std::string lock = repo_ + "/vms/vm1/lock";
    auto deadline = Clock::now() + std::chrono::seconds(60);
    bool locked = false;
    while (!locked && c.running() && Clock::now() < deadline) {
      std::string content = ReadFile(lock);
      locked = content == std::to_string(c.pid()) + "\n";
      if (!locked) c.WaitUntil(Clock::now() + std::chrono::milliseconds(1));
    }
    ASSERT_TRUE(locked) << ReadFile(log_);
    c.Signal(SIGTERM);
    int rc = c.Wait();
    ReapOrphans();
    ASSERT_EQ(rc, 130) << ReadFile(log_);
    EXPECT_NE(ReadFile(log_).find("no snapshot was recorded"), std::string::npos) << ReadFile(log_);
    size_t before = expected_.size();
    auto snaps = Snapshots();
    EXPECT_EQ(snaps.size(), before);
    ASSERT_NO_FATAL_FAILURE(ExpectCheckOk(false, "after SIGTERM"));
    EXPECT_EQ(attempt_sha, sha_);
    ASSERT_NO_FATAL_FAILURE(CompleteBackup("backup after SIGTERM"));
  }

  ASSERT_NO_FATAL_FAILURE(ExpectCheckOk(/*read_data=*/true, "at the end"));
  ExpectAllSnapshotsRestore("at the end");
  auto secs = std::chrono::duration_cast<std::chrono::seconds>(Clock::now() - test_start).count();
  std::cout << "kills before commit: " << killed_before_commit_
            << ", kills after commit: " << killed_after_commit_
            << ", runs finished before their kill: " << finished_before_kill_
            << ", completed backups: " << completed_ << ", snapshots: " << expected_.size()
            << ", killed in the data phase: " << data_phase_kills_
            << ", runs that left leftovers: " << runs_leaving_leftovers_
            << ", reclaimable findings seen: " << reclaimable_findings_ << ", " << secs << " s"
            << std::endl;
  // The kills must really have interrupted backups, mostly before the commit.
  EXPECT_GE(killed_before_commit_ + killed_after_commit_, kIterations * 3 / 4);
  EXPECT_GE(killed_before_commit_, kIterations / 2);
  // And some of them in the middle of writing data.
  EXPECT_GE(data_phase_kills_, kIterations / 6);
  EXPECT_GE(runs_leaving_leftovers_, 3);
}

// A qemu-img wrapper that SIGKILLs its parent (vmdedup) right after the
// QIW_KILL_AT-th qemu-img call completes: a crash between two bitmap steps,
// which random kills hit only by luck.
constexpr char kWrapper[] = R"(#!/bin/sh
n=$(cat "$QIW_COUNTER" 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" > "$QIW_COUNTER"
echo "$n $*" >> "$QIW_LOG"
"$QIW_REAL" "$@"
rc=$?
if [ "$n" = "$QIW_KILL_AT" ]; then kill -9 "$PPID"; fi
exit $rc
)";

TEST_F(CrashTest, KillAfterEachQemuImgStepKeepsIncrementalsExact) {
  // Small: this test is about the bitmap steps, not the data path.
  ASSERT_NO_FATAL_FAILURE(MakeImage(16 * kMiB, 4 * kMiB));
  ASSERT_NO_FATAL_FAILURE(CompleteBackup("first backup", /*expect_incremental=*/false));

  std::string bin = dir_.Sub("bin");
  ASSERT_EQ(mkdir(bin.c_str(), 0755), 0);
  {
    std::ofstream out(bin + "/qemu-img");
    out << kWrapper;
  }
  ASSERT_EQ(chmod((bin + "/qemu-img").c_str(), 0755), 0);
  auto which = RunShell("command -v qemu-img");
  ASSERT_EQ(which.exit_code, 0);
  std::string real = which.out.substr(0, which.out.find('\n'));
  const std::string counter = dir_.Sub("qemu-img.count"), calls = dir_.Sub("qemu-img.calls");
  const char* path = std::getenv("PATH");

  // Runs a backup whose `kill_at`-th qemu-img call is its last; returns
  // true when it was killed.
  auto run = [&](int kill_at, const std::string& when) -> bool {
    unlink(counter.c_str());
    unlink(calls.c_str());
    const std::string attempt_sha = sha_;
    Child c(
        BackupArgv(), log_,
        {"PATH=" + bin + ":" + (path ? path : "/usr/bin:/bin"), "QIW_REAL=" + real,
         "QIW_COUNTER=" + counter, "QIW_LOG=" + calls, "QIW_KILL_AT=" + std::to_string(kill_at)});
    int rc = c.Wait();
    ReapOrphans();
    bool killed = rc == 128 + SIGKILL;
    EXPECT_TRUE(killed || rc == 0) << when << ": exit " << rc << "\n" << ReadFile(log_);
    EXPECT_NO_FATAL_FAILURE(SyncSnapshots(attempt_sha, killed, when));
    EXPECT_NO_FATAL_FAILURE(ExpectCheckOk(false, when));
    return killed;
  };

  // 1. A crash after each step of a normal incremental backup.
  int disable_step = 0;
  for (int k = 1; k < 20; k++) {
    const std::string when = "normal run killed after qemu-img call " + std::to_string(k);
    ASSERT_NO_FATAL_FAILURE(Modify());
    bool killed = run(k, when);
    ASSERT_FALSE(HasFailure()) << when << "\n" << ReadFile(calls);
    if (killed && disable_step == 0 && ReadFile(calls).find("--disable") != std::string::npos)
      disable_step = k;
    ASSERT_NO_FATAL_FAILURE(Modify());
    ASSERT_NO_FATAL_FAILURE(CompleteBackup(when + "; next backup"));
    if (!killed) break;  // past the last qemu-img call
    ASSERT_LT(k, 19) << "a backup makes too many qemu-img calls:\n" << ReadFile(calls);
  }
  ASSERT_GT(disable_step, 0) << "no run was killed after disabling the parent's bitmap";

  // 2. A crash after each step of a backup that recovers the bitmaps of a
  // run killed while it was reading (parent bitmap disabled, new one live).
  for (int j = 1; j < 20; j++) {
    const std::string when = "recovering run killed after qemu-img call " + std::to_string(j);
    ASSERT_NO_FATAL_FAILURE(Modify());
    ASSERT_TRUE(run(disable_step, when + " (first crash)"));
    ASSERT_NO_FATAL_FAILURE(Modify());
    bool killed = run(j, when);
    ASSERT_FALSE(HasFailure()) << when << "\n" << ReadFile(calls);
    ASSERT_NO_FATAL_FAILURE(Modify());
    ASSERT_NO_FATAL_FAILURE(CompleteBackup(when + "; next backup"));
    if (!killed) break;
    ASSERT_LT(j, 19) << "a backup makes too many qemu-img calls:\n" << ReadFile(calls);
  }
  ExpectAllSnapshotsRestore("at the end");
  ASSERT_NO_FATAL_FAILURE(ExpectCheckOk(/*read_data=*/true, "at the end"));
}

// Known bug, disabled until nbd-client/nbd_block_source.cc is fixed: vmdedup
// killed after it started qemu-nbd (socket activation) but before the NBD
// handshake completed leaves qemu-nbd running forever: qemu-nbd exits when
// its last *negotiated* client disconnects, and this one never negotiated.
// It keeps the image open (shared lock), so every later backup of the image
// fails with exit 4 "Failed to get "write" lock" until someone kills it. The
// random kills hit this window now and then (RandomKills counts them). A
// qemu-nbd wrapper first in PATH reproduces it deterministically.
constexpr char kNbdWrapper[] = R"(#!/bin/sh
kill -9 "$PPID"
exec "$QNW_REAL" "$@"
)";

TEST_F(CrashTest, KillWhileQemuNbdStartsLeavesNoServerBehind) {
  ASSERT_NO_FATAL_FAILURE(MakeImage(16 * kMiB, 4 * kMiB));
  ASSERT_NO_FATAL_FAILURE(CompleteBackup("first backup", /*expect_incremental=*/false));
  std::string bin = dir_.Sub("bin");
  ASSERT_EQ(mkdir(bin.c_str(), 0755), 0);
  {
    std::ofstream out(bin + "/qemu-nbd");
    out << kNbdWrapper;
  }
  ASSERT_EQ(chmod((bin + "/qemu-nbd").c_str(), 0755), 0);
  auto which = RunShell("command -v qemu-nbd");
  ASSERT_EQ(which.exit_code, 0);
  const char* path = std::getenv("PATH");
  ASSERT_NO_FATAL_FAILURE(Modify());
  {
    Child c(BackupArgv(), log_,
            {"PATH=" + bin + ":" + (path ? path : "/usr/bin:/bin"),
             "QNW_REAL=" + which.out.substr(0, which.out.find('\n'))});
    ASSERT_EQ(c.Wait(), 128 + SIGKILL) << ReadFile(log_);
  }
  // No reaping first: the next backup must not depend on the test cleaning up.
  std::this_thread::sleep_for(std::chrono::seconds(3));
  for (const ProcInfo& k : LiveChildren())
    ADD_FAILURE() << "still running 3 s after vmdedup was killed: " << k.pid << " " << k.cmdline;
  ASSERT_NO_FATAL_FAILURE(CompleteBackup("backup after a kill while qemu-nbd started"));
  ExpectCheckOk(false, "at the end");
}

}  // namespace
}  // namespace vmdedup::testing
