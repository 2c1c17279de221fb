// Little-endian fixed-width and varint encoding of records, with a bounds-
// checked reader that reports truncated or malformed input as Corruption.
//
// ByteWriter appends to a std::string it owns; ByteReader reads a borrowed
// span that must outlive it. Neither is shared between threads.
#pragma once

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>

#include "base/status.h"

namespace vmdedup {

class ByteWriter {
 public:
  void U8(uint8_t v) { buf_.push_back(static_cast<char>(v)); }
  void U16(uint16_t v) { Fixed(v); }
  void U32(uint32_t v) { Fixed(v); }
  void U64(uint64_t v) { Fixed(v); }
  void Varint(uint64_t v) {
    while (v >= 0x80) {
      buf_.push_back(static_cast<char>((v & 0x7f) | 0x80));
      v >>= 7;
    }
    buf_.push_back(static_cast<char>(v));
  }
  void Bytes(const void* p, size_t n) { buf_.append(static_cast<const char*>(p), n); }
  // Varint length followed by the bytes.
  void String(std::string_view s) {
    Varint(s.size());
    buf_.append(s.data(), s.size());
  }
  size_t size() const { return buf_.size(); }
  std::string& buffer() { return buf_; }
  std::string Take() { return std::move(buf_); }

 private:
  template <typename T>
  void Fixed(T v) {
    char b[sizeof(T)];
    for (size_t i = 0; i < sizeof(T); i++) b[i] = static_cast<char>((v >> (8 * i)) & 0xff);
    buf_.append(b, sizeof(T));
  }
  std::string buf_;
};

class ByteReader {
 public:
  // `what` names the record in error messages ("segment recipe 00000007").
  ByteReader(std::string_view data, std::string what) : data_(data), what_(std::move(what)) {}

  Status U8(uint8_t* v) { return Fixed(v); }
  Status U16(uint16_t* v) { return Fixed(v); }
  Status U32(uint32_t* v) { return Fixed(v); }
  Status U64(uint64_t* v) { return Fixed(v); }
  Status Varint(uint64_t* v) {
    uint64_t r = 0;
    for (int shift = 0; shift <= 63; shift += 7) {
      if (pos_ >= data_.size()) return Truncated();
      uint8_t b = static_cast<uint8_t>(data_[pos_++]);
      r |= static_cast<uint64_t>(b & 0x7f) << shift;
      if (!(b & 0x80)) {
        *v = r;
        return Status::OK();
      }
    }
    return Status::Corruption(what_ + ": malformed varint");
  }
  Status Bytes(void* p, size_t n) {
    if (data_.size() - pos_ < n) return Truncated();
    std::memcpy(p, data_.data() + pos_, n);
    pos_ += n;
    return Status::OK();
  }
  Status String(std::string* s) {
    uint64_t n = 0;
    RETURN_IF_ERROR(Varint(&n));
    if (data_.size() - pos_ < n) return Truncated();
    s->assign(data_.data() + pos_, n);
    pos_ += n;
    return Status::OK();
  }
  size_t remaining() const { return data_.size() - pos_; }
  size_t position() const { return pos_; }
  const std::string& what() const { return what_; }

 private:
  Status Truncated() const { return Status::Corruption(what_ + ": record truncated"); }
  template <typename T>
  Status Fixed(T* v) {
    if (data_.size() - pos_ < sizeof(T)) return Truncated();
    T r = 0;
    for (size_t i = 0; i < sizeof(T); i++)
      r |= static_cast<T>(static_cast<T>(static_cast<uint8_t>(data_[pos_ + i])) << (8 * i));
    pos_ += sizeof(T);
    *v = r;
    return Status::OK();
  }
  std::string_view data_;
  size_t pos_ = 0;
  std::string what_;
};

// Encodes little-endian into a raw buffer (for fixed-layout headers).
inline void EncodeU16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}
inline void EncodeU32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline void EncodeU64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline uint16_t DecodeU16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
inline uint32_t DecodeU32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; i++) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}
inline uint64_t DecodeU64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

// 16 lowercase hex digits, as object names and metadata keys carry ids.
inline std::string Hex16(uint64_t v) {
  static const char kDigits[] = "0123456789abcdef";
  std::string s(16, '0');
  for (int i = 15; i >= 0; i--, v >>= 4) s[static_cast<size_t>(i)] = kDigits[v & 0xf];
  return s;
}

// Exactly 16 lowercase hex digits, as Hex16 writes them.
inline bool ParseHex16(std::string_view s, uint64_t* v) {
  if (s.size() != 16) return false;
  uint64_t r = 0;
  for (char c : s) {
    uint64_t d;
    if (c >= '0' && c <= '9') {
      d = static_cast<uint64_t>(c - '0');
    } else if (c >= 'a' && c <= 'f') {
      d = static_cast<uint64_t>(c - 'a' + 10);
    } else {
      return false;
    }
    r = (r << 4) | d;
  }
  *v = r;
  return true;
}

}  // namespace vmdedup
