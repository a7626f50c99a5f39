// Device-side building blocks shared by the forward and backward kernels: element conversions,
// vector loads/stores of x's dtype (compile time) and of the weight/modulation dtypes (run time),
// broadcast maps, and team reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../fast_divmod.h"
#include "modnorm/modnorm.h"

namespace modnorm::cuda_detail {

// DType values as plain ints, for run-time switches inside kernels.
constexpr int kDtF32 = static_cast<int>(DType::kFloat32);
constexpr int kDtF16 = static_cast<int>(DType::kFloat16);
constexpr int kDtBF16 = static_cast<int>(DType::kBFloat16);

template <DType T>
__host__ __device__ constexpr int elem_bytes() {
  return T == DType::kFloat32 ? 4 : 2;
}

// Register types that move N bytes in one memory instruction.
template <int BYTES>
struct RawOf;
template <>
struct RawOf<16> {
  using type = uint4;
};
template <>
struct RawOf<8> {
  using type = uint2;
};
template <>
struct RawOf<4> {
  using type = unsigned int;
};
template <>
struct RawOf<2> {
  using type = unsigned short;
};

// VEC elements of x's dtype as one raw register value.
template <DType T, int VEC>
using XRaw = typename RawOf<VEC * elem_bytes<T>()>::type;

__device__ __forceinline__ void to_words(const uint4& r, unsigned* w) {
  w[0] = r.x;
  w[1] = r.y;
  w[2] = r.z;
  w[3] = r.w;
}
__device__ __forceinline__ void to_words(const uint2& r, unsigned* w) {
  w[0] = r.x;
  w[1] = r.y;
}
__device__ __forceinline__ void to_words(unsigned int r, unsigned* w) { w[0] = r; }
__device__ __forceinline__ void to_words(unsigned short r, unsigned* w) { w[0] = r; }

__device__ __forceinline__ void from_words(const unsigned* w, uint4& r) {
  r = make_uint4(w[0], w[1], w[2], w[3]);
}
__device__ __forceinline__ void from_words(const unsigned* w, uint2& r) { r = make_uint2(w[0], w[1]); }
__device__ __forceinline__ void from_words(const unsigned* w, unsigned int& r) { r = w[0]; }
__device__ __forceinline__ void from_words(const unsigned* w, unsigned short& r) {
  r = static_cast<unsigned short>(w[0]);
}

template <DType T>
__device__ __forceinline__ float bits_to_float(unsigned bits) {
  if constexpr (T == DType::kBFloat16) {
    return __uint_as_float(bits << 16);
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  }
}

template <DType T>
__device__ __forceinline__ unsigned float_to_bits(float f) {
  if constexpr (T == DType::kBFloat16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  } else {
    return __half_as_ushort(__float2half_rn(f));
  }
}

// Round to T and back: the value an unfused module would have stored in T.
template <DType T>
__device__ __forceinline__ float round_to(float f) {
  if constexpr (T == DType::kFloat32) {
    return f;
  } else {
    return bits_to_float<T>(float_to_bits<T>(f));
  }
}

// round_to on two values with one packed conversion (cvt.rn.bf16x2.f32 / cvt.rn.f16x2.f32): the
// same values, half the conversion instructions (F2F runs at 16 per clock per SM on sm_90).
template <DType T>
__device__ __forceinline__ void round_pair(float& lo, float& hi) {
  if constexpr (T == DType::kBFloat16) {
    unsigned u;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(u) : "f"(hi), "f"(lo));  // hi in the upper half
    lo = __uint_as_float(u << 16);
    hi = __uint_as_float(u & 0xffff0000u);
  } else if constexpr (T == DType::kFloat16) {
    const __half2 h = __floats2half2_rn(lo, hi);
    lo = __low2float(h);
    hi = __high2float(h);
  }
}

template <DType T, int N, typename Raw>
__device__ __forceinline__ void unpack(const Raw& raw, float* f) {
  constexpr int kWords = (N * elem_bytes<T>() + 3) / 4;
  unsigned w[kWords];
  to_words(raw, w);
  if constexpr (T == DType::kFloat32) {
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = __uint_as_float(w[i]);
  } else if constexpr (N == 1) {
    f[0] = bits_to_float<T>(w[0] & 0xffffu);
  } else {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      f[2 * i] = bits_to_float<T>(w[i] & 0xffffu);
      f[2 * i + 1] = bits_to_float<T>(w[i] >> 16);
    }
  }
}

