// FastDivisor (src/fast_divmod.h): the multiply-and-shift quotient the CUDA row maps use must
// equal integer division for every divisor and dividend it accepts. The device computes the
// same formula (__umulhi in place of the 64-bit product), so checking it here covers the math.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "fast_divmod.h"

using modnorm::FastDivisor;

namespace {

constexpr int64_t kLimit = FastDivisor::kLimit;

void expect_exact(const FastDivisor& f, int64_t d, int64_t n) {
  ASSERT_TRUE(FastDivisor::fits(n)) << n;
  ASSERT_EQ(static_cast<int64_t>(f.quotient(static_cast<uint32_t>(n))), n / d) << "n=" << n << " d=" << d;
}

// Dividends where a wrong multiplier shows first: around multiples of d and the top of the range.
std::vector<int64_t> edge_dividends(int64_t d) {
  std::vector<int64_t> ns = {0, 1, d - 1, d, d + 1, kLimit - 1, kLimit - 2, kLimit - d};
  const int64_t top = (kLimit - 1) / d * d;
  for (int64_t k : {top, top - d, top - 2 * d}) {
    for (int64_t delta : {-1, 0, 1}) ns.push_back(k + delta);
  }
  std::vector<int64_t> in_range;
  for (int64_t n : ns) {
    if (n >= 0 && n < kLimit) in_range.push_back(n);
  }
  return in_range;
}

}  // namespace

TEST(FastDivisor, EveryDividendUpTo65536ForSmallDivisors) {
  for (int64_t d = 1; d <= 300; ++d) {
    const FastDivisor f = FastDivisor::make(d);
    ASSERT_TRUE(f.usable());
    for (int64_t n = 0; n < 65536; ++n) expect_exact(f, d, n);
    for (int64_t n : edge_dividends(d)) expect_exact(f, d, n);
  }
}

TEST(FastDivisor, PowersOfTwoAndTheirNeighbours) {
  for (int s = 0; s <= 30; ++s) {
    for (int64_t delta : {-1, 0, 1}) {
      const int64_t d = (int64_t{1} << s) + delta;
      if (d < 1 || d >= kLimit) continue;
      const FastDivisor f = FastDivisor::make(d);
      ASSERT_TRUE(f.usable()) << d;
      for (int64_t n : edge_dividends(d)) expect_exact(f, d, n);
    }
  }
  const FastDivisor largest = FastDivisor::make(kLimit - 1);
  ASSERT_TRUE(largest.usable());
  for (int64_t n : edge_dividends(kLimit - 1)) expect_exact(largest, kLimit - 1, n);
}

TEST(FastDivisor, RandomDivisorsAndDividends) {
  std::random_device seed;  // fresh values every run; the failing pair is printed
  std::mt19937_64 rng(seed());
  std::uniform_int_distribution<int> bits(1, 31);
  for (int trial = 0; trial < 20000; ++trial) {
    // Divisors spread over every magnitude, not just the large ones a uniform draw gives.
    const int64_t d = std::max<int64_t>(1, static_cast<int64_t>(rng() % (uint64_t{1} << bits(rng))));
    const FastDivisor f = FastDivisor::make(d);
    ASSERT_TRUE(f.usable()) << d;
    for (int k = 0; k < 50; ++k) expect_exact(f, d, static_cast<int64_t>(rng() % kLimit));
    for (int64_t n : edge_dividends(d)) expect_exact(f, d, n);
  }
}

TEST(FastDivisor, OutOfRangeDivisorsAndDividendsAreRefused) {
  EXPECT_FALSE(FastDivisor::make(0).usable());
  EXPECT_FALSE(FastDivisor::make(-3).usable());
  EXPECT_FALSE(FastDivisor::make(kLimit).usable());
  EXPECT_FALSE(FastDivisor::make(int64_t{1} << 40).usable());
  EXPECT_FALSE(FastDivisor{}.usable());
  EXPECT_TRUE(FastDivisor::fits(kLimit - 1));
  EXPECT_FALSE(FastDivisor::fits(kLimit));
  EXPECT_FALSE(FastDivisor::fits(-1));
}
