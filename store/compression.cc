// zstd block compression; see compression.h.

#include "store/compression.h"

#include <zstd.h>

#include <cstring>
#include <memory>

namespace vmdedup {

namespace {

// zstd level 1 gives inputs of 16-128 KiB (one tier of its parameter
// table) a hash table of 2^13 entries (32 KiB). For frames of that size a
// table of 2^12 entries pays off: on the non-zero 64 KiB runs of three
// Debian guests it took 8-10 % less CPU and stored 0.9-1.2 % more, and the
// same at 32 and 128 KiB; at 16 KiB and below it was slower, so smaller
// inputs keep zstd's parameters, as do larger ones and other levels
// (docs/benchmarks.md, "zstd's hash table").
constexpr int kTunedHashLog = 12;
constexpr size_t kTunedAbove = 16 * 1024;
constexpr size_t kTunedUpTo = 128 * 1024;

}  // namespace

Compressor::Compressor(int level) : ctx_(ZSTD_createCCtx()), level_(level) {
  if (ctx_ != nullptr &&
      ZSTD_isError(ZSTD_CCtx_setParameter(ctx_, ZSTD_c_compressionLevel, level))) {
    ZSTD_freeCCtx(ctx_);
    ctx_ = nullptr;  // every block is then stored as is
  }
}

Compressor::~Compressor() { ZSTD_freeCCtx(ctx_); }

size_t Compressor::Run(std::span<const uint8_t> in, std::span<uint8_t> out) {
  if (level_ == 1) {
    const bool tuned = in.size() > kTunedAbove && in.size() <= kTunedUpTo;
    const int hash_log = tuned ? kTunedHashLog : 0;  // 0: zstd's own
    if (hash_log != hash_log_) {
      // Parameters may change only between frames: end any frame a failed
      // call left open. An error here stores the input as it is.
      ZSTD_CCtx_reset(ctx_, ZSTD_reset_session_only);
      const size_t r = ZSTD_CCtx_setParameter(ctx_, ZSTD_c_hashLog, hash_log);
      if (ZSTD_isError(r)) return r;
      hash_log_ = hash_log;
    }
  }
  return ZSTD_compress2(ctx_, out.data(), out.size(), in.data(), in.size());
}

Compressor::View Compressor::CompressView(std::span<const uint8_t> in) {
  size_t n = in.size();
  if (ctx_ != nullptr && n > 0) {
    size_t bound = ZSTD_compressBound(n);
    if (bound > out_capacity_) {
      out_ = std::make_unique_for_overwrite<uint8_t[]>(bound);
      out_capacity_ = bound;
    }
    size_t c = Run(in, {out_.get(), out_capacity_});
    // Keep the compressed form only when it saves at least 1/32 of the size.
    if (!ZSTD_isError(c) && c <= n - n / 32) return {Compression::kZstd, {out_.get(), c}};
  }
  return {Compression::kNone, in};
}

size_t Compressor::Bound(size_t n) { return ZSTD_compressBound(n); }

Compressor::View Compressor::CompressInto(std::span<const uint8_t> in, std::span<uint8_t> out) {
  const size_t n = in.size();
  if (ctx_ != nullptr && n > 0) {
    // zstd fails with dstSize_tooSmall when `out` is too small. Keep the
    // compressed form only when it saves at least 1/32 of the size.
    size_t c = Run(in, out);
    if (!ZSTD_isError(c) && c <= n - n / 32) return {Compression::kZstd, {out.data(), c}};
  }
  return {Compression::kNone, in};
}

Compression Compressor::Compress(std::span<const uint8_t> in, std::string* out) {
  View v = CompressView(in);
  out->assign(reinterpret_cast<const char*>(v.bytes.data()), v.bytes.size());
  return v.compression;
}

namespace {

struct DCtxDeleter {
  void operator()(ZSTD_DCtx* ctx) const { ZSTD_freeDCtx(ctx); }
};

ZSTD_DCtx* ThreadDCtx() {
  thread_local std::unique_ptr<ZSTD_DCtx, DCtxDeleter> ctx(ZSTD_createDCtx());
  return ctx.get();
}

// The payload must hold exactly raw_len bytes: stored as is, or one zstd
// frame declaring that size. Checked before anything is allocated or written.
Status CheckPayloadSize(Compression c, std::span<const uint8_t> payload, size_t raw_len,
                        const std::string& what) {
  switch (c) {
    case Compression::kNone:
      if (payload.size() != raw_len) {
        return Status::Corruption(what + ": stored block has " + std::to_string(payload.size()) +
                                  " bytes, expected " + std::to_string(raw_len));
      }
      return Status::OK();
    case Compression::kZstd: {
      unsigned long long declared = ZSTD_getFrameContentSize(payload.data(), payload.size());
      if (declared == ZSTD_CONTENTSIZE_ERROR || declared == ZSTD_CONTENTSIZE_UNKNOWN) {
        return Status::Corruption(what + ": not a zstd frame with a content size");
      }
      if (declared != raw_len) {
        return Status::Corruption(what + ": zstd frame declares " + std::to_string(declared) +
                                  " bytes, expected " + std::to_string(raw_len));
      }
      return Status::OK();
    }
  }
  return Status::Corruption(what + ": unknown compression " +
                            std::to_string(static_cast<unsigned>(c)));
}

// Decodes a payload that CheckPayloadSize accepted for out.size() bytes.
Status DecodeCheckedPayload(Compression c, std::span<const uint8_t> payload, std::span<uint8_t> out,
                            const std::string& what) {
  const size_t raw_len = out.size();
  if (c == Compression::kNone) {
    if (raw_len > 0) std::memcpy(out.data(), payload.data(), raw_len);  // data() may be null
    return Status::OK();
  }
  ZSTD_DCtx* ctx = ThreadDCtx();
  if (ctx == nullptr) return Status::IOError(what + ": cannot allocate a zstd context");
  // Capacity raw_len: a frame that would decompress to more fails.
  size_t r = ZSTD_decompressDCtx(ctx, out.data(), raw_len, payload.data(), payload.size());
  if (ZSTD_isError(r) || r != raw_len) {
    return Status::Corruption(what + ": zstd: " +
                              (ZSTD_isError(r)
                                   ? std::string(ZSTD_getErrorName(r))
                                   : "decompressed " + std::to_string(r) + " bytes, expected " +
                                         std::to_string(raw_len)));
  }
  return Status::OK();
}

}  // namespace

Status DecompressInto(Compression c, std::span<const uint8_t> payload, std::span<uint8_t> out,
                      const std::string& what) {
  RETURN_IF_ERROR(CheckPayloadSize(c, payload, out.size(), what));
  return DecodeCheckedPayload(c, payload, out, what);
}

Status DecompressPrefix(Compression c, std::span<const uint8_t> payload, uint32_t raw_len,
                        std::span<uint8_t> out, const std::string& what) {
  if (out.size() > raw_len) {
    return Status::InvalidArgument(what + ": asked for " + std::to_string(out.size()) +
                                   " bytes of a " + std::to_string(raw_len) + "-byte payload");
  }
  RETURN_IF_ERROR(CheckPayloadSize(c, payload, raw_len, what));
  if (out.size() == raw_len) return DecodeCheckedPayload(c, payload, out, what);
  if (c == Compression::kNone) {
    if (!out.empty()) std::memcpy(out.data(), payload.data(), out.size());
    return Status::OK();
  }
  ZSTD_DCtx* ctx = ThreadDCtx();
  if (ctx == nullptr) return Status::IOError(what + ": cannot allocate a zstd context");
  ZSTD_DCtx_reset(ctx, ZSTD_reset_session_only);
  ZSTD_outBuffer ob{out.data(), out.size(), 0};
  ZSTD_inBuffer ib{payload.data(), payload.size(), 0};
  while (ob.pos < ob.size) {
    const size_t before_in = ib.pos, before_out = ob.pos;
    size_t r = ZSTD_decompressStream(ctx, &ob, &ib);
    if (ZSTD_isError(r))
      return Status::Corruption(what + ": zstd: " + std::string(ZSTD_getErrorName(r)));
    if (r == 0 && ob.pos < ob.size) break;                   // the frame ended early
    if (ib.pos == before_in && ob.pos == before_out) break;  // no progress: input exhausted
  }
  // Leave the context clean for the next one-shot call on this thread.
  ZSTD_DCtx_reset(ctx, ZSTD_reset_session_only);
  if (ob.pos != out.size()) {
    return Status::Corruption(what + ": zstd frame ended after " + std::to_string(ob.pos) +
                              " bytes, expected at least " + std::to_string(out.size()));
  }
  return Status::OK();
}

Status Decompress(Compression c, std::span<const uint8_t> payload, uint32_t raw_len,
                  std::string* out, const std::string& what) {
  RETURN_IF_ERROR(CheckPayloadSize(c, payload, raw_len, what));
  out->resize(raw_len);
  Status st =
      DecodeCheckedPayload(c, payload, {reinterpret_cast<uint8_t*>(out->data()), raw_len}, what);
  if (!st.ok()) out->clear();
  return st;
}

}  // namespace vmdedup