template <DType T, int N, typename Raw>
__device__ __forceinline__ Raw pack(const float* f) {
  constexpr int kWords = (N * elem_bytes<T>() + 3) / 4;
  unsigned w[kWords];
  if constexpr (T == DType::kFloat32) {
#pragma unroll
    for (int i = 0; i < N; ++i) w[i] = __float_as_uint(f[i]);
  } else if constexpr (N == 1) {
    w[0] = float_to_bits<T>(f[0]);
  } else {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      w[i] = float_to_bits<T>(f[2 * i]) | (float_to_bits<T>(f[2 * i + 1]) << 16);
    }
  }
  Raw r;
  from_words(w, r);
  return r;
}

template <DType T>
__device__ __forceinline__ const char* elem_ptr(const void* base, int64_t idx) {
  return static_cast<const char*>(base) + idx * elem_bytes<T>();
}
template <DType T>
__device__ __forceinline__ char* elem_ptr(void* base, int64_t idx) {
  return static_cast<char*>(base) + idx * elem_bytes<T>();
}

// N elements of dtype T starting at element idx, through the read-only cache (weights and
// modulation rows are re-read by many rows). The caller guarantees min(16, N*size) alignment.
template <DType T, int N>
__device__ __forceinline__ void load_elems(const void* base, int64_t idx, float* f) {
  constexpr int kBytes = N * elem_bytes<T>();
  constexpr int kChunkBytes = kBytes > 16 ? 16 : kBytes;
  constexpr int kPerChunk = kChunkBytes / elem_bytes<T>();
  using Raw = typename RawOf<kChunkBytes>::type;
  const Raw* p = reinterpret_cast<const Raw*>(elem_ptr<T>(base, idx));
#pragma unroll
  for (int c = 0; c < N / kPerChunk; ++c) unpack<T, kPerChunk>(__ldg(p + c), f + c * kPerChunk);
}

template <int N>
__device__ __forceinline__ void load_any(const void* base, int dtype, int64_t idx, float* f) {
  if (dtype == kDtF32) {
    load_elems<DType::kFloat32, N>(base, idx, f);
  } else if (dtype == kDtBF16) {
    load_elems<DType::kBFloat16, N>(base, idx, f);
  } else {
    load_elems<DType::kFloat16, N>(base, idx, f);
  }
}

// Stores N floats as dtype T; `vectorized` false falls back to one store per element (outputs
// whose base the caller could not prove aligned).
template <DType T, int N>
__device__ __forceinline__ void store_elems(void* base, int64_t idx, const float* f, bool vectorized) {
  constexpr int kBytes = N * elem_bytes<T>();
  constexpr int kChunkBytes = kBytes > 16 ? 16 : kBytes;
  constexpr int kPerChunk = kChunkBytes / elem_bytes<T>();
  if (vectorized) {
    using Raw = typename RawOf<kChunkBytes>::type;
    Raw* p = reinterpret_cast<Raw*>(elem_ptr<T>(base, idx));
#pragma unroll
    for (int c = 0; c < N / kPerChunk; ++c) p[c] = pack<T, kPerChunk, Raw>(f + c * kPerChunk);
  } else {
    using Raw1 = typename RawOf<elem_bytes<T>()>::type;
    Raw1* p = reinterpret_cast<Raw1*>(elem_ptr<T>(base, idx));
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = pack<T, 1, Raw1>(f + i);
  }
}

template <int N>
__device__ __forceinline__ void store_any(void* base, int dtype, int64_t idx, const float* f,
                                          bool vectorized) {
  if (dtype == kDtF32) {
    store_elems<DType::kFloat32, N>(base, idx, f, vectorized);
  } else if (dtype == kDtBF16) {
    store_elems<DType::kBFloat16, N>(base, idx, f, vectorized);
  } else {
    store_elems<DType::kFloat16, N>(base, idx, f, vectorized);
  }
}

