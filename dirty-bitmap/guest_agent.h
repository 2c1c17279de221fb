// GuestAgentClient: the few qemu-guest-agent commands a live backup needs
// (guest-fsfreeze-freeze and guest-fsfreeze-thaw), over the unix socket of
// the guest agent's chardev (e.g. -chardev socket,path=QGA.sock,server=on,
// wait=off,id=qga0 -device virtio-serial -device virtserialport,
// chardev=qga0,name=org.qemu.guest_agent.0).
//
// The agent may be absent, not yet started or hung inside the guest, and
// the socket then accepts but never answers; every call therefore takes a
// timeout. Each call first resynchronises with guest-sync-delimited (a
// random id, the reply preceded by a 0xFF byte) so that a stale reply from
// an earlier session is never taken for this one's.
//
// Errors: IOError "guest agent ... no answer within N s" on a timeout,
// IOError with the agent's "desc" for an error reply, the JsonLineSocket
// errors for the connection. Thread model: one thread at a time.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "base/status.h"
#include "dirty-bitmap/qmp_client.h"

namespace vmdedup {

class GuestAgentClient {
 public:
  static Result<std::unique_ptr<GuestAgentClient>> Connect(const std::string& socket_path);
  // guest-sync-delimited, then `command`; returns the reply's "return".
  Result<nlohmann::json> Execute(const std::string& command, const nlohmann::json& arguments,
                                 int timeout_ms);
  // Returns the number of filesystems frozen / thawed.
  Result<int> FreezeFilesystems(int timeout_ms) {
    return Count("guest-fsfreeze-freeze", timeout_ms);
  }
  Result<int> ThawFilesystems(int timeout_ms) { return Count("guest-fsfreeze-thaw", timeout_ms); }
  // True when the last Execute got as far as sending its command (after a
  // timeout the agent may still carry it out).
  bool command_sent() const { return command_sent_; }

 private:
  explicit GuestAgentClient(std::unique_ptr<JsonLineSocket> sock) : sock_(std::move(sock)) {}
  Status Sync(int timeout_ms);
  Result<int> Count(const std::string& command, int timeout_ms);
  std::unique_ptr<JsonLineSocket> sock_;
  bool command_sent_ = false;
};

}  // namespace vmdedup
