#include "dirty-bitmap/image_bitmaps.h"

#include <sys/stat.h>

#include <cerrno>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "base/subprocess.h"

namespace vmdedup {
namespace {

// qemu-img on a local image never takes long; this only keeps a hung
// filesystem from hanging a backup forever.
constexpr int kQemuImgTimeoutMs = 10 * 60 * 1000;

// qemu would take "proto:rest" as a protocol prefix and "-x" as an option;
// an absolute path is neither.
std::string AbsolutePath(const std::string& path) {
  std::error_code ec;
  std::filesystem::path abs = std::filesystem::absolute(path, ec);
  return ec ? path : abs.string();
}

bool Contains(const std::string& s, const char* needle) {
  return s.find(needle) != std::string::npos;
}

// The file must exist and be a regular file or a block device.
Status CheckImagePath(const std::string& path) {
  if (path.empty()) return Status::InvalidArgument("empty image path");
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return Status::NotFound("image " + path + " does not exist");
    return Status::FromErrno(errno, "image " + path);
  }
  if (S_ISDIR(st.st_mode)) {
    return Status::InvalidArgument(path + " is a directory, not a disk image");
  }
  return Status::OK();
}

// Maps a qemu-img failure to a Status. `what` names the operation, the image
// and the bitmap; `fallback` is the code for messages not recognised.
Status QemuImgError(const ProcessOutput& out, const std::string& what, const std::string& path,
                    Status::Code fallback) {
  const std::string msg = out.ErrorSummary();
  const std::string text = what + ": " + msg;
  if (Contains(msg, "Failed to get") && Contains(msg, "lock")) {
    return Status::Busy(what + ": image " + path +
                        " is in use by another process (a running VM?); qemu-img: " + msg);
  }
  if (Contains(msg, "No such file or directory")) return Status::NotFound(text);
  if (Contains(msg, "Permission denied")) return Status::IOError(text);
  if (Contains(msg, "not found")) return Status::NotFound(text);
  if (Contains(msg, "inconsistent")) return Status::Corruption(text);
  if (Contains(msg, "already exists") || Contains(msg, "not in qcow2 format") ||
      Contains(msg, "cannot be empty") || Contains(msg, "too long")) {
    return Status::InvalidArgument(text);
  }
  switch (fallback) {
    case Status::Code::kInvalidArgument:
      return Status::InvalidArgument(text);
    default:
      return Status::IOError(text);
  }
}

Status CheckBitmapName(const std::string& path, const std::string& name) {
  if (name.empty()) return Status::InvalidArgument("empty bitmap name for image " + path);
  return Status::OK();
}

// Runs `qemu-img bitmap OPS -f qcow2 -- PATH NAME`.
Status RunBitmapOp(const std::string& path, const std::string& name,
                   const std::vector<std::string>& ops, const std::string& what) {
  RETURN_IF_ERROR(CheckBitmapName(path, name));
  RETURN_IF_ERROR(CheckImagePath(path));
  std::vector<std::string> argv = {"qemu-img", "bitmap"};
  argv.insert(argv.end(), ops.begin(), ops.end());
  argv.insert(argv.end(), {"-f", "qcow2", "--", AbsolutePath(path), name});
  ProcessOptions options;
  options.timeout_ms = kQemuImgTimeoutMs;
  ASSIGN_OR_RETURN(ProcessOutput out, RunProcess(argv, options));
  if (!out.success()) return QemuImgError(out, what, path, Status::Code::kIOError);
  return Status::OK();
}

}  // namespace

Status CheckSourceFormat(const std::string& path, const std::string& format) {
  if (format == "raw" || format == "qcow2") return Status::OK();
  return Status::InvalidArgument("image " + path + ": format '" + format +
                                 "' is not one vmdedup reads (raw or qcow2)");
}