// norm(x) for one element, rounded where the casting mode rounds (SPEC 3).
template <CastingMode M, DType T>
__device__ __forceinline__ float norm_value(float xhat, float w) {
  if constexpr (M == CastingMode::kLlama) {
    return round_to<T>(xhat) * w;
  } else if constexpr (M == CastingMode::kGemma) {
    return round_to<T>(xhat * w);
  } else {
    return xhat * w;
  }
}

// The weight factor dweight accumulates: the value the forward multiplied the weight with.
template <CastingMode M, DType T>
__device__ __forceinline__ float weight_factor(float xhat) {
  if constexpr (M == CastingMode::kLlama) {
    return round_to<T>(xhat);
  } else {
    return xhat;
  }
}

// RowMap (modnorm.h) in a kernel-parameter form, plus the blocked fast path.
struct DevMap {
  int ndim = 0;
  int blocked = 0;
  int64_t size[kMaxDims] = {};
  int64_t stride[kMaxDims] = {};
  int64_t grad_stride[kMaxDims] = {};
  int64_t rows_per_distinct = 1;
  int64_t distinct_rows = 1;
  int64_t block_stride = 0;       // element offset per block of rows_per_distinct rows
  int64_t block_grad_stride = 0;  // gradient row per block of rows_per_distinct rows
  // Multipliers for the divisions below (host-made, to_dev_map): size[i] and rows_per_distinct.
  FastDivisor size_div[kMaxDims];
  FastDivisor block_div;
};

// q = a / b, r = a % b for non-negative a, positive b. kFast: a multiply and a shift where the
// host made b's multiplier and a < 2^31 (the common case; fast_divmod.h). Else a 32-bit division
// when both fit, else 64-bit (a long subroutine).
// The one-row kernels map once per row per thread and take kFast (two 32-bit divisions a row were
// ~70 instructions a warp; the forward gained under 1%: it is not instruction-bound). Kernels that
// map once per block keep the division: it costs them nothing, and the extra code alone moved the
// lean kernel's times both ways (wan14b backward -6 us, ltx13b +1 us; performance log, session 15).
template <bool kFast>
__device__ __forceinline__ void divmod(int64_t a, int64_t b, const FastDivisor& fb, int64_t& q,
                                       int64_t& r) {
  if (kFast && fb.usable() && FastDivisor::fits(a)) {
    const uint32_t q32 = fb.quotient(static_cast<uint32_t>(a));
    q = q32;
    r = static_cast<int64_t>(static_cast<uint32_t>(a) - q32 * fb.divisor);
  } else if (((static_cast<uint64_t>(a) | static_cast<uint64_t>(b)) >> 32) == 0) {
    const uint32_t q32 = static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
    q = q32;
    r = static_cast<int64_t>(static_cast<uint32_t>(a) - q32 * static_cast<uint32_t>(b));
  } else {
    q = a / b;
    r = a - q * b;
  }
}

template <bool kFast = true>
__device__ __forceinline__ int64_t map_offset(const DevMap& m, int64_t row) {
  int64_t q, r;
  if (m.blocked) {
    divmod<kFast>(row, m.rows_per_distinct, m.block_div, q, r);
    return q * m.block_stride;
  }
  int64_t off = 0;
  for (int i = m.ndim - 1; i >= 0; --i) {
    divmod<kFast>(row, m.size[i], m.size_div[i], q, r);
    row = q;
    off += r * m.stride[i];
  }
  return off;
}

__device__ __forceinline__ int64_t map_grad_row(const DevMap& m, int64_t row) {
  int64_t q, r;
  if (m.blocked) {
    divmod<true>(row, m.rows_per_distinct, m.block_div, q, r);
    return q * m.block_grad_stride;
  }
  int64_t g = 0;
  for (int i = m.ndim - 1; i >= 0; --i) {
    divmod<true>(row, m.size[i], m.size_div[i], q, r);
    row = q;
    g += r * m.grad_stride[i];
  }
  return g;
}

