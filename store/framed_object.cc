#include "store/framed_object.h"

#include <cstring>

#include "base/crc32c.h"
#include "base/encoding.h"

namespace vmdedup {

std::string FrameObject(const char (&magic)[8], std::string_view body) {
  ByteWriter w;
  w.Bytes(magic, 8);
  w.U32(static_cast<uint32_t>(body.size()));
  w.Bytes(body.data(), body.size());
  w.U32(crc32c::Mask(crc32c::Value(w.buffer().data(), w.buffer().size())));
  return w.Take();
}

Status UnframeObject(std::string_view data, const char (&magic)[8], const std::string& what,
                     std::string_view* body) {
  if (data.size() < kFrameOverhead)
    return Status::Corruption(what + ": truncated (" + std::to_string(data.size()) + " bytes)");
  if (std::memcmp(data.data(), magic, 8) != 0) return Status::Corruption(what + ": bad magic");
  uint64_t len = DecodeU32(reinterpret_cast<const uint8_t*>(data.data()) + 8);
  if (data.size() != kFrameOverhead + len)
    return Status::Corruption(what + ": body length " + std::to_string(len) +
                              " does not match the object size " + std::to_string(data.size()));
  uint32_t stored = DecodeU32(reinterpret_cast<const uint8_t*>(data.data()) + 12 + len);
  if (crc32c::Unmask(stored) != crc32c::Value(data.data(), 12 + len))
    return Status::Corruption(what + ": checksum mismatch");
  *body = data.substr(12, len);
  return Status::OK();
}

}  // namespace vmdedup