Result<ImageInfo> InspectSourceImage(const std::string& path, const std::string& format,
                                     bool backing_chain) {
  RETURN_IF_ERROR(CheckSourceFormat(path, format));
  ASSIGN_OR_RETURN(ImageInfo info, InspectImage(path, format));
  if (info.backing_file.empty()) return info;
  if (!backing_chain)
    return Status::InvalidArgument(
        "image " + path + " has a backing file (" + info.backing_file +
        "); vmdedup follows backing chains only with --backing-chain (or flatten it: qemu-img "
        "convert -O qcow2)");
  // Every image of the chain must say its backing file's format: a backing
  // file whose format qemu would probe is refused, as the image itself is.
  ProcessOptions options;
  options.timeout_ms = kQemuImgTimeoutMs;
  ASSIGN_OR_RETURN(ProcessOutput out,
                   RunProcess({"qemu-img", "info", "-f", format, "--backing-chain", "--output=json",
                               "--", AbsolutePath(path)},
                              options));
  if (!out.success())
    return QemuImgError(out, "qemu-img info --backing-chain " + path, path,
                        Status::Code::kInvalidArgument);
  try {
    for (const auto& layer : nlohmann::json::parse(out.out)) {
      if (!layer.contains("backing-filename")) continue;
      if (!layer.contains("backing-filename-format"))
        return Status::InvalidArgument(
            "image " + layer.value("filename", path) + " in the backing chain of " + path +
            " does not record its backing file's format; vmdedup never guesses a format "
            "(set it: qemu-img rebase -u -F FORMAT -b BACKING)");
    }
  } catch (const nlohmann::json::exception& e) {
    return Status::IOError("qemu-img info --backing-chain " + path +
                           ": unexpected output: " + e.what());
  }
  return info;
}

Result<ImageInfo> InspectImage(const std::string& path, const std::string& format) {
  RETURN_IF_ERROR(CheckImagePath(path));
  if (format.empty() ||
      format.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789") != std::string::npos)
    return Status::InvalidArgument("image " + path + ": bad format '" + format + "'");
  // No -U (force share): a bitmap of an image that a VM has open is not what
  // the file says, so an image in use must be reported, not read. The
  // format is given (-f): never probed.
  ProcessOptions options;
  options.timeout_ms = kQemuImgTimeoutMs;
  ASSIGN_OR_RETURN(ProcessOutput out, RunProcess({"qemu-img", "info", "-f", format, "--output=json",
                                                  "--", AbsolutePath(path)},
                                                 options));
  if (!out.success()) {
    return QemuImgError(out, "qemu-img info -f " + format + " " + path, path,
                        Status::Code::kInvalidArgument);
  }

  ImageInfo info;
  info.path = path;
  try {
    nlohmann::json j = nlohmann::json::parse(out.out);
    info.format = j.at("format").get<std::string>();
    info.virtual_size = j.at("virtual-size").get<uint64_t>();
    info.backing_file = j.value("backing-filename", "");
    auto fs = j.find("format-specific");
    if (fs != j.end() && fs->is_object()) {
      auto data = fs->find("data");
      if (data != fs->end() && data->is_object()) {
        auto bitmaps = data->find("bitmaps");
        if (bitmaps != data->end() && bitmaps->is_array()) {
          for (const auto& b : *bitmaps) {
            ImageBitmap bm;
            bm.name = b.at("name").get<std::string>();
            bm.granularity = b.at("granularity").get<uint32_t>();
            for (const auto& flag : b.value("flags", nlohmann::json::array())) {
              const std::string f = flag.get<std::string>();
              if (f == "auto") bm.enabled = true;
              if (f == "in-use") bm.in_use = true;
            }
            info.bitmaps.push_back(std::move(bm));
          }
        }
      }
    }
  } catch (const nlohmann::json::exception& e) {
    return Status::IOError("qemu-img info " + path + ": unexpected output: " + e.what());
  }
  return info;
}

Status AddBitmap(const std::string& path, const std::string& name, bool enabled) {
  std::vector<std::string> ops = {"--add"};
  if (!enabled) ops.push_back("--disable");
  return RunBitmapOp(path, name, ops, "adding bitmap '" + name + "' to image " + path);
}

Status RemoveBitmap(const std::string& path, const std::string& name) {
  return RunBitmapOp(path, name, {"--remove"}, "removing bitmap '" + name + "' from image " + path);
}

Status EnableBitmap(const std::string& path, const std::string& name) {
  return RunBitmapOp(path, name, {"--enable"}, "enabling bitmap '" + name + "' of image " + path);
}

Status DisableBitmap(const std::string& path, const std::string& name) {
  return RunBitmapOp(path, name, {"--disable"}, "disabling bitmap '" + name + "' of image " + path);
}

Status MergeBitmap(const std::string& path, const std::string& from, const std::string& into) {
  RETURN_IF_ERROR(CheckBitmapName(path, from));
  return RunBitmapOp(path, into, {"--merge", from},
                     "merging bitmap '" + from + "' into '" + into + "' of image " + path);
}

}  // namespace vmdedup