// The k-th x row reading gradient row g (RowMap::nth_row_of).
__device__ __forceinline__ int64_t map_nth_row(const DevMap& m, int64_t g, int64_t k) {
  int64_t row = 0;
  int64_t row_stride = 1;
  for (int i = m.ndim - 1; i >= 0; --i) {
    int64_t digit;
    if (m.grad_stride[i] != 0) {
      digit = (g / m.grad_stride[i]) % m.size[i];
    } else {
      digit = k % m.size[i];
      k /= m.size[i];
    }
    row += digit * row_stride;
    row_stride *= m.size[i];
  }
  return row;
}

// The rows a block of TEAMS teams walks, TEAMS rows per step: begin, begin + step, ... below end,
// when blocks come blocks_per_group to a group of group_rows consecutive rows. Contiguous: the
// block's own range of rows_per_block rows, the last ones clipped to their group, step TEAMS.
// Interleaved: the blocks of a group take turns, chunk sub, sub + blocks_per_group, ... of the
// group, so the rows in flight across the GPU at any moment lie close together in memory, as in a
// copy kernel.
struct RowWalk {
  int64_t begin, end, step;
};
template <int TEAMS>
__device__ __forceinline__ RowWalk block_row_walk(int64_t rows, int64_t group_rows,
                                                  int64_t blocks_per_group, int64_t rows_per_block,
                                                  bool interleave) {
  const int64_t group = blockIdx.x / blocks_per_group;
  const int64_t sub = blockIdx.x - group * blocks_per_group;
  const int64_t group_begin = group * group_rows;
  const int64_t group_end = min(group_begin + group_rows, rows);
  if (interleave) {
    return {min(group_begin + sub * TEAMS, group_end), group_end, blocks_per_group * TEAMS};
  }
  const int64_t begin = min(group_begin + sub * rows_per_block, group_end);
  return {begin, min(begin + rows_per_block, group_end), TEAMS};
}

// The contiguous range [begin, end) of block_row_walk.
struct RowRange {
  int64_t begin, end;
};
__device__ __forceinline__ RowRange block_rows(int64_t rows, int64_t group_rows,
                                               int64_t blocks_per_group, int64_t rows_per_block) {
  const RowWalk w = block_row_walk<1>(rows, group_rows, blocks_per_group, rows_per_block, false);
  return {w.begin, w.end};
}

// This lane's NV vectors lane + i * tpr of the x row at element `offset`, through the read-only
// cache; none when !active.
template <DType XT, typename Raw, int NV>
__device__ __forceinline__ void load_x_row(const void* x, int64_t offset, bool active, int lane,
                                           int tpr, int dim_vecs, Raw (&xr)[NV]) {
  const Raw* row = reinterpret_cast<const Raw*>(elem_ptr<XT>(x, offset));
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int v = lane + i * tpr;
    if (active && v < dim_vecs) xr[i] = __ldg(row + v);
  }
}

// This thread's share of a row's sum of squares: its NV vectors lane + i * tpr of x.
template <DType XT, int VEC, int NV, typename Raw>
__device__ __forceinline__ float sum_squares(const Raw (&xr)[NV], bool active, int lane, int tpr,
                                             int dim_vecs) {
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    if (active && lane + i * tpr < dim_vecs) {
      float f[VEC];
      unpack<XT, VEC>(xr[i], f);
#pragma unroll
      for (int e = 0; e < VEC; ++e) ss += f[e] * f[e];
    }
  }
  return ss;
}

// Sum over the TPR threads of a team. Every lane gets the same bits (xor butterflies add the
// same pairs in each lane; the cross-warp step reads the partials in one fixed order).
// TPR > 32 needs the whole block on the call (one team per block) and `red` of 32 floats.
template <int TPR>
__device__ __forceinline__ float team_sum(float v, float* red) {
  const int kWarpSpan = TPR < 32 ? TPR : 32;
#pragma unroll
  for (int o = kWarpSpan / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if constexpr (TPR > 32) {
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) red[warp] = v;
    __syncthreads();
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < TPR / 32; ++i) t += red[i];
    __syncthreads();  // red is reused by the next row
    return t;
  } else {
    (void)red;
    return v;
  }
}

