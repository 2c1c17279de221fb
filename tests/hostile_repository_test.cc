// Whoever can write a repository must not get the help of the (root)
// process that backs up into it, and what vmdedup writes is its user's
// alone: end-to-end tests with the vmdedup binary of symbolic links planted
// at lock files, VM directories, metadata files and containers (never
// followed: refused, named, reported by check, nothing outside touched),
// and of the modes of everything a repository holds under umask 022; and a
// damaged configuration record, read from its copy.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include "tests/test_util.h"

namespace vmdedup::testing {
namespace {

namespace fs = std::filesystem;
constexpr uint64_t kMiB = 1 << 20;

class HostileRepositoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    old_umask_ = ::umask(022);
    repo_ = dir_.Sub("repo");
    image_ = dir_.Sub("disk.raw");
    victim_ = dir_.Sub("victim");
    ASSERT_TRUE(WriteFileBytes(victim_, "precious"));
    ASSERT_EQ(::chmod(victim_.c_str(), 0644), 0);
    ASSERT_EQ(Vmdedup({"init", repo_}).exit_code, 0);
    ASSERT_TRUE(WriteFileBytes(image_, RandomBytes(4 * kMiB, 21)));
    auto r = Backup("vm1");
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  void TearDown() override { ::umask(old_umask_); }

  CommandResult Vmdedup(std::vector<std::string> args) {
    args.insert(args.begin(), VmdedupBinary());
    return RunCommand(args);
  }
  CommandResult Backup(const std::string& vm) {
    return Vmdedup({"backup", "-r", repo_, "--vm", vm, "--disk", "vda", "raw:" + image_});
  }
  // The victim outside the repository is as it was, content and mode.
  void ExpectVictimUntouched() {
    EXPECT_EQ(ReadFileBytes(victim_), "precious");
    struct stat sb;
    ASSERT_EQ(::stat(victim_.c_str(), &sb), 0);
    EXPECT_EQ(sb.st_mode & 07777, 0644u);
  }
  void ReplaceWithLink(const std::string& path, const std::string& target) {
    std::error_code ec;
    fs::remove(path, ec);
    ASSERT_EQ(::symlink(target.c_str(), path.c_str()), 0) << path;
  }

  ScratchDir dir_;
  std::string repo_, image_, victim_;
  mode_t old_umask_ = 022;
};

TEST_F(HostileRepositoryTest, EverythingARepositoryHoldsIsPrivateWhateverTheUmask) {
  // A second backup, another VM and a CDS version: every kind of file.
  ASSERT_EQ(Backup("vm1").exit_code, 0);
  ASSERT_EQ(Backup("vm2").exit_code, 0);
  auto r = Vmdedup({"cds", "build", "-r", repo_, "-q"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_EQ(Backup("vm2").exit_code, 0);
  size_t files = 0, dirs = 1;
  struct stat sb;
  ASSERT_EQ(::stat(repo_.c_str(), &sb), 0);
  EXPECT_EQ(sb.st_mode & 077, 0u) << repo_ << " is " << std::oct << (sb.st_mode & 0777);
  for (const auto& e : fs::recursive_directory_iterator(repo_)) {
    ASSERT_EQ(::lstat(e.path().c_str(), &sb), 0);
    EXPECT_EQ(sb.st_mode & 077, 0u) << e.path() << " is " << std::oct << (sb.st_mode & 0777);
    (S_ISDIR(sb.st_mode) ? dirs : files)++;
  }
  // The walk saw the repository's parts: configuration, locks, LevelDB
  // files, containers, CDS objects.
  EXPECT_GE(files, 20u);
  EXPECT_GE(dirs, 8u);
}

TEST_F(HostileRepositoryTest, ALinkAtALockFileIsNeverFollowed) {
  ReplaceWithLink(repo_ + "/vms/vm1/lock", victim_);
  auto r = Backup("vm1");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find(repo_ + "/vms/vm1/lock is, or passes through, a symbolic link"),
            std::string::npos)
      << r.err;
  ExpectVictimUntouched();

  ASSERT_EQ(::mkdir((repo_ + "/cds").c_str(), 0700) == 0 || errno == EEXIST, true);
  ReplaceWithLink(repo_ + "/cds/lock", victim_);
  r = Vmdedup({"cds", "build", "-r", repo_, "-q"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find(repo_ + "/cds/lock is, or passes through, a symbolic link"),
            std::string::npos)
      << r.err;
  ExpectVictimUntouched();
}

TEST_F(HostileRepositoryTest, ALinkedVmDirectoryIsRefusedAndReported) {
  ASSERT_EQ(::symlink("vm1", (repo_ + "/vms/alias").c_str()), 0);
  auto r = Vmdedup({"snapshots", "-r", repo_});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("vm1/vda/1"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("alias"), std::string::npos) << r.out;

  r = Backup("alias");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find(repo_ + "/vms/alias is a symbolic link"), std::string::npos) << r.err;
  r = Vmdedup({"restore", "-r", repo_, "alias/vda/1", "--to", dir_.Sub("out.raw")});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find(repo_ + "/vms/alias is a symbolic link"), std::string::npos) << r.err;
  EXPECT_NE(::access(dir_.Sub("out.raw").c_str(), F_OK), 0);

  r = Vmdedup({"check", "-r", repo_});
  EXPECT_EQ(r.exit_code, 3) << r.out << r.err;
  EXPECT_NE(r.out.find("vms/alias is a symbolic link"), std::string::npos) << r.out;
  // The real VM is unaffected.
  r = Vmdedup({"restore", "-r", repo_, "vm1/vda/1", "--to", dir_.Sub("vm1.raw")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(FileSha256(dir_.Sub("vm1.raw")), FileSha256(image_));
}

TEST_F(HostileRepositoryTest, ALinkPlantedInTheMetadataStoreIsNeverFollowed) {
  // A name LevelDB would create next (a log file it truncates on creation).
  const std::string planted = repo_ + "/vms/vm1/meta/999999.log";
  ASSERT_EQ(::symlink(victim_.c_str(), planted.c_str()), 0);
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"backup", "-r", repo_, "--vm", "vm1", "--disk", "vda", "raw:" + image_},
           {"snapshots", "-r", repo_, "--vm", "vm1"},
           {"restore", "-r", repo_, "vm1/vda/1", "--to", dir_.Sub("out.raw")}}) {
    auto r = Vmdedup(args);
    EXPECT_NE(r.exit_code, 0) << args[0];
    EXPECT_NE(r.err.find(planted + " is a symbolic link"), std::string::npos)
        << args[0] << ": " << r.err;
  }
  auto r = Vmdedup({"check", "-r", repo_});
  EXPECT_EQ(r.exit_code, 3) << r.out << r.err;
  EXPECT_NE(r.out.find("999999.log is a symbolic link"), std::string::npos) << r.out;
  ExpectVictimUntouched();
}

