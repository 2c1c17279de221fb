// Known-answer tests of the two checksums every stored byte depends on:
// CRC-32C on both of its code paths (the SSE4.2 instruction and the table,
// each called by name so that neither hides behind the other), with the
// vectors of RFC 3720 appendix B.4, and the SHA-256 fingerprint with the
// vectors of FIPS 180-2 appendix B.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "base/crc32c.h"
#include "base/fingerprint.h"

namespace vmdedup {
namespace {

using ExtendFn = uint32_t (*)(uint32_t, const void*, size_t);

struct CrcPath {
  const char* name;
  ExtendFn extend;
};

std::vector<CrcPath> CrcPaths() {
  std::vector<CrcPath> paths = {{"table", &crc32c::ExtendTable}};
  if (crc32c::HaveSse42()) paths.push_back({"sse4.2", &crc32c::ExtendSse42});
  return paths;
}

TEST(Crc32cTest, BothCodePathsAreTestedOnX86) {
#if defined(__x86_64__)
  // Every x86-64 CPU since 2008 has SSE4.2; without it the hardware path
  // below would go untested, which this suite must not do silently.
  EXPECT_TRUE(crc32c::HaveSse42()) << "this CPU lacks SSE4.2: only the table path was tested";
  EXPECT_EQ(CrcPaths().size(), 2u);
#endif
}

// RFC 3720 (iSCSI), appendix B.4, "CRC Examples"; and the check value of
// the Castagnoli CRC ("123456789").
TEST(Crc32cTest, Rfc3720VectorsOnEveryCodePath) {
  std::vector<uint8_t> zeros(32, 0x00), ones(32, 0xff), up(32), down(32);
  for (int i = 0; i < 32; i++) {
    up[i] = static_cast<uint8_t>(i);
    down[i] = static_cast<uint8_t>(31 - i);
  }
  // An iSCSI SCSI Read (10) command PDU.
  const std::vector<uint8_t> pdu = {0x01, 0xc0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                                    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00,
                                    0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00,
                                    0x00, 0x18, 0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                                    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};
  const std::string check = "123456789";
  for (const CrcPath& path : CrcPaths()) {
    SCOPED_TRACE(path.name);
    EXPECT_EQ(path.extend(0, zeros.data(), zeros.size()), 0x8a9136aau);
    EXPECT_EQ(path.extend(0, ones.data(), ones.size()), 0x62a8ab43u);
    EXPECT_EQ(path.extend(0, up.data(), up.size()), 0x46dd794eu);
    EXPECT_EQ(path.extend(0, down.data(), down.size()), 0x113fdb5cu);
    EXPECT_EQ(path.extend(0, pdu.data(), pdu.size()), 0xd9963a56u);
    EXPECT_EQ(path.extend(0, check.data(), check.size()), 0xe3069283u);
    EXPECT_EQ(path.extend(0, nullptr, 0), 0u);
    // Extending in pieces gives the CRC of the whole.
    uint32_t crc = path.extend(0, pdu.data(), 13);
    crc = path.extend(crc, pdu.data() + 13, 1);
    crc = path.extend(crc, pdu.data() + 14, pdu.size() - 14);
    EXPECT_EQ(crc, 0xd9963a56u);
  }
}

// The two paths agree on every length (the 8-byte main loop and the byte
// tail) and every alignment of the input.
TEST(Crc32cTest, CodePathsAgreeOnEveryLengthAndAlignment) {
  std::mt19937 rng(20261207);
  std::vector<uint8_t> data(4096 + 16);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  for (const CrcPath& path : CrcPaths()) {
    SCOPED_TRACE(path.name);
    for (size_t align = 0; align < 8; align++) {
      for (size_t n = 0; n <= 80; n++) {
        ASSERT_EQ(path.extend(7, data.data() + align, n),
                  crc32c::ExtendTable(7, data.data() + align, n))
            << "length " << n << " at offset " << align;
      }
      ASSERT_EQ(path.extend(0, data.data() + align, 4096),
                crc32c::ExtendTable(0, data.data() + align, 4096));
    }
  }
  // And Extend, whichever path it picked, agrees with both.
  EXPECT_EQ(crc32c::Value(data.data(), data.size()),
            crc32c::ExtendTable(0, data.data(), data.size()));
}

TEST(Crc32cTest, MaskRoundTripsAndChangesTheValue) {
  for (uint32_t v : {0u, 1u, 0x8a9136aau, 0xffffffffu, 0xe3069283u}) {
    EXPECT_EQ(crc32c::Unmask(crc32c::Mask(v)), v);
    EXPECT_NE(crc32c::Mask(v), v);
  }
}

std::string Hex(const std::string& s) {
  return Sha256({reinterpret_cast<const uint8_t*>(s.data()), s.size()}).Hex();
}

// FIPS 180-2, appendix B (SHA-256 examples), and the empty message.
TEST(FingerprintTest, Fips180Vectors) {
  EXPECT_EQ(Hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(Hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(Hex(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

// The hasher the backup keeps per thread gives the same answers when it is
// reused, in any order.
TEST(FingerprintTest, AReusedHasherGivesTheSameAnswers) {
  Sha256Hasher h;
  const std::string abc = "abc", empty;
  for (int round = 0; round < 3; round++) {
    EXPECT_EQ(h.Hash({reinterpret_cast<const uint8_t*>(abc.data()), abc.size()}).Hex(),
              "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    EXPECT_EQ(h.Hash({}).Hex(), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  }
  Fingerprint fp = h.Hash({reinterpret_cast<const uint8_t*>(abc.data()), abc.size()});
  EXPECT_EQ(fp.bytes[0], 0xba);
  EXPECT_EQ(fp.bytes[31], 0xad);
  // Prefix64 is the first eight bytes, little-endian.
  EXPECT_EQ(fp.Prefix64(), 0xeacf018fbf1678baull);
}

}  // namespace
}  // namespace vmdedup
