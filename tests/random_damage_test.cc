// Random damage to a repository, over many seeds, followed by what users
// run: backup (raw images read in full, a qcow2 image through its dirty
// bitmap, a copy of the repository backing up the same image), restore of
// every snapshot, check (with and without --read-data), serve read by
// nbdcopy, repair, cds build. The damage: files deleted, flipped,
// truncated, swapped (also across VMs), replaced by links to a file
// outside, a VM directory replaced by a link, metadata files lost, the
// repository copied.
//
// The invariant, checked after every command: no command returns wrong
// bytes (a restore or a served image that exits 0 is bit-exact), a backup
// that exits 0 after `check --read-data` made a snapshot that restores
// bit-exactly at once, a `check --read-data` that exits 0 leaves every
// snapshot restorable bit-exactly, and nothing outside the repository is
// touched.
//
// VMDEDUP_TEST_SEED=N runs seed N only; VMDEDUP_DAMAGE_SEEDS sets how many
// seeds run (default 24). A failure prints the seed and every step.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "tests/test_util.h"

namespace vmdedup::testing {
namespace {

namespace fs = std::filesystem;
constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kImageSize = 3 * kMiB;

int SeedCount() {
  const char* env = std::getenv("VMDEDUP_DAMAGE_SEEDS");
  return env != nullptr && std::atoi(env) > 0 ? std::atoi(env) : 24;
}

class RandomDamageTest : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    const char* fixed = std::getenv("VMDEDUP_TEST_SEED");
    seed_ = fixed != nullptr ? std::strtoull(fixed, nullptr, 10)
                             : 0x5eed0000u + static_cast<uint64_t>(GetParam());
    if (fixed != nullptr && GetParam() != 0) GTEST_SKIP() << "VMDEDUP_TEST_SEED runs one seed";
    rng_.seed(seed_);
    victim_ = dir_.Sub("victim");
    ASSERT_TRUE(WriteFileBytes(victim_, "precious"));
    repos_.push_back(dir_.Sub("repo"));
  }

  // A line of the log printed on failure.
  void Log(const std::string& line) { log_ += line + "\n"; }
  std::string Trace() const {
    return "seed " + std::to_string(seed_) +
           " (rerun with VMDEDUP_TEST_SEED=" + std::to_string(seed_) + ")\n" + log_;
  }
  uint64_t Rand(uint64_t n) { return n == 0 ? 0 : rng_() % n; }

