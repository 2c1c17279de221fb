// RawFileSource: the BlockSource of a raw disk image (a regular file or a
// block device) read directly with pread, without a qemu-nbd in between.
// A raw image holds the disk's bytes as they are, so there is nothing for a
// server to translate; reading it in-process saves qemu-nbd's CPU (about a
// fifth of a first backup's, docs/benchmarks.md) and a process to start and
// stop. qcow2 images still go through OpenImageFile (block_source.h).
//
// What it answers, as qemu-nbd -f raw would for the same file:
//   - size(): the file's size rounded up to 512 bytes (QEMU's sector), or a
//     block device's size; the padding past the end of the file reads as
//     zeros and is a hole.
//   - Allocation(): lseek SEEK_DATA / SEEK_HOLE; holes are kHole | kZero,
//     data is 0. A file system without SEEK_DATA yields one data extent.
//   - no dirty map (raw images have no bitmap): Dirty() is NotSupported.
//   - ReadMany(): pread of each request in turn, in the calling thread.
//
// Locking: the image must not change while it is read, and a running VM
// must not start writing it meanwhile. QEMU coordinates the users of an
// image file with OFD byte-range locks (block/file-posix.c); the source
// takes part in that protocol as a consistent reader that does not share
// write or resize permission (as qemu-nbd --read-only of a qcow2 image
// does): it holds shared locks on bytes 100 (holds consistent read), 201
// (does not share write) and 203 (does not share resize), and fails with
// Busy when another process holds write (byte 101) or resize (103)
// permission, or does not share consistent reads (200). While the source
// is open, QEMU refuses to open the image for writing.
//
// Ownership: a source owns its file descriptor, and with it the locks, for
// its whole lifetime; destruction closes it. The descriptor is close-on-exec.
//
// Thread model: as every BlockSource, one thread uses a source at a time.
// Nothing runs in the background.
#pragma once

#include <memory>
#include <string>

#include "base/status.h"
#include "nbd-client/block_source.h"

namespace vmdedup {

// Opens the raw image at `path` (a regular file or a block device), takes
// QEMU's locks and returns its source; Describe() is "file:PATH (raw)".
// Errors name the path:
//   NotFound: no such file.
//   InvalidArgument: a directory, or neither a regular file nor a block
//     device.
//   Busy: another process (a running VM, a writable qemu-nbd or qemu-io)
//     has the image open for writing or resizing.
//   IOError: unreadable, or the locks cannot be taken; anything else.
Result<std::unique_ptr<BlockSource>> OpenRawFile(const std::string& path);

}  // namespace vmdedup
