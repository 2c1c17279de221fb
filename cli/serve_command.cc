// vmdedup serve: exports one snapshot over NBD, read-only, through nbdkit
// and the project's plugin (nbd-export/), until SIGINT or SIGTERM.
//
// The command checks the snapshot itself first (so that a wrong name or a
// locked VM is reported with the usual exit codes), releases the VM, then
// runs `nbdkit --foreground --exit-with-parent --readonly` in its own process
// group with the plugin, waits for its pid file (written once nbdkit
// listens), prints the NBD URI, and on SIGINT/SIGTERM stops nbdkit by its pid
// (SIGTERM, then SIGKILL after 10 s) and removes what it created.
//
// A unix socket is created under umask 0177 (mode 0600); without --socket it
// lives in a fresh private directory (mode 0700). TCP listens on 127.0.0.1
// unless --bind says otherwise, and requires --tls-psk (nbdkit
// --tls=require) unless --insecure-tcp is given: any local user can
// connect to a loopback port.
#include <arpa/inet.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "base/subprocess.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "cli/output.h"
#include "store/repository.h"

extern char** environ;

namespace vmdedup::cli {
namespace {

namespace fs = std::filesystem;

const char kHelp[] = R"(usage: vmdedup serve -r REPO SNAPSHOT [--socket PATH] [OPTIONS]
       vmdedup serve -r REPO SNAPSHOT --port N [--bind ADDR]
                     (--tls-psk FILE | --insecure-tcp) [OPTIONS]

Exports snapshot SNAPSHOT (VM/DISK/N or VM/DISK/latest) over NBD, read-only,
until interrupted (SIGINT or SIGTERM), then stops the server and exits 0.
Prints the NBD URI on stdout, for example
  nbd+unix:///?socket=/run/user/0/vmdedup-serve-Ab12Cd/nbd.sock
which nbdcopy, nbdinfo, qemu-img, qemu-io, guestfish and QEMU accept.

The server is nbdkit with vmdedup's plugin. It reports extents (the
snapshot's zero ranges are holes) so that clients skip them, allows
several connections at once (multi-conn), keeps decoded segments in a
memory-bounded cache, and verifies every block it reads: a damaged block
fails the read with EIO and a log line on stderr naming the snapshot and
the damaged object; it never returns wrong data.

Instant recovery: put a local qcow2 overlay on the export and start QEMU
from it at once (see docs/operations.md):
  qemu-img create -f qcow2 -b 'URI' -F raw overlay.qcow2

Options:
  -r, --repo REPO     repository (or $VMDEDUP_REPO)
  --socket PATH       listen on this unix socket (created mode 0600; an
                      existing stale socket is replaced). Default: a socket
                      in a new private directory (mode 0700) under
                      $XDG_RUNTIME_DIR, $TMPDIR or /tmp, removed at exit
  --port N            listen on TCP port N instead; needs --tls-psk or
                      --insecure-tcp: NBD has no authentication of its own,
                      and any local user can connect to a loopback port
  --bind ADDR         the IP address to listen on with --port (default
                      127.0.0.1)
  --tls-psk FILE      require TLS with the pre-shared keys in FILE (lines
                      "USERNAME:HEXKEY", see nbdkit-tls(1); keep it mode
                      0600: a warning says when others can read it);
                      clients use
                      nbds://USERNAME@HOST:PORT/?tls-psk-file=FILE
  --insecure-tcp      serve TCP without TLS: whoever reaches the port reads
                      the disk (a warning says so)
  --cache SIZE        memory for decoded segments (default 256M; 0: none)
  --threads N         nbdkit worker threads per connection (default 16, but
                      1 with nbdkit 1.32.4 to 1.33.9: their parallel mode
                      aborts the server when a client hangs up with
                      requests in flight, nbdkit commit 9d82aa4f)
  --json              print {"uri", "snapshot", "size", "pid", ...} on stdout
                      instead of the bare URI
  -q, --quiet         no message on stderr besides errors
  -h, --help          this text

Environment: VMDEDUP_NBDKIT_PLUGIN overrides the plugin's path.

The server reads the VM through a read view: backups, restores and other
servers of the same VM run while it serves, and it serves the snapshot as
it was when it started.

Exit codes: 0 stopped by SIGINT/SIGTERM, 1 failure (nbdkit missing, failed
to start or died), 2 bad usage (unknown snapshot, --port without --tls-psk
or --insecure-tcp, socket path in use), 130 interrupted before the server
was ready.
)";

constexpr uint64_t kDefaultCacheBytes = 256ull << 20;
constexpr auto kStartTimeout = std::chrono::seconds(60);
constexpr auto kStopTimeout = std::chrono::seconds(10);
constexpr unsigned kDefaultThreads = 16;

// nbdkit's version as major*1000000 + minor*1000 + patch (0 when unknown).
unsigned NbdkitVersion(const std::string& nbdkit) {
  auto out = RunProcess({nbdkit, "--version"});
  if (!out.ok() || !out->success()) return 0;
  unsigned major = 0, minor = 0, patch = 0;
  if (std::sscanf(out->out.c_str(), "nbdkit %u.%u.%u", &major, &minor, &patch) != 3) return 0;
  return major * 1000000 + minor * 1000 + patch;
}

// nbdkit 1.32.4 to 1.33.9 abort (or, rarely, send a reply to the wrong
// socket) when a client with several requests in flight hangs up: fixed by
// nbdkit commit 9d82aa4f ("server: Don't assert on send if client hangs up
// early"). One worker thread per connection avoids it.
bool NbdkitHasHangupBug(unsigned version) { return version >= 1032004 && version < 1033010; }

int Usage(const std::string& msg) {
  std::fprintf(stderr, "vmdedup: %s\n", msg.c_str());
  return kExitUsage;
}

std::string ExecutableDir() {
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  return ec ? std::string() : exe.parent_path().string();
}

bool IsRegularFile(const std::string& p) {
  struct stat sb;
  return ::stat(p.c_str(), &sb) == 0 && S_ISREG(sb.st_mode);
}

// The plugin: $VMDEDUP_NBDKIT_PLUGIN, next to the executable, in
// ../lib/vmdedup (installed layout), or where the build put it.
Result<std::string> FindPlugin() {
  const char* name = "nbdkit-vmdedup-plugin.so";
  if (const char* env = std::getenv("VMDEDUP_NBDKIT_PLUGIN"); env && *env) {
    if (!IsRegularFile(env))
      return Status::NotFound(std::string("VMDEDUP_NBDKIT_PLUGIN=") + env + ": no such file");
    return fs::absolute(env).string();
  }
  std::vector<std::string> candidates;
  std::string dir = ExecutableDir();
  if (!dir.empty()) {
    candidates.push_back(dir + "/" + name);
    candidates.push_back(dir + "/../lib/vmdedup/" + name);
  }
#ifdef VMDEDUP_NBDKIT_PLUGIN
  candidates.push_back(VMDEDUP_NBDKIT_PLUGIN);
#endif
  for (const auto& c : candidates)
    if (IsRegularFile(c)) return fs::weakly_canonical(c).string();
  std::string tried;
  for (const auto& c : candidates) tried += (tried.empty() ? "" : ", ") + c;
  return Status::NotFound(std::string(name) + " not found (looked at " + tried +
                          "); build the vmdedup_nbdkit_plugin target or set "
                          "VMDEDUP_NBDKIT_PLUGIN");
}

// True for 127.0.0.0/8, ::1 and ::ffff:127.x; nullopt when ADDR is not a
// numeric IP address.
std::optional<bool> IsLoopback(const std::string& addr) {
  in_addr v4;
  if (inet_pton(AF_INET, addr.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6;
  if (inet_pton(AF_INET6, addr.c_str(), &v6) == 1) {
    if (IN6_IS_ADDR_LOOPBACK(&v6)) return true;
    if (IN6_IS_ADDR_V4MAPPED(&v6)) return v6.s6_addr[12] == 127;
    return false;
  }
  return std::nullopt;
}

// A fresh directory (mode 0700) for the pid file and the default socket.
Result<std::string> MakePrivateDir() {
  std::string base;
  for (const char* var : {"XDG_RUNTIME_DIR", "TMPDIR"}) {
    const char* v = std::getenv(var);
    struct stat sb;
    if (v && *v && ::stat(v, &sb) == 0 && S_ISDIR(sb.st_mode) && ::access(v, W_OK) == 0) {
      base = v;
      break;
    }
  }
  if (base.empty()) base = "/tmp";
  std::string tmpl = base + "/vmdedup-serve-XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr) return Status::FromErrno(errno, "create " + tmpl);
  return tmpl;
}

// OK when nothing is at `path` (a stale socket nobody listens on is
// removed); InvalidArgument when it is in use or not a socket.
Status PrepareSocketPath(const std::string& path) {
  sockaddr_un sa{};
  if (path.size() >= sizeof(sa.sun_path))
    return Status::InvalidArgument("socket path " + path + " is longer than " +
                                   std::to_string(sizeof(sa.sun_path) - 1) + " bytes");
  struct stat sb;
  if (::lstat(path.c_str(), &sb) != 0) return Status::OK();
  if (!S_ISSOCK(sb.st_mode))
    return Status::InvalidArgument(path + " exists and is not a socket; choose another --socket");
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::FromErrno(errno, "socket");
  sa.sun_family = AF_UNIX;
  std::memcpy(sa.sun_path, path.c_str(), path.size());
  int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa));
  int err = errno;
  ::close(fd);
  if (rc == 0) return Status::InvalidArgument("socket " + path + " is in use by another server");
  if (err != ECONNREFUSED) return Status::FromErrno(err, "check socket " + path);
  if (::unlink(path.c_str()) != 0) return Status::FromErrno(errno, "remove stale socket " + path);
  return Status::OK();
}

std::string ShellQuote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'')
      out += "'\\''";
    else
      out += c;
  }
  return out + "'";
}

