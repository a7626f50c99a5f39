// Forward kernels.
//
// forward_row_block_kernel: one row per block, everything the row needs loaded before its sum;
// rows of 129-1024 vectors whose weight is in x's dtype and modulation in x's dtype (or float32
// per token).
//
// forward_reg_kernel: a team of TPR threads owns one row at a time and holds it in registers
// (NV vectors of VEC elements per thread), so x is read from memory exactly once. Small rows use
// warp or half-warp teams, several per block; larger rows use one block-wide team.
//
// forward_loop_kernel: rows too long for registers, or layouts that rule out vector access.
// The row is walked twice; the first walk parks each thread's own vectors in shared memory when
// they fit ("staged"), so the second walk does not go back to global memory. Each thread only
// reads back slots it wrote itself, so staging needs no barrier.
#pragma once

#include "device_utils.cuh"

namespace modnorm::cuda_detail {

struct ForwardArgs {
  const void* x = nullptr;
  void* y = nullptr;
  float* rstd = nullptr;  // nullptr: not written (a forward without backward)
  int64_t rows = 0;
  int64_t x_row_stride = 0;  // elements
  int dim = 0;
  int dim_vecs = 0;  // dim / VEC
  const void* weight = nullptr;
  const void* scale = nullptr;
  const void* shift = nullptr;
  int weight_dtype = 0, scale_dtype = 0, shift_dtype = 0;
  int y_vectorized = 1;
  int staged = 0;
  float eps = 0.f, offset = 0.f, scale_offset = 1.f, inv_dim = 1.f;
  DevMap scale_map, shift_map;
  // forward_rows_kernel: block b owns a tile of tile_rows consecutive rows. With run_rows > 0
  // every run of run_rows rows reads one scale row and one shift row, tiles never cross a run
  // (tiles_per_run tiles each) and the block caches those rows; otherwise tiles cover all rows.
  int64_t tile_rows = 0, run_rows = 0, tiles_per_run = 1;
  // forward_const_kernel (block_row_walk): block b = group * blocks_per_group + sub walks rows of
  // its group of group_rows; interleaved, rows sub, sub + blocks_per_group, ... (by teams),
  // else its own run [sub * rows_per_block, + rows_per_block), clipped to the group.
  int64_t group_rows = 0, blocks_per_group = 1, rows_per_block = 0;
  int interleave = 0;  // block_row_walk: blocks of a group take turns row by row
  // forward_row_block_kernel: scale and shift rows loaded evict-last (else the normal policy).
  int mod_evict_last = 0;
  // forward_row_block_kernel: x loaded evict-first (else with the normal policy).
  int x_evict_first = 0;
  // begin_forward: release the next launch as soon as each block starts (MODNORM_PDL=early).
  int release_early = 0;
  // Byte offsets of the cached weight / scale / shift rows in dynamic shared memory (-1: none).
  int cache_w = -1, cache_s = -1, cache_h = -1;
  // forward_reg_kernel: byte offsets of per-token scale / shift vectors in each team's
  // prefetch slots of pre_slot_bytes (-1: read through L1 after the row sum).
  int pre_s = -1, pre_h = -1, pre_slot_bytes = 0;
};

// Every forward kernel's type (the host launches them through this, so a kernel taking anything
// else does not compile there).
using ForwardKernel = void (*)(ForwardArgs);

// Every forward kernel's first statement. Launched programmatically on sm_90+ (launch_kernel), a
// kernel waits for the one before it in the stream to finish before it touches memory; no block
// may return before this, or the kernel could finish before the one before it does. With
// release_early (MODNORM_PDL=early) each block, once its wait returns, also lets the next
// programmatic launch place its blocks while this grid still runs: that widens the window a
// missing wait in the next kernel would leave (the tests use it), but measured slower in a
// forward and backward back to back (H100: ltx2b-t2v +5 us, wan14b +6; performance log, session
// 20), so it is off by default.
__device__ __forceinline__ void begin_forward(const ForwardArgs& p) {
  wait_for_prior_grid();
  if (p.release_early) allow_dependent_launch();
}

// A multiplicative factor of VEC columns: offset + operand, or 1 when the operand is absent
// (w = offset + weight, m = scale_offset + scale). The shift, h, is load_shift (0 when absent).
template <int VEC>
__device__ __forceinline__ void load_factor(const void* operand, int dtype, float offset,
                                            int64_t idx, float* out) {
  if (operand != nullptr) {
    load_any<VEC>(operand, dtype, idx, out);
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] += offset;
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = 1.f;
  }
}

template <int VEC>
__device__ __forceinline__ void load_shift(const void* shift, int shift_dtype, int64_t idx,
                                           float* h) {
  if (shift != nullptr) {
    load_any<VEC>(shift, shift_dtype, idx, h);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) h[e] = 0.f;
  }
}

