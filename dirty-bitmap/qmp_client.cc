#include "dirty-bitmap/qmp_client.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace vmdedup {
namespace {

constexpr size_t kMaxLineBytes = 64u << 20;  // query-qmp-schema is ~200 KiB
constexpr size_t kMaxBufferedEvents = 1000;

int64_t NowMs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

int64_t Deadline(int timeout_ms) { return timeout_ms < 0 ? -1 : NowMs() + timeout_ms; }

// Milliseconds left until `deadline` for poll(): -1 forever, 0 when passed.
int Remaining(int64_t deadline) {
  if (deadline < 0) return -1;
  int64_t left = deadline - NowMs();
  return left <= 0 ? 0 : static_cast<int>(left);
}

std::string Seconds(int timeout_ms) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g s", timeout_ms / 1000.0);
  return buf;
}

constexpr char kClassMarker[] = " [";

}  // namespace

// --- JsonLineSocket ---

JsonLineSocket::JsonLineSocket(int fd, std::string path, std::string what)
    : fd_(fd), path_(std::move(path)), what_(std::move(what)) {
  ucred cred;
  socklen_t len = sizeof(cred);
  if (::getsockopt(fd_, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) peer_pid_ = cred.pid;
}

JsonLineSocket::~JsonLineSocket() {
  if (fd_ >= 0) ::close(fd_);
}

Result<std::unique_ptr<JsonLineSocket>> JsonLineSocket::Connect(const std::string& path,
                                                                const std::string& what) {
  sockaddr_un addr;
  std::memset(&addr, 0, sizeof(addr));
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path))
    return Status::InvalidArgument(what + " socket path '" + path + "' is empty or longer than " +
                                   std::to_string(sizeof(addr.sun_path) - 1) + " bytes");
  std::memcpy(addr.sun_path, path.data(), path.size());
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::FromErrno(errno, "socket");
  int rc;
  do {
    rc = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    int err = errno;
    ::close(fd);
    if (err == ENOENT)
      return Status::NotFound(what + " socket " + path + " does not exist (is QEMU running?)");
    if (err == ECONNREFUSED)
      return Status::IOError(what + " socket " + path + ": connection refused (nothing listens)");
    return Status::FromErrno(err, "connecting to " + what + " socket " + path);
  }
  return std::unique_ptr<JsonLineSocket>(new JsonLineSocket(fd, path, what));
}

Status JsonLineSocket::ClosedError() const {
  return Status::IOError(what_ + " connection to " + path_ + " closed (QEMU exited?)");
}

Status JsonLineSocket::SendRaw(const std::string& bytes, int timeout_ms) {
  if (closed_) return ClosedError();
  const int64_t deadline = Deadline(timeout_ms);
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::send(fd_, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      done += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      pollfd p = {fd_, POLLOUT, 0};
      int rc = ::poll(&p, 1, Remaining(deadline));
      if (rc == 0) {
        timed_out_ = true;
        return Status::IOError(what_ + " socket " + path_ + ": cannot send for " +
                               Seconds(timeout_ms));
      }
      continue;
    }
    closed_ = true;
    return ClosedError();
  }
  return Status::OK();
}

Status JsonLineSocket::Send(const nlohmann::json& message, int timeout_ms) {
  return SendRaw(message.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n",
                 timeout_ms);
}

Status JsonLineSocket::FillBuffer(int64_t deadline) {
  if (closed_) return ClosedError();
  for (;;) {
    pollfd p = {fd_, POLLIN, 0};
    int rc = ::poll(&p, 1, Remaining(deadline));
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) return Status::FromErrno(errno, "poll on " + what_ + " socket " + path_);
    if (rc == 0) {
      timed_out_ = true;
      return Status::IOError("timeout");
    }
    char chunk[65536];
    ssize_t n = ::recv(fd_, chunk, sizeof(chunk), MSG_DONTWAIT);
    if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
    if (n <= 0) {
      closed_ = true;
      return ClosedError();
    }
    buf_.append(chunk, static_cast<size_t>(n));
    return Status::OK();
  }
}

