#include "base/subprocess.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace vmdedup {
namespace {

// Closes a descriptor once, on scope exit or on request.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { Close(); }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  int* ptr() { return &fd_; }
  void Close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

int64_t NowMs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

bool IsExecutableFile(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(path.c_str(), X_OK) == 0;
}

// Waits for `pid`, retrying on EINTR. Returns the raw wait status.
int WaitFor(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return status;
}

// In the child: makes `fd` become `target`, without close-on-exec.
// Async-signal-safe.
void MoveFd(int fd, int target) {
  if (fd == target) {
    int flags = ::fcntl(fd, F_GETFD);
    if (flags >= 0) ::fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC);
  } else {
    ::dup2(fd, target);
  }
}

}  // namespace

std::string ProcessOutput::ErrorSummary() const {
  std::string summary;
  size_t pos = 0;
  while (pos < err.size()) {
    size_t nl = err.find('\n', pos);
    if (nl == std::string::npos) nl = err.size();
    std::string line = err.substr(pos, nl - pos);
    size_t b = line.find_first_not_of(" \t\r");
    size_t e = line.find_last_not_of(" \t\r");
    if (b != std::string::npos) {
      if (!summary.empty()) summary += ' ';
      summary += line.substr(b, e - b + 1);
    }
    pos = nl + 1;
  }
  constexpr size_t kMax = 2000;
  if (summary.size() > kMax) summary = summary.substr(0, kMax) + "...";
  if (!summary.empty()) return summary;
  if (term_signal != 0) return "killed by signal " + std::to_string(term_signal);
  return "exit status " + std::to_string(exit_code);
}

std::optional<std::string> FindProgram(const std::string& name) {
  if (name.empty()) return std::nullopt;
  if (name.find('/') != std::string::npos) {
    if (IsExecutableFile(name)) return name;
    return std::nullopt;
  }
  const char* path_env = std::getenv("PATH");
  std::string path = path_env ? path_env : "/usr/local/bin:/usr/bin:/bin";
  size_t pos = 0;
  while (pos <= path.size()) {
    size_t colon = path.find(':', pos);
    if (colon == std::string::npos) colon = path.size();
    // An empty PATH entry means the current directory.
    std::string candidate = colon > pos ? path.substr(pos, colon - pos) : std::string(".");
    candidate.push_back('/');
    candidate.append(name);
    if (IsExecutableFile(candidate)) return candidate;
    pos = colon + 1;
  }
  return std::nullopt;
}

Status ProgramNotFound(const std::string& name) {
  const char* package = nullptr;
  if (name == "qemu-img" || name == "qemu-nbd" || name == "qemu-io") package = "qemu-utils";
  if (name == "nbdkit") package = "nbdkit";
  if (name == "nbdinfo" || name == "nbdcopy") package = "libnbd-bin";
  if (package != nullptr) return Status::NotFound(name + " not found: install " + package);
  return Status::NotFound(name + " not found in PATH");
}