// One vector of y from one vector of x.
template <DType XT, CastingMode M, int VEC>
__device__ __forceinline__ void forward_vector(const ForwardArgs& p, const XRaw<XT, VEC>& xraw,
                                               float rstd, int v, int64_t scale_idx,
                                               int64_t shift_idx, void* yrow) {
  float xf[VEC], w[VEC], m[VEC], h[VEC], out[VEC];
  unpack<XT, VEC>(xraw, xf);
  const int64_t col = static_cast<int64_t>(v) * VEC;
  load_factor<VEC>(p.weight, p.weight_dtype, p.offset, col, w);
  load_factor<VEC>(p.scale, p.scale_dtype, p.scale_offset, scale_idx + col, m);
  load_shift<VEC>(p.shift, p.shift_dtype, shift_idx + col, h);
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = norm_value<M, XT>(xf[e] * rstd, w[e]) * m[e] + h[e];
  store_elems<XT, VEC>(yrow, col, out, p.y_vectorized != 0);
}

constexpr int kTeamBlockThreads = 256;  // backward pipe kernel with warp teams

// Blocks per SM the register budget must allow. Rows of 1-2 vectors per thread fit in 40
// registers (ptxas spills 32 bytes), and 12 resident 128-thread blocks instead of 9 keep more
// rows' loads in flight (ncu on ltx2b-t2v: 54 registers capped occupancy at 56%); 4 vectors per
// thread need more registers than that without spilling, so they keep 8 blocks of 128 threads.
template <int THREADS, int NV, bool PRE = false>
constexpr int forward_min_blocks() {
  // With per-token prefetch slots the 1-2-vector rows keep 48 registers (10 blocks): at 40
  // registers they spilled 32-96 bytes and ltx2b-i2v lost 7 points (88 -> 81%).
  constexpr int resident_threads = NV <= 2 ? (PRE ? 1280 : 1536) : 1024;
  return THREADS >= resident_threads ? 1 : resident_threads / THREADS;
}

// One vector of y from one vector of x, with scale/shift from the thread's own shared-memory
// slots where the kernel prefetched them (slot offset >= 0), else (and the weight) through L1.
template <DType XT, CastingMode M, int VEC>
__device__ __forceinline__ void forward_vector_slots(const ForwardArgs& p, const char* slots,
                                                     const XRaw<XT, VEC>& xraw, float rstd, int v,
                                                     int64_t scale_idx, int64_t shift_idx,
                                                     void* yrow) {
  float xf[VEC], w[VEC], m[VEC], h[VEC], out[VEC];
  unpack<XT, VEC>(xraw, xf);
  const int64_t col = static_cast<int64_t>(v) * VEC;
  load_factor<VEC>(p.weight, p.weight_dtype, p.offset, col, w);
  if (p.pre_s >= 0) {
    load_plain_any<VEC>(slots + p.pre_s + v * VEC * (p.scale_dtype == kDtF32 ? 4 : 2),
                        p.scale_dtype, m);
#pragma unroll
    for (int e = 0; e < VEC; ++e) m[e] += p.scale_offset;
  } else {
    load_factor<VEC>(p.scale, p.scale_dtype, p.scale_offset, scale_idx + col, m);
  }
  if (p.pre_h >= 0) {
    load_plain_any<VEC>(slots + p.pre_h + v * VEC * (p.shift_dtype == kDtF32 ? 4 : 2),
                        p.shift_dtype, h);
  } else {
    load_shift<VEC>(p.shift, p.shift_dtype, shift_idx + col, h);
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = norm_value<M, XT>(xf[e] * rstd, w[e]) * m[e] + h[e];
  store_elems<XT, VEC>(yrow, col, out, p.y_vectorized != 0);
}

// Copies this thread's vectors of one weight/modulation row (present when slot_off >= 0) into
// its own slots: no other thread reads them, so only the thread's own wait is needed.
template <int NV>
__device__ __forceinline__ void prefetch_operand(char* slots, int slot_off, const void* src,
                                                 int dtype, int64_t elem_idx, int lane, int tpr,
                                                 int dim_vecs, int vec) {
  if (slot_off < 0) return;
  const int vec_bytes = vec * (dtype == kDtF32 ? 4 : 2);
  const char* from = static_cast<const char*>(src) + elem_idx * (dtype == kDtF32 ? 4 : 2);
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int v = lane + i * tpr;
    if (v < dim_vecs) {
      cp_async_vec_ca(slots + slot_off + v * vec_bytes, from + static_cast<int64_t>(v) * vec_bytes,
                      vec_bytes);
    }
  }
}

