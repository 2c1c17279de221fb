// ParseImageSource, ResolveImageFormat; see image_source.h.
#include "engine/image_source.h"

namespace vmdedup {

Result<std::optional<ImageSourceSpec>> ParseImageSource(const std::string& source) {
  for (const char* scheme : {"raw", "qcow2", "file"}) {
    const std::string prefix = std::string(scheme) + ":";
    if (source.rfind(prefix, 0) != 0) continue;
    ImageSourceSpec spec;
    spec.path = source.substr(prefix.size());
    spec.format = prefix == "file:" ? "" : scheme;
    if (spec.path.empty())
      return Status::InvalidArgument("source '" + source + "' needs a path: " + prefix + "PATH");
    return std::optional<ImageSourceSpec>(std::move(spec));
  }
  return std::optional<ImageSourceSpec>();
}

Result<std::string> ResolveImageFormat(const ImageSourceSpec& spec, const std::string& given,
                                       const std::string& recorded, const std::string& what) {
  if (!given.empty() && given != "raw" && given != "qcow2")
    return Status::InvalidArgument("--format " + given + ": vmdedup reads raw and qcow2 images");
  if (!spec.format.empty()) {
    if (!given.empty() && given != spec.format)
      return Status::InvalidArgument(what + " says " + spec.format + " but --format says " + given);
    return spec.format;
  }
  if (!given.empty()) return given;
  if (!recorded.empty()) return recorded;
  return Status::InvalidArgument(
      "the format of " + what +
      " is not known: name it (raw:PATH or qcow2:PATH, or --format raw|qcow2); vmdedup never "
      "guesses it, because a guest can write any header into its raw disk");
}

}  // namespace vmdedup
