// Fingerprint: the SHA-256 of a block's plaintext (OpenSSL EVP), and the
// helpers to print and compare it.
//
// Sha256Hasher owns an EVP context and the SHA-256 implementation, fetched
// once (the implicit fetch of EVP_sha256() on every init added half the cost
// of hashing a 4 KiB block); use one per thread. The free functions are
// thread-safe.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <span>
#include <string>

struct evp_md_ctx_st;
struct evp_md_st;

namespace vmdedup {

struct Fingerprint {
  std::array<uint8_t, 32> bytes{};
  auto operator<=>(const Fingerprint&) const = default;
  // The first 8 bytes as an integer: well mixed, used for hashing and indexes.
  uint64_t Prefix64() const {
    uint64_t v;
    std::memcpy(&v, bytes.data(), 8);
    return v;
  }
  std::string Hex() const;
};

struct FingerprintHash {
  size_t operator()(const Fingerprint& f) const { return static_cast<size_t>(f.Prefix64()); }
};

class Sha256Hasher {
 public:
  Sha256Hasher();
  ~Sha256Hasher();
  Sha256Hasher(const Sha256Hasher&) = delete;
  Sha256Hasher& operator=(const Sha256Hasher&) = delete;
  Fingerprint Hash(std::span<const uint8_t> data);

 private:
  evp_md_ctx_st* ctx_;
  evp_md_st* md_;
};

// One-shot convenience (allocates a context per call).
Fingerprint Sha256(std::span<const uint8_t> data);

}  // namespace vmdedup