template <DType XT, CastingMode M, int VEC, int NV, int TPR, int TEAMS, bool PRE>
__global__ void __launch_bounds__(TPR* TEAMS, forward_min_blocks<TPR * TEAMS, NV, PRE>())
    forward_reg_kernel(const __grid_constant__ ForwardArgs p) {
  begin_forward(p);
  static_assert(TPR <= 32 || TEAMS == 1, "block-wide teams own the whole block");
  using Raw = XRaw<XT, VEC>;
  __shared__ float red[32];
  // Per-team slots for the row's per-token scale/shift vectors (pre_slot_bytes each), filled by
  // cp.async right after the x loads so that, after the row sum, they are already on chip.
  extern __shared__ __align__(16) char fwd_slots[];
  const int team = threadIdx.x / TPR;
  const int lane = threadIdx.x % TPR;
  char* slots = fwd_slots + team * p.pre_slot_bytes;
  constexpr bool prefetch = PRE;  // pre_s / pre_h >= 0 for at least one operand
  // The loop bound is uniform over the block, so every lane reaches every team_sum.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * TEAMS; base < p.rows;
       base += static_cast<int64_t>(gridDim.x) * TEAMS) {
    const int64_t row = base + team;
    const bool active = row < p.rows;
    // x first: nothing may delay the row's main stream (computing the modulation offsets
    // before these loads cost 5-7 points on shared-modulation rows, v0.4 log).
    Raw xr[NV];
    load_x_row<XT>(p.x, active ? row * p.x_row_stride : 0, active, lane, TPR, p.dim_vecs, xr);
    const int64_t scale_idx = (active && p.scale != nullptr) ? map_offset(p.scale_map, row) : 0;
    const int64_t shift_idx = (active && p.shift != nullptr) ? map_offset(p.shift_map, row) : 0;
    if (prefetch && active) {
      prefetch_operand<NV>(slots, p.pre_s, p.scale, p.scale_dtype, scale_idx, lane, TPR, p.dim_vecs, VEC);
      prefetch_operand<NV>(slots, p.pre_h, p.shift, p.shift_dtype, shift_idx, lane, TPR, p.dim_vecs, VEC);
      cp_async_commit();
    }
    float ss = sum_squares<XT, VEC, NV>(xr, active, lane, TPR, p.dim_vecs);
    ss = team_sum<TPR>(ss, red);
    if (!active) continue;
    const float rstd = 1.f / sqrtf(ss * p.inv_dim + p.eps);
    if (lane == 0 && p.rstd != nullptr) p.rstd[row] = rstd;
    if (prefetch) cp_async_wait<0>();
    void* yrow = elem_ptr<XT>(p.y, row * static_cast<int64_t>(p.dim));
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int v = lane + i * TPR;
      if (v < p.dim_vecs) {
        forward_vector_slots<XT, M, VEC>(p, slots, xr[i], rstd, v, scale_idx, shift_idx, yrow);
      }
    }
  }
}

template <DType XT, CastingMode M, int VEC, int TPR, int TEAMS>
__global__ void __launch_bounds__(TPR* TEAMS, forward_min_blocks<TPR * TEAMS, 4>())
    forward_loop_kernel(const __grid_constant__ ForwardArgs p) {
  begin_forward(p);
  static_assert(TPR <= 32 || TEAMS == 1, "block-wide teams own the whole block");
  using Raw = XRaw<XT, VEC>;
  __shared__ float red[32];
  extern __shared__ uint4 stage_mem[];
  Raw* stage = reinterpret_cast<Raw*>(stage_mem);  // dim_vecs slots; only with TEAMS == 1
  const int team = threadIdx.x / TPR;
  const int lane = threadIdx.x % TPR;
  const bool staged = p.staged != 0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * TEAMS; base < p.rows;
       base += static_cast<int64_t>(gridDim.x) * TEAMS) {
    const int64_t row = base + team;
    const bool active = row < p.rows;
    const Raw* xrow =
        reinterpret_cast<const Raw*>(elem_ptr<XT>(p.x, active ? row * p.x_row_stride : 0));
    float ss = 0.f;
    if (active) {
      for (int v = lane; v < p.dim_vecs; v += TPR) {
        const Raw raw = __ldg(xrow + v);
        if (staged) stage[v] = raw;
        float f[VEC];
        unpack<XT, VEC>(raw, f);
#pragma unroll
        for (int e = 0; e < VEC; ++e) ss += f[e] * f[e];
      }
    }
    ss = team_sum<TPR>(ss, red);
    if (!active) continue;
    const float rstd = 1.f / sqrtf(ss * p.inv_dim + p.eps);
    if (lane == 0 && p.rstd != nullptr) p.rstd[row] = rstd;
    const int64_t scale_idx = p.scale != nullptr ? map_offset(p.scale_map, row) : 0;
    const int64_t shift_idx = p.shift != nullptr ? map_offset(p.shift_map, row) : 0;
    void* yrow = elem_ptr<XT>(p.y, row * static_cast<int64_t>(p.dim));
    for (int v = lane; v < p.dim_vecs; v += TPR) {
      const Raw raw = staged ? stage[v] : __ldg(xrow + v);
      forward_vector<XT, M, VEC>(p, raw, rstd, v, scale_idx, shift_idx, yrow);
    }
  }
}

// The row-held kernels' arithmetic on a thread's NV vectors of x (vectors past the row's end hold
// zeros, which add nothing): the sum of squares in two chains (half the dependent adds), and
// xhat = x * rstd, rounded to x's dtype in pairs under llama casting (the value the unfused
// module multiplies by the weight).
template <DType XT, int VEC, int NV>
__device__ __forceinline__ float sum_squares_held(const XRaw<XT, VEC> (&xr)[NV]) {
  float ss[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    float f[VEC];
    unpack<XT, VEC>(xr[i], f);
#pragma unroll
    for (int e = 0; e < VEC; ++e) ss[e & 1] = fmaf(f[e], f[e], ss[e & 1]);
  }
  return ss[0] + ss[1];
}

template <DType XT, CastingMode M, int VEC>
__device__ __forceinline__ void xhat_of(const XRaw<XT, VEC>& raw, float rstd, float (&n)[VEC]) {
  unpack<XT, VEC>(raw, n);
#pragma unroll
  for (int e = 0; e < VEC; ++e) n[e] *= rstd;
  if constexpr (M == CastingMode::kLlama) {
#pragma unroll
    for (int e = 0; e < VEC; e += 2) round_pair<XT>(n[e], n[e + 1]);
  }
}

