// BlockSource: where a backup reads a virtual disk from. Two kinds:
//   - over NBD through libnbd: an NBD URI, or an image file served by a
//     qemu-nbd that the source starts (systemd socket activation) and stops
//     (this file, nbd-client/nbd_block_source.cc);
//   - a raw image file read directly with pread, no subprocess
//     (raw_file_source.h); the backup job uses it for raw file: sources and
//     qemu-nbd for qcow2.
//
// A source answers three questions: the allocation map (NBD base:allocation:
// data, zero, hole), the dirty map (qemu:dirty-bitmap:NAME, when a bitmap was
// requested and the server offers it), and the bytes.
//
// NBD implementation: one libnbd handle (one connection) per source. A
// source owns its handle and, for an image file, the qemu-nbd process libnbd
// started for it.
//
// Thread model: one thread uses a source at a time; an NBD source's ReadMany
// keeps many requests in flight on its own (libnbd aio, no extra threads).
// Destruction disconnects and stops qemu-nbd.
//
// Failures of NBD sources: a connection that breaks (server killed, socket
// reset) or stays silent for io_timeout_seconds fails the call in progress
// with IOError and is closed; every later call fails with IOError too. A
// set cancel flag (SIGINT/SIGTERM) fails the connect or the call in
// progress with Aborted within half a second, and closes the connection.
// No call returns while the server may still write into a caller's buffer.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"

namespace vmdedup {

struct Extent {
  uint64_t offset = 0;
  uint64_t length = 0;
  // base:allocation: kHole | kZero bits as NBD defines them (hole=1, zero=2).
  // dirty map: kDirty (1) or 0.
  uint32_t flags = 0;
  static constexpr uint32_t kHole = 1;
  static constexpr uint32_t kZero = 2;
  static constexpr uint32_t kDirty = 1;
  bool operator==(const Extent&) const = default;
};

// Appends [offset, offset+length) with `flags` to `out`, merging it into the
// last extent when adjacent with the same flags; a zero length adds nothing.
// For sources building their maps.
void AppendExtent(std::vector<Extent>* out, uint64_t offset, uint64_t length, uint32_t flags);

struct ReadRequest {
  uint64_t offset = 0;
  uint32_t length = 0;  // at most 32 MiB (QEMU's limit)
  uint8_t* dst = nullptr;
};

class BlockSource {
 public:
  virtual ~BlockSource() = default;
  virtual uint64_t size() const = 0;
  // The exact length of the content: size() but for a raw file whose
  // length is no multiple of 512, which this source (as QEMU) rounds up.
  virtual uint64_t content_bytes() const { return size(); }
  // Extents covering exactly [offset, offset+length), in order, merged where
  // neighbours have the same flags (*out is replaced). A server without
  // base:allocation yields one data extent (flags 0): always safe.
  // InvalidArgument for a range beyond size().
  virtual Status Allocation(uint64_t offset, uint64_t length, std::vector<Extent>* out) = 0;
  // True when a dirty bitmap was requested and the server exports it.
  virtual bool has_dirty_map() const = 0;
  // Like Allocation for the dirty bitmap (flags kDirty or 0; a range the
  // server leaves unanswered counts as dirty). NotSupported without one.
  virtual Status Dirty(uint64_t offset, uint64_t length, std::vector<Extent>* out) = 0;
  // Reads every request (each fully); an NBD source keeps many in flight,
  // split into pieces of at most 256 KiB (or the server's maximum). Any
  // failure fails the whole call with IOError naming the offset.
  // InvalidArgument for a request beyond size(), over 32 MiB or without a
  // buffer. After a failure the buffers' contents are undefined (libnbd does
  // not pre-zero them).
  virtual Status ReadMany(std::span<const ReadRequest> requests) = 0;
  // "nbd+unix:///?socket=..." or "file:/path/disk.qcow2 (qcow2)", for messages.
  virtual std::string Describe() const = 0;
};

// True for the NBD URI schemes libnbd connects to (nbd://, nbds://,
// nbd+unix://, nbds+unix://, nbd+vsock://).
bool IsNbdUri(std::string_view text);

struct NbdUriOptions {
  std::string uri;
  std::optional<std::string> bitmap;  // exported as qemu:dirty-bitmap:NAME
  unsigned max_in_flight = 16;
  // A call fails (IOError) when no reply arrives for this long; 0: never.
  unsigned io_timeout_seconds = 300;
  const std::atomic<bool>* cancel = nullptr;  // set: Aborted (see above)
};
// Connects to `uri` (nbd://, nbd+unix:///EXPORT?socket=PATH, ...) asking for
// base:allocation and, with a bitmap, qemu:dirty-bitmap:NAME. A bitmap the
// server does not offer is not an error: has_dirty_map() is then false and
// the caller reads everything. IOError when the connection fails.
Result<std::unique_ptr<BlockSource>> OpenNbdUri(const NbdUriOptions& options);

struct ImageFileOptions {
  std::string path;
  std::string format;                 // "raw" or "qcow2"
  std::optional<std::string> bitmap;  // persistent qcow2 bitmap, qemu-nbd -B
  unsigned max_in_flight = 16;
  unsigned io_timeout_seconds = 300;          // as in NbdUriOptions
  const std::atomic<bool>* cancel = nullptr;  // as in NbdUriOptions
};
// Starts `qemu-nbd --read-only --format=FORMAT [--bitmap=NAME] PATH` through
// libnbd (systemd socket activation, default cache mode) and connects; the
// qemu-nbd exits when the source is destroyed. Errors name the image (and
// the bitmap), with qemu-nbd's own message:
//   NotFound: no such file; the bitmap is not in the image (fall back to a
//     full read); qemu-nbd not installed.
//   Corruption: the bitmap is inconsistent ("in-use" after a crash): it can
//     only be removed (fall back to a full read).
//   Busy: another process holds the image's lock (a running VM, a writable
//     qemu-nbd); qemu-nbd -r itself only blocks writers.
//   InvalidArgument: a bitmap on a non-qcow2 image, a bad format name, a
//     directory, or a file that does not open in that format.
//   IOError: unreadable file, anything else.
// qemu-nbd 7.2 exports an enabled (recording) persistent bitmap read-only as
// it is on disk; nothing writes the image while it is served.
Result<std::unique_ptr<BlockSource>> OpenImageFile(const ImageFileOptions& options);

}  // namespace vmdedup
