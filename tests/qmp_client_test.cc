// Tests of the QMP client (dirty-bitmap/qmp_client.h): against a scripted
// fake server for the protocol's corner cases (events before replies, late
// replies after a timeout, lines split across writes, errors, a server that
// never greets or goes away), and against a real qemu-system-x86_64.
#include "dirty-bitmap/qmp_client.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <thread>

#include "dirty-bitmap/guest_agent.h"
#include "tests/test_util.h"

namespace vmdedup::testing {
namespace {

using nlohmann::json;
using namespace std::chrono_literals;

// A unix socket server that runs `script` on the first connection in a
// thread. The script reads lines and writes raw bytes.
class FakeServer {
 public:
  struct Conn {
    int fd;
    std::string pending;
    // The next line the client sent, parsed (null on EOF).
    json ReadMessage() {
      for (;;) {
        size_t nl = pending.find('\n');
        if (nl != std::string::npos) {
          std::string line = pending.substr(0, nl);
          pending.erase(0, nl + 1);
          size_t start = line.find_first_not_of("\xff");
          if (start == std::string::npos) continue;
          return json::parse(line.substr(start));
        }
        char buf[4096];
        ssize_t n = ::read(fd, buf, sizeof(buf));
        if (n <= 0) return nullptr;
        pending.append(buf, static_cast<size_t>(n));
      }
    }
    void Write(const std::string& s) {
      ASSERT_EQ(::write(fd, s.data(), s.size()), static_cast<ssize_t>(s.size()));
    }
    void Reply(const json& req, const json& ret) {
      json r = {{"return", ret}};
      if (req.contains("id")) r["id"] = req["id"];
      Write(r.dump() + "\r\n");
    }
  };

  FakeServer(const std::string& path, std::function<void(Conn&)> script) : path_(path) {
    listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    EXPECT_EQ(::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    EXPECT_EQ(::listen(listen_fd_, 4), 0);
    thread_ = std::thread([this, script] {
      int fd = ::accept(listen_fd_, nullptr, nullptr);
      if (fd < 0) return;
      Conn c{fd, ""};
      script(c);
      ::close(fd);
    });
  }
  ~FakeServer() {
    ::shutdown(listen_fd_, SHUT_RDWR);
    thread_.join();
    ::close(listen_fd_);
  }

 private:
  std::string path_;
  int listen_fd_ = -1;
  std::thread thread_;
};

const char kGreeting[] =
    R"({"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}})"
    "\r\n";

// Greets, answers qmp_capabilities, then runs `rest`.
std::function<void(FakeServer::Conn&)> Qmp(std::function<void(FakeServer::Conn&)> rest) {
  return [rest](FakeServer::Conn& c) {
    c.Write(kGreeting);
    json caps = c.ReadMessage();
    if (caps.is_null()) return;
    EXPECT_EQ(caps["execute"], "qmp_capabilities");
    c.Reply(caps, json::object());
    rest(c);
  };
}

TEST(QmpClientFake, EventsBeforeTheReplyAreBufferedAndFound) {
  ScratchDir dir;
  std::string sock = dir.Sub("qmp.sock");
  FakeServer server(
      sock, Qmp([](FakeServer::Conn& c) {
        json req = c.ReadMessage();
        EXPECT_EQ(req["execute"], "block-export-del");
        EXPECT_EQ(req["arguments"]["id"], "e1");
        // The event the command causes, then an unrelated one, then the reply,
        // the reply itself split over two writes.
        c.Write(R"({"event": "BLOCK_EXPORT_DELETED", "data": {"id": "e1"}, "timestamp": {}})"
                "\r\n"
                R"({"event": "JOB_STATUS_CHANGE", "data": {"id": "j", "status": "running"}})"
                "\r\n");
        std::string reply = json({{"return", json::object()}, {"id", req["id"]}}).dump() + "\r\n";
        c.Write(reply.substr(0, 5));
        std::this_thread::sleep_for(20ms);
        c.Write(reply.substr(5));
        json next = c.ReadMessage();  // keep the connection until the client is done
      }));
  auto q = QmpClient::Connect(sock);
  ASSERT_TRUE(q.ok()) << q.status().ToString();
  EXPECT_EQ((*q)->qemu_version(), "7.2.22");
  auto r = (*q)->Execute("block-export-del", {{"id", "e1"}});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ((*q)->events().size(), 2u);
  auto ev = (*q)->WaitForEvent(
      "BLOCK_EXPORT_DELETED", [](const json& d) { return d.value("id", "") == "e1"; }, 100);
  ASSERT_TRUE(ev.ok()) << ev.status().ToString();
  EXPECT_EQ((*ev)["data"]["id"], "e1");
  // Taken out of the buffer: a second wait times out.
  auto again = (*q)->WaitForEvent("BLOCK_EXPORT_DELETED", nullptr, 100);
  EXPECT_TRUE(again.status().IsIOError());
  EXPECT_NE(again.status().message().find("did not arrive"), std::string::npos);
  (*q)->DiscardEvents();
  EXPECT_TRUE((*q)->events().empty());
}