// ---------------------------------------------------------------------------------------------
// forward_const_kernel: rows of 129-1024 vectors whose block reads one weight, one scale row and
// one shift row (per-sample / per-frame runs grouped per block, shared rows, none). Each thread
// owns fixed columns and keeps wm = (offset + weight) * (scale_offset + scale) and the shift for
// them in registers, loaded once per block; rows stream through with the next row's x one row
// ahead in registers. Per element that leaves unpack, x * rstd, the cast of the casting mode, one
// fma and the pack (ncu, ltx2b-t2v: the register kernel issued on 81% of cycles at 39% of DRAM
// bandwidth, ~30 instructions per element, most of them the per-row weight/modulation loads,
// their dtype switches and offsets). Gemma rounds xhat * w before the scale, which does not fold:
// it keeps forward_reg_kernel.
// Resident blocks from the registers a thread needs: wm (and the shift) per column, x and the
// next row's x, plus ~24 for addresses and the loop.
template <int NV, int VEC, bool SHIFT, int THREADS>
__host__ __device__ constexpr int forward_const_min_blocks() {
  constexpr int regs = ((SHIFT ? 2 : 1) * NV * VEC + 8 * NV + 24 + 7) / 8 * 8;
  constexpr int blocks = 65536 / (THREADS * regs);
  return blocks < 1 ? 1 : blocks > 16 ? 16 : blocks;
}

// TPR lanes per row: a block-wide team (TEAMS == 1, TPR == block size) or TEAMS teams of at most
// a warp each, for short rows (their sums are shuffles only). y must allow 16-byte stores.
// Issue slots, not bytes in flight, set this kernel's pace (ncu, ltx13b: Liger's one-row-per-block
// forward issues 13 instructions per element at 0.43 IPC per scheduler, this kernel issued 17 at
// 0.50; more resident blocks with the constants in shared memory issued more and ran slower). So
// the loop is straight-line code: vectors past the row's end hold zeros and only their stores
// are predicated, addresses are one per row plus constant offsets, and xhat is rounded in pairs
// (20.1M instead of 28.6M instructions on ltx13b, yet only 1 point faster: not the limit either).
// What did pay: the interleaved row order (block_row_walk) and the L2 prefetch below.
template <DType XT, CastingMode M, int VEC, int NV, int TPR, int TEAMS, bool SHIFT>
__global__ void __launch_bounds__(TPR* TEAMS, forward_const_min_blocks<NV, VEC, SHIFT, TPR * TEAMS>())
    forward_const_kernel(const __grid_constant__ ForwardArgs p) {
  begin_forward(p);
  static_assert(M != CastingMode::kGemma, "gemma's rounding does not fold the weight");
  static_assert(TPR <= 32 || TEAMS == 1, "block-wide teams own the whole block");
  static_assert(VEC % 2 == 0, "pairs of elements");
  using Raw = XRaw<XT, VEC>;
  constexpr int kVecBytes = VEC * elem_bytes<XT>();
  __shared__ float red[2][32];
  const int team = threadIdx.x / TPR;
  const int lane = threadIdx.x % TPR;
  const RowWalk walk = block_row_walk<TEAMS>(p.rows, p.group_rows, p.blocks_per_group,
                                             p.rows_per_block, p.interleave != 0);
  const int64_t row_begin = walk.begin;
  const int64_t row_end = walk.end;
  bool has[NV];
#pragma unroll
  for (int i = 0; i < NV; ++i) has[i] = lane + i * TPR < p.dim_vecs;
  const char* x_lane = static_cast<const char*>(p.x) + static_cast<int64_t>(lane) * kVecBytes;
  char* y_lane = static_cast<char*>(p.y) + static_cast<int64_t>(lane) * kVecBytes;
  const int64_t x_row_bytes = p.x_row_stride * elem_bytes<XT>();
  const int64_t y_row_bytes = static_cast<int64_t>(p.dim) * elem_bytes<XT>();
  // Vectors past the row's end are never loaded and stay zero: they add nothing to the sum.
  const uint64_t evict_first = l2_policy<L2Evict::kFirst>();
  auto load_row = [&](int64_t row, Raw (&dst)[NV]) {
    const char* src = x_lane + row * x_row_bytes;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      if (has[i]) {
        dst[i] = load_streamed(reinterpret_cast<const Raw*>(src + i * TPR * kVecBytes), evict_first);
      }
    }
  };

  Raw x_next[NV];
