// Forward kernels.
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
  float* rstd = nullptr;
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
};

// w = offset + weight (1 without weight), m = scale_offset + scale (1), h = shift (0).
template <int VEC>
__device__ __forceinline__ void load_affine(const void* weight, int weight_dtype, float offset,
                                            int64_t col, float* w) {
  if (weight != nullptr) {
    load_any<VEC>(weight, weight_dtype, col, w);
#pragma unroll
    for (int e = 0; e < VEC; ++e) w[e] += offset;
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) w[e] = 1.f;
  }
}

template <int VEC>
__device__ __forceinline__ void load_scale(const void* scale, int scale_dtype, float scale_offset,
                                           int64_t idx, float* m) {
  if (scale != nullptr) {
    load_any<VEC>(scale, scale_dtype, idx, m);
#pragma unroll
    for (int e = 0; e < VEC; ++e) m[e] += scale_offset;
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) m[e] = 1.f;
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
  load_affine<VEC>(p.weight, p.weight_dtype, p.offset, col, w);
  load_scale<VEC>(p.scale, p.scale_dtype, p.scale_offset, scale_idx + col, m);
  load_shift<VEC>(p.shift, p.shift_dtype, shift_idx + col, h);
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = norm_value<M, XT>(xf[e] * rstd, w[e]) * m[e] + h[e];
  store_elems<XT, VEC>(yrow, col, out, p.y_vectorized != 0);
}

constexpr int kTeamBlockThreads = 256;  // backward pipe kernel with warp teams

// Blocks per SM the register budget must allow. Rows of 1-2 vectors per thread fit in 40
// registers, and 12 resident 128-thread blocks instead of 9 keep more rows' loads in flight
// (ncu on ltx2b-t2v: 54 registers capped occupancy at 56%); 4 vectors per thread need more
// registers than that without spilling, so they keep 8 blocks of 128 threads.
template <int THREADS, int NV>
constexpr int forward_min_blocks() {
  constexpr int resident_threads = NV <= 2 ? 1536 : 1024;
  return THREADS >= resident_threads ? 1 : resident_threads / THREADS;
}

template <DType XT, CastingMode M, int VEC, int NV, int TPR, int TEAMS>
__global__ void __launch_bounds__(TPR* TEAMS, forward_min_blocks<TPR * TEAMS, NV>())
    forward_reg_kernel(const __grid_constant__ ForwardArgs p) {
  static_assert(TPR <= 32 || TEAMS == 1, "block-wide teams own the whole block");
  using Raw = XRaw<XT, VEC>;
  __shared__ float red[32];
  const int team = threadIdx.x / TPR;
  const int lane = threadIdx.x % TPR;
  // The loop bound is uniform over the block, so every lane reaches every team_sum.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * TEAMS; base < p.rows;
       base += static_cast<int64_t>(gridDim.x) * TEAMS) {
    const int64_t row = base + team;
    const bool active = row < p.rows;
    const Raw* xrow =
        reinterpret_cast<const Raw*>(elem_ptr<XT>(p.x, active ? row * p.x_row_stride : 0));
    Raw xr[NV];
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int v = lane + i * TPR;
      if (active && v < p.dim_vecs) xr[i] = __ldg(xrow + v);
    }
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int v = lane + i * TPR;
      if (active && v < p.dim_vecs) {
        float f[VEC];
        unpack<XT, VEC>(xr[i], f);
#pragma unroll
        for (int e = 0; e < VEC; ++e) ss += f[e] * f[e];
      }
    }
    ss = team_sum<TPR>(ss, red);
    if (!active) continue;
    const float rstd = 1.f / sqrtf(ss * p.inv_dim + p.eps);
    if (lane == 0) p.rstd[row] = rstd;
    const int64_t scale_idx = p.scale != nullptr ? map_offset(p.scale_map, row) : 0;
    const int64_t shift_idx = p.shift != nullptr ? map_offset(p.shift_map, row) : 0;
    void* yrow = elem_ptr<XT>(p.y, row * static_cast<int64_t>(p.dim));
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int v = lane + i * TPR;
      if (v < p.dim_vecs) forward_vector<XT, M, VEC>(p, xr[i], rstd, v, scale_idx, shift_idx, yrow);
    }
  }
}

template <DType XT, CastingMode M, int VEC, int TPR, int TEAMS>
__global__ void __launch_bounds__(TPR* TEAMS, forward_min_blocks<TPR * TEAMS, 4>())
    forward_loop_kernel(const __grid_constant__ ForwardArgs p) {
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
    if (lane == 0) p.rstd[row] = rstd;
    const int64_t scale_idx = p.scale != nullptr ? map_offset(p.scale_map, row) : 0;
    const int64_t shift_idx = p.shift != nullptr ? map_offset(p.shift_map, row) : 0;
    void* yrow = elem_ptr<XT>(p.y, row * static_cast<int64_t>(p.dim));
    for (int v = lane; v < p.dim_vecs; v += TPR) {
      const Raw raw = staged ? stage[v] : __ldg(xrow + v);
      forward_vector<XT, M, VEC>(p, raw, rstd, v, scale_idx, shift_idx, yrow);
    }
  }
}

}  // namespace modnorm::cuda_detail
