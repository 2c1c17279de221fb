// nbdkit-vmdedup-plugin: serves one vmdedup snapshot over NBD, read-only.
//
//   nbdkit --readonly ./nbdkit-vmdedup-plugin.so repo=/srv/repo snapshot=web1/vda/7 [cache=256M]
//
// `vmdedup serve` runs it (with the socket, TLS and lifetime handled); it can
// also be run by hand. Keys:
//   repo=PATH       the repository
//   snapshot=REF    VM/DISK/SEQ or VM/DISK/latest (the magic key: a bare
//                   argument is the snapshot)
//   cache=SIZE      memory for decoded segments (default 256M; 0: no cache)
//   readahead=N     segments decoded ahead of a sequential reader (default 4)
//   decoders=N      segments decoded at once, and read-ahead threads
//                   (default: the number of cores, at least 2)
//
// The snapshot is opened in .get_ready (so errors reach the user before the
// server listens) and reopened in .after_fork only when nbdkit forked.
// Thread model PARALLEL: SnapshotExport is safe for concurrent calls, and
// the export is immutable, so multi-conn is safe. Extents come from the
// recipes (zero segments and zero blocks are hole|zero). Any read error is
// EIO with an nbdkit_error line naming the snapshot, the segment and the
// damaged object; wrong data is never returned.
#define NBDKIT_API_VERSION 2
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL
#include <nbdkit-plugin.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "nbd-export/snapshot_export.h"

