// End-to-end tests of readers through read views (store/leveldb_read_view.h):
// a repository on a read-only file system is listed, restored, served and
// checked; readers neither wait for a running backup nor make it wait, and
// a server keeps serving its snapshot while the VM is backed up. check,
// which opens a VM's store itself, says which VM a backup kept it from
// (exit code 5) or waits for it with --lock-wait.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "tests/test_util.h"

namespace vmdedup::testing {
namespace {

constexpr uint64_t kMiB = 1 << 20;

class ReadViewTest : public ::testing::Test {
 protected:
  void SetUp() override {
    repo_ = dir_.Sub("repo");
    image_ = dir_.Sub("disk.raw");
    ASSERT_EQ(Vmdedup({"init", repo_}).exit_code, 0);
    ASSERT_TRUE(WriteFileBytes(image_, RandomBytes(12 * kMiB, 41)));
    auto r = Vmdedup({"backup", "-r", repo_, "--vm", "vm1", "--disk", "vda", "raw:" + image_});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    image_sha_ = FileSha256(image_);
  }
  void TearDown() override {
    if (!mounted_.empty()) ::umount2(mounted_.c_str(), MNT_DETACH);
  }

  CommandResult Vmdedup(std::vector<std::string> args) {
    args.insert(args.begin(), VmdedupBinary());
    return RunCommand(args);
  }

  // Starts `vmdedup serve --json ARGS...` and returns its pid and the URI
  // from its first line ("" when it did not start).
  std::string StartServe(const std::vector<std::string>& args, const std::string& log, pid_t* pid) {
    int fds[2];
    if (::pipe(fds) != 0) return "";
    *pid = ::fork();
    if (*pid == 0) {
      ::dup2(fds[1], 1);
      ::close(fds[0]);
      ::close(fds[1]);
      FILE* err = std::freopen(log.c_str(), "a", stderr);
      (void)err;
      std::vector<std::string> argv = {VmdedupBinary(), "serve", "--json"};
      argv.insert(argv.end(), args.begin(), args.end());
      std::vector<char*> c;
      for (auto& a : argv) c.push_back(a.data());
      c.push_back(nullptr);
      ::execv(c[0], c.data());
      ::_exit(127);
    }
    ::close(fds[1]);
    std::string line;
    char ch;
    while (::read(fds[0], &ch, 1) == 1 && ch != '\n') line += ch;
    ::close(fds[0]);
    auto j = nlohmann::json::parse(line, nullptr, false);
    return j.is_object() ? j.value("uri", "") : "";
  }
  // A backup of vm1/vda from `uri` on a thread of its own (join it):
  // `*result` and then `*done` are set when it ends.
  std::thread BackUpInBackground(const std::string& uri, CommandResult* result,
                                 std::atomic<bool>* done) {
    return std::thread([this, uri, result, done] {
      *result =
          Vmdedup({"backup", "-r", repo_, "--vm", "vm1", "--disk", "vda", "--threads", "1", uri});
      *done = true;
    });
  }
  static int StopServe(pid_t pid) {
    ::kill(pid, SIGTERM);
    int status = 0;
    ::waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  ScratchDir dir_;
  std::string repo_, image_, image_sha_;
  std::string mounted_;
};

TEST_F(ReadViewTest, AReadOnlyRepositoryIsListedRestoredServedAndChecked) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root for a read-only bind mount";
  const std::string ro = dir_.Sub("ro");
  ASSERT_EQ(::mkdir(ro.c_str(), 0700), 0);
  if (::mount(repo_.c_str(), ro.c_str(), nullptr, MS_BIND, nullptr) != 0)
    GTEST_SKIP() << "cannot bind-mount here: " << std::strerror(errno);
  mounted_ = ro;
  ASSERT_EQ(::mount(nullptr, ro.c_str(), nullptr, MS_REMOUNT | MS_BIND | MS_RDONLY, nullptr), 0)
      << std::strerror(errno);
  ASSERT_NE(::access((ro + "/vms").c_str(), W_OK), 0) << "the mount is writable";

  auto r = Vmdedup({"snapshots", "-r", ro, "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("\"id\":\"vm1/vda/1\""), std::string::npos) << r.out;

  const std::string out = dir_.Sub("restored.raw");
  r = Vmdedup({"restore", "-r", ro, "vm1/vda/1", "--to", out});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(FileSha256(out), image_sha_);