bool JsonLineSocket::HasPendingInput() {
  if (!buf_.empty()) return true;
  if (closed_) return false;
  pollfd p = {fd_, POLLIN, 0};
  return ::poll(&p, 1, 0) > 0;
}

Result<nlohmann::json> JsonLineSocket::Receive(int timeout_ms) {
  timed_out_ = false;
  const int64_t deadline = Deadline(timeout_ms);
  for (;;) {
    size_t nl = buf_.find('\n');
    while (nl != std::string::npos) {
      std::string line = buf_.substr(0, nl);
      buf_.erase(0, nl + 1);
      while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
      size_t start = line.find_first_not_of(" \t\xff");
      if (start == std::string::npos) {  // blank line or a bare delimiter
        nl = buf_.find('\n');
        continue;
      }
      auto j = nlohmann::json::parse(line.begin() + static_cast<std::ptrdiff_t>(start), line.end(),
                                     nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded() || !j.is_object())
        return Status::IOError(what_ + " socket " + path_ +
                               " sent a malformed message: " + line.substr(0, 200));
      return j;
    }
    if (buf_.size() > kMaxLineBytes)
      return Status::IOError(what_ + " socket " + path_ + " sent a line over 64 MiB");
    Status st = FillBuffer(deadline);
    if (!st.ok()) {
      if (timed_out_)
        return Status::IOError(what_ + " socket " + path_ + ": no message within " +
                               Seconds(timeout_ms));
      return st;
    }
  }
}

Status JsonLineSocket::SkipToDelimiter(int timeout_ms) {
  timed_out_ = false;
  const int64_t deadline = Deadline(timeout_ms);
  for (;;) {
    size_t pos = buf_.find('\xff');
    if (pos != std::string::npos) {
      buf_.erase(0, pos + 1);
      return Status::OK();
    }
    buf_.clear();
    Status st = FillBuffer(deadline);
    if (!st.ok()) {
      if (timed_out_)
        return Status::IOError(what_ + " socket " + path_ + ": no answer within " +
                               Seconds(timeout_ms));
      return st;
    }
  }
}

// --- QmpClient ---

Result<std::unique_ptr<QmpClient>> QmpClient::Connect(const std::string& socket_path,
                                                      int timeout_ms) {
  ASSIGN_OR_RETURN(auto sock, JsonLineSocket::Connect(socket_path, "QMP"));
  std::unique_ptr<QmpClient> client(new QmpClient(std::move(sock)));
  auto greeting = client->sock_->Receive(timeout_ms);
  if (!greeting.ok()) {
    if (client->sock_->timed_out())
      return Status::Busy("QMP socket " + socket_path + " sent no greeting within " +
                          Seconds(timeout_ms) +
                          ": QEMU serves one QMP client at a time; is another one (libvirt?) "
                          "connected?");
    return greeting.status();
  }
  if (!greeting->contains("QMP"))
    return Status::IOError(socket_path + " is not a QMP socket: it greeted with " +
                           greeting->dump().substr(0, 200));
  const auto& v = (*greeting)["QMP"].value("version", nlohmann::json::object());
  if (v.contains("qemu") && v["qemu"].is_object()) {
    const auto& q = v["qemu"];
    client->version_ = std::to_string(q.value("major", 0)) + "." +
                       std::to_string(q.value("minor", 0)) + "." +
                       std::to_string(q.value("micro", 0));
  }
  auto caps = client->Execute("qmp_capabilities", nullptr, timeout_ms);
  if (!caps.ok()) return caps.status();
  return client;
}

void QmpClient::BufferEvent(nlohmann::json event) {
  events_.push_back(std::move(event));
  while (events_.size() > kMaxBufferedEvents) events_.pop_front();
}

