// Offline image inspection and qcow2 persistent dirty bitmap operations,
// through qemu-img (the image must not be open in another process).
//
// Used by the file: source to keep one vmdedup bitmap per disk series in the
// image and rotate it at each backup. Every function runs qemu-img as a
// child process (base/subprocess.h) and is safe to call from any thread.
//
// Errors, common to all functions: NotFound for a missing image file (the
// message names the path) or a missing bitmap (names image and bitmap);
// Busy when another process holds the image's lock (a running VM, a writable
// qemu-nbd); Corruption for a bitmap that is "in-use" (inconsistent: its
// writer crashed) on anything but RemoveBitmap; InvalidArgument for a
// non-qcow2 image given to a bitmap operation, an empty bitmap name or a
// bitmap that already exists; NotFound "qemu-img not found: install
// qemu-utils" without qemu-img; IOError otherwise, with qemu-img's message.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"

namespace vmdedup {

struct ImageBitmap {
  std::string name;
  uint32_t granularity = 0;
  bool enabled = false;  // flag "auto": records writes
  bool in_use = false;   // flag "in-use": not closed cleanly, unusable
};

struct ImageInfo {
  std::string path;
  std::string format;  // as given: "raw", "qcow2"
  uint64_t virtual_size = 0;
  std::string backing_file;          // qcow2: its backing file, as the image names it
  std::vector<ImageBitmap> bitmaps;  // qcow2 only
};

// `qemu-img info -f FORMAT --output=json` (without -U: an image in use is
// Busy, since its bitmaps on disk are not its real state). The format is
// the caller's, never probed: a raw disk whose guest wrote a qcow2 header
// into it is raw. A file that does not open in that format (a directory, a
// raw file given as qcow2, a damaged qcow2 header) is InvalidArgument with
// qemu-img's message.
Result<ImageInfo> InspectImage(const std::string& path, const std::string& format);
// InspectImage of an image vmdedup reads as a source: InvalidArgument unless
// the format is raw or qcow2, and for a qcow2 image with a backing file
// unless `backing_chain` is set and every image of the chain records its
// backing file's format (qemu would probe it otherwise).
Result<ImageInfo> InspectSourceImage(const std::string& path, const std::string& format,
                                     bool backing_chain);

// `qemu-img bitmap --add [--disable]`; granularity: the cluster size, at most
// 64 KiB (qemu-img default). An enabled bitmap records the writes of whoever opens the
// image writable next (QEMU, qemu-io, qemu-nbd) and is saved when it closes it.
Status AddBitmap(const std::string& path, const std::string& name, bool enabled);
Status RemoveBitmap(const std::string& path, const std::string& name);
Status EnableBitmap(const std::string& path, const std::string& name);
Status DisableBitmap(const std::string& path, const std::string& name);
// Merges bitmap `from` into `into` (both in the image at `path`).
Status MergeBitmap(const std::string& path, const std::string& from, const std::string& into);

}  // namespace vmdedup