// Starts nbdkit with `argv` in its own process group (so that a terminal's
// Ctrl-C reaches only vmdedup, which then stops it in order), umask 0177 (a
// unix socket is created 0600), stdout sent to stderr, stdin /dev/null.
Result<pid_t> SpawnNbdkit(const std::vector<std::string>& argv,
                          const std::vector<std::string>& extra_env) {
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  std::vector<std::string> env_strings;
  for (char** e = environ; *e; e++) {
    bool replaced = false;
    for (const auto& x : extra_env)
      if (std::strncmp(*e, x.c_str(), x.find('=') + 1) == 0) replaced = true;
    if (!replaced) env_strings.push_back(*e);
  }
  env_strings.insert(env_strings.end(), extra_env.begin(), extra_env.end());
  std::vector<char*> env;
  for (auto& s : env_strings) env.push_back(s.data());
  env.push_back(nullptr);
  int devnull = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (devnull < 0) return Status::FromErrno(errno, "open /dev/null");

  pid_t pid = ::fork();
  if (pid < 0) {
    int err = errno;
    ::close(devnull);
    return Status::FromErrno(err, "fork");
  }
  if (pid == 0) {
    // Only async-signal-safe calls from here to exec.
    ::setpgid(0, 0);
    ::umask(0177);
    ::dup2(devnull, STDIN_FILENO);
    ::dup2(STDERR_FILENO, STDOUT_FILENO);
    struct sigaction sa;
    std::memset(&sa, 0, sizeof(sa));
    sa.sa_handler = SIG_DFL;
    ::sigaction(SIGPIPE, &sa, nullptr);
    ::sigaction(SIGINT, &sa, nullptr);
    ::sigaction(SIGTERM, &sa, nullptr);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::execve(args[0], args.data(), env.data());
    ::_exit(127);
  }
  ::close(devnull);
  ::setpgid(pid, pid);  // also from the parent: no race with a signal to the group
  return pid;
}