namespace {

using vmdedup::ExportOptions;
using vmdedup::SnapshotExport;
using vmdedup::Status;

std::string g_repo;
std::string g_snapshot;
ExportOptions g_options;
std::unique_ptr<SnapshotExport> g_export;
std::string g_description;
pid_t g_ready_pid = 0;
bool g_cleaned_up = false;
int g_handle;  // every connection's handle: the export is global and immutable

int OpenExport() {
  auto e = SnapshotExport::Open(g_repo, g_snapshot, g_options);
  if (!e.ok()) {
    nbdkit_error("cannot serve snapshot %s of repository %s: %s", g_snapshot.c_str(),
                 g_repo.c_str(), e.status().ToString().c_str());
    return -1;
  }
  g_export = std::move(e).value();
  const auto& s = g_export->snapshot();
  g_description = "vmdedup snapshot " + s.Id();
  nbdkit_debug("serving snapshot %s: %" PRIu64 " bytes, %" PRIu64
               " segments of %u bytes, cache %" PRIu64 " bytes",
               s.Id().c_str(), s.size, s.segment_count, s.segment_size, g_options.cache_bytes);
  return 0;
}

int Config(const char* key, const char* value) {
  std::string k = key;
  if (k == "repo") {
    g_repo = value;
  } else if (k == "snapshot") {
    g_snapshot = value;
  } else if (k == "cache") {
    int64_t v = nbdkit_parse_size(value);
    if (v < 0) return -1;  // nbdkit_parse_size reported it
    g_options.cache_bytes = static_cast<uint64_t>(v);
  } else if (k == "readahead" || k == "decoders") {
    char* end = nullptr;
    errno = 0;
    unsigned long v = std::strtoul(value, &end, 10);
    if (errno != 0 || end == value || *end != '\0' || v > 64 || (k == "decoders" && v == 0)) {
      nbdkit_error("%s=%s: expected a number from %d to 64", key, value, k == "decoders" ? 1 : 0);
      return -1;
    }
    (k == "readahead" ? g_options.readahead : g_options.decoders) = static_cast<unsigned>(v);
  } else {
    nbdkit_error(
        "unknown parameter '%s' (expected repo=, snapshot=, cache=, readahead=, decoders=)", key);
    return -1;
  }
  return 0;
}

int ConfigComplete() {
  if (g_repo.empty() || g_snapshot.empty()) {
    nbdkit_error("repo=PATH and snapshot=VM/DISK/SEQ are required");
    return -1;
  }
  return 0;
}

int GetReady() {
  g_ready_pid = getpid();
  return OpenExport();
}

int AfterFork() {
  // LevelDB's background thread does not survive a fork: reopen in the child.
  if (getpid() == g_ready_pid) return 0;
  g_export.reset();
  return OpenExport();
}

void Cleanup() {
  if (g_export) {
    auto st = g_export->stats();
    nbdkit_debug("served %" PRIu64 " reads (%" PRIu64 " bytes, %" PRIu64
                 " failed); decoded %" PRIu64 " segments and %" PRIu64
                 " small reads block by block; segment cache %" PRIu64 " hits, %" PRIu64
                 " misses, %" PRIu64 " joined, %" PRIu64 " evictions, %" PRIu64
                 " dropped behind a sequential reader",
                 st.reads, st.read_bytes, st.read_errors, st.decoded_segments, st.range_reads,
                 st.segments.hits, st.segments.misses, st.segments.waits, st.segments.evictions,
                 st.segments.dropped);
  }
  g_export.reset();
  g_cleaned_up = true;
}

#if defined(__SANITIZE_ADDRESS__)
// Sanitized builds only: nbdkit is not built with ASan, so `vmdedup serve`
// preloads the ASan runtime, which leaves glibc's locale lock in a state
// where p11-kit's destructor (gnutls, loaded by nbdkit) deadlocks in
// freelocale() at exit. After a normal shutdown (.cleanup ran) nothing is
// left to do, so the process ends here.
void Unload() {
  if (!g_cleaned_up) return;
  std::fflush(nullptr);
  _exit(0);
}
#endif

void* Open(int readonly) {
  (void)readonly;  // can_write says no whatever the client asked
  return &g_handle;
}

int64_t GetSize(void*) { return static_cast<int64_t>(g_export->size()); }
int CanWrite(void*) { return 0; }
int CanMultiConn(void*) { return 1; }
int CanExtents(void*) { return 1; }
int IsRotational(void*) { return 0; }
// NBD_CMD_CACHE becomes a pread, which fills the decoded-segment cache.
int CanCache(void*) { return NBDKIT_CACHE_EMULATE; }
const char* ExportDescription(void*) { return g_description.c_str(); }

int Pread(void*, void* buf, uint32_t count, uint64_t offset, uint32_t flags) {
  (void)flags;
  Status st = g_export->Read(static_cast<uint8_t*>(buf), count, offset);
  if (st.ok()) return 0;
  nbdkit_error("snapshot %s: read of %" PRIu32 " bytes at offset %" PRIu64 " failed: %s",
               g_export->snapshot().Id().c_str(), count, offset, st.ToString().c_str());
  nbdkit_set_error(EIO);
  return -1;
}

int Extents(void*, uint32_t count, uint64_t offset, uint32_t flags,
            struct nbdkit_extents* extents) {
  Status st = g_export->Extents(offset, count, (flags & NBDKIT_FLAG_REQ_ONE) != 0,
                                [&](uint64_t off, uint64_t len, bool zero) {
                                  uint32_t type =
                                      zero ? (NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO) : 0;
                                  if (nbdkit_add_extent(extents, off, len, type) == -1)
                                    return Status::IOError("nbdkit_add_extent failed");
                                  return Status::OK();
                                });
  if (st.ok()) return 0;
  nbdkit_error("snapshot %s: extents at offset %" PRIu64 " failed: %s",
               g_export->snapshot().Id().c_str(), offset, st.ToString().c_str());
  nbdkit_set_error(EIO);
  return -1;
}

void DumpPlugin() { std::puts("vmdedup_export=1"); }

struct nbdkit_plugin plugin = [] {
  struct nbdkit_plugin p {};
  p.name = "vmdedup";
  p.longname = "vmdedup snapshot export";
  p.version = "0.1.0";
  p.description = "Serves a vmdedup backup snapshot read-only, with extents";
  p.config = Config;
  p.config_complete = ConfigComplete;
  p.config_help =
      "repo=PATH       (required) the vmdedup repository\n"
      "snapshot=REF    (required) VM/DISK/SEQ or VM/DISK/latest\n"
      "cache=SIZE      memory for decoded segments (default 256M)\n"
      "readahead=N     segments decoded ahead of a sequential reader (default 4)\n"
      "decoders=N      segments decoded at once (default: cores, at least 2)";
  p.magic_config_key = "snapshot";
  p.get_ready = GetReady;
  p.after_fork = AfterFork;
  p.cleanup = Cleanup;
#if defined(__SANITIZE_ADDRESS__)
  p.unload = Unload;
#endif
  p.open = Open;
  p.get_size = GetSize;
  p.can_write = CanWrite;
  p.can_multi_conn = CanMultiConn;
  p.can_extents = CanExtents;
  p.is_rotational = IsRotational;
  p.can_cache = CanCache;
  p.export_description = ExportDescription;
  p.pread = Pread;
  p.extents = Extents;
  p.dump_plugin = DumpPlugin;
  return p;
}();

}  // namespace

NBDKIT_REGISTER_PLUGIN(plugin)
