// End-to-end tests of a backup from an NBD server that stops answering: one
// that accepts the connection and never completes the handshake, and one
// (nbdkit) that never answers a read. `--timeout` fails the backup with a
// line that says so; SIGTERM ends it within seconds (exit 130) whatever the
// timeout; nothing is recorded either way, and the repository stays clean.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "tests/test_util.h"

namespace vmdedup::testing {
namespace {

constexpr uint64_t kMiB = 1 << 20;
using Clock = std::chrono::steady_clock;

class NbdTimeoutTest : public ::testing::Test {
 protected:
  void SetUp() override {
    repo_ = dir_.Sub("repo");
    ASSERT_EQ(Vmdedup({"init", repo_}).exit_code, 0);
  }
  void TearDown() override {
    if (listener_ >= 0) ::close(listener_);
  }

  CommandResult Vmdedup(std::vector<std::string> args) {
    args.insert(args.begin(), VmdedupBinary());
    return RunCommand(args);
  }

  // A unix socket that listens and never accepts: connections complete in
  // the backlog and then hear nothing.
  std::string SilentSocket() {
    const std::string path = dir_.Sub("silent.sock");
    listener_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::strncpy(sa.sun_path, path.c_str(), sizeof(sa.sun_path) - 1);
    EXPECT_EQ(::bind(listener_, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
    EXPECT_EQ(::listen(listener_, 8), 0);
    return "nbd+unix:///?socket=" + path;
  }

  // Runs a backup of `uri` in the background, sends SIGTERM after `delay`
  // (or when `ready` returns true), and returns its exit code and how long
  // it took to end after the signal.
  std::pair<int, double> BackupThenSigterm(const std::string& uri,
                                           const std::function<bool()>& ready) {
    const std::string log = dir_.Sub("backup.log");
    pid_t pid = SpawnLogged(
        {VmdedupBinary(), "backup", "-r", repo_, "--vm", "vm1", "--disk", "vda", uri}, log);
    EXPECT_GT(pid, 0);
    for (int i = 0; i < 600 && !ready(); i++)
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    const auto sent = Clock::now();
    ::kill(pid, SIGTERM);
    int status = 0;
    ::waitpid(pid, &status, 0);
    const double took = std::chrono::duration<double>(Clock::now() - sent).count();
    log_ = ReadFileBytes(log);
    return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), took};
  }

  void ExpectNothingRecorded() {
    auto r = Vmdedup({"snapshots", "-r", repo_, "--json"});
    EXPECT_EQ(r.out, "") << r.out;
    r = Vmdedup({"check", "-r", repo_});
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  }

  ScratchDir dir_;
  std::string repo_;
  std::string log_;
  int listener_ = -1;
};

TEST_F(NbdTimeoutTest, AServerSilentInTheHandshakeFailsAfterTheTimeout) {
  const std::string uri = SilentSocket();
  const auto start = Clock::now();
  auto r = Vmdedup({"backup", "-r", repo_, "--vm", "vm1", "--disk", "vda", "--timeout", "2", uri});
  const double took = std::chrono::duration<double>(Clock::now() - start).count();
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("no handshake from the server in 2 s"), std::string::npos) << r.err;
  EXPECT_LT(took, 60.0);
  ExpectNothingRecorded();

  for (const std::string bad : {"-1", "x", "", "1.5", "100000"}) {
    r = Vmdedup({"backup", "-r", repo_, "--vm", "vm1", "--timeout", bad, uri});
    EXPECT_EQ(r.exit_code, 2) << bad << ": " << r.err;
    EXPECT_NE(r.err.find("--timeout"), std::string::npos) << r.err;
  }
}

TEST_F(NbdTimeoutTest, SigtermEndsABackupWaitingForTheHandshake) {
  const std::string uri = SilentSocket();
  auto [code, took] = BackupThenSigterm(uri, [] { return true; });
  EXPECT_EQ(code, 130) << log_;
  EXPECT_LT(took, 10.0) << log_;
  EXPECT_NE(log_.find("interrupted"), std::string::npos) << log_;
  ExpectNothingRecorded();
}

TEST_F(NbdTimeoutTest, AReadThatIsNeverAnsweredTimesOutOrIsEndedBySigterm) {
  const std::string image = dir_.Sub("disk.raw");
  ASSERT_TRUE(WriteFileBytes(image, RandomBytes(4 * kMiB, 51)));
  {
    // Every read waits 10 minutes: --timeout 2 fails the first one.
    SlowNbdServer server(image, 4 * kMiB, "600", dir_.Sub("slow.sock"), dir_.Sub("reads"));
    ASSERT_TRUE(server.Listening());
    const auto start = Clock::now();
    auto r = Vmdedup(
        {"backup", "-r", repo_, "--vm", "vm1", "--disk", "vda", "--timeout", "2", server.Uri()});
    const double took = std::chrono::duration<double>(Clock::now() - start).count();
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find("no reply from the server in 2 s"), std::string::npos) << r.err;
    EXPECT_LT(took, 60.0);
  }
  ExpectNothingRecorded();
  {
    // With the default timeout (300 s), SIGTERM while a read is pending.
    SlowNbdServer server(image, 4 * kMiB, "600", dir_.Sub("slow2.sock"), dir_.Sub("reads2"));
    ASSERT_TRUE(server.Listening());
    auto [code, took] = BackupThenSigterm(server.Uri(), [&] { return server.ReadsStarted() > 0; });
    EXPECT_GT(server.ReadsStarted(), 0);
    EXPECT_EQ(code, 130) << log_;
    EXPECT_LT(took, 10.0) << log_;
  }
  ExpectNothingRecorded();
}

}  // namespace
}  // namespace vmdedup::testing
