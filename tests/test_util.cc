#include "tests/test_util.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <stdexcept>

#include "base/fingerprint.h"
#include "store/records.h"
#include "store/repository.h"

namespace vmdedup::testing {

ScratchDir::ScratchDir() {
  const char* tmp = std::getenv("TMPDIR");
  std::string tmpl = std::string(tmp && *tmp ? tmp : "/tmp") + "/vmdedup-test-XXXXXX";
  if (mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  path_ = tmpl;
}

ScratchDir::~ScratchDir() {
  if (std::getenv("VMDEDUP_KEEP_TEST_DIRS")) return;
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

CommandResult RunCommand(const std::vector<std::string>& argv) {
  CommandResult result;
  int out_pipe[2], err_pipe[2];
  if (pipe2(out_pipe, O_CLOEXEC) != 0 || pipe2(err_pipe, O_CLOEXEC) != 0) return result;
  pid_t pid = fork();
  if (pid == 0) {
    dup2(out_pipe[1], 1);
    dup2(err_pipe[1], 2);
    int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0) dup2(devnull, 0);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    _exit(127);
  }
  close(out_pipe[1]);
  close(err_pipe[1]);
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  std::string* bufs[2] = {&result.out, &result.err};
  int open_fds = 2;
  while (open_fds > 0) {
    if (poll(fds, 2, -1) < 0) break;
    for (int i = 0; i < 2; i++) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[65536];
      ssize_t n = read(fds[i].fd, buf, sizeof(buf));
      if (n <= 0) {
        close(fds[i].fd);
        fds[i].fd = -1;
        open_fds--;
      } else {
        bufs[i]->append(buf, static_cast<size_t>(n));
      }
    }
  }
  int status = 0;
  waitpid(pid, &status, 0);
  if (WIFEXITED(status)) result.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) result.exit_code = 128 + WTERMSIG(status);
  return result;
}

CommandResult RunShell(const std::string& script) { return RunCommand({"/bin/sh", "-c", script}); }

int SpawnLogged(const std::vector<std::string>& argv, const std::string& log_path) {
  pid_t pid = fork();
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlives an aborted test
    int log = open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
    dup2(log, 1);
    dup2(log, 2);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    _exit(127);
  }
  return pid;
}

std::string ReadFileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return "";
  std::string data(static_cast<size_t>(in.tellg()), '\0');
  in.seekg(0);
  in.read(data.data(), static_cast<std::streamsize>(data.size()));
  return in ? data : "";
}

bool WriteFileBytes(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
  out.close();
  return static_cast<bool>(out);
}

std::string FileSha256(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return "";
  std::string data(static_cast<size_t>(in.tellg()), '\0');
  in.seekg(0);
  in.read(data.data(), static_cast<std::streamsize>(data.size()));
  if (!in) return "";
  return Sha256({reinterpret_cast<const uint8_t*>(data.data()), data.size()}).Hex();
}

std::string RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::string s(n, '\0');
  for (size_t i = 0; i < n; i += 8) {
    uint64_t v = rng();
    for (size_t k = 0; k < 8 && i + k < n; k++) s[i + k] = static_cast<char>(v >> (8 * k));
  }
  return s;
}

std::string VmdedupBinary() { return VMDEDUP_BINARY; }

SlowNbdServer::SlowNbdServer(const std::string& image, uint64_t size, const std::string& delay,
                             const std::string& socket_path, const std::string& marker_path)
    : socket_(socket_path), marker_(marker_path) {
  std::string pread = "echo >> '" + marker_ + "'; sleep " + delay + "; dd if='" + image +
                      "' skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none";
  std::string get_size = "get_size=echo " + std::to_string(size);
  pread = "pread=" + pread;
  // Its own process group, so that Kill also ends the plugin's shells and
  // their `sleep` (which would otherwise outlive nbdkit by DELAY seconds).
  pid_ = fork();
  if (pid_ == 0) {
    setpgid(0, 0);
    execlp("nbdkit", "nbdkit", "--foreground", "-U", socket_.c_str(), "eval", get_size.c_str(),
           pread.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  if (pid_ > 0) setpgid(pid_, pid_);  // also here: whichever runs first
  for (int i = 0; i < 400 && access(socket_.c_str(), F_OK) != 0; i++) usleep(25000);
}

SlowNbdServer::~SlowNbdServer() { Kill(SIGKILL); }

bool SlowNbdServer::Listening() const { return access(socket_.c_str(), F_OK) == 0; }

int SlowNbdServer::ReadsStarted() const {
  std::ifstream in(marker_);
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return static_cast<int>(std::count(s.begin(), s.end(), '\n'));
}

bool SlowNbdServer::WaitForReads(int n, int timeout_ms) const {
  for (int waited = 0; ReadsStarted() < n; waited += 10) {
    if (waited >= timeout_ms) return false;
    usleep(10000);
  }
  return true;
}

bool SlowNbdServer::Kill(int sig) {
  if (pid_ <= 0) return false;
  bool sent = kill(-pid_, sig) == 0 || kill(pid_, sig) == 0;
  waitpid(pid_, nullptr, 0);
  if (sig != SIGKILL) kill(-pid_, SIGKILL);  // what the signal left of the group
  pid_ = -1;
  return sent;
}

std::string DamageSnapshotRecord(const std::string& repo, const std::string& vm,
                                 const std::string& disk, uint64_t seq) {
  auto r = Repository::Open(repo);
  if (!r.ok()) return r.status().ToString();
  auto store = (*r)->OpenVm(vm, Repository::Access::kWrite);
  if (!store.ok()) return store.status().ToString();
  const std::string key = SnapshotKey(disk, seq);
  std::string value;
  Status st = (*store)->meta()->Get(key, &value);
  if (!st.ok()) return st.ToString();
  value[value.size() / 2] = static_cast<char>(value[value.size() / 2] ^ 0x08);
  WriteBatch batch;
  batch.Put(key, value);
  st = (*store)->meta()->Write(batch, true);
  return st.ok() ? "" : st.ToString();
}

}  // namespace vmdedup::testing
