// Image files as sources of backups and CDS seeds: "raw:PATH" and
// "qcow2:PATH" say the format, "file:PATH" leaves it to be given elsewhere
// (`--format`, or the series' latest snapshot). vmdedup never probes an
// image's format (docs/format.md, "source format"): a guest that writes a
// qcow2 header into its raw disk must not make the next backup read the
// file that header names.
//
// Pure functions; thread-safe.
#pragma once

#include <optional>
#include <string>

#include "base/status.h"

namespace vmdedup {

struct ImageSourceSpec {
  std::string path;
  std::string format;  // "raw", "qcow2", or "" for file:PATH
};

// The image source `source` names, or nullopt when it is not one (an NBD
// URI, a qemu: socket). InvalidArgument for an empty path.
Result<std::optional<ImageSourceSpec>> ParseImageSource(const std::string& source);

// The format to read `spec` as: the source's own, else `given` (--format),
// else `recorded` (the series' latest snapshot). `given` that contradicts
// the source's own is InvalidArgument; none of them is InvalidArgument
// saying how to name it. `what` names the source in messages.
Result<std::string> ResolveImageFormat(const ImageSourceSpec& spec, const std::string& given,
                                       const std::string& recorded, const std::string& what);

}  // namespace vmdedup
