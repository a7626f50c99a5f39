// backward_lean_kernel: backward_const_kernel<RING>'s block-wide rows, for the layout most DiT
// blocks have, with the per-row overhead cut.
//
// The layout: every row of a block reads one scale row (per sample, per frame, shared or none) and
// the weight, dx is written contiguous and 16-byte aligned, dweight / dscale come from the block
// sum S = sum g * weight_factor(xhat) (backward_const_kernel's factoring) and dshift, when asked,
// from sum g; no per-row modulation gradient. Block-wide rows of that layout are most of the
// backward's time on the BENCH cases (ltx2b-t2v, ltx13b, flux, mochi, wan14b).
//
// Why a second kernel: ncu of backward_const_kernel<RING> on ltx2b-t2v counted 438 warp
// instructions per row and warp, ~145 of them per-row overhead (64-bit row bounds, run-time tests
// of the optional outputs on every vector, the block sum's two barriers, rebuilt addresses). Here:
//   - one 16-byte vector a thread, the block's threads owning exactly the row's vectors
//     (dim_vecs threads, whole warps), so no vector is tested, at 64 registers;
//   - the row walk counts rows in 32 bits; x / dy come through the bulk-copy ring as before, rstd
//     and dx advance by a pointer step;
//   - the optional outputs are template flags (kShift) or go to the generic kernel (the host
//     routes anything else there);
//   - the block sum takes one barrier (two alternating buffers) and a butterfly over the warps;
//   - llama's rounding converts two values at a time (round_pair).
// On ltx2b-t2v that is 26% fewer instructions (27.6 M -> 20.4 M) and 14% less time at ncu's locked
// base clock, but level at the boost clock the benchmark runs at: there the row pass was bound by
// its uncoalesced partial-sum stores (write_block_partials) and the memory side. With those
// stores fixed it is 1-6% faster than the generic ring on every BENCH row length it takes
// (performance log, session 12).
// Results and determinism are those of backward_const_kernel: the same fixed-order sums.
#pragma once

#include "backward_kernels.cuh"

namespace modnorm::cuda_detail {

// weight_factor of a vector of xhat, two values per conversion where llama rounds.
template <CastingMode M, DType XT, int VEC>
__device__ __forceinline__ void weight_factors(const float (&xhat)[VEC], float (&wf)[VEC]) {
#pragma unroll
  for (int e = 0; e < VEC; e += 2) {
    wf[e] = xhat[e];
    wf[e + 1] = xhat[e + 1];
    if constexpr (M == CastingMode::kLlama) round_pair<XT>(wf[e], wf[e + 1]);
  }
}

// w = offset + weight and m = scale_offset + scale of vector `vec` of the block's one scale row
// (at element scale_idx): the lean and short kernels' one vector a thread, read at the start and
// again for the partials at the end.
template <int VEC>
__device__ __forceinline__ void load_block_w_m(const BackwardArgs& p, int64_t scale_idx, int vec,
                                               float (&w)[VEC], float (&m)[VEC]) {
  const int64_t col = static_cast<int64_t>(vec) * VEC;
  load_factor<VEC>(p.weight, p.weight_dtype, p.offset, col, w);
  load_factor<VEC>(p.scale, p.scale_dtype, p.scale_offset, scale_idx + col, m);
}

// A block's partials from its sums: dweight = m * S into w_part and dscale = w * S in place
// (backward_const_kernel's factoring; m and w are the block's constant scale and weight).
template <int VEC>
__device__ __forceinline__ void factor_block_sums(float (&acc_s)[VEC], const float (&w)[VEC],
                                                  const float (&m)[VEC], float (&w_part)[VEC]) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    w_part[e] = acc_s[e] * m[e];
    acc_s[e] *= w[e];
  }
}

// Rows of up to 1024 vectors: blocks of up to 1024 threads, so at most 64 registers a thread.
constexpr int kLeanMaxThreads = 1024;