Result<ProcessOutput> RunProcess(const std::vector<std::string>& argv,
                                 const ProcessOptions& options) {
  if (argv.empty() || argv[0].empty()) return Status::InvalidArgument("RunProcess: empty argv");
  std::optional<std::string> program = FindProgram(argv[0]);
  if (!program) return ProgramNotFound(argv[0]);

  // Everything the child needs is prepared before fork: after fork the child
  // of a multi-threaded parent may only call async-signal-safe functions.
  std::vector<char*> args;
  args.reserve(argv.size() + 1);
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);

  Fd devnull(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  if (devnull.get() < 0) return Status::FromErrno(errno, "open /dev/null");
  int out_pipe[2], err_pipe[2], exec_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0) return Status::FromErrno(errno, "pipe");
  Fd out_r(out_pipe[0]), out_w(out_pipe[1]);
  if (::pipe2(err_pipe, O_CLOEXEC) != 0) return Status::FromErrno(errno, "pipe");
  Fd err_r(err_pipe[0]), err_w(err_pipe[1]);
  // Carries errno from a failed exec; closed by a successful one.
  if (::pipe2(exec_pipe, O_CLOEXEC) != 0) return Status::FromErrno(errno, "pipe");
  Fd exec_r(exec_pipe[0]), exec_w(exec_pipe[1]);

  pid_t pid = ::fork();
  if (pid < 0) return Status::FromErrno(errno, "fork for " + argv[0]);
  if (pid == 0) {
    // Child. Move the descriptors above 2 first so that none of them is
    // clobbered by the dup2 calls below even if the parent had closed stdio.
    int in = ::fcntl(devnull.get(), F_DUPFD_CLOEXEC, 10);
    int out = ::fcntl(out_w.get(), F_DUPFD_CLOEXEC, 10);
    int err = ::fcntl(err_w.get(), F_DUPFD_CLOEXEC, 10);
    if (in < 0 || out < 0 || err < 0) {
      int e = errno;
      (void)!::write(exec_w.get(), &e, sizeof(e));
      ::_exit(127);
    }
    MoveFd(in, 0);
    MoveFd(out, 1);
    MoveFd(err, 2);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::signal(SIGPIPE, SIG_DFL);
    ::execv(program->c_str(), args.data());
    int e = errno;
    (void)!::write(exec_w.get(), &e, sizeof(e));
    ::_exit(127);
  }

  // Parent.
  out_w.Close();
  err_w.Close();
  exec_w.Close();
  devnull.Close();

  int exec_errno = 0;
  ssize_t n;
  while ((n = ::read(exec_r.get(), &exec_errno, sizeof(exec_errno))) < 0 && errno == EINTR) {
  }
  if (n == static_cast<ssize_t>(sizeof(exec_errno))) {
    WaitFor(pid);
    if (exec_errno == ENOENT) return ProgramNotFound(argv[0]);
    return Status::FromErrno(exec_errno, "cannot run " + *program).WithContext(argv[0]);
  }

  ProcessOutput result;
  pollfd fds[2] = {{out_r.get(), POLLIN, 0}, {err_r.get(), POLLIN, 0}};
  std::string* bufs[2] = {&result.out, &result.err};
  Fd* owners[2] = {&out_r, &err_r};
  int open_fds = 2;
  const int64_t deadline = options.timeout_ms >= 0 ? NowMs() + options.timeout_ms : -1;
  bool timed_out = false;
  while (open_fds > 0) {
    int wait_ms = -1;
    if (deadline >= 0) {
      int64_t left = deadline - NowMs();
      if (left <= 0) {
        timed_out = true;
        break;
      }
      wait_ms = static_cast<int>(left);
    }
    int r = ::poll(fds, 2, wait_ms);
    if (r < 0) {
      if (errno == EINTR) continue;
      Status st = Status::FromErrno(errno, "poll on the output of " + argv[0]);
      ::kill(pid, SIGKILL);
      WaitFor(pid);
      return st;
    }
    for (int i = 0; i < 2; i++) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[65536];
      ssize_t got = ::read(fds[i].fd, buf, sizeof(buf));
      if (got < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (got <= 0) {
        owners[i]->Close();
        fds[i].fd = -1;
        open_fds--;
      } else {
        bufs[i]->append(buf, static_cast<size_t>(got));
      }
    }
  }

  int status = 0;
  if (!timed_out && deadline >= 0) {
    // Both pipes are closed; the child is about to exit. Keep to the deadline
    // anyway in case it closed its output and went on running.
    for (;;) {
      pid_t w = ::waitpid(pid, &status, WNOHANG);
      if (w == pid) break;
      if (w < 0 && errno != EINTR) break;
      if (NowMs() >= deadline) {
        timed_out = true;
        break;
      }
      ::usleep(2000);
    }
  } else if (!timed_out) {
    status = WaitFor(pid);
  }
  if (timed_out) {
    ::kill(pid, SIGKILL);
    WaitFor(pid);
    return Status::IOError(argv[0] + " did not finish within " +
                           std::to_string(options.timeout_ms) + " ms and was killed");
  }
  if (WIFEXITED(status)) result.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) {
    result.term_signal = WTERMSIG(status);
    result.exit_code = 128 + result.term_signal;
  }
  return result;
}

}  // namespace vmdedup