std::string DescribeWaitStatus(int status) {
  if (WIFEXITED(status)) return "exit status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("signal ") + strsignal(WTERMSIG(status));
  return "status " + std::to_string(status);
}

// Stops nbdkit: SIGTERM, then SIGKILL after kStopTimeout. Returns its wait
// status.
int StopNbdkit(pid_t pid) {
  ::kill(pid, SIGTERM);
  auto deadline = std::chrono::steady_clock::now() + kStopTimeout;
  int status = 0;
  for (;;) {
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid || (r < 0 && errno != EINTR)) return status;
    if (std::chrono::steady_clock::now() > deadline) {
      std::fprintf(stderr, "vmdedup: nbdkit (pid %d) did not stop within %lld s; killing it\n",
                   static_cast<int>(pid),
                   static_cast<long long>(
                       std::chrono::duration_cast<std::chrono::seconds>(kStopTimeout).count()));
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      return status;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

// Removes the private directory and what vmdedup created in it.
struct Cleanup {
  std::string dir;
  std::string socket;  // removed when set
  ~Cleanup() {
    if (!socket.empty()) {
      struct stat sb;
      if (::lstat(socket.c_str(), &sb) == 0 && S_ISSOCK(sb.st_mode)) ::unlink(socket.c_str());
    }
    if (!dir.empty()) {
      std::error_code ec;
      fs::remove_all(dir, ec);
    }
  }
};

}  // namespace

int ServeCommand(int argc, char** argv) {
  auto args = Args::Parse(argc, argv, 2,
                          {{"repo", 'r', true},
                           {"socket", 0, true},
                           {"port", 0, true},
                           {"bind", 0, true},
                           {"tls-psk", 0, true},
                           {"insecure-tcp", 0, false},
                           {"cache", 0, true},
                           {"threads", 0, true},
                           {"json", 0, false},
                           {"quiet", 'q', false},
                           {"help", 'h', false}});
  if (!args.ok()) return ReportError(args.status());
  if (args->Has("help")) {
    std::fputs(kHelp, stdout);
    return kExitOk;
  }
  if (args->positionals().size() != 1) {
    std::fputs(kHelp, stderr);
    return kExitUsage;
  }
  const bool json = args->Has("json");
  const bool quiet = args->Has("quiet");

  // The command line, fully checked before anything is opened.
  std::optional<std::string> socket_opt = args->Get("socket");
  std::optional<unsigned> port;
  std::string bind = args->Get("bind").value_or("127.0.0.1");
  if (auto p = args->Get("port")) {
    char* end = nullptr;
    errno = 0;
    unsigned long v = std::strtoul(p->c_str(), &end, 10);
    if (p->empty() || *end != '\0' || errno != 0 || v == 0 || v > 65535)
      return Usage("--port takes a TCP port number (1-65535), not '" + *p + "'");
    port = static_cast<unsigned>(v);
  }
  if (socket_opt && port) return Usage("--socket and --port exclude each other");
  if (args->Has("bind") && !port) return Usage("--bind needs --port");
  std::optional<std::string> psk;
  if (auto f = args->Get("tls-psk")) {
    if (::access(f->c_str(), R_OK) != 0)
      return Usage("--tls-psk " + *f + ": " + std::strerror(errno));
    psk = fs::absolute(*f).string();
    struct stat sb;
    if (::stat(f->c_str(), &sb) == 0 && (sb.st_mode & 077) != 0 && !args->Has("quiet"))
      std::fprintf(stderr,
                   "vmdedup: warning: %s is readable by %s (mode %04o): whoever reads the keys "
                   "reads the disk; chmod 600 %s\n",
                   f->c_str(), (sb.st_mode & 007) != 0 ? "every user" : "its group",
                   static_cast<unsigned>(sb.st_mode & 07777), f->c_str());
  }
  const bool insecure = args->Has("insecure-tcp");
  if (insecure && !port) return Usage("--insecure-tcp is for --port");
  if (insecure && psk) return Usage("--insecure-tcp and --tls-psk exclude each other");
  if (psk && !port) return Usage("--tls-psk is for --port (a unix socket is mode 0600)");
  if (port) {
    auto loopback = IsLoopback(bind);
    if (!loopback) return Usage("--bind takes a numeric IP address, not '" + bind + "'");
    if (!psk && !insecure)
      return Usage("listening on TCP (" + bind + ":" + std::to_string(*port) +
                   ") requires --tls-psk FILE: NBD has no authentication of its own, and " +
                   (*loopback ? "any local user can connect to a loopback port"
                              : "anyone who reaches the port reads the disk") +
                   "; --insecure-tcp serves without it");
    if (insecure && !args->Has("quiet"))
      std::fprintf(stderr,
                   "vmdedup: warning: serving %s over TCP without TLS (--insecure-tcp): "
                   "whoever can connect to %s:%u reads it\n",
                   args->positionals().empty() ? "the snapshot" : args->positionals()[0].c_str(),
                   bind.c_str(), *port);
  }
  uint64_t cache = kDefaultCacheBytes;
  if (auto c = args->Get("cache")) {
    auto v = ParseSize(*c);
    if (!v.ok()) return ReportError(v.status());
    cache = *v;
  }
  std::optional<unsigned> threads;
  if (auto t = args->Get("threads")) {
    char* end = nullptr;
    unsigned long v = std::strtoul(t->c_str(), &end, 10);
    if (t->empty() || *end != '\0' || v == 0 || v > 1024)
      return Usage("--threads takes a number from 1 to 1024, not '" + *t + "'");
    threads = static_cast<unsigned>(v);
  }
  auto repo_path = args->Repo();
  if (!repo_path.ok()) return ReportError(repo_path.status());
  auto ref = ParseSnapshotRef(args->positionals()[0]);
  if (!ref.ok()) return ReportError(ref.status());

  // The snapshot, checked here for clear errors; the VM is released before
  // nbdkit opens it.
  SnapshotRecord snap;
  std::string abs_repo;
  {
    auto repo = OpenRepository(*repo_path);
    if (!repo.ok()) return ReportError(repo.status());
    abs_repo = fs::absolute((*repo)->path()).lexically_normal().string();
    auto vm = (*repo)->OpenVm(ref->vm, Repository::Access::kRead);
    if (!vm.ok()) return ReportError(vm.status());
    auto s = ref->seq ? (*vm)->GetSnapshot(ref->disk, *ref->seq) : (*vm)->LatestSnapshot(ref->disk);
    if (!s.ok()) {
      if (s.status().IsNotFound()) return Usage(s.status().message());
      return ReportError(s.status());
    }
    snap = *s;
  }

  std::optional<std::string> nbdkit = FindProgram("nbdkit");
  if (!nbdkit) return ReportError(ProgramNotFound("nbdkit"));
  auto plugin = FindPlugin();
  if (!plugin.ok()) return ReportError(plugin.status());
  const bool hangup_bug = NbdkitHasHangupBug(NbdkitVersion(*nbdkit));
  if (!threads) threads = hangup_bug ? 1 : kDefaultThreads;
  if (hangup_bug && *threads > 1 && !quiet)
    std::fprintf(stderr,
                 "vmdedup: warning: this nbdkit aborts when a client hangs up with requests "
                 "in flight and --threads is above 1 (fixed in nbdkit 1.33.10)\n");

  auto dir = MakePrivateDir();
  if (!dir.ok()) return ReportError(dir.status());
  Cleanup cleanup;
  cleanup.dir = *dir;
  const std::string pidfile = *dir + "/nbdkit.pid";
  std::string socket_path;
  if (!port) {
    socket_path =
        socket_opt ? fs::absolute(*socket_opt).lexically_normal().string() : *dir + "/nbd.sock";
    Status st = PrepareSocketPath(socket_path);
    if (!st.ok()) return ReportError(st);
    cleanup.socket = socket_path;
  }

  std::vector<std::string> cmd = {*nbdkit,      "--foreground", "--exit-with-parent",
                                  "--readonly", "--log=stderr", "--pidfile",
                                  pidfile,      "--threads",    std::to_string(*threads)};
  if (port) {
    cmd.insert(cmd.end(), {"--port", std::to_string(*port), "--ipaddr", bind});
  } else {
    cmd.insert(cmd.end(), {"--unix", socket_path});
  }
  if (psk) cmd.insert(cmd.end(), {"--tls=require", "--tls-psk=" + *psk});
  cmd.insert(cmd.end(), {*plugin, "repo=" + abs_repo, "snapshot=" + snap.Id(),
                         "cache=" + std::to_string(cache)});
  std::vector<std::string> env;
#ifdef VMDEDUP_NBDKIT_PRELOAD
  // Sanitized build: nbdkit must load the ASan runtime first. Its own
  // allocations at exit are not ours to report.
  {
    const char* old = std::getenv("LD_PRELOAD");
    env.push_back(std::string("LD_PRELOAD=") + VMDEDUP_NBDKIT_PRELOAD +
                  (old && *old ? std::string(":") + old : std::string()));
    const char* asan = std::getenv("ASAN_OPTIONS");
    env.push_back(std::string("ASAN_OPTIONS=") + (asan && *asan ? std::string(asan) + ":" : "") +
                  "detect_leaks=0");
  }
#endif

  if (CancelFlag().load()) return kExitInterrupted;
  auto pid = SpawnNbdkit(cmd, env);
  if (!pid.ok()) return ReportError(pid.status());

  // Ready once the pid file exists (nbdkit writes it after it listens).
  auto deadline = std::chrono::steady_clock::now() + kStartTimeout;
  for (;;) {
    int status = 0;
    pid_t r = ::waitpid(*pid, &status, WNOHANG);
    if (r == *pid) {
      std::string cmdline;
      for (const auto& a : cmd) cmdline += (cmdline.empty() ? "" : " ") + ShellQuote(a);
      std::fprintf(stderr, "vmdedup: nbdkit failed to start (%s; see its messages above)\n",
                   DescribeWaitStatus(status).c_str());
      std::fprintf(stderr, "vmdedup: command was: %s\n", cmdline.c_str());
      return kExitFailure;
    }
    struct stat sb;
    if (::stat(pidfile.c_str(), &sb) == 0 && sb.st_size > 0) break;
    if (CancelFlag().load()) {
      StopNbdkit(*pid);
      return kExitInterrupted;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      std::fprintf(stderr, "vmdedup: nbdkit did not become ready within %lld s; stopping it\n",
                   static_cast<long long>(
                       std::chrono::duration_cast<std::chrono::seconds>(kStartTimeout).count()));
      StopNbdkit(*pid);
      return kExitFailure;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (!port) {
    // umask made it 0600 already; make sure whatever nbdkit did.
    if (::chmod(socket_path.c_str(), 0600) != 0) {
      Status st = Status::FromErrno(errno, "chmod " + socket_path);
      StopNbdkit(*pid);
      return ReportError(st);
    }
  }

  std::string uri;
  const char* scheme = psk ? "nbds" : "nbd";
  if (port) {
    std::string host = bind.find(':') != std::string::npos ? "[" + bind + "]" : bind;
    uri = std::string(scheme) + "://" + host + ":" + std::to_string(*port);
  } else {
    uri = std::string(scheme) + "+unix:///?socket=" + socket_path;
  }
  if (json) {
    nlohmann::json j = {{"uri", uri},          {"snapshot", snap.Id()},  {"size", snap.size},
                        {"pid", *pid},         {"tls", psk.has_value()}, {"cache", cache},
                        {"threads", *threads}, {"plugin", *plugin}};
    if (port) {
      j["port"] = *port;
      j["bind"] = bind;
    } else {
      j["socket"] = socket_path;
    }
    PrintJson(j);
  } else {
    std::puts(uri.c_str());
  }
  std::fflush(stdout);
  if (!quiet)
    std::fprintf(stderr,
                 "vmdedup: serving %s (%s) read-only, nbdkit pid %d; stop with Ctrl-C or "
                 "SIGTERM\n",
                 snap.Id().c_str(), HumanSize(snap.size).c_str(), static_cast<int>(*pid));

  while (!CancelFlag().load()) {
    int status = 0;
    pid_t r = ::waitpid(*pid, &status, WNOHANG);
    if (r == *pid) {
      std::fprintf(stderr, "vmdedup: nbdkit (pid %d) stopped unexpectedly (%s)\n",
                   static_cast<int>(*pid), DescribeWaitStatus(status).c_str());
      return kExitFailure;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  int status = StopNbdkit(*pid);
  bool clean = (WIFEXITED(status) && WEXITSTATUS(status) == 0) ||
               (WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM);
  if (!clean) {
    std::fprintf(stderr, "vmdedup: nbdkit ended with %s\n", DescribeWaitStatus(status).c_str());
    return kExitFailure;
  }
  if (!quiet) std::fprintf(stderr, "vmdedup: stopped serving %s\n", snap.Id().c_str());
  return kExitOk;
}

}  // namespace vmdedup::cli