Result<nlohmann::json> QmpClient::Execute(const std::string& command,
                                          const nlohmann::json& arguments, int timeout_ms) {
  const std::string id = "vmdedup-" + std::to_string(next_id_++);
  nlohmann::json msg = {{"execute", command}, {"id", id}};
  if (!arguments.is_null()) msg["arguments"] = arguments;
  const int64_t deadline = Deadline(timeout_ms);
  Status st = sock_->Send(msg, timeout_ms);
  if (!st.ok()) return st.WithContext("QEMU " + command);
  for (;;) {
    int left = Remaining(deadline);
    if (deadline >= 0 && left == 0 && !sock_->HasPendingInput())
      return Status::IOError("QEMU " + command + ": no reply within " + Seconds(timeout_ms));
    auto reply = sock_->Receive(deadline < 0 ? -1 : left);
    if (!reply.ok()) {
      if (sock_->timed_out())
        return Status::IOError("QEMU " + command + ": no reply within " + Seconds(timeout_ms));
      return reply.status().WithContext("QEMU " + command);
    }
    nlohmann::json& r = *reply;
    if (r.contains("event")) {
      BufferEvent(std::move(r));
      continue;
    }
    if (!r.contains("id") || r["id"] != id) continue;  // a late reply to a timed-out command
    if (r.contains("return")) return std::move(r["return"]);
    if (r.contains("error") && r["error"].is_object()) {
      const auto& e = r["error"];
      std::string cls = e.value("class", "GenericError");
      std::string desc = e.value("desc", "unknown error");
      std::string text = "QEMU " + command + ": " + desc + kClassMarker + cls + "]";
      if (cls == "CommandNotFound") return Status::NotSupported(text);
      if (cls == "DeviceNotFound") return Status::NotFound(text);
      return Status::IOError(text);
    }
    return Status::IOError(
        "QEMU " + command + ": unexpected reply " +
        r.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).substr(0, 200));
  }
}

Result<nlohmann::json> QmpClient::WaitForEvent(
    const std::string& name, const std::function<bool(const nlohmann::json&)>& match,
    int timeout_ms) {
  auto matches = [&](const nlohmann::json& ev) {
    if (!ev.contains("event") || ev["event"] != name) return false;
    if (!match) return true;
    return match(ev.value("data", nlohmann::json::object()));
  };
  for (auto it = events_.begin(); it != events_.end(); ++it) {
    if (matches(*it)) {
      nlohmann::json ev = std::move(*it);
      events_.erase(it);
      return ev;
    }
  }
  const int64_t deadline = Deadline(timeout_ms);
  for (;;) {
    int left = Remaining(deadline);
    if (deadline >= 0 && left == 0 && !sock_->HasPendingInput())
      return Status::IOError("QEMU event " + name + " did not arrive within " +
                             Seconds(timeout_ms));
    auto msg = sock_->Receive(deadline < 0 ? -1 : left);
    if (!msg.ok()) {
      if (sock_->timed_out())
        return Status::IOError("QEMU event " + name + " did not arrive within " +
                               Seconds(timeout_ms));
      return msg.status().WithContext("waiting for QEMU event " + name);
    }
    if (!msg->contains("event")) continue;  // a late reply to a timed-out command
    if (matches(*msg)) return std::move(msg).value();
    BufferEvent(std::move(msg).value());
  }
}

void QmpClient::DiscardEvents() {
  while (sock_->HasPendingInput()) {
    auto msg = sock_->Receive(0);
    if (!msg.ok()) break;
  }
  events_.clear();
}

Result<std::string> QmpClient::HumanMonitorCommand(const std::string& command_line,
                                                   int timeout_ms) {
  ASSIGN_OR_RETURN(auto r,
                   Execute("human-monitor-command", {{"command-line", command_line}}, timeout_ms));
  return r.is_string() ? r.get<std::string>()
                       : r.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::string QmpErrorClass(const Status& status) {
  const std::string& m = status.message();
  if (m.rfind("QEMU ", 0) != 0 || m.empty() || m.back() != ']') return "";
  size_t pos = m.rfind(kClassMarker);
  if (pos == std::string::npos) return "";
  return m.substr(pos + 2, m.size() - pos - 3);
}

}  // namespace vmdedup