#pragma unroll
  for (int i = 0; i < NV; ++i) x_next[i] = Raw{};
  if (row_begin + team < row_end) load_row(row_begin + team, x_next);

  float wm[NV][VEC], h[SHIFT ? NV : 1][VEC];
  {
    const int64_t scale_idx = p.scale != nullptr ? map_offset<false>(p.scale_map, row_begin) : 0;
    const int64_t shift_idx = SHIFT ? map_offset<false>(p.shift_map, row_begin) : 0;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int64_t col = static_cast<int64_t>(lane + i * TPR) * VEC;
      float w[VEC] = {}, m[VEC] = {};
      if constexpr (SHIFT) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) h[i][e] = 0.f;
      }
      if (has[i]) {
        load_factor<VEC>(p.weight, p.weight_dtype, p.offset, col, w);
        load_factor<VEC>(p.scale, p.scale_dtype, p.scale_offset, scale_idx + col, m);
        if constexpr (SHIFT) load_any<VEC>(p.shift, p.shift_dtype, shift_idx + col, h[i]);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) wm[i][e] = w[e] * m[e];
    }
  }

  int parity = 0;
  // Iterations are uniform over the block: every lane reaches every shuffle and barrier.
  for (int64_t base = row_begin; base < row_end; base += walk.step) {
    const int64_t row = base + team;
    const bool active = row < row_end;
    Raw xr[NV];
#pragma unroll
    for (int i = 0; i < NV; ++i) xr[i] = x_next[i];
    if (row + walk.step < row_end) load_row(row + walk.step, x_next);
    if constexpr (TEAMS == 1) {
      // The row after next goes to L2 by one bulk prefetch (no registers): its register load
      // next iteration then waits on L2, not DRAM (+2-3 points on ltx13b and wan14b).
      if (threadIdx.x == 0 && row + 2 * walk.step < row_end) {
        bulk_prefetch_l2(x_lane + (row + 2 * walk.step) * x_row_bytes,
                         static_cast<unsigned>(p.dim_vecs) * kVecBytes);
      }
    }
    const float sum = team_sum_rt<TPR>(sum_squares_held<XT, VEC, NV>(xr), red[parity]);
    parity ^= 1;
    if (!active) continue;
    const float rstd = rsqrtf(sum * p.inv_dim + p.eps);
    if (lane == 0 && p.rstd != nullptr) p.rstd[row] = rstd;
    char* yrow = y_lane + row * y_row_bytes;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      float n[VEC], out[VEC];
      xhat_of<XT, M, VEC>(xr[i], rstd, n);
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[e] = SHIFT ? fmaf(n[e], wm[i][e], h[SHIFT ? i : 0][e]) : n[e] * wm[i][e];
      if (has[i]) {
        *reinterpret_cast<Raw*>(yrow + i * TPR * kVecBytes) = pack<XT, VEC, Raw>(out);
      }
    }
  }
}

// Raw registers for VEC modulation elements of dtype MT next to VEC elements of x: one vector when
// MT is x's dtype, two 16-byte vectors for float32 rows beside 16-bit x (Wan's float32 scale and
// shift).
template <DType MT, int VEC>
struct ModRaw {
  static constexpr int kParts = VEC * elem_bytes<MT>() > 16 ? 2 : 1;
  static constexpr int kPartElems = VEC / kParts;
  using Part = XRaw<MT, kPartElems>;
  Part part[kParts];
};

template <DType MT, int VEC>
__device__ __forceinline__ ModRaw<MT, VEC> load_mod_vector(const void* row, int v) {
  using R = ModRaw<MT, VEC>;
  const auto* src = static_cast<const typename R::Part*>(row) + static_cast<int64_t>(v) * R::kParts;
  R r;
#pragma unroll
  for (int k = 0; k < R::kParts; ++k) r.part[k] = __ldg(src + k);
  return r;
}

// The same with an L2 eviction policy on every 16-byte part (load_streamed).
template <DType MT, int VEC>
__device__ __forceinline__ ModRaw<MT, VEC> load_mod_vector(const void* row, int v, uint64_t policy) {
  using R = ModRaw<MT, VEC>;
  const auto* src = static_cast<const typename R::Part*>(row) + static_cast<int64_t>(v) * R::kParts;
  R r;
#pragma unroll
  for (int k = 0; k < R::kParts; ++k) r.part[k] = load_streamed(src + k, policy);
  return r;
}
template <DType MT, int VEC>
__device__ __forceinline__ void unpack_mod(const ModRaw<MT, VEC>& r, float* f) {
  using R = ModRaw<MT, VEC>;
#pragma unroll
  for (int k = 0; k < R::kParts; ++k) unpack<MT, R::kPartElems>(r.part[k], f + k * R::kPartElems);
}

// One vector of y from raw vectors of x and of the present weight / scale / shift (W, S, H): the
// weight in x's dtype, scale and shift in MT. The row-block and row-tile kernels' epilogue.
template <DType XT, CastingMode M, int VEC, bool W, bool S, bool H, DType MT = XT>
__device__ __forceinline__ XRaw<XT, VEC> modulated_vector(const ForwardArgs& p, const XRaw<XT, VEC>& xr,
                                                          float rstd, const XRaw<XT, VEC>& wr,
                                                          const ModRaw<MT, VEC>& sr,
                                                          const ModRaw<MT, VEC>& hr) {
  float n[VEC], w[VEC], m[VEC], h[VEC], out[VEC];
  xhat_of<XT, M, VEC>(xr, rstd, n);
  if constexpr (W) {
    unpack<XT, VEC>(wr, w);
#pragma unroll
    for (int e = 0; e < VEC; ++e) w[e] += p.offset;
  }
  if constexpr (S) {
    unpack_mod<MT, VEC>(sr, m);
#pragma unroll
    for (int e = 0; e < VEC; ++e) m[e] += p.scale_offset;
  }
  if constexpr (H) unpack_mod<MT, VEC>(hr, h);
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    float o = W ? n[e] * w[e] : n[e];
    o = S ? o * m[e] : o;
    out[e] = H ? o + h[e] : o;
  }
  return pack<XT, VEC, XRaw<XT, VEC>>(out);
}

