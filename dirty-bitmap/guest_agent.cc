#include "dirty-bitmap/guest_agent.h"

#include <time.h>

#include <random>

namespace vmdedup {

Result<std::unique_ptr<GuestAgentClient>> GuestAgentClient::Connect(
    const std::string& socket_path) {
  ASSIGN_OR_RETURN(auto sock, JsonLineSocket::Connect(socket_path, "guest agent"));
  return std::unique_ptr<GuestAgentClient>(new GuestAgentClient(std::move(sock)));
}

Status GuestAgentClient::Sync(int timeout_ms) {
  std::random_device rd;
  const int64_t id = static_cast<int64_t>(rd() & 0x3fffffff) + 1;
  // A leading 0xFF makes an agent in the middle of a partial message reset
  // its parser.
  RETURN_IF_ERROR(sock_->SendRaw("\xff", timeout_ms));
  RETURN_IF_ERROR(
      sock_->Send({{"execute", "guest-sync-delimited"}, {"arguments", {{"id", id}}}}, timeout_ms));
  timespec start;
  clock_gettime(CLOCK_MONOTONIC, &start);
  for (;;) {
    RETURN_IF_ERROR(sock_->SkipToDelimiter(timeout_ms));
    auto reply = sock_->Receive(timeout_ms);
    if (!reply.ok()) return reply.status();
    if (reply->contains("return") && (*reply)["return"] == id) return Status::OK();
    // A stale reply from an earlier session: keep looking for ours.
    timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    if ((now.tv_sec - start.tv_sec) * 1000 > timeout_ms)
      return Status::IOError("guest agent " + sock_->path() + ": no answer to guest-sync");
  }
}

Result<nlohmann::json> GuestAgentClient::Execute(const std::string& command,
                                                 const nlohmann::json& arguments, int timeout_ms) {
  command_sent_ = false;
  RETURN_IF_ERROR(Sync(timeout_ms));
  command_sent_ = true;
  nlohmann::json msg = {{"execute", command}};
  if (!arguments.is_null()) msg["arguments"] = arguments;
  RETURN_IF_ERROR(sock_->Send(msg, timeout_ms));
  for (;;) {
    ASSIGN_OR_RETURN(auto reply, sock_->Receive(timeout_ms));
    if (reply.contains("return")) return std::move(reply["return"]);
    if (reply.contains("error") && reply["error"].is_object())
      return Status::IOError("guest agent " + command + ": " +
                             reply["error"].value("desc", std::string("unknown error")));
  }
}

Result<int> GuestAgentClient::Count(const std::string& command, int timeout_ms) {
  ASSIGN_OR_RETURN(auto r, Execute(command, nullptr, timeout_ms));
  return r.is_number_integer() ? r.get<int>() : 0;
}

}  // namespace vmdedup
