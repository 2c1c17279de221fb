// QmpClient: a small client for the QEMU Machine Protocol (QMP) over a unix
// socket, and JsonLineSocket, the newline-delimited JSON transport it shares
// with the guest agent client (dirty-bitmap/guest_agent.h).
//
// Connect() reads QEMU's greeting and negotiates capabilities. Execute()
// sends one command with a unique "id" and waits for the reply with that id;
// events that arrive meanwhile (QEMU may send the event a command causes
// before the command's own reply, e.g. BLOCK_EXPORT_DELETED) are kept in a
// buffer that WaitForEvent() searches before it reads more. Replies to
// commands that timed out earlier are recognised by their id and dropped.
//
// Errors:
//   - QEMU's own error reply becomes a Status whose message is
//     "QEMU COMMAND: DESC [CLASS]"; the code is NotSupported for
//     CommandNotFound, NotFound for DeviceNotFound, IOError otherwise.
//     QmpErrorClass() gives the class back.
//   - No reply within the timeout: IOError "... no reply within N s".
//   - The connection closing (QEMU exited or was killed): IOError
//     "QMP connection to PATH closed (QEMU exited?)"; every later call fails
//     the same way.
//   - A QMP monitor serves one client at a time: a socket whose greeting does
//     not arrive in time is reported as Busy (another client is connected).
//
// Thread model: one thread uses a client at a time. Signals do not abort a
// call (EINTR is retried); the caller checks its own cancel flag between
// calls so that teardown sequences run to the end.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "base/status.h"

namespace vmdedup {

// A connected unix stream socket carrying one JSON object per line.
class JsonLineSocket {
 public:
  // Connects to `path`; NotFound when nothing is there, IOError when the
  // connection is refused. `what` names the peer in messages ("QMP").
  static Result<std::unique_ptr<JsonLineSocket>> Connect(const std::string& path,
                                                         const std::string& what);
  ~JsonLineSocket();
  JsonLineSocket(const JsonLineSocket&) = delete;
  JsonLineSocket& operator=(const JsonLineSocket&) = delete;

  Status Send(const nlohmann::json& message, int timeout_ms);
  Status SendRaw(const std::string& bytes, int timeout_ms);
  // The next JSON object. IOError on timeout (timed_out() is then true), on
  // a closed connection (closed() is then true) or a malformed line.
  Result<nlohmann::json> Receive(int timeout_ms);
  // Drops input up to and including the next 0xFF byte (the guest agent's
  // guest-sync-delimited marker).
  Status SkipToDelimiter(int timeout_ms);
  // True when input is already buffered or readable right now.
  bool HasPendingInput();
  bool closed() const { return closed_; }
  bool timed_out() const { return timed_out_; }
  const std::string& path() const { return path_; }
  // The peer's process id (SO_PEERCRED), 0 when unknown.
  pid_t peer_pid() const { return peer_pid_; }

 private:
  JsonLineSocket(int fd, std::string path, std::string what);
  Status FillBuffer(int64_t deadline_ms);
  Status ClosedError() const;
  int fd_ = -1;
  std::string path_;
  std::string what_;
  std::string buf_;
  bool closed_ = false;
  bool timed_out_ = false;
  pid_t peer_pid_ = 0;
};

class QmpClient {
 public:
  static constexpr int kDefaultTimeoutMs = 60 * 1000;

  // Connects, reads the greeting and runs qmp_capabilities.
  static Result<std::unique_ptr<QmpClient>> Connect(const std::string& socket_path,
                                                    int timeout_ms = 10 * 1000);

  // Runs `command` with `arguments` (an object, or null for none) and returns
  // the reply's "return" value.
  Result<nlohmann::json> Execute(const std::string& command,
                                 const nlohmann::json& arguments = nullptr,
                                 int timeout_ms = kDefaultTimeoutMs);

  // Waits for an event `name` whose "data" satisfies `match` (any when
  // null), looking first at the events buffered so far; returns the whole
  // event and removes it from the buffer. IOError on timeout.
  Result<nlohmann::json> WaitForEvent(const std::string& name,
                                      const std::function<bool(const nlohmann::json&)>& match,
                                      int timeout_ms);
  // Reads whatever is pending on the socket without waiting, then drops
  // every buffered event: call before a command whose event you will wait
  // for, so that an older event of the same name is not mistaken for it.
  void DiscardEvents();
  // Events buffered so far (oldest first); the buffer keeps the last 1000.
  const std::deque<nlohmann::json>& events() const { return events_; }

  // HMP command through human-monitor-command; returns its text output.
  Result<std::string> HumanMonitorCommand(const std::string& command_line,
                                          int timeout_ms = kDefaultTimeoutMs);

  // "7.2.22", from the greeting.
  const std::string& qemu_version() const { return version_; }
  pid_t qemu_pid() const { return sock_->peer_pid(); }
  bool closed() const { return sock_->closed(); }
  const std::string& path() const { return sock_->path(); }

 private:
  explicit QmpClient(std::unique_ptr<JsonLineSocket> sock) : sock_(std::move(sock)) {}
  void BufferEvent(nlohmann::json event);
  std::unique_ptr<JsonLineSocket> sock_;
  std::deque<nlohmann::json> events_;
  std::string version_;
  uint64_t next_id_ = 1;
};

// The QEMU error class in a Status made by QmpClient::Execute
// ("GenericError", "DeviceNotFound", ...); "" for any other Status.
std::string QmpErrorClass(const Status& status);

}  // namespace vmdedup
