#include "base/fingerprint.h"

#include <openssl/evp.h>

#include <cstdlib>

namespace vmdedup {

std::string Fingerprint::Hex() const {
  static const char* kDigits = "0123456789abcdef";
  std::string s(64, '0');
  for (size_t i = 0; i < bytes.size(); i++) {
    s[2 * i] = kDigits[bytes[i] >> 4];
    s[2 * i + 1] = kDigits[bytes[i] & 0xf];
  }
  return s;
}

Sha256Hasher::Sha256Hasher()
    : ctx_(EVP_MD_CTX_new()), md_(EVP_MD_fetch(nullptr, "SHA256", nullptr)) {
  if (ctx_ == nullptr || md_ == nullptr) std::abort();
}

Sha256Hasher::~Sha256Hasher() {
  EVP_MD_CTX_free(ctx_);
  EVP_MD_free(md_);
}

Fingerprint Sha256Hasher::Hash(std::span<const uint8_t> data) {
  Fingerprint fp;
  unsigned int len = 0;
  if (EVP_DigestInit_ex2(ctx_, md_, nullptr) != 1 ||
      EVP_DigestUpdate(ctx_, data.data(), data.size()) != 1 ||
      EVP_DigestFinal_ex(ctx_, fp.bytes.data(), &len) != 1 || len != fp.bytes.size()) {
    std::abort();  // only fails on allocation failure inside OpenSSL
  }
  return fp;
}

Fingerprint Sha256(std::span<const uint8_t> data) {
  Sha256Hasher h;
  return h.Hash(data);
}

}  // namespace vmdedup
