// Tests for engine/block_scan.h.
#include "engine/block_scan.h"

#include <gtest/gtest.h>

#include <vector>

namespace vmdedup {
namespace {

TEST(BlockScanTest, EmptyIsZero) { EXPECT_TRUE(IsAllZero({})); }

// Every length up to a few words at every alignment, zero and with one
// nonzero byte anywhere (head, body and tail paths).
TEST(BlockScanTest, AllOffsetsLengthsAndPositions) {
  std::vector<uint8_t> buf(512 + 16, 0);
  for (size_t offset = 0; offset < 16; ++offset) {
    for (size_t len = 0; len <= 300; ++len) {
      std::span<uint8_t> s(buf.data() + offset, len);
      ASSERT_TRUE(IsAllZero(s)) << offset << "+" << len;
      for (size_t pos = 0; pos < len; ++pos) {
        for (uint8_t v : {uint8_t{1}, uint8_t{0x80}}) {
          s[pos] = v;
          ASSERT_FALSE(IsAllZero(s)) << offset << "+" << len << " @" << pos;
          s[pos] = 0;
        }
      }
    }
  }
}

TEST(BlockScanTest, NeighboursOutsideTheSpanAreIgnored) {
  std::vector<uint8_t> buf(4096 + 2, 0xff);
  std::fill(buf.begin() + 1, buf.end() - 1, 0);
  EXPECT_TRUE(IsAllZero(std::span(buf).subspan(1, 4096)));
  EXPECT_FALSE(IsAllZero(std::span(buf).subspan(0, 4097)));
  EXPECT_FALSE(IsAllZero(std::span(buf).subspan(1, 4097)));
}

TEST(BlockScanTest, LargeBlocks) {
  std::vector<uint8_t> buf(2 << 20, 0);
  EXPECT_TRUE(IsAllZero(buf));
  buf.back() = 1;
  EXPECT_FALSE(IsAllZero(buf));
  buf.back() = 0;
  buf[1 << 20] = 0x40;
  EXPECT_FALSE(IsAllZero(buf));
}

}  // namespace
}  // namespace vmdedup