// ---------------------------------------------------------------------------------------------
// forward_row_block_kernel: one row per block (grid = rows) of THREADS threads with NV vectors
// each, for rows of 129-1024 vectors whose weight is in x's dtype and scale / shift in x's dtype
// (any broadcast rule) or float32 (per token). Every load of the row (x, then the weight and its modulation rows as raw vectors) is
// issued before the row's sum, and the block's only barrier is that sum's. Short-lived blocks are
// replaced by the hardware as they retire, so each SM always has rows in flight without a
// software pipeline: on H100 this shape (Liger's) beat forward_const_kernel's persistent blocks
// with constants in registers by 2-9 points on every case it serves (performance log, session 7).
// W / S / H: weight, scale, shift present; MT: the scale's and shift's dtype (x's, or float32).
// L2 policies: x normal (evict-first where the host sets x_evict_first: row_block_x_evict_first
// says why not by default); scale and shift evict-last where the host sets
// mod_evict_last (rows read by several x rows, a small set), else normal. Per-token rows loaded
// evict-last made ltx2b-i2v 1 us faster, but left dead lines that cost the next kernel more
// (l2_policy; performance log, sessions 17 and 18).
// Three vectors a thread: one block per SM guaranteed, no more. Left alone, ptxas held flux's
// variant (weight, scale, shift) to 64 registers and spilled; with 80 and no spill flux ran 37.0
// -> 35.0 us, mochi and wan-token unchanged (H200, performance log, session 10).
template <DType XT, CastingMode M, int VEC, int NV, int THREADS, bool W, bool S, bool H,
          DType MT = XT>
__global__ void __launch_bounds__(THREADS, NV >= 3 ? 1 : 0)
    forward_row_block_kernel(const __grid_constant__ ForwardArgs p) {
  begin_forward(p);
  static_assert(THREADS % 32 == 0 && VEC % 2 == 0, "whole warps, pairs of elements");
  using Raw = XRaw<XT, VEC>;
  using Mod = ModRaw<MT, VEC>;
  __shared__ float red[THREADS / 32];  // a float per warp: all team_sum_rt<THREADS> writes
  const int64_t row = blockIdx.x;
  const int t = threadIdx.x;
  const Raw* xrow = reinterpret_cast<const Raw*>(elem_ptr<XT>(p.x, row * p.x_row_stride));
  const uint64_t x_policy =
      p.x_evict_first ? l2_policy<L2Evict::kFirst>() : l2_policy<L2Evict::kNormal>();
  const uint64_t mod_policy =
      p.mod_evict_last ? l2_policy<L2Evict::kLast>() : l2_policy<L2Evict::kNormal>();
  Raw xr[NV], wr[W ? NV : 1];
  Mod sr[S ? NV : 1], hr[H ? NV : 1];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int v = t + i * THREADS;
    xr[i] = v < p.dim_vecs ? load_streamed(xrow + v, x_policy) : Raw{};  // zeros add nothing
  }
  const Raw* wrow = static_cast<const Raw*>(p.weight);
  const void* srow = nullptr;
  const void* hrow = nullptr;
  if constexpr (S) srow = elem_ptr<MT>(p.scale, map_offset(p.scale_map, row));
  if constexpr (H) hrow = elem_ptr<MT>(p.shift, map_offset(p.shift_map, row));
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int v = t + i * THREADS;
    if (v < p.dim_vecs) {
      if constexpr (W) wr[i] = __ldg(wrow + v);
      if constexpr (S) sr[i] = load_mod_vector<MT, VEC>(srow, v, mod_policy);
      if constexpr (H) hr[i] = load_mod_vector<MT, VEC>(hrow, v, mod_policy);
    }
  }
  // One row per block: red is never reused, so team_sum_rt's single barrier is all it needs.
  const float sum = team_sum_rt<THREADS>(sum_squares_held<XT, VEC, NV>(xr), red);
  const float rstd = rsqrtf(sum * p.inv_dim + p.eps);
  if (t == 0 && p.rstd != nullptr) p.rstd[row] = rstd;
  Raw* yrow = reinterpret_cast<Raw*>(elem_ptr<XT>(p.y, row * static_cast<int64_t>(p.dim)));
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int v = t + i * THREADS;
    if (v >= p.dim_vecs) continue;
    yrow[v] = modulated_vector<XT, M, VEC, W, S, H, MT>(p, xr[i], rstd, wr[W ? i : 0],
                                                         sr[S ? i : 0], hr[H ? i : 0]);
  }
}

// ---------------------------------------------------------------------------------------------
// forward_row_tile_kernel: the row-block kernel's shape for short rows (up to 128 vectors, whose
// weight and modulation are in x's dtype). A block of kRowTileThreads threads is teams of TPR <= 32
// lanes, a row each (NV vectors a lane); the block's rows are consecutive, so a warp's loads are
// contiguous. Every load is issued before the row's sum, which is shuffles only (no barrier), and
// grid = rows / teams: short-lived blocks the hardware replaces as they retire. On H200 this beat
// forward_const_kernel's persistent teams (one row ahead in registers) by 3% on qk-norm; two or
// four rows a team were no faster (performance log, session 10).
constexpr int kRowTileThreads = 256;

