// backward_short_kernel: backward_lean_kernel's layout for short rows, several rows ahead in
// registers.
//
// The layout: rows of exactly TPR 16-byte vectors (8, 16 or 32: 64-256 bf16 columns, the head
// dims of per-head QK norms), every row of a block reading one scale row (per sample, shared or
// none) and the weight, dx written contiguous and 16-byte aligned, dweight / dscale from the block
// sum S = sum g * weight_factor(xhat) and dshift, when asked, from sum g; no per-row modulation
// gradient (the host routes anything else to backward_const_kernel).
//
// A block is 256 threads in teams of TPR lanes, a vector a lane. Each team takes kShortRowsAhead
// of the block's rows at once: all their x, dy and rstd loads are issued before any arithmetic,
// their sums reduce side by side (independent shuffle chains), and no barrier runs until the
// partial sums at the end. That keeps ~32 bytes x kShortRowsAhead in flight a thread, as an
// elementwise kernel does, where the tile ring (backward_const_kernel<RING, TEAMS > 1>) waited
// on a block barrier per tile of rows before refilling its stage.
// Results and determinism are those of backward_const_kernel: fixed-order sums.
#pragma once

#include "backward_lean_kernel.cuh"

namespace modnorm::cuda_detail {

constexpr int kShortThreads = 256;
// Four rows ahead at two blocks an SM (128 registers a thread, no spills): two rows at four
// blocks (64 registers, a few spills) and eight at one block measured slower (H200 qk-norm
// backward 52.1 against 55.3 and 55.0 us; performance log, session 14).
constexpr int kShortRowsAhead = 4;
constexpr int kShortBlocksPerSm = 2;

template <DType XT, CastingMode M, int VEC, int TPR, bool kShift>
__global__ void __launch_bounds__(kShortThreads, kShortBlocksPerSm)
    backward_short_kernel(const __grid_constant__ BackwardArgs p) {
  static_assert(M != CastingMode::kGemma, "gemma's dscale does not factor");
  static_assert(TPR <= 32 && kShortThreads % TPR == 0, "teams inside a warp");
  constexpr int TEAMS = kShortThreads / TPR;
  constexpr int U = kShortRowsAhead;
  using Raw = XRaw<XT, VEC>;
  static_assert(sizeof(Raw) == 16, "16-byte vectors");
  extern __shared__ __align__(16) float team_partials[];  // [TEAMS][dim], at the end
  const int team = static_cast<int>(threadIdx.x) / TPR;
  const int lane = static_cast<int>(threadIdx.x) % TPR;  // = this thread's vector (dim_vecs == TPR)
  wait_for_prior_grid();  // (programmatic launch: see backward_lean_kernel)

  const RowWalk walk = block_row_walk<TEAMS>(p.rows, p.group_rows, p.blocks_per_group,
                                             p.rows_per_block, p.interleave != 0);
  const int64_t scale_idx = p.scale != nullptr ? map_offset<false>(p.scale_map, walk.begin) : 0;
  float mw[VEC], acc_s[1][VEC], acc_h[1][VEC];  // (acc_h unused without kShift)
  {
    float w[VEC], m[VEC];
    load_block_w_m<VEC>(p, scale_idx, lane, w, m);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      mw[e] = m[e] * w[e];
      acc_s[0][e] = 0.f;
      acc_h[0][e] = 0.f;
    }
  }
  const int64_t step = walk.step;
  for (int64_t base = walk.begin + team; base < walk.end + team; base += U * step) {
    Raw xr[U], gr[U];
    float rstd[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t row = base + u * step;
      if (row < walk.end) {
        xr[u] = __ldg(reinterpret_cast<const Raw*>(elem_ptr<XT>(p.x, row * p.x_row_stride)) + lane);
        // dy plainly: its memory may be the dx this kernel writes (other rows' vectors only).
        gr[u] = reinterpret_cast<const Raw*>(elem_ptr<XT>(p.dy, row * p.dy_row_stride))[lane];
        rstd[u] = p.rstd[row];
      } else {  // zeros add nothing to the sums
        xr[u] = Raw{};
        gr[u] = Raw{};
        rstd[u] = 0.f;
      }
    }
    float dot[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float xf[VEC], gf[VEC], xhat[VEC], wf[VEC];
      unpack<XT, VEC>(xr[u], xf);
      unpack<XT, VEC>(gr[u], gf);
#pragma unroll
      for (int e = 0; e < VEC; ++e) xhat[e] = xf[e] * rstd[u];
      weight_factors<M, XT, VEC>(xhat, wf);
      float d = 0.f;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        d = fmaf(gf[e] * mw[e], xhat[e], d);
        acc_s[0][e] = fmaf(gf[e], wf[e], acc_s[0][e]);
        if constexpr (kShift) acc_h[0][e] += gf[e];
      }
      dot[u] = d;
    }
    // The team's sums by a butterfly over its lanes (the same bits in every lane), the rows'
    // chains side by side.
#pragma unroll
    for (int o = TPR / 2; o > 0; o >>= 1) {
#pragma unroll
      for (int u = 0; u < U; ++u) dot[u] += __shfl_xor_sync(0xffffffffu, dot[u], o);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t row = base + u * step;
      if (row >= walk.end) continue;
      // dx = rstd * (g*m*w) - x * (rstd^2 * mean(g*m*w * xhat)), as backward_lean_kernel.
      const float x_coef = dot[u] * p.inv_dim * rstd[u] * rstd[u];
      float xf[VEC], gf[VEC], out[VEC];
      unpack<XT, VEC>(xr[u], xf);
      unpack<XT, VEC>(gr[u], gf);
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[e] = fmaf(rstd[u], gf[e] * mw[e], -xf[e] * x_coef);
      reinterpret_cast<Raw*>(elem_ptr<XT>(p.dx, row * static_cast<int64_t>(p.dim)))[lane] =
          pack<XT, VEC, Raw>(out);
    }
  }

  allow_dependent_launch();  // the finalize may start its blocks; it waits for these partials
  // The partials, each combined over the block's teams in team order.
  float w_part[1][VEC];
  {
    float w[VEC], m[VEC];
    load_block_w_m<VEC>(p, scale_idx, lane, w, m);
    factor_block_sums<VEC>(acc_s[0], w, m, w_part[0]);
  }
  auto flush = [&](const float (&acc)[1][VEC], float* partials) {
    write_block_partials<1, VEC>(acc, partials, p.dim, p.dim_vecs, lane, TPR, team, TEAMS,
                                 team_partials);
  };
  if (p.dweight_partials != nullptr) flush(w_part, p.dweight_partials);
  if (p.dscale_partials != nullptr) flush(acc_s, p.dscale_partials);
  if constexpr (kShift) flush(acc_h, p.dshift_partials);
}

}  // namespace modnorm::cuda_detail
