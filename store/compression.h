// Block compression (zstd). Compressor keeps a zstd context and an output
// buffer and is used by one thread at a time; Decompress is thread-safe
// (thread-local context).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "base/status.h"

struct ZSTD_CCtx_s;

namespace vmdedup {

enum class Compression : uint8_t { kNone = 0, kZstd = 1 };

class Compressor {
 public:
  // `level` is a zstd level; at level 1, inputs of 16-128 KiB use a smaller
  // hash table than zstd's default (compression.cc says why).
  explicit Compressor(int level);
  ~Compressor();
  Compressor(const Compressor&) = delete;
  Compressor& operator=(const Compressor&) = delete;
  // Compresses `in` into `out` (replacing its content). When compression does
  // not save at least 1/32 of the size, stores `in` as is and returns kNone.
  Compression Compress(std::span<const uint8_t> in, std::string* out);

  // The same choice and bytes as Compress, without a copy: `bytes` is the
  // compressed form in the compressor's own buffer (kZstd; valid until the
  // next call) or `in` itself (kNone).
  struct View {
    Compression compression;
    std::span<const uint8_t> bytes;
  };
  View CompressView(std::span<const uint8_t> in);
  // The same choice, compressed straight into `out` (kZstd: a prefix of
  // `out`); kNone (`in` itself) also when the compressed form does not fit.
  // With Bound(in.size()) bytes of room the bytes are CompressView's; with
  // less, zstd may store some literals uncompressed to fit.
  View CompressInto(std::span<const uint8_t> in, std::span<uint8_t> out);
  // The most bytes zstd may need for `n` bytes of input.
  static size_t Bound(size_t n);

 private:
  // Compresses with the context's parameters; a zstd result code.
  size_t Run(std::span<const uint8_t> in, std::span<uint8_t> out);

  ZSTD_CCtx_s* ctx_;
  int level_;
  int hash_log_ = 0;  // the hashLog set on ctx_; 0 is zstd's own choice
  // Output buffer, grown to ZSTD_compressBound of the largest input so far;
  // never zero-filled.
  std::unique_ptr<uint8_t[]> out_;
  size_t out_capacity_ = 0;
};

// Decompresses a payload whose plaintext is exactly `raw_len` bytes; any
// mismatch or zstd error is Corruption naming `what`.
Status Decompress(Compression c, std::span<const uint8_t> payload, uint32_t raw_len,
                  std::string* out, const std::string& what);
// The same into `out`, which holds exactly the plaintext's length: no
// intermediate copy (a reader decoding straight into its output buffer).
Status DecompressInto(Compression c, std::span<const uint8_t> payload, std::span<uint8_t> out,
                      const std::string& what);
// The first out.size() bytes of a payload whose plaintext is `raw_len` bytes
// (out.size() <= raw_len), for a reader that must not write past them. zstd
// stops after the zstd block that fills `out` (blocks hold up to 128 KiB; the
// backup writes a frame as one, so this saves no decoding today). The
// payload's declared size is checked; the rest of the frame is not decoded,
// so the caller verifies what it got (the record's crc covers the payload,
// the fingerprint the plaintext).
Status DecompressPrefix(Compression c, std::span<const uint8_t> payload, uint32_t raw_len,
                        std::span<uint8_t> out, const std::string& what);

}  // namespace vmdedup