template <DType XT, CastingMode M, int VEC, int NV, int TPR, bool W, bool S, bool H>
__global__ void __launch_bounds__(kRowTileThreads)
    forward_row_tile_kernel(const __grid_constant__ ForwardArgs p) {
  begin_forward(p);
  static_assert(TPR <= 32 && kRowTileThreads % TPR == 0 && VEC % 2 == 0, "warp teams, pairs");
  using Raw = XRaw<XT, VEC>;
  constexpr int kTeams = kRowTileThreads / TPR;
  const int lane = threadIdx.x % TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kTeams + threadIdx.x / TPR;
  const bool active = row < p.rows;
  const uint64_t evict_first = l2_policy<L2Evict::kFirst>();
  Raw xr[NV], wr[W ? NV : 1];
  ModRaw<XT, VEC> sr[S ? NV : 1], hr[H ? NV : 1];
  const Raw* xrow = reinterpret_cast<const Raw*>(elem_ptr<XT>(p.x, row * p.x_row_stride));
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int v = lane + i * TPR;
    // Zeros past the row's end (and in rows past the last) add nothing to the sum.
    xr[i] = active && v < p.dim_vecs ? load_streamed(xrow + v, evict_first) : Raw{};
  }
  const void* srow = nullptr;
  const void* hrow = nullptr;
  if constexpr (S) srow = elem_ptr<XT>(p.scale, active ? map_offset(p.scale_map, row) : 0);
  if constexpr (H) hrow = elem_ptr<XT>(p.shift, active ? map_offset(p.shift_map, row) : 0);
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int v = lane + i * TPR;
    if (active && v < p.dim_vecs) {
      if constexpr (W) wr[i] = __ldg(static_cast<const Raw*>(p.weight) + v);
      if constexpr (S) sr[i] = load_mod_vector<XT, VEC>(srow, v);
      if constexpr (H) hr[i] = load_mod_vector<XT, VEC>(hrow, v);
    }
  }
  // Every lane of the warp reaches the shuffles: the row test comes after the sum.
  const float sum = team_sum_rt<TPR>(sum_squares_held<XT, VEC, NV>(xr), nullptr);
  if (!active) return;
  const float rstd = rsqrtf(sum * p.inv_dim + p.eps);
  if (lane == 0 && p.rstd != nullptr) p.rstd[row] = rstd;
  Raw* yrow = reinterpret_cast<Raw*>(elem_ptr<XT>(p.y, row * static_cast<int64_t>(p.dim)));
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int v = lane + i * TPR;
    if (v >= p.dim_vecs) continue;
    yrow[v] = modulated_vector<XT, M, VEC, W, S, H>(p, xr[i], rstd, wr[W ? i : 0], sr[S ? i : 0],
                                                     hr[H ? i : 0]);
  }
}

// ---------------------------------------------------------------------------------------------
// forward_rows_kernel (rows up to 128 vectors): teams of TPR <= 32 lanes, so a row's sum is a few
// shuffles and no block barrier; 4 vectors of x per lane, so each thread has 64 bytes of loads in
// flight however short the row. (Warp teams with 6-24 vectors per lane for longer rows measured
// 10-45 points below block-wide teams: performance log v0.4.) A block owns a tile of consecutive rows. The weight, and the scale/shift
// rows when the whole tile reads the same ones, are copied once per block into shared memory in
// their own dtype by cp.async, issued together with the first rows' x loads: a row then waits on
// one memory latency (x) instead of x and, after its sum, the weight/modulation through L1/L2.
// PRE: per-token modulation of x's dtype whose rows are loaded into registers with x's.
// Blocks of 256 threads; register budget 64 (128 with the modulation rows in registers too):
// left alone, ptxas takes 70-100 to hoist the weight/modulation loads.
constexpr int kRowsBlockThreads = 256;
__host__ __device__ constexpr int rows_min_blocks(bool pre) { return pre ? 2 : 4; }

template <int VEC>
__device__ __forceinline__ void cache_operand(char* cache, int cache_off, const void* src,
                                              int dtype, int64_t elem_idx, int dim_vecs) {
  if (cache_off < 0) return;
  const int es = dtype == kDtF32 ? 4 : 2;
  const int vec_bytes = VEC * es;
  const char* from = static_cast<const char*>(src) + elem_idx * es;
  for (int v = threadIdx.x; v < dim_vecs; v += blockDim.x) {
    cp_async_vec(cache + cache_off + v * vec_bytes, from + static_cast<int64_t>(v) * vec_bytes,
                 vec_bytes);
  }
}