// ---------------------------------------------------------------------------------------------
// Asynchronous row staging (cp.async, sm_80+): each thread copies its own 16-byte vectors of a
// future row into its own shared-memory slots and later reads back only those slots, so the ring
// needs no barrier; the copies hold no registers while in flight. .cg bypasses L1, which stays
// free for the weight and shared modulation vectors every row re-reads.
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src)
               : "memory");
}
__device__ __forceinline__ void cp_async_8(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_u32(dst)), "l"(src)
               : "memory");
}
// 16 bytes through L1 (.ca): for weight and shared modulation rows that other rows on this SM
// read too.
__device__ __forceinline__ void cp_async_16_ca(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src)
               : "memory");
}
// 8, 16 or 32 bytes of a weight/modulation vector through L1, aligned to min(16, bytes).
__device__ __forceinline__ void cp_async_vec_ca(char* dst, const char* src, int bytes) {
  if (bytes == 8) {
    cp_async_8(dst, src);
  } else {
    cp_async_16_ca(dst, src);
    if (bytes == 32) cp_async_16_ca(dst + 16, src + 16);
  }
}
// 8, 16 or 32 bytes (one vector of a modulation operand), aligned to min(16, bytes).
__device__ __forceinline__ void cp_async_vec(char* dst, const char* src, int bytes) {
  if (bytes == 8) {
    cp_async_8(dst, src);
  } else {
    cp_async_16(dst, src);
    if (bytes == 32) cp_async_16(dst + 16, src + 16);
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// Waits until at most stages - 1 groups are pending (stages in 2..4).
__device__ __forceinline__ void cp_async_wait_ring(int stages) {
  if (stages >= 4) {
    cp_async_wait<3>();
  } else if (stages == 3) {
    cp_async_wait<2>();
  } else {
    cp_async_wait<1>();
  }
}

// ---------------------------------------------------------------------------------------------
// Programmatic dependent launch (sm_90+). A kernel launched with programmatic stream
// serialization may start while the kernel before it in the stream drains: it must call
// wait_for_prior_grid before it reads anything that kernel wrote (the wait returns once that
// kernel has finished and its writes are visible), and no block may return before its wait.
// allow_dependent_launch lets the next such kernel start early. Both are no-ops before sm_90 and
// for kernels launched without the attribute (programmatic_launches allows the attribute only
// where the kernels were compiled for sm_90+).
__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------------
// Row rings filled by bulk copies (TMA, sm_90+): one thread copies a whole contiguous row into a
// shared-memory stage with one instruction and an mbarrier counts its bytes in, so a block keeps
// several rows in flight without holding them in registers or spending issue slots on them.
// Every address and size must be a multiple of 16 bytes.
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count)
               : "memory");
}
// Makes initialized barriers visible to the async proxy (the bulk copies' completions).
__device__ __forceinline__ void fence_mbar_init() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_expect_bytes(uint64_t* bar, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
#endif
}
// Waits for the phase `parity` of the barrier at shared address `bar` to complete.
__device__ __forceinline__ void mbar_wait_at(unsigned bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned done;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
#else
  __trap();  // rings are only launched on sm_90+
#endif
}
// 16 bytes from shared address `addr`. Volatile, so it stays after the barrier wait before it;
// a shared-window address computed once per block spares the loop the generic-to-shared
// conversion of every staged load.
__device__ __forceinline__ uint4 load_shared_16(unsigned addr) {
  uint4 r;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "r"(addr));
  return r;
}
// 4 bytes from global `src` into shared `dst` by cp.async, counted on `bar` as one more arrival
// of its current phase (the arrival happens when the copy lands, so the phase cannot complete
// before it). For a per-row scalar that travels with a bulk-copied row.
__device__ __forceinline__ void cp_async_4_on_mbar(void* dst, const void* src, uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.ca.shared.global [%0], [%1], 4;\n"
      "cp.async.mbarrier.arrive.shared.b64 [%2];\n" ::"r"(smem_u32(dst)),
      "l"(src), "r"(smem_u32(bar))
      : "memory");
#endif
}
// bytes from global `src` into shared `dst`, completing on `bar`.
__device__ __forceinline__ void bulk_copy_to_shared(void* dst, const void* src, unsigned bytes,
                                                    uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
#endif
}