TEST_F(HostileRepositoryTest, AContainerReplacedByALinkIsNeverReadAndTheNextBackupHeals) {
  // The container moved out of the repository and linked back: its bytes
  // are right, but a repository never reads through a link.
  const std::string container = repo_ + "/vms/vm1/data/0000000000000001.ctr";
  const std::string outside = dir_.Sub("moved.ctr");
  ASSERT_EQ(::rename(container.c_str(), outside.c_str()), 0);
  ASSERT_EQ(::symlink(outside.c_str(), container.c_str()), 0);

  auto r = Vmdedup({"restore", "-r", repo_, "vm1/vda/1", "--to", dir_.Sub("out.raw")});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("symbolic link"), std::string::npos) << r.err;
  EXPECT_NE(::access(dir_.Sub("out.raw").c_str(), F_OK), 0);

  r = Vmdedup({"check", "-r", repo_});
  EXPECT_EQ(r.exit_code, 3) << r.out << r.err;
  EXPECT_NE(r.out.find("0000000000000001.ctr is, or passes through, a symbolic link"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("quarantined 1"), std::string::npos) << r.out;

  // The next backup references nothing in it: its snapshot restores.
  r = Backup("vm1");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Vmdedup({"restore", "-r", repo_, "vm1/vda/2", "--to", dir_.Sub("healed.raw")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(FileSha256(dir_.Sub("healed.raw")), FileSha256(image_));
}

// One flipped byte in the configuration record: every command reads its
// copy and says so; check rewrites the record from it. A missing copy (a
// repository made before copies) is written by check; both unreadable is
// an error naming both.
TEST_F(HostileRepositoryTest, ADamagedConfigurationIsReadFromItsCopyAndRepairedByCheck) {
  const std::string record = repo_ + "/vmdedup-repo", copy = repo_ + "/vmdedup-repo.copy";
  const std::string good = ReadFileBytes(record);
  ASSERT_FALSE(good.empty());
  EXPECT_EQ(ReadFileBytes(copy), good);
  std::string flipped = good;
  flipped[flipped.size() / 2] ^= 0x20;
  ASSERT_TRUE(WriteFileBytes(record, flipped));

  auto r = Vmdedup({"snapshots", "-r", repo_});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("vm1/vda/1"), std::string::npos) << r.out;
  EXPECT_NE(r.err.find("read its copy " + copy), std::string::npos) << r.err;
  r = Vmdedup({"restore", "-r", repo_, "vm1/vda/1", "--to", dir_.Sub("out.raw")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(FileSha256(dir_.Sub("out.raw")), FileSha256(image_));

  r = Vmdedup({"check", "-r", repo_});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("repaired: vmdedup-repo rewritten from vmdedup-repo.copy"),
            std::string::npos)
      << r.out;
  EXPECT_EQ(ReadFileBytes(record), good);
  r = Vmdedup({"snapshots", "-r", repo_});
  EXPECT_EQ(r.err, "") << r.err;

  // No copy (an older repository): read without a word; check writes it.
  ASSERT_EQ(::unlink(copy.c_str()), 0);
  r = Vmdedup({"snapshots", "-r", repo_});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.err, "") << r.err;
  r = Vmdedup({"check", "-r", repo_, "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("vmdedup-repo.copy rewritten from vmdedup-repo (there was none)"),
            std::string::npos)
      << r.out;
  EXPECT_EQ(ReadFileBytes(copy), good);

  // Both damaged: nothing is read, and the error names both.
  ASSERT_TRUE(WriteFileBytes(record, flipped));
  ASSERT_TRUE(WriteFileBytes(copy, flipped));
  r = Vmdedup({"snapshots", "-r", repo_});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("vmdedup-repo.copy"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("Corruption"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace vmdedup::testing
