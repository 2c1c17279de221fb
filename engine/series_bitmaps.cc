// Series bitmap names; see series_bitmaps.h.
#include "engine/series_bitmaps.h"

#include <cstdio>
#include <random>

#include "base/fingerprint.h"

namespace vmdedup {
namespace {

constexpr size_t kNonceDigits = 8;

bool IsLowerHex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }

}  // namespace

std::string SeriesBitmapPrefix(const std::string& repo_id, const std::string& vm,
                               const std::string& disk) {
  std::string key = repo_id;
  key += '\0';
  key += vm;
  key += '\0';
  key += disk;
  const std::string hex = Sha256({reinterpret_cast<const uint8_t*>(key.data()), key.size()}).Hex();
  return "vmdedup." + hex.substr(0, 16) + ".";
}

std::string NewSeriesBitmapName(const std::string& prefix, uint64_t seq) {
  std::random_device rd;
  char nonce[kNonceDigits + 1];
  std::snprintf(nonce, sizeof(nonce), "%08x", static_cast<unsigned>(rd()));
  return prefix + std::to_string(seq) + "." + nonce;
}

std::optional<uint64_t> SeriesBitmapSeq(const std::string& name, const std::string& prefix) {
  if (name.rfind(prefix, 0) != 0) return std::nullopt;
  const size_t dot = name.find('.', prefix.size());
  if (dot == std::string::npos || dot == prefix.size() || dot - prefix.size() > 19 ||
      name.size() - dot - 1 != kNonceDigits)
    return std::nullopt;
  uint64_t seq = 0;
  for (size_t i = prefix.size(); i < dot; i++) {
    if (name[i] < '0' || name[i] > '9') return std::nullopt;
    seq = seq * 10 + static_cast<uint64_t>(name[i] - '0');
  }
  for (size_t i = dot + 1; i < name.size(); i++)
    if (!IsLowerHex(name[i])) return std::nullopt;
  return seq;
}

}  // namespace vmdedup