  // vmdedup with a deadline: a hang is a failure, never a stuck suite.
  CommandResult Vmdedup(const std::vector<std::string>& args) {
    std::vector<std::string> argv = {"timeout", "-s", "KILL", "180", VmdedupBinary()};
    argv.insert(argv.end(), args.begin(), args.end());
    const auto start = std::chrono::steady_clock::now();
    CommandResult r = RunCommand(argv);
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                        std::chrono::steady_clock::now() - start)
                        .count();
    std::string line = "[" + std::to_string(ms) + " ms] vmdedup";
    for (const auto& a : args) line += " " + a;
    Log(line + " -> " + std::to_string(r.exit_code) +
        (r.exit_code != 0 ? ": " + r.err.substr(0, r.err.find('\n')) : ""));
    EXPECT_NE(r.exit_code, 137) << "hung or killed: " << line << "\n" << Trace();
    EXPECT_LT(r.exit_code, 128) << "crashed: " << line << "\n" << r.err << Trace();
    return r;
  }

  // The VMs: two raw images ("a", "b": read in full at every backup,
  // sharing half their blocks) and a qcow2 image ("q": read through its
  // dirty bitmap).
  std::string RawImage(const std::string& vm) { return dir_.Sub(vm + ".raw"); }
  std::string Qcow2Image() { return dir_.Sub("q.qcow2"); }
  std::string Source(const std::string& vm) {
    return vm == "q" ? "qcow2:" + Qcow2Image() : "raw:" + RawImage(vm);
  }
  std::string Content(const std::string& vm) {
    if (vm != "q") return ReadFileBytes(RawImage(vm));
    const std::string raw = dir_.Sub("q-now.raw");
    std::error_code ec;
    fs::remove(raw, ec);
    auto r = RunCommand({"qemu-img", "convert", "-f", "qcow2", "-O", "raw", Qcow2Image(), raw});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return ReadFileBytes(raw);
  }
  void MakeImages() {
    const std::string shared = RandomBytes(kImageSize / 2, seed_);
    for (const std::string vm : {"a", "b"}) {
      std::string data = shared + RandomBytes(kImageSize / 2, seed_ + vm[0]);
      ASSERT_TRUE(WriteFileBytes(RawImage(vm), data));
    }
    const std::string seed_raw = dir_.Sub("q-seed.raw");
    ASSERT_TRUE(WriteFileBytes(seed_raw, shared + std::string(kImageSize / 2, '\0')));
    ASSERT_EQ(
        RunCommand({"qemu-img", "convert", "-f", "raw", "-O", "qcow2", seed_raw, Qcow2Image()})
            .exit_code,
        0);
  }
  // A guest's writes: a few random 64 KiB runs.
  void Churn(const std::string& vm) {
    const int runs = 1 + static_cast<int>(Rand(3));
    if (vm == "q") {
      std::vector<std::string> argv = {"qemu-io", "-f", "qcow2"};
      for (int i = 0; i < runs; i++) {
        argv.push_back("-c");
        argv.push_back("write -P " + std::to_string(1 + Rand(250)) + " " +
                       std::to_string(Rand(kImageSize / 65536) * 65536) + " 64k");
      }
      argv.push_back(Qcow2Image());
      ASSERT_EQ(RunCommand(argv).exit_code, 0);
      return;
    }
    std::string data = ReadFileBytes(RawImage(vm));
    for (int i = 0; i < runs; i++)
      data.replace(Rand(kImageSize / 65536) * 65536, 65536, RandomBytes(65536, rng_()));
    ASSERT_TRUE(WriteFileBytes(RawImage(vm), data));
  }

  // Backs up `vm` into `repo`. On exit 0 the new snapshot restores
  // bit-exactly or fails, and when `check --read-data` has run since the
  // last damage, it restores: a backup never references what check found
  // damaged or what is missing. (Bytes damaged since the last check are
  // known to nobody: a backup references the parent's records without
  // reading them, as every incremental backup tool does.)
  void Backup(const std::string& repo, const std::string& vm) {
    const std::string content = Content(vm);
    auto r = Vmdedup({"backup", "-r", repo, "--vm", vm, "--disk", "vda", "--json", Source(vm)});
    if (r.exit_code != 0) return;
    auto j = nlohmann::json::parse(r.out, nullptr, false);
    ASSERT_TRUE(j.is_object() && j.contains("id")) << r.out << Trace();
    const std::string id = j["id"];
    expected_[repo][id] = content;
    auto got = Restore(repo, id);
    if (checked_since_damage_[repo]) {
      EXPECT_TRUE(got.has_value())
          << "backup " << id << " exited 0 after check --read-data but does not restore\n"
          << Trace();
    }
    if (got) {
      EXPECT_TRUE(*got == content) << "backup " << id << " restores other bytes\n" << Trace();
    }
  }
  std::optional<std::string> Restore(const std::string& repo, const std::string& id) {
    const std::string out = dir_.Sub("restored.raw");
    fs::remove(out);
    auto r = Vmdedup({"restore", "-r", repo, id, "--to", out});
    if (r.exit_code != 0) return std::nullopt;
    return ReadFileBytes(out);
  }
  // Every snapshot made: a restore that exits 0 is bit-exact. Returns
  // those that failed.
  std::vector<std::string> RestoreAll(const std::string& repo) {
    std::vector<std::string> failed;
    for (const auto& [id, bytes] : expected_[repo]) {
      auto got = Restore(repo, id);
      if (!got) {
        failed.push_back(id);
        continue;
      }
      EXPECT_TRUE(*got == bytes) << "restore of " << id << " exited 0 with other bytes\n"
                                 << Trace();
    }
    return failed;
  }
  void Check(const std::string& repo, bool read_data) {
    std::vector<std::string> args = {"check", "-r", repo, "--json"};
    if (read_data) args.push_back("--read-data");
    auto r = Vmdedup(args);
    if (read_data && r.exit_code != 1) checked_since_damage_[repo] = true;
    if (r.exit_code != 0 || !read_data) return;
    auto failed = RestoreAll(repo);
    EXPECT_TRUE(failed.empty()) << "check --read-data exited 0, but " << failed.front()
                                << " does not restore\n"
                                << r.out << Trace();
  }
  // Serves a random snapshot and copies it with nbdcopy: a copy that
  // succeeds is bit-exact.
  void Serve(const std::string& repo) {
    if (expected_[repo].empty()) return;
    auto it = expected_[repo].begin();
    std::advance(it, static_cast<long>(Rand(expected_[repo].size())));
    const std::string socket = dir_.Sub("nbd.sock");
    const std::string out = dir_.Sub("served.raw");
    fs::remove(out);
    Log("vmdedup serve -r " + repo + " " + it->first);
    int pid =
        SpawnLogged({VmdedupBinary(), "serve", "-r", repo, it->first, "--socket", socket, "--json"},
                    dir_.Sub("serve.log"));
    ASSERT_GT(pid, 0);
    bool listening = false;
    for (int i = 0; i < 300 && !listening; i++) {
      int status = 0;
      if (::waitpid(pid, &status, WNOHANG) == pid) {  // refused to serve: fine
        Log("  serve exited " + std::to_string(WEXITSTATUS(status)));
        EXPECT_FALSE(WIFSIGNALED(status)) << ReadFileBytes(dir_.Sub("serve.log")) << Trace();
        return;
      }
      struct stat sb;
      listening = ::stat(socket.c_str(), &sb) == 0 && S_ISSOCK(sb.st_mode);
      if (!listening) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (listening) {
      auto copy = RunCommand(
          {"timeout", "-s", "KILL", "120", "nbdcopy", "nbd+unix:///?socket=" + socket, out});
      Log("  nbdcopy -> " + std::to_string(copy.exit_code));
      if (copy.exit_code == 0) {
        std::string got = ReadFileBytes(out);
        const std::string& want = it->second;
        // The export is the virtual size: whole sectors.
        EXPECT_TRUE(got.size() >= want.size() && got.compare(0, want.size(), want) == 0 &&
                    got.find_first_not_of('\0', want.size()) == std::string::npos)
            << "served " << it->first << " with other bytes\n"
            << Trace();
      }
    }
    ::kill(pid, SIGTERM);
    int status = 0;
    ::waitpid(pid, &status, 0);
    fs::remove(socket);
  }

  // Every regular file and directory below `repo`.
  std::vector<std::string> Files(const std::string& repo, bool directories = false) {
    std::vector<std::string> out;
    std::error_code ec;
    for (auto it = fs::recursive_directory_iterator(repo, ec);
         !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
      if (it->is_symlink()) continue;
      if (directories ? it->is_directory() : it->is_regular_file())
        out.push_back(it->path().string());
    }
    std::sort(out.begin(), out.end());
    return out;
  }
  std::string Pick(const std::vector<std::string>& v) { return v[Rand(v.size())]; }

  // One random kind of damage to `repo`.
  void Damage(const std::string& repo) {
    checked_since_damage_[repo] = false;
    auto files = Files(repo);
    if (files.empty()) return;
    const std::string f = Pick(files);
    const std::string rel = f.substr(repo.size() + 1);
    std::error_code ec;  // damage that cannot be done is no damage
    switch (Rand(9)) {
      case 0:
        Log("damage: delete " + rel);
        fs::remove(f, ec);
        break;
      case 1: {
        std::string bytes = ReadFileBytes(f);
        if (bytes.empty()) return;
        const uint64_t at = Rand(bytes.size());
        Log("damage: flip byte " + std::to_string(at) + " of " + rel);
        bytes[at] = static_cast<char>(bytes[at] ^ (1 + Rand(255)));
        WriteFileBytes(f, bytes);
        break;
      }
      case 2: {
        const uint64_t to = Rand(ReadFileBytes(f).size() + 1);
        Log("damage: truncate " + rel + " to " + std::to_string(to));
        fs::resize_file(f, to, ec);
        break;
      }
      case 3: {
        const std::string g = Pick(files);
        Log("damage: swap " + rel + " and " + g.substr(repo.size() + 1));
        if (g == f) return;
        const std::string tmp = f + ".swap";
        fs::rename(f, tmp, ec);
        fs::rename(g, f, ec);
        fs::rename(tmp, g, ec);
        break;
      }
      case 4:
        Log("damage: " + rel + " becomes a link to a file outside");
        fs::remove(f, ec);
        fs::create_symlink(victim_, f, ec);
        break;
      case 5: {
        // A VM directory becomes a link to another's.
        std::vector<std::string> vms;
        for (const std::string vm : {"a", "b", "q"})
          if (fs::is_directory(repo + "/vms/" + vm)) vms.push_back(vm);
        if (vms.size() < 2) return;
        const std::string from = vms[0], to = vms[1 + Rand(vms.size() - 1)];
        Log("damage: vms/" + from + " becomes a link to vms/" + to);
        fs::rename(repo + "/vms/" + from, dir_.Sub("moved-" + from + std::to_string(Rand(1000))),
                   ec);
        fs::create_symlink(repo + "/vms/" + to, repo + "/vms/" + from, ec);
        break;
      }
      case 6: {
        // Metadata files lost: one kind, in one VM.
        const std::string vm = std::string(1, "abq"[Rand(3)]);
        const std::string meta = repo + "/vms/" + vm + "/meta";
        const std::string kind =
            std::vector<std::string>{"CURRENT", "MANIFEST", ".log", ".ldb"}[Rand(4)];
        Log("damage: lose the " + kind + " files of vms/" + vm + "/meta");
        for (auto it = fs::directory_iterator(meta, ec); !ec && it != fs::directory_iterator();
             it.increment(ec)) {
          const std::string name = it->path().filename().string();
          if (name.starts_with(kind) || name.ends_with(kind)) fs::remove(it->path(), ec);
        }
        break;
      }
      case 7:
        Log("damage: repository copied to " + repos_[0] + "-copy");
        if (repos_.size() == 1) {
          fs::copy(repo, repos_[0] + "-copy",
                   fs::copy_options::recursive | fs::copy_options::copy_symlinks, ec);
          repos_.push_back(repos_[0] + "-copy");
          expected_[repos_[1]] = expected_[repo];
          checked_since_damage_[repos_[1]] = false;
        }
        break;
      default: {
        // A whole VM's containers lost.
        const std::string vm = std::string(1, "abq"[Rand(3)]);
        Log("damage: lose vms/" + vm + "/data");
        fs::remove_all(repo + "/vms/" + vm + "/data", ec);
        break;
      }
    }
  }

  // One random user command after the damage.
  void Step() {
    const std::string repo = Pick(repos_);
    const std::string vm = std::string(1, "abq"[Rand(3)]);
    switch (Rand(7)) {
      case 0:
      case 1:
        Churn(vm);
        Backup(repo, vm);
        break;
      case 2: {
        const bool read_data = Rand(2) == 0;
        Check(repo, read_data);
        // What check found damaged, the next backups leave behind.
        if (read_data && Rand(2) == 0) {
          for (const std::string each : {"a", "b", "q"}) {
            Churn(each);
            Backup(repo, each);
          }
        }
        break;
      }
      case 3:
        RestoreAll(repo);
        break;
      case 4:
        Serve(repo);
        break;
      case 5:
        Vmdedup({"repair", "-r", repo, "--vm", vm});
        break;
      default:
        Vmdedup({"cds", "build", "-r", repo});
        break;
    }
  }

  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
  ScratchDir dir_;
  std::string victim_;
  std::vector<std::string> repos_;
  std::map<std::string, std::map<std::string, std::string>> expected_;  // repo → id → bytes
  std::map<std::string, bool> checked_since_damage_;  // check --read-data ran since
  std::string log_;
};