template <DType XT, CastingMode M, int VEC, bool kShift>
__global__ void __launch_bounds__(kLeanMaxThreads, 1)
    backward_lean_kernel(const __grid_constant__ BackwardArgs p) {
  static_assert(M != CastingMode::kGemma, "gemma's dscale does not factor");
  static_assert(VEC % 2 == 0, "16-byte vectors of pairs");
  __shared__ float red[2][32];
  __shared__ uint64_t ring_full[kMaxRingStages];
  extern __shared__ __align__(16) char lean_ring[];
  constexpr int NV = 1;  // vectors a thread; write_block_partials takes [NV][VEC] sums
  const int tpr = static_cast<int>(blockDim.x);  // = dim_vecs (host-checked)
  const int lane = static_cast<int>(threadIdx.x);
  const int warps = tpr >> 5;
  // Launched programmatically (sm_90+), the block may start while the kernel before drains:
  // nothing is read or written before that kernel is done.
  wait_for_prior_grid();

  const RowWalk walk = block_row_walk<1>(p.rows, p.group_rows, p.blocks_per_group,
                                         p.rows_per_block, p.interleave != 0);
  const int rows = walk.end > walk.begin
                       ? static_cast<int>((walk.end - walk.begin + walk.step - 1) / walk.step)
                       : 0;
  const int stages = p.ring_stages;
  const unsigned row_bytes = static_cast<unsigned>(p.dim_vecs) * 16u;
  const unsigned stage_bytes = 2u * row_bytes;

  // Thread 0 fills a stage with row k of the walk: the x row, then the dy row. The first stages
  // are asked for before anything else, so the block's first DRAM reads do not wait on its
  // scale row's mapping and loads below.
  auto issue = [&](int slot, int k) {
    stage_x_dy_row<XT>(p, lean_ring + slot * stage_bytes, &ring_full[slot],
                       walk.begin + static_cast<int64_t>(k) * walk.step, row_bytes, stage_bytes);
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) mbar_init(&ring_full[s], 1);
    fence_mbar_init();
    for (int s = 0; s < stages && s < rows; ++s) issue(s, s);
  }

  // The block's constant m * w per column, and the sums.
  const int64_t scale_idx = p.scale != nullptr ? map_offset<false>(p.scale_map, walk.begin) : 0;
  float mw[NV][VEC], acc_s[NV][VEC], acc_h[kShift ? NV : 1][VEC];
  {
    float w[VEC], m[VEC];
    load_block_w_m<VEC>(p, scale_idx, lane, w, m);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      mw[0][e] = m[e] * w[e];
      acc_s[0][e] = 0.f;
      if constexpr (kShift) acc_h[0][e] = 0.f;
    }
  }

  // rstd one row ahead; this thread's dx vector, advanced a row at a time.
  const float* rstd_ptr = p.rstd + walk.begin;
  const int64_t rstd_step = walk.step;
  float rstd_next = rows > 0 ? *rstd_ptr : 0.f;
  using Raw = XRaw<XT, VEC>;
  static_assert(sizeof(Raw) == 16, "16-byte vectors");
  Raw* dx_ptr = reinterpret_cast<Raw*>(elem_ptr<XT>(p.dx, walk.begin * p.dim)) + lane;
  const int64_t dx_step = walk.step * p.dim_vecs;  // in vectors
  const unsigned ring_addr = smem_u32(lean_ring);
  const unsigned bar_base = smem_u32(ring_full);
  const unsigned lane_off = 16u * static_cast<unsigned>(lane);
  __syncthreads();  // the barriers are initialized before any thread waits on them

  int slot = 0;
  unsigned parity = 0;
  for (int k = 0; k < rows; ++k) {
    const float rstd = rstd_next;
    if (k + 1 < rows) {
      rstd_ptr += rstd_step;
      rstd_next = *rstd_ptr;
    }
    mbar_wait_at(bar_base + 8u * slot, parity);
    const unsigned x_addr = ring_addr + slot * stage_bytes + lane_off;
    // This thread's vector of the staged x and dy rows, held for dx.
    const Raw xr = load_shared_16(x_addr);
    const Raw gr = load_shared_16(x_addr + row_bytes);
    float dot = 0.f;
    {
      float xf[VEC], gf[VEC], xhat[VEC], wf[VEC];
      unpack<XT, VEC>(xr, xf);
      unpack<XT, VEC>(gr, gf);
#pragma unroll
      for (int e = 0; e < VEC; ++e) xhat[e] = xf[e] * rstd;
      weight_factors<M, XT, VEC>(xhat, wf);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        dot = fmaf(gf[e] * mw[0][e], xhat[e], dot);
        acc_s[0][e] = fmaf(gf[e], wf[e], acc_s[0][e]);
        if constexpr (kShift) acc_h[0][e] += gf[e];
      }
    }
    // The block's sum; one barrier, the partials alternating between two buffers.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    float* r = red[k & 1];
    if ((lane & 31) == 0) r[lane >> 5] = dot;
    __syncthreads();
    // Every warp adds the warps' partials by a butterfly (the same bits in every lane; the
    // order is fixed by the block size): 11 instructions, where a loop over them took ~45.
    float total = (lane & 31) < warps ? r[lane & 31] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
    // Past the barrier every thread holds this stage's rows in registers: refill it.
    if (threadIdx.x == 0 && k + stages < rows) issue(slot, k + stages);
    // dx = rstd * (g*m*w) - x * (rstd^2 * mean(g*m*w * xhat))
    const float x_coef = total * p.inv_dim * rstd * rstd;
    {
      float xf[VEC], gf[VEC], out[VEC];
      unpack<XT, VEC>(xr, xf);
      unpack<XT, VEC>(gr, gf);
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[e] = fmaf(rstd, gf[e] * mw[0][e], -xf[e] * x_coef);
      *dx_ptr = pack<XT, VEC, Raw>(out);
    }
    dx_ptr += dx_step;
    if (++slot == stages) {
      slot = 0;
      parity ^= 1u;
    }
  }

  allow_dependent_launch();  // the finalize may start its blocks; it waits for these partials
  float w_part[NV][VEC];
  {
    float w[VEC], m[VEC];
    load_block_w_m<VEC>(p, scale_idx, lane, w, m);
    factor_block_sums<VEC>(acc_s[0], w, m, w_part[0]);
  }
  if (p.dweight_partials != nullptr) {
    write_block_partials<NV, VEC>(w_part, p.dweight_partials, p.dim, p.dim_vecs, lane, tpr, 0, 1,
                                  nullptr);
  }
  if (p.dscale_partials != nullptr) {
    write_block_partials<NV, VEC>(acc_s, p.dscale_partials, p.dim, p.dim_vecs, lane, tpr, 0, 1,
                                  nullptr);
  }
  if constexpr (kShift) {
    write_block_partials<NV, VEC>(acc_h, p.dshift_partials, p.dim, p.dim_vecs, lane, tpr, 0, 1,
                                  nullptr);
  }
}

}  // namespace modnorm::cuda_detail