TEST(QmpClientFake, ErrorsCarryQemuClassAndDescription) {
  ScratchDir dir;
  std::string sock = dir.Sub("qmp.sock");
  FakeServer server(
      sock, Qmp([](FakeServer::Conn& c) {
        for (const char* cls : {"GenericError", "CommandNotFound", "DeviceNotFound"}) {
          json req = c.ReadMessage();
          c.Write(
              json({{"error", {{"class", cls}, {"desc", "it failed"}}}, {"id", req["id"]}}).dump() +
              "\n");
        }
      }));
  auto q = QmpClient::Connect(sock);
  ASSERT_TRUE(q.ok()) << q.status().ToString();
  auto a = (*q)->Execute("blockdev-del", {{"node-name", "x"}});
  EXPECT_TRUE(a.status().IsIOError());
  EXPECT_EQ(a.status().message(), "QEMU blockdev-del: it failed [GenericError]");
  EXPECT_EQ(QmpErrorClass(a.status()), "GenericError");
  auto b = (*q)->Execute("no-such-command");
  EXPECT_EQ(b.status().code(), Status::Code::kNotSupported);
  EXPECT_EQ(QmpErrorClass(b.status()), "CommandNotFound");
  auto c = (*q)->Execute("x");
  EXPECT_TRUE(c.status().IsNotFound());
  EXPECT_EQ(QmpErrorClass(Status::IOError("other")), "");
}

TEST(QmpClientFake, LateReplyAfterTimeoutIsNotTakenForTheNextOne) {
  ScratchDir dir;
  std::string sock = dir.Sub("qmp.sock");
  FakeServer server(sock, Qmp([](FakeServer::Conn& c) {
                      json slow = c.ReadMessage();
                      std::this_thread::sleep_for(300ms);
                      c.Reply(slow, "slow");
                      json fast = c.ReadMessage();
                      c.Reply(fast, "fast");
                    }));
  auto q = QmpClient::Connect(sock);
  ASSERT_TRUE(q.ok()) << q.status().ToString();
  auto r1 = (*q)->Execute("slow", nullptr, 100);
  EXPECT_TRUE(r1.status().IsIOError());
  EXPECT_NE(r1.status().message().find("no reply within 0.1 s"), std::string::npos)
      << r1.status().ToString();
  auto r2 = (*q)->Execute("fast", nullptr, 2000);
  ASSERT_TRUE(r2.ok()) << r2.status().ToString();
  EXPECT_EQ(*r2, "fast");
}