TEST_P(RandomDamageTest, NoCommandEverReturnsWrongBytes) {
  const std::string repo = repos_[0];
  ASSERT_EQ(Vmdedup({"init", repo}).exit_code, 0);
  MakeImages();
  for (const std::string vm : {"a", "b", "q"}) Backup(repo, vm);
  if (Rand(2) == 0) Vmdedup({"cds", "build", "-r", repo});
  for (const std::string vm : {"a", "b", "q"}) {
    Churn(vm);
    Backup(repo, vm);
  }
  ASSERT_FALSE(HasFailure()) << Trace();
  ASSERT_EQ(expected_[repo].size(), 6u) << Trace();

  const int rounds = 2;
  for (int round = 0; round < rounds; round++) {
    const int damages = 1 + static_cast<int>(Rand(3));
    for (int i = 0; i < damages; i++) Damage(Pick(repos_));
    const int steps = 4 + static_cast<int>(Rand(4));
    for (int i = 0; i < steps && !HasFailure(); i++) Step();
  }
  // Finally every snapshot of every repository, and the file outside.
  for (const std::string& r : repos_) RestoreAll(r);
  EXPECT_EQ(ReadFileBytes(victim_), "precious") << Trace();
  if (std::getenv("VMDEDUP_DAMAGE_VERBOSE") != nullptr) std::fputs(Trace().c_str(), stdout);
}

INSTANTIATE_TEST_SUITE_P(Seeds, RandomDamageTest, ::testing::Range(0, SeedCount()));

}  // namespace
}  // namespace vmdedup::testing