template <DType XT, CastingMode M, int VEC, int NV, int TPR, bool PRE>
__global__ void __launch_bounds__(kRowsBlockThreads, rows_min_blocks(PRE))
    forward_rows_kernel(const __grid_constant__ ForwardArgs p) {
  begin_forward(p);
  static_assert(TPR <= 32, "teams are at most one warp");
  using Raw = XRaw<XT, VEC>;
  static_assert(sizeof(Raw) >= 8 || VEC == 1, "vector rows");
  constexpr int kTeams = kRowsBlockThreads / TPR;
  extern __shared__ __align__(16) char fwd_cache[];
  const int team = threadIdx.x / TPR;
  const int lane = threadIdx.x % TPR;

  int64_t begin, end;
  if (p.run_rows > 0) {
    const int64_t run = blockIdx.x / p.tiles_per_run;
    const int64_t run_begin = run * p.run_rows;
    begin = run_begin + (blockIdx.x - run * p.tiles_per_run) * p.tile_rows;
    end = min(begin + p.tile_rows, run_begin + p.run_rows);
  } else {
    begin = static_cast<int64_t>(blockIdx.x) * p.tile_rows;
    end = min(begin + p.tile_rows, p.rows);
  }

  // Cached rows: the tile's first row stands for all of them (same run).
  const int64_t tile_scale_idx = p.cache_s >= 0 ? map_offset(p.scale_map, begin) : 0;
  const int64_t tile_shift_idx = p.cache_h >= 0 ? map_offset(p.shift_map, begin) : 0;
  cache_operand<VEC>(fwd_cache, p.cache_w, p.weight, p.weight_dtype, 0, p.dim_vecs);
  cache_operand<VEC>(fwd_cache, p.cache_s, p.scale, p.scale_dtype, tile_scale_idx, p.dim_vecs);
  cache_operand<VEC>(fwd_cache, p.cache_h, p.shift, p.shift_dtype, tile_shift_idx, p.dim_vecs);
  cp_async_commit();
  bool cache_pending = p.cache_w >= 0 || p.cache_s >= 0 || p.cache_h >= 0;
  const int w_bytes = VEC * (p.weight_dtype == kDtF32 ? 4 : 2);
  const int s_bytes = VEC * (p.scale_dtype == kDtF32 ? 4 : 2);
  const int h_bytes = VEC * (p.shift_dtype == kDtF32 ? 4 : 2);

  // Iterations are uniform over the block: every lane reaches every shuffle and the barrier.
  for (int64_t base = begin; base < end; base += kTeams) {
    const int64_t row = base + team;
    const bool active = row < end;
    Raw xr[NV];
    load_x_row<XT>(p.x, active ? row * p.x_row_stride : 0, active, lane, TPR, p.dim_vecs, xr);
    int64_t scale_idx = tile_scale_idx, shift_idx = tile_shift_idx;
    if (p.cache_s < 0 && p.scale != nullptr && active) scale_idx = map_offset(p.scale_map, row);
    if (p.cache_h < 0 && p.shift != nullptr && active) shift_idx = map_offset(p.shift_map, row);
    Raw sr[PRE ? NV : 1], hr[PRE ? NV : 1];
    if constexpr (PRE) {
      const Raw* srow = reinterpret_cast<const Raw*>(elem_ptr<XT>(p.scale, scale_idx));
      const Raw* hrow = reinterpret_cast<const Raw*>(elem_ptr<XT>(p.shift, shift_idx));
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int v = lane + i * TPR;
        if (active && v < p.dim_vecs) {
          if (p.scale != nullptr) sr[i] = __ldg(srow + v);
          if (p.shift != nullptr) hr[i] = __ldg(hrow + v);
        }
      }
    }
    if (cache_pending) {
      cp_async_wait<0>();
      __syncthreads();
      cache_pending = false;
    }
    float ss = sum_squares<XT, VEC, NV>(xr, active, lane, TPR, p.dim_vecs);
    ss = team_sum<TPR>(ss, nullptr);
    if (!active) continue;
    const float rstd = 1.f / sqrtf(ss * p.inv_dim + p.eps);
    if (lane == 0 && p.rstd != nullptr) p.rstd[row] = rstd;
    void* yrow = elem_ptr<XT>(p.y, row * static_cast<int64_t>(p.dim));
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int v = lane + i * TPR;
      if (v >= p.dim_vecs) continue;
      const int64_t col = static_cast<int64_t>(v) * VEC;
      float xf[VEC], w[VEC], m[VEC], h[VEC], out[VEC];
      unpack<XT, VEC>(xr[i], xf);
      if (p.cache_w >= 0) {
        load_plain_any<VEC>(fwd_cache + p.cache_w + v * w_bytes, p.weight_dtype, w);
#pragma unroll
        for (int e = 0; e < VEC; ++e) w[e] += p.offset;
      } else {
        load_factor<VEC>(p.weight, p.weight_dtype, p.offset, col, w);
      }
      if (p.scale == nullptr) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) m[e] = 1.f;
      } else {
        if constexpr (PRE) {
          unpack<XT, VEC>(sr[i], m);
        } else if (p.cache_s >= 0) {
          load_plain_any<VEC>(fwd_cache + p.cache_s + v * s_bytes, p.scale_dtype, m);
        } else {
          load_any<VEC>(p.scale, p.scale_dtype, scale_idx + col, m);
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) m[e] += p.scale_offset;
      }
      if (p.shift == nullptr) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) h[e] = 0.f;
      } else if constexpr (PRE) {
        unpack<XT, VEC>(hr[i], h);
      } else if (p.cache_h >= 0) {
        load_plain_any<VEC>(fwd_cache + p.cache_h + v * h_bytes, p.shift_dtype, h);
      } else {
        load_any<VEC>(p.shift, p.shift_dtype, shift_idx + col, h);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[e] = norm_value<M, XT>(xf[e] * rstd, w[e]) * m[e] + h[e];
      store_elems<XT, VEC>(yrow, col, out, p.y_vectorized != 0);
    }
  }
}

}  // namespace modnorm::cuda_detail