// L2 eviction priorities for load_streamed (createpolicy + L2::cache_hint).
//   kFirst: a stream read once (x in the forward). After the benchmark's L2 flush, and in a model
//     after the previous layer, L2 is full of dirty lines; x's clean lines then go before them
//     and fewer dirty lines are written back while the kernel runs (forward +0-2 points on H100,
//     performance log, session 7).
//   kLast: small rows that many rows of the grid read again (per-sample / per-frame scale and
//     shift rows). Never for a large set: evict-last lines outlive later kernels' normal traffic,
//     and after 100 MB of per-token rows loaded evict-last a following kernel re-reading 44 MB
//     ran 18-27% slower (H200, performance log, session 18).
//   kNormal: what a plain load does, as a policy value.
enum class L2Evict { kFirst, kNormal, kLast };
template <L2Evict P>
__device__ __forceinline__ uint64_t l2_policy() {
  uint64_t pol = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (P == L2Evict::kFirst) {
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  } else if constexpr (P == L2Evict::kLast) {
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(pol));
  } else {
    asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(pol));
  }
#endif
  return pol;
}
template <typename Raw>
__device__ __forceinline__ Raw load_streamed(const Raw* src, uint64_t policy) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<Raw, uint4>) {
    uint4 r;
    asm volatile("ld.global.nc.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(src), "l"(policy));
    return r;
  }
#endif
  (void)policy;
  return __ldg(src);
}

// Asks the copy engine to bring `bytes` (a multiple of 16, 16-byte aligned) from global memory
// into L2, with nothing waiting on it (sm_90+; a no-op before).
__device__ __forceinline__ void bulk_prefetch_l2(const void* src, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(src), "r"(bytes) : "memory");
#endif
}

// A ring of row stages and its position: stage `slot` holds its `use`-th row, whose barrier
// phase parity is use & 1.
struct RingCursor {
  int slot = 0;
  unsigned parity = 0;
  __device__ __forceinline__ void next(int stages) {
    if (++slot == stages) {
      slot = 0;
      parity ^= 1u;
    }
  }
};

// N elements of dtype T from shared memory (or any generic address) with plain loads.
template <DType T, int N>
__device__ __forceinline__ void load_plain(const char* ptr, float* f) {
  constexpr int kBytes = N * elem_bytes<T>();
  constexpr int kChunkBytes = kBytes > 16 ? 16 : kBytes;
  constexpr int kPerChunk = kChunkBytes / elem_bytes<T>();
  using Raw = typename RawOf<kChunkBytes>::type;
  const Raw* r = reinterpret_cast<const Raw*>(ptr);
#pragma unroll
  for (int c = 0; c < N / kPerChunk; ++c) unpack<T, kPerChunk>(r[c], f + c * kPerChunk);
}

template <int N>
__device__ __forceinline__ void load_plain_any(const char* ptr, int dtype, float* f) {
  if (dtype == kDtF32) {
    load_plain<DType::kFloat32, N>(ptr, f);
  } else if (dtype == kDtBF16) {
    load_plain<DType::kBFloat16, N>(ptr, f);
  } else {
    load_plain<DType::kFloat16, N>(ptr, f);
  }
}

// Sum over a team: TPR <= 32 lanes of a warp (xor butterflies), or the whole block: TPR > 32
// threads, or TPR == 0 with a run-time number of warps. The warps' partials are read in one fixed
// order. `red` holds 32 floats and must alternate between two buffers on consecutive calls (no
// trailing barrier).
template <int TPR>
__device__ __forceinline__ float team_sum_rt(float v, float* red) {
  constexpr bool kBlock = TPR == 0 || TPR > 32;
  constexpr int kWarpSpan = kBlock ? 32 : TPR;
#pragma unroll
  for (int o = kWarpSpan / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if constexpr (kBlock) {
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) red[warp] = v;
    __syncthreads();
    float t = 0.f;
    const int warps = TPR == 0 ? blockDim.x >> 5 : TPR / 32;
    for (int i = 0; i < warps; ++i) t += red[i];
    return t;
  } else {
    (void)red;
    return v;
  }
}

}  // namespace modnorm::cuda_detail