  r = Vmdedup({"check", "-r", ro, "--read-data"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("no damage found"), std::string::npos) << r.out;

  pid_t pid = -1;
  const std::string uri = StartServe({"-r", ro, "vm1/vda/1"}, dir_.Sub("serve.log"), &pid);
  ASSERT_NE(uri, "") << ReadFileBytes(dir_.Sub("serve.log"));
  const std::string copy = dir_.Sub("served.raw");
  auto c = RunCommand({"nbdcopy", uri, copy});
  EXPECT_EQ(c.exit_code, 0) << c.err;
  EXPECT_EQ(FileSha256(copy), image_sha_);
  EXPECT_EQ(StopServe(pid), 0) << ReadFileBytes(dir_.Sub("serve.log"));

  // A backup cannot write there: it says so and changes nothing.
  r = Vmdedup({"backup", "-r", ro, "--vm", "vm1", "--disk", "vda", "raw:" + image_});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("Read-only file system"), std::string::npos) << r.err;
}

TEST_F(ReadViewTest, ReadersNeitherWaitForNorHoldUpABackup) {
  // A backup of vm1 that reads slowly from an NBD server: it holds the VM
  // while the readers below run.
  const std::string changed = dir_.Sub("changed.raw");
  ASSERT_TRUE(WriteFileBytes(changed, RandomBytes(8 * kMiB, 42)));
  SlowNbdServer server(changed, 8 * kMiB, "0.3", dir_.Sub("slow.sock"), dir_.Sub("reads"));
  ASSERT_TRUE(server.Listening());
  CommandResult backup;
  std::atomic<bool> backup_done{false};
  std::thread writer = BackUpInBackground(server.Uri(), &backup, &backup_done);
  ASSERT_TRUE(server.WaitForReads(2, 60000));

  // While it runs: the VM is listed and its snapshot restored.
  auto r = Vmdedup({"snapshots", "-r", repo_, "--vm", "vm1", "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("\"id\":\"vm1/vda/1\""), std::string::npos) << r.out;
  const std::string out = dir_.Sub("restored.raw");
  r = Vmdedup({"restore", "-r", repo_, "vm1/vda/1", "--to", out});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(FileSha256(out), image_sha_);
  EXPECT_FALSE(backup_done.load()) << "the backup was over before the readers ran";
  writer.join();
  ASSERT_EQ(backup.exit_code, 0) << backup.err;

  // A server of vm1/vda/1 runs while the next backup of vm1 commits, and
  // serves its snapshot exactly before and after.
  pid_t pid = -1;
  const std::string uri = StartServe({"-r", repo_, "vm1/vda/1"}, dir_.Sub("serve.log"), &pid);
  ASSERT_NE(uri, "") << ReadFileBytes(dir_.Sub("serve.log"));
  r = Vmdedup({"backup", "-r", repo_, "--vm", "vm1", "--disk", "vda", "raw:" + image_});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  const std::string copy = dir_.Sub("served.raw");
  auto c = RunCommand({"nbdcopy", uri, copy});
  EXPECT_EQ(c.exit_code, 0) << c.err;
  EXPECT_EQ(FileSha256(copy), image_sha_);
  EXPECT_EQ(StopServe(pid), 0) << ReadFileBytes(dir_.Sub("serve.log"));
  r = Vmdedup({"snapshots", "-r", repo_, "--vm", "vm1", "--json"});
  EXPECT_NE(r.out.find("\"id\":\"vm1/vda/3\""), std::string::npos) << r.out;
  r = Vmdedup({"restore", "-r", repo_, "vm1/vda/2", "--to", dir_.Sub("second.raw")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(FileSha256(dir_.Sub("second.raw")), FileSha256(changed));

  r = Vmdedup({"check", "-r", repo_, "--read-data"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

TEST_F(ReadViewTest, ACheckOfAVmBeingBackedUpIsIncompleteOrWaits) {
  const std::string changed = dir_.Sub("changed.raw");
  ASSERT_TRUE(WriteFileBytes(changed, RandomBytes(8 * kMiB, 43)));
  SlowNbdServer server(changed, 8 * kMiB, "0.3", dir_.Sub("slow.sock"), dir_.Sub("reads"));
  ASSERT_TRUE(server.Listening());
  // A second VM, not busy, is checked in full.
  auto r = Vmdedup({"backup", "-r", repo_, "--vm", "vm2", "--disk", "vda", "raw:" + image_});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  CommandResult backup;
  std::atomic<bool> backup_done{false};
  std::thread writer = BackUpInBackground(server.Uri(), &backup, &backup_done);
  ASSERT_TRUE(server.WaitForReads(2, 60000));

  r = Vmdedup({"check", "-r", repo_});
  EXPECT_EQ(r.exit_code, 5) << r.out << r.err;
  EXPECT_NE(r.out.find("not checked: VM vm1: "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("CHECK INCOMPLETE: 1 VM(s) not checked"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("\nno damage found\n"), std::string::npos) << r.out;
  r = Vmdedup({"check", "-r", repo_, "--json"});
  EXPECT_EQ(r.exit_code, 5) << r.out << r.err;
  auto j = nlohmann::json::parse(r.out, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.out;
  EXPECT_EQ(j["complete"], false);
  EXPECT_EQ(j["ok"], true);
  ASSERT_EQ(j["vms_not_checked"].size(), 1u) << r.out;
  EXPECT_EQ(j["vms_not_checked"][0]["vm"], "vm1");
  EXPECT_EQ(j["vms"], 1);  // vm2
  EXPECT_FALSE(backup_done.load()) << "the backup was over before the checks ran";

  // --lock-wait: the check waits for the backup and then checks vm1 too.
  r = Vmdedup({"check", "-r", repo_, "--lock-wait", "300", "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  // It waited: it saw the snapshot the backup committed (the backup's
  // process may still be exiting when the check is done).
  j = nlohmann::json::parse(r.out, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.out;
  EXPECT_EQ(j["complete"], true);
  EXPECT_EQ(j["vms"], 2);
  EXPECT_EQ(j["snapshots"], 3);
  writer.join();
  EXPECT_EQ(backup.exit_code, 0) << backup.err;

  for (const std::string bad : {"-1", "x", "", "1e9"}) {
    r = Vmdedup({"check", "-r", repo_, "--lock-wait", bad});
    EXPECT_EQ(r.exit_code, 2) << bad;
    EXPECT_NE(r.err.find("--lock-wait"), std::string::npos) << r.err;
  }
}

}  // namespace
}  // namespace vmdedup::testing