TEST(QmpClientFake, ClosedConnectionAndSilentServerAreClearErrors) {
  ScratchDir dir;
  {
    std::string sock = dir.Sub("a.sock");
    FakeServer server(sock, Qmp([](FakeServer::Conn& c) { c.ReadMessage(); }));  // then closes
    auto q = QmpClient::Connect(sock);
    ASSERT_TRUE(q.ok()) << q.status().ToString();
    auto r = (*q)->Execute("query-status", nullptr, 2000);
    EXPECT_TRUE(r.status().IsIOError());
    EXPECT_NE(r.status().message().find("closed (QEMU exited?)"), std::string::npos)
        << r.status().ToString();
    EXPECT_TRUE((*q)->closed());
    auto again = (*q)->Execute("query-status");
    EXPECT_NE(again.status().message().find("closed"), std::string::npos);
  }
  {
    std::string sock = dir.Sub("b.sock");
    FakeServer server(sock, [](FakeServer::Conn& c) { c.ReadMessage(); });  // never greets
    auto q = QmpClient::Connect(sock, 200);
    EXPECT_TRUE(q.status().IsBusy()) << q.status().ToString();
    EXPECT_NE(q.status().message().find("one QMP client at a time"), std::string::npos);
  }
  auto none = QmpClient::Connect(dir.Sub("missing.sock"));
  EXPECT_TRUE(none.status().IsNotFound()) << none.status().ToString();
  {
    std::string sock = dir.Sub("c.sock");
    FakeServer server(sock, [](FakeServer::Conn& c) { c.Write("{\"hello\": 1}\n"); });
    auto q = QmpClient::Connect(sock);
    EXPECT_FALSE(q.ok());
    EXPECT_NE(q.status().message().find("not a QMP socket"), std::string::npos);
  }
}

TEST(GuestAgentFake, SyncSkipsStaleRepliesThenFreezes) {
  ScratchDir dir;
  std::string sock = dir.Sub("qga.sock");
  FakeServer server(sock, [](FakeServer::Conn& c) {
    json sync = c.ReadMessage();
    EXPECT_EQ(sync["execute"], "guest-sync-delimited");
    // A stale answer from an earlier session comes first.
    c.Write("\xff{\"return\": 12}\n");
    c.Write("\xff" + json({{"return", sync["arguments"]["id"]}}).dump() + "\n");
    json freeze = c.ReadMessage();
    EXPECT_EQ(freeze["execute"], "guest-fsfreeze-freeze");
    c.Write("{\"return\": 2}\n");
    json sync2 = c.ReadMessage();
    c.Write("\xff" + json({{"return", sync2["arguments"]["id"]}}).dump() + "\n");
    json thaw = c.ReadMessage();
    EXPECT_EQ(thaw["execute"], "guest-fsfreeze-thaw");
    c.Write("{\"error\": {\"class\": \"GenericError\", \"desc\": \"not frozen\"}}\n");
  });
  auto g = GuestAgentClient::Connect(sock);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  auto n = (*g)->FreezeFilesystems(2000);
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(*n, 2);
  auto t = (*g)->ThawFilesystems(2000);
  EXPECT_NE(t.status().message().find("not frozen"), std::string::npos) << t.status().ToString();
}

TEST(GuestAgentFake, SilentAgentTimesOut) {
  ScratchDir dir;
  std::string sock = dir.Sub("qga.sock");
  FakeServer server(sock, [](FakeServer::Conn& c) {
    c.ReadMessage();
    std::this_thread::sleep_for(600ms);
  });
  auto g = GuestAgentClient::Connect(sock);
  ASSERT_TRUE(g.ok());
  auto start = std::chrono::steady_clock::now();
  auto n = (*g)->FreezeFilesystems(300);
  EXPECT_TRUE(n.status().IsIOError()) << n.status().ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 2s);
}

// --- Against a real QEMU ---

bool KvmUsable() {
  int fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (fd < 0) return false;
  ::close(fd);
  return true;
}

class QmpClientQemuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(FindInPath("qemu-system-x86_64"))
        << "qemu-system-x86_64 is missing: scripts/setup.sh test installs it";
    image_ = dir_.Sub("d0.qcow2");
    auto r = RunCommand({"qemu-img", "create", "-q", "-f", "qcow2", image_, "16M"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    sock_ = dir_.Sub("qmp.sock");
    pid_ = fork();
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlives an aborted test
      int log = ::open(dir_.Sub("qemu.log").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      dup2(log, 1);
      dup2(log, 2);
      std::string qmp = "unix:" + sock_ + ",server=on,wait=off";
      std::string blockdev =
          "driver=qcow2,node-name=disk0,file.driver=file,file.filename=" + image_;
      execlp("qemu-system-x86_64", "qemu-system-x86_64", "-nodefaults", "-display", "none",
             "-machine", "pc", "-accel", KvmUsable() ? "kvm" : "tcg", "-m", "64", "-qmp",
             qmp.c_str(), "-blockdev", blockdev.c_str(), "-device",
             "virtio-blk-pci,drive=disk0,id=vd0", static_cast<char*>(nullptr));
      _exit(127);
    }
    for (int i = 0; i < 400; i++) {
      auto q = QmpClient::Connect(sock_, 5000);
      if (q.ok()) {
        qmp_ = std::move(q).value();
        break;
      }
      std::this_thread::sleep_for(25ms);
    }
    ASSERT_NE(qmp_, nullptr) << "QEMU did not start; see " << dir_.Sub("qemu.log");
  }
  void TearDown() override {
    qmp_.reset();
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  static bool FindInPath(const std::string& name) {
    return RunShell("command -v " + name + " >/dev/null").exit_code == 0;
  }

  ScratchDir dir_;
  std::string image_, sock_;
  pid_t pid_ = -1;
  std::unique_ptr<QmpClient> qmp_;
};

TEST_F(QmpClientQemuTest, CommandsErrorsEventsAndHmp) {
  EXPECT_FALSE(qmp_->qemu_version().empty());
  EXPECT_EQ(qmp_->qemu_pid(), pid_);
  auto st = qmp_->Execute("query-status");
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_EQ((*st)["status"], "running");

  // QEMU's error class and description come through.
  auto bad = qmp_->Execute("block-dirty-bitmap-add", {{"node", "nosuch"}, {"name", "b"}});
  EXPECT_EQ(QmpErrorClass(bad.status()), "GenericError") << bad.status().ToString();
  EXPECT_NE(bad.status().message().find("nosuch"), std::string::npos);
  auto unknown = qmp_->Execute("no-such-command");
  EXPECT_EQ(unknown.status().code(), Status::Code::kNotSupported) << unknown.status().ToString();

  // Events: STOP is sent before the reply to "stop"; it is buffered.
  qmp_->DiscardEvents();
  ASSERT_TRUE(qmp_->Execute("stop").ok());
  auto ev = qmp_->WaitForEvent("STOP", nullptr, 5000);
  ASSERT_TRUE(ev.ok()) << ev.status().ToString();
  ASSERT_TRUE(qmp_->Execute("cont").ok());
  ASSERT_TRUE(qmp_->WaitForEvent("RESUME", nullptr, 5000).ok());

  // Guest writes through the device's BlockBackend land in the image and in
  // a dirty bitmap.
  ASSERT_TRUE(qmp_->Execute("block-dirty-bitmap-add", {{"node", "disk0"}, {"name", "t"}}).ok());
  auto hmp = qmp_->HumanMonitorCommand(
      "qemu-io -d /machine/peripheral/vd0/virtio-backend \"write -P 0xab 1M 64k\"");
  ASSERT_TRUE(hmp.ok()) << hmp.status().ToString();
  auto nodes = qmp_->Execute("query-named-block-nodes", {{"flat", true}});
  ASSERT_TRUE(nodes.ok());
  uint64_t count = 0;
  for (const auto& n : *nodes)
    if (n["node-name"] == "disk0")
      for (const auto& b : n["dirty-bitmaps"]) count = b["count"].get<uint64_t>();
  EXPECT_EQ(count, 65536u);

  // An event waited for in vain times out.
  auto none = qmp_->WaitForEvent("BLOCK_JOB_CANCELLED", nullptr, 200);
  EXPECT_TRUE(none.status().IsIOError());
}

TEST_F(QmpClientQemuTest, QemuKilledGivesAClosedConnectionError) {
  ::kill(pid_, SIGKILL);
  ::waitpid(pid_, nullptr, 0);
  pid_ = -1;
  auto r = qmp_->Execute("query-status", nullptr, 5000);
  EXPECT_TRUE(r.status().IsIOError());
  EXPECT_NE(r.status().message().find("closed (QEMU exited?)"), std::string::npos)
      << r.status().ToString();
}

}  // namespace
}  // namespace vmdedup::testing
