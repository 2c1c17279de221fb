#include "dirty-bitmap/live_fleece.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include "base/subprocess.h"

namespace vmdedup {
namespace {

using nlohmann::json;

constexpr char kPrefix[] = "vmdedup-";
constexpr char kAreaPrefix[] = "vmdedup-live.";
constexpr char kNbdMarker[] = "nbd-server";
constexpr int kEventTimeoutMs = 30 * 1000;

// Drivers that pass writes through to their "file" child unchanged, so that
// a dirty bitmap on the child sees every guest write.
const std::set<std::string>& FilterDrivers() {
  static const std::set<std::string> f = {"throttle", "copy-on-read", "preallocate", "compress",
                                          "copy-before-write"};
  return f;
}

bool StartsWith(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }

bool UsableName(const std::string& s) {
  if (s.empty() || s.size() > 64 || s[0] == '.') return false;
  for (char c : s)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-'))
      return false;
  return true;
}

std::string QdevId(const std::string& qdev) {
  const std::string p = "/machine/peripheral/";
  if (!StartsWith(qdev, p)) return "";
  std::string rest = qdev.substr(p.size());
  return rest.substr(0, rest.find('/'));
}

LiveBitmap ParseBitmap(const json& b) {
  LiveBitmap lb;
  lb.name = b.value("name", "");
  lb.count = b.value("count", uint64_t{0});
  lb.granularity = b.value("granularity", uint32_t{0});
  lb.recording = b.value("recording", false);
  lb.busy = b.value("busy", false);
  lb.persistent = b.value("persistent", false);
  lb.inconsistent = b.value("inconsistent", false);
  return lb;
}

bool IsMissing(const Status& st) {
  const std::string& m = st.message();
  return m.find("not found") != std::string::npos || m.find("Cannot find") != std::string::npos ||
         m.find("Failed to find") != std::string::npos || m.find("No such") != std::string::npos ||
         m.find("not exist") != std::string::npos || QmpErrorClass(st) == "DeviceNotFound";
}

void Keep(Status* first, const Status& st) {
  if (first->ok() && !st.ok()) *first = st;
}

// block-export-del (hard: drops connected clients) and its event.
Status DeleteExport(QmpClient& qmp, const std::string& id) {
  qmp.DiscardEvents();
  auto r = qmp.Execute("block-export-del", {{"id", id}, {"mode", "hard"}});
  if (!r.ok()) return IsMissing(r.status()) ? Status::OK() : r.status();
  auto ev = qmp.WaitForEvent(
      "BLOCK_EXPORT_DELETED", [&](const json& d) { return d.value("id", "") == id; },
      kEventTimeoutMs);
  return ev.ok() ? Status::OK() : ev.status();
}

Status DeleteNode(QmpClient& qmp, const std::string& node) {
  auto r = qmp.Execute("blockdev-del", {{"node-name", node}});
  if (!r.ok() && !IsMissing(r.status())) return r.status();
  return Status::OK();
}

// block-job-cancel and wait until the job is gone.
Status CancelJob(QmpClient& qmp, const std::string& id) {
  qmp.DiscardEvents();
  auto r = qmp.Execute("block-job-cancel", {{"device", id}, {"force", true}});
  if (!r.ok()) return IsMissing(r.status()) ? Status::OK() : r.status();
  auto ev = qmp.WaitForEvent(
      "BLOCK_JOB_CANCELLED", [&](const json& d) { return d.value("device", "") == id; },
      kEventTimeoutMs);
  if (ev.ok()) return Status::OK();
  if (qmp.closed()) return ev.status();
  // The job may have ended otherwise (BLOCK_JOB_COMPLETED with an error).
  auto jobs = qmp.Execute("query-block-jobs");
  if (!jobs.ok()) return jobs.status();
  for (const auto& j : *jobs)
    if (j.value("device", "") == id) return ev.status();
  return Status::OK();
}

}  // namespace

std::string FleeceName(const std::string& kind, size_t index) {
  return kPrefix + kind + "-" + std::to_string(index);
}

const LiveBitmap* LiveDisk::FindBitmap(const std::string& bitmap) const {
  for (const auto& b : bitmaps)
    if (b.name == bitmap) return &b;
  return nullptr;
}

bool LiveDisk::Matches(const std::string& s) const {
  if (s.empty()) return false;
  return s == name || s == qdev_id || s == qdev || s == device || s == root_node ||
         s == bitmap_node;
}

Result<std::vector<LiveDisk>> QueryDisks(QmpClient& qmp) {
  ASSIGN_OR_RETURN(json blocks, qmp.Execute("query-block"));
  ASSIGN_OR_RETURN(json named, qmp.Execute("query-named-block-nodes", {{"flat", true}}));
  std::map<std::string, const json*> nodes;
  for (const auto& n : named) nodes[n.value("node-name", "")] = &n;
  // The graph, to look through filters (x-debug-: absent on some builds;
  // then the root node holds the bitmaps).
  std::map<std::string, std::string> file_child;  // filter node -> its "file" child
  auto graph = qmp.Execute("x-debug-query-block-graph");
  if (graph.ok()) {
    std::map<int64_t, std::string> names;
    for (const auto& n : (*graph)["nodes"]) names[n.value("id", int64_t{-1})] = n.value("name", "");
    for (const auto& e : (*graph)["edges"])
      if (e.value("name", "") == "file")
        file_child[names[e.value("parent", int64_t{-1})]] = names[e.value("child", int64_t{-1})];
  }
  std::vector<LiveDisk> disks;
  for (const auto& b : blocks) {
    if (!b.contains("inserted")) continue;  // an empty drive
    const json& in = b["inserted"];
    LiveDisk d;
    d.device = b.value("device", "");
    d.qdev = b.value("qdev", "");
    d.qdev_id = QdevId(d.qdev);
    d.root_node = in.value("node-name", "");
    d.read_only = in.value("ro", false);
    d.size = in.contains("image") ? in["image"].value("virtual-size", uint64_t{0}) : 0;
    d.bitmap_node = d.root_node;
    for (int depth = 0; depth < 8; depth++) {
      auto it = nodes.find(d.bitmap_node);
      if (it == nodes.end() || !FilterDrivers().count(it->second->value("drv", ""))) break;
      auto child = file_child.find(d.bitmap_node);
      if (child == file_child.end() || child->second.empty()) break;
      d.bitmap_node = child->second;
    }
    auto it = nodes.find(d.bitmap_node);
    if (it != nodes.end()) {
      d.format = it->second->value("drv", "");
      if (it->second->contains("dirty-bitmaps"))
        for (const auto& bm : (*it->second)["dirty-bitmaps"]) d.bitmaps.push_back(ParseBitmap(bm));
    } else {
      d.format = in.value("drv", "");
    }
    if (UsableName(d.qdev_id))
      d.name = d.qdev_id;
    else if (UsableName(d.device))
      d.name = d.device;
    else if (UsableName(d.root_node))
      d.name = d.root_node;
    disks.push_back(std::move(d));
  }
  return disks;
}

uint64_t ProcessStartTime(pid_t pid) {
  if (pid <= 0) return 0;
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t close = stat.rfind(')');  // the command name may contain spaces
  if (close == std::string::npos) return 0;
  std::istringstream rest(stat.substr(close + 2));
  std::string field;
  // Field 3 (state) is the first after the name; the start time is field 22.
  for (int i = 3; i <= 22; i++) {
    if (!(rest >> field)) return 0;
  }
  return std::strtoull(field.c_str(), nullptr, 10);
}

// --- ScratchArea ---

Result<std::unique_ptr<ScratchArea>> ScratchArea::Acquire(
    const std::string& base, pid_t qemu_pid, const std::function<void(const std::string&)>& note) {
  struct stat st;
  if (::stat(base.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    return Status::NotFound("scratch directory " + base + " does not exist");
  const uint64_t start = ProcessStartTime(qemu_pid);
  const std::string mine =
      std::string(kAreaPrefix) + std::to_string(qemu_pid) + "." + std::to_string(start);
  const std::string path = base + "/" + mine;
  if (path.size() + std::strlen("/nbd.sock") >= sizeof(sockaddr_un::sun_path))
    return Status::InvalidArgument("scratch directory " + base +
                                   " is too long a path for a unix socket; use a shorter "
                                   "--scratch-dir");

  // Scratch areas of QEMU processes that are gone.
  if (DIR* d = ::opendir(base.c_str())) {
    std::vector<std::string> dead;
    while (dirent* e = ::readdir(d)) {
      std::string n = e->d_name;
      if (!StartsWith(n, kAreaPrefix) || n == mine) continue;
      unsigned long long pid = 0, t = 0;
      if (std::sscanf(n.c_str() + std::strlen(kAreaPrefix), "%llu.%llu", &pid, &t) != 2) continue;
      if (ProcessStartTime(static_cast<pid_t>(pid)) == t && t != 0) continue;  // still running
      dead.push_back(n);
    }
    ::closedir(d);
    for (const auto& n : dead) {
      std::string p = base + "/" + n;
      struct stat ds;
      if (::lstat(p.c_str(), &ds) != 0 || !S_ISDIR(ds.st_mode) || ds.st_uid != ::getuid()) continue;
      int fd = ::open((p + "/lock").c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW);
      if (fd >= 0 && ::flock(fd, LOCK_EX | LOCK_NB) != 0) {
        ::close(fd);
        continue;  // somebody still works there
      }
      std::error_code ec;
      std::filesystem::remove_all(p, ec);
      if (fd >= 0) ::close(fd);
      if (note && !ec) note("removed the scratch files of an earlier vmdedup run in " + p);
    }
  }

  if (::mkdir(path.c_str(), 0700) != 0 && errno != EEXIST)
    return Status::FromErrno(errno, "creating scratch directory " + path);
  if (::lstat(path.c_str(), &st) != 0) return Status::FromErrno(errno, path);
  if (!S_ISDIR(st.st_mode) || st.st_uid != ::getuid() || (st.st_mode & 077) != 0)
    return Status::IOError("scratch directory " + path +
                           " is not a private directory of this user (mode 0700); remove it");
  int fd = ::open((path + "/lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return Status::FromErrno(errno, "opening " + path + "/lock");
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    ::close(fd);
    return Status::Busy("another vmdedup is backing up the QEMU process " +
                        std::to_string(qemu_pid) + " (it holds " + path + "/lock)");
  }
  return std::unique_ptr<ScratchArea>(new ScratchArea(path, fd));
}

ScratchArea::~ScratchArea() {
  if (lock_fd_ >= 0) ::close(lock_fd_);
}

std::string ScratchArea::ImagePath(size_t index) const {
  return path_ + "/fleece-" + std::to_string(index) + ".qcow2";
}

std::vector<std::string> ScratchArea::Leftovers() const {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(path_, ec))
    if (e.path().filename() != "lock") out.push_back(e.path().string());
  return out;
}

bool ScratchArea::nbd_server_marked() const {
  return ::access((path_ + "/" + kNbdMarker).c_str(), F_OK) == 0;
}

Status ScratchArea::MarkNbdServer(bool started) {
  const std::string p = path_ + "/" + kNbdMarker;
  if (!started) {
    if (::unlink(p.c_str()) != 0 && errno != ENOENT) return Status::FromErrno(errno, p);
    return Status::OK();
  }
  int fd = ::open(p.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return Status::FromErrno(errno, p);
  ::close(fd);
  return Status::OK();
}

Status ScratchArea::RemoveFiles() {
  Status first;
  for (const auto& f : Leftovers()) {
    std::error_code ec;
    std::filesystem::remove_all(f, ec);
    if (ec) Keep(&first, Status::IOError("removing " + f + ": " + ec.message()));
  }
  return first;
}

Status ScratchArea::Remove() {
  RETURN_IF_ERROR(RemoveFiles());
  if (::unlink((path_ + "/lock").c_str()) != 0 && errno != ENOENT)
    return Status::FromErrno(errno, path_ + "/lock");
  if (::rmdir(path_.c_str()) != 0 && errno != ENOENT) return Status::FromErrno(errno, path_);
  return Status::OK();
}

// --- Leftovers ---

Result<FleeceObjects> QueryFleeceObjects(QmpClient& qmp) {
  FleeceObjects o;
  ASSIGN_OR_RETURN(json exports, qmp.Execute("query-block-exports"));
  for (const auto& e : exports)
    if (StartsWith(e.value("id", ""), kPrefix)) o.exports.push_back(e["id"]);
  ASSIGN_OR_RETURN(json jobs, qmp.Execute("query-block-jobs"));
  for (const auto& j : jobs)
    if (StartsWith(j.value("device", ""), kPrefix)) o.jobs.push_back(j["device"]);
  ASSIGN_OR_RETURN(json nodes, qmp.Execute("query-named-block-nodes", {{"flat", true}}));
  for (const auto& n : nodes)
    if (StartsWith(n.value("node-name", ""), kPrefix)) o.nodes.push_back(n["node-name"]);
  return o;
}

Status RemoveLeftovers(QmpClient& qmp, ScratchArea& scratch,
                       const std::function<void(const std::string&)>& note) {
  ASSIGN_OR_RETURN(FleeceObjects o, QueryFleeceObjects(qmp));
  const bool files = !scratch.Leftovers().empty();
  if (o.empty() && !files) return Status::OK();
  if (note) {
    std::string what;
    for (const auto& e : o.exports) what += " export " + e;
    for (const auto& j : o.jobs) what += " job " + j;
    for (const auto& n : o.nodes) what += " node " + n;
    if (files) what += " scratch files in " + scratch.path();
    note("removing what an interrupted vmdedup run left:" + what);
  }
  Status first;
  for (const auto& e : o.exports) Keep(&first, DeleteExport(qmp, e));
  for (const auto& n : o.nodes)
    if (StartsWith(n, std::string(kPrefix) + "acc-")) Keep(&first, DeleteNode(qmp, n));
  for (const auto& j : o.jobs) Keep(&first, CancelJob(qmp, j));
  for (const auto& n : o.nodes)
    if (StartsWith(n, std::string(kPrefix) + "tgt-")) Keep(&first, DeleteNode(qmp, n));
  if (scratch.nbd_server_marked()) {
    auto r = qmp.Execute("nbd-server-stop");
    if (!r.ok() && r.status().message().find("not running") == std::string::npos)
      Keep(&first, r.status());
  }
  Keep(&first, scratch.RemoveFiles());
  RETURN_IF_ERROR(first);
  ASSIGN_OR_RETURN(FleeceObjects after, QueryFleeceObjects(qmp));
  if (!after.empty()) {
    std::string left;
    for (const auto& v : {after.exports, after.jobs, after.nodes})
      for (const auto& x : v) left += " " + x;
    return Status::IOError("could not remove vmdedup's leftover QEMU objects:" + left);
  }
  return Status::OK();
}

// --- FleeceSession ---

FleeceSession::~FleeceSession() { (void)Teardown(); }

Status FleeceSession::Prepare(std::vector<FleeceDisk> disks) {
  disks_ = std::move(disks);
  for (size_t i = 0; i < disks_.size(); i++) {
    const std::string image = scratch_.ImagePath(i);
    ASSIGN_OR_RETURN(auto out, RunProcess({"qemu-img", "create", "-q", "-f", "qcow2", image,
                                           std::to_string(disks_[i].size)}));
    if (!out.success())
      return Status::IOError("creating scratch image " + image + ": " + out.ErrorSummary());
    auto r = qmp_.Execute("blockdev-add", {{"driver", "qcow2"},
                                           {"node-name", FleeceName("tgt", i)},
                                           {"file", {{"driver", "file"}, {"filename", image}}}});
    if (!r.ok()) {
      ::unlink(image.c_str());
      return r.status().WithContext("adding the scratch node for " + disks_[i].root_node);
    }
    targets_ = i + 1;
  }
  return Status::OK();
}

Result<int64_t> FleeceSession::Cut(const std::vector<json>& bitmap_actions) {
  json actions = json::array();
  for (const auto& a : bitmap_actions) actions.push_back(a);
  for (size_t i = 0; i < disks_.size(); i++)
    actions.push_back({{"type", "blockdev-backup"},
                       {"data",
                        {{"job-id", FleeceName("job", i)},
                         {"device", disks_[i].root_node},
                         {"target", FleeceName("tgt", i)},
                         {"sync", "none"},
                         {"filter-node-name", FleeceName("cbw", i)}}}});
  auto r = qmp_.Execute("transaction", {{"actions", actions}});
  if (!r.ok()) return r.status().WithContext("the fleecing transaction failed (nothing changed)");
  cut_ = true;
  return static_cast<int64_t>(::time(nullptr));
}

Status FleeceSession::Export() {
  for (size_t i = access_; i < disks_.size(); i++) {
    auto r = qmp_.Execute("blockdev-add", {{"driver", "snapshot-access"},
                                           {"node-name", FleeceName("acc", i)},
                                           {"file", FleeceName("cbw", i)}});
    if (!r.ok()) return r.status();
    access_ = i + 1;
  }
  if (!nbd_server_) {
    const std::string sock = scratch_.NbdSocket();
    RETURN_IF_ERROR(scratch_.MarkNbdServer(true));  // before: a crash right after still knows
    auto r = qmp_.Execute("nbd-server-start",
                          {{"addr", {{"type", "unix"}, {"data", {{"path", sock}}}}}});
    if (!r.ok()) {
      (void)scratch_.MarkNbdServer(false);
      if (r.status().message().find("already running") != std::string::npos)
        return Status::Busy(
            "QEMU's NBD server is already running (started by another tool, e.g. a libvirt "
            "backup); QEMU 7.2 has only one, and vmdedup needs its own on a private socket");
      return r.status();
    }
    nbd_server_ = true;
    ::chmod(sock.c_str(), 0600);
  }
  for (size_t i = exports_; i < disks_.size(); i++) {
    json args = {{"type", "nbd"},
                 {"id", FleeceName("exp", i)},
                 {"node-name", FleeceName("acc", i)},
                 {"name", kPrefix + std::to_string(i)},
                 {"writable", false}};
    if (disks_[i].export_bitmap)
      args["bitmaps"] =
          json::array({{{"node", disks_[i].bitmap_node}, {"name", *disks_[i].export_bitmap}}});
    auto r = qmp_.Execute("block-export-add", args);
    if (!r.ok()) return r.status();
    exports_ = i + 1;
  }
  return Status::OK();
}

std::string FleeceSession::Uri(size_t index) const {
  return "nbd+unix:///" + std::string(kPrefix) + std::to_string(index) +
         "?socket=" + scratch_.NbdSocket();
}

Status FleeceSession::Teardown() {
  if (torn_down_) return Status::OK();
  torn_down_ = true;
  Status first;
  for (size_t i = exports_; i-- > 0;) Keep(&first, DeleteExport(qmp_, FleeceName("exp", i)));
  for (size_t i = access_; i-- > 0;) Keep(&first, DeleteNode(qmp_, FleeceName("acc", i)));
  if (cut_)
    for (size_t i = disks_.size(); i-- > 0;) Keep(&first, CancelJob(qmp_, FleeceName("job", i)));
  for (size_t i = targets_; i-- > 0;) Keep(&first, DeleteNode(qmp_, FleeceName("tgt", i)));
  if (nbd_server_) {
    auto r = qmp_.Execute("nbd-server-stop");
    Keep(&first, r.status());
    if (r.ok() || qmp_.closed()) (void)scratch_.MarkNbdServer(false);
  }
  // With QEMU gone nothing holds the files; with QEMU alive and an error
  // above, the next run's RemoveLeftovers deals with what remains.
  if (first.ok() || qmp_.closed()) Keep(&first, scratch_.RemoveFiles());
  return first;
}

}  // namespace vmdedup
