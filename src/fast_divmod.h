// Division by a run-time constant as a multiply and a shift (Granlund and Montgomery, "Division
// by invariant integers using multiplication", 1994), for the row maps' divisions.
//
// Why: the CUDA kernels map every row to its modulation row with one or more divisions by sizes
// fixed per launch. A 32-bit integer division is ~20 instructions on the GPU (no divide unit),
// and each warp of a one-row-per-block forward paid two of them per row (scale and shift), about
// as many instructions as the row's 16 elements a thread cost in arithmetic. With the multiplier
// computed once on the host the quotient costs a multiply-high, an add and a shift.
//
// Exact for every dividend 0 <= n < 2^31 and divisor 1 <= d < 2^31: with s = ceil(log2 d) and
// m = floor(2^32 (2^s - d) / d) + 1, n / d == (mulhi(n, m) + n) >> s. Callers keep larger
// values on a plain division (`usable`, `fits`).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MODNORM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MODNORM_HOST_DEVICE inline
#endif

namespace modnorm {

struct FastDivisor {
  uint32_t magic = 0;
  uint32_t shift = 0;
  uint32_t divisor = 0;  // 0: not usable (divisor out of range), take the plain division

  static constexpr int64_t kLimit = int64_t{1} << 31;  // divisors and dividends below this

  static FastDivisor make(int64_t d) {
    FastDivisor f;
    if (d < 1 || d >= kLimit) return f;
    uint32_t s = 0;
    while ((int64_t{1} << s) < d) ++s;
    const uint64_t numerator = (uint64_t{1} << 32) * ((uint64_t{1} << s) - static_cast<uint64_t>(d));
    f.magic = static_cast<uint32_t>(numerator / static_cast<uint64_t>(d) + 1);
    f.shift = s;
    f.divisor = static_cast<uint32_t>(d);
    return f;
  }

  MODNORM_HOST_DEVICE bool usable() const { return divisor != 0; }
  MODNORM_HOST_DEVICE static bool fits(int64_t n) { return static_cast<uint64_t>(n) < static_cast<uint64_t>(kLimit); }

  // n / divisor for 0 <= n < 2^31 (usable() and fits(n) hold).
  MODNORM_HOST_DEVICE uint32_t quotient(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, magic);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(n) * magic) >> 32);
#endif
    return (hi + n) >> shift;  // hi <= n < 2^31: the sum fits in 32 bits
  }
};

}  // namespace modnorm

#undef MODNORM_HOST_DEVICE
