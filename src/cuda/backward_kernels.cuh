// Backward kernels.
//
// With g = dy, m = scale_offset + scale, dn = g*m, xhat = x*rstd, w = offset + weight, a = dn*w:
//   dx = rstd * (a - xhat * mean(a * xhat)),  dweight = sum dn * xhat (llama: round(xhat)),
//   dscale = sum g * norm(x),  dshift = sum g.
//
// backward_reg_kernel / backward_pipe_kernel: the main path. A persistent grid whose row-to-block assignment is a fixed
// function of the shape: block b owns a contiguous row range, inside one modulation group when
// shared per-sample modulation gradients are fused (groups of rows_per_distinct consecutive rows).
// Each thread owns fixed columns, so it accumulates dweight / shared dscale / dshift partials in
// registers over its rows and writes them once, as block partials, at the end; finalize_kernel
// sums those partials in a fixed order. The reg kernel loads x and dy rows straight into
// registers (the next row's too where registers allow). The pipe kernel (per-token scale rows,
// short rows) streams x and dy rows (and per-token scale rows) through a ring of shared-memory slots filled by cp.async stages - 1 rows ahead (each thread copies and
// reads back only its own vectors), then sit in registers: x and dy are read once. dx of a row is
// written only after the team's sum, which every thread reaches only after its share of that dy
// row is in registers; the ring only ever reads rows after the current one, so dx may alias dy.
//
// backward_loop_kernel: rows too long for registers or unaligned layouts. dx (and per-row dscale
// / dshift) only; walks the row twice, staging each thread's own x/dy vectors in shared memory
// when they fit. Element j of dy is re-read (second walk) only by the thread that then writes
// element j of dx, so in place stays safe.
//
// column_grad_kernel: read-only fixed-order partial sums over the rows that share a gradient row,
// for any RowMap (e.g. (T, D) modulation shared over the batch) and for dweight on the loop path.
// It runs before any kernel that writes dx, so an in-place dx can never feed it.
#pragma once

#include "forward_kernels.cuh"

namespace modnorm::cuda_detail {

struct BackwardArgs {
  const void* x = nullptr;
  const void* dy = nullptr;
  const float* rstd = nullptr;
  void* dx = nullptr;  // nullptr: dx not requested
  int64_t rows = 0;
  int64_t x_row_stride = 0;
  int64_t dy_row_stride = 0;
  int dim = 0;
  int dim_vecs = 0;
  const void* weight = nullptr;
  const void* scale = nullptr;
  int weight_dtype = 0, scale_dtype = 0, shift_dtype = 0;
  float offset = 0.f, scale_offset = 1.f, inv_dim = 1.f;
  DevMap scale_map, shift_map;
  int dx_vectorized = 1;
  // Modulation rows read by a single x row: gradients written straight from the row.
  void* dscale_direct = nullptr;
  void* dshift_direct = nullptr;
  int dscale_vectorized = 1, dshift_vectorized = 1;
  // Block partials [blocks][dim] (reg kernel only).
  float* dweight_partials = nullptr;
  float* dscale_partials = nullptr;
  float* dshift_partials = nullptr;
  // Row assignment (reg kernel): block b = group * blocks_per_group + sub owns rows
  // [group*group_rows + sub*rows_per_block, +rows_per_block) clipped to its group.
  int64_t group_rows = 0;
  int64_t blocks_per_group = 1;
  int64_t rows_per_block = 0;
  int interleave = 0;  // backward_const_kernel: block_row_walk's interleaved order
  int staged = 0;  // loop kernel
  // Pipe kernel: dynamic shared memory = [team partials: partials_smem bytes][ring per team:
  // stages slots of stage_bytes: x vectors at 0, dy at g_stage_off, scale at m_stage_off when
  // m_vec_bytes > 0 (per-token scale rows)].
  int stages = 2, stage_bytes = 0, g_stage_off = 0, m_stage_off = 0, m_vec_bytes = 0;
  int partials_smem = 0;
  // Pipe kernel: byte offsets in dynamic shared memory of the weight and of the one scale row
  // every row of the block reads, copied there once per block (-1: read through L1).
  int cache_w = -1, cache_s = -1;
  // backward_const_kernel<RING>: x and dy rows stream through this many shared-memory stages.
  int ring_stages = 0;
};

// Every backward row kernel's type (the host plans and launches them through this).
using BackwardKernel = void (*)(BackwardArgs);

template <int THREADS>
constexpr int backward_min_blocks() {
  return THREADS >= 512 ? 1 : 512 / THREADS;
}

// Writes this block's per-column partials (row blockIdx.x of `partials`). Teams of one block
// combine in team order through shared memory, so every sum is a fixed function of the shape.
template <int NV, int VEC>
__device__ __forceinline__ void write_block_partials(const float (&acc)[NV][VEC], float* partials,
                                                     int dim, int dim_vecs, int lane, int tpr,
                                                     int team, int teams, float* team_partials) {
  float* dst = partials + static_cast<int64_t>(blockIdx.x) * dim;
  if (teams == 1) {
    // A warp's 32 vectors of 8 floats are 1 KB of contiguous columns. Stored as they lie, each
    // store instruction touched 32 sectors 4 bytes each (8 instructions a vector): ~0.6 M extra
    // L2 write sectors on ltx2b-t2v, all in the burst at the end of the row pass, which the
    // finalize then waited on. Instead the lanes trade halves so that each of two 16-byte stores
    // covers 512 contiguous bytes (H200 backward op: ltx2b-t2v 59.6 -> 52.6 us, ltx13b 107.6 ->
    // 96.0, flux 68.2 -> 61.2, wan14b 284.8 -> 264.0; performance log, session 12).
    // (float32 x: a vector is 16 bytes, one store of its own.)
    const bool aligned = reinterpret_cast<uintptr_t>(dst) % 16 == 0;
    const bool warp_stores = VEC == 8 && tpr % 32 == 0 && aligned;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int v = lane + i * tpr;
      if constexpr (VEC == 8) {
        const int warp_v0 = v - (threadIdx.x & 31);  // the warp's first vector (uniform)
        if (warp_stores && warp_v0 + 32 <= dim_vecs) {
          const int l = threadIdx.x & 31;
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int src = 16 * j + (l >> 1);
            float lo[4], hi[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              lo[q] = __shfl_sync(0xffffffffu, acc[i][q], src);
              hi[q] = __shfl_sync(0xffffffffu, acc[i][4 + q], src);
            }
            const float4 out = (l & 1) ? make_float4(hi[0], hi[1], hi[2], hi[3])
                                       : make_float4(lo[0], lo[1], lo[2], lo[3]);
            reinterpret_cast<float4*>(dst + static_cast<int64_t>(warp_v0) * VEC)[32 * j + l] = out;
          }
          continue;
        }
      }
      if constexpr (VEC == 4) {
        if (aligned) {
          if (v < dim_vecs) {
            reinterpret_cast<float4*>(dst)[v] =
                make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
          }
          continue;
        }
      }
      if (v < dim_vecs) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) dst[v * VEC + e] = acc[i][e];
      }
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int v = lane + i * tpr;
    if (v < dim_vecs) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) team_partials[team * dim + v * VEC + e] = acc[i][e];
    }
  }
  __syncthreads();
  for (int col = threadIdx.x; col < dim; col += blockDim.x) {
    float s = 0.f;
    for (int t = 0; t < teams; ++t) s += team_partials[t * dim + col];
    dst[col] = s;
  }
  __syncthreads();
}

// This lane's NV vectors lane + i * tpr of row `row` of x (through the read-only cache) and of dy
// (plain loads: dy's memory may be the dx the kernel writes).
template <DType XT, typename Raw, int NV>
__device__ __forceinline__ void load_x_dy_row(const BackwardArgs& p, int64_t row, int lane,
                                              int tpr, Raw (&xr)[NV], Raw (&gr)[NV]) {
  const Raw* xrow = reinterpret_cast<const Raw*>(elem_ptr<XT>(p.x, row * p.x_row_stride));
  const Raw* grow = reinterpret_cast<const Raw*>(elem_ptr<XT>(p.dy, row * p.dy_row_stride));
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int v = lane + i * tpr;
    if (v < p.dim_vecs) {
      xr[i] = __ldg(xrow + v);
      gr[i] = grow[v];
    }
  }
}

// One step of the one-row-ahead pipeline: the rows loaded ahead become this iteration's (xr, gr)
// and, when there is a next row, it is loaded ahead in turn. Returns whether it was.
template <DType XT, typename Raw, int NV>
__device__ __forceinline__ bool advance_x_dy_rows(const BackwardArgs& p, int64_t next_row,
                                                  bool has_next, int lane, int tpr,
                                                  Raw (&xr)[NV], Raw (&gr)[NV],
                                                  Raw (&x_next)[NV], Raw (&g_next)[NV]) {
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    xr[i] = x_next[i];
    gr[i] = g_next[i];
  }
  if (has_next) load_x_dy_row<XT>(p, next_row, lane, tpr, x_next, g_next);
  return has_next;
}

// Per-vector gradient math shared by the register and loop kernels: returns this vector's share
// of sum(a * xhat), accumulates partials and writes direct modulation gradients as asked.
template <DType XT, CastingMode M, int VEC, bool kAccumulate>
__device__ __forceinline__ float backward_vector(const BackwardArgs& p, const float* xf,
                                                 const float* gf, float rstd, int v,
                                                 int64_t scale_idx, int64_t dscale_row,
                                                 int64_t dshift_row, float* acc_w, float* acc_s,
                                                 float* acc_h) {
  float w[VEC], m[VEC];
  const int64_t col = static_cast<int64_t>(v) * VEC;
  load_factor<VEC>(p.weight, p.weight_dtype, p.offset, col, w);
  load_factor<VEC>(p.scale, p.scale_dtype, p.scale_offset, scale_idx + col, m);
  float dot = 0.f;
  float direct[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const float xhat = xf[e] * rstd;
    const float dn = gf[e] * m[e];
    dot += dn * w[e] * xhat;
    if constexpr (kAccumulate) {
      if (p.dweight_partials != nullptr) acc_w[e] += dn * weight_factor<M, XT>(xhat);
      if (p.dscale_partials != nullptr) acc_s[e] += gf[e] * norm_value<M, XT>(xhat, w[e]);
      if (p.dshift_partials != nullptr) acc_h[e] += gf[e];
    }
    direct[e] = gf[e] * norm_value<M, XT>(xhat, w[e]);
  }
  if (p.dscale_direct != nullptr) {
    store_any<VEC>(p.dscale_direct, p.scale_dtype, dscale_row * p.dim + col, direct,
                   p.dscale_vectorized != 0);
  }
  if (p.dshift_direct != nullptr) {
    store_any<VEC>(p.dshift_direct, p.shift_dtype, dshift_row * p.dim + col, gf,
                   p.dshift_vectorized != 0);
  }
  return dot;
}

// a = g*m*w is recomputed rather than kept from the first step: w and m come back from L1, and
// the registers go to the partial sums.
template <DType XT, CastingMode M, int VEC>
__device__ __forceinline__ void store_dx(const BackwardArgs& p, const float* xf, const float* gf,
                                         float rstd, float c, int v, int64_t scale_idx,
                                         void* dxrow) {
  float w[VEC], m[VEC], out[VEC];
  const int64_t col = static_cast<int64_t>(v) * VEC;
  load_factor<VEC>(p.weight, p.weight_dtype, p.offset, col, w);
  load_factor<VEC>(p.scale, p.scale_dtype, p.scale_offset, scale_idx + col, m);
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = rstd * (gf[e] * m[e] * w[e] - xf[e] * rstd * c);
  store_elems<XT, VEC>(dxrow, col, out, p.dx_vectorized != 0);
}

template <DType XT, CastingMode M, int VEC, int NV, int TPR, int TEAMS>
__global__ void __launch_bounds__(TPR* TEAMS, backward_min_blocks<TPR * TEAMS>())
    backward_reg_kernel(const __grid_constant__ BackwardArgs p) {
  wait_for_prior_grid();  // launched programmatically on sm_90+ (launch_row_pass)
  static_assert(TPR <= 32 || TEAMS == 1, "block-wide teams own the whole block");
  using Raw = XRaw<XT, VEC>;
  __shared__ float red[32];
  extern __shared__ float team_partials[];  // [TEAMS][dim], only when TEAMS > 1
  const int team = threadIdx.x / TPR;
  const int lane = threadIdx.x % TPR;

  const RowRange range = block_rows(p.rows, p.group_rows, p.blocks_per_group, p.rows_per_block);
  const int64_t row_begin = range.begin;
  const int64_t row_end = range.end;

  float acc_w[NV][VEC], acc_s[NV][VEC], acc_h[NV][VEC];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc_w[i][e] = acc_s[i][e] = acc_h[i][e] = 0.f;
  }


  // Prefetching the next row costs a second set of row registers; threads with 16 elements
  // would spill, and rely on the other resident warps to hide latency instead.
  constexpr bool kPrefetch = NV * VEC <= 8;
  Raw x_next[NV], g_next[NV];
  if (kPrefetch && row_begin + team < row_end) {
    load_x_dy_row<XT>(p, row_begin + team, lane, TPR, x_next, g_next);
  }

  for (int64_t base = row_begin; base < row_end; base += TEAMS) {
    const int64_t row = base + team;
    const bool active = row < row_end;
    Raw xr[NV], gr[NV];
    if constexpr (kPrefetch) {
      advance_x_dy_rows<XT>(p, row + TEAMS, row + TEAMS < row_end, lane, TPR, xr, gr, x_next,
                            g_next);
    } else if (active) {
      load_x_dy_row<XT>(p, row, lane, TPR, xr, gr);
    }

    float dot = 0.f;
    float rstd = 0.f;
    int64_t scale_idx = 0;
    if (active) {
      rstd = p.rstd[row];
      scale_idx = p.scale != nullptr ? map_offset(p.scale_map, row) : 0;
      const int64_t dscale_row = p.dscale_direct != nullptr ? map_grad_row(p.scale_map, row) : 0;
      const int64_t dshift_row = p.dshift_direct != nullptr ? map_grad_row(p.shift_map, row) : 0;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int v = lane + i * TPR;
        if (v < p.dim_vecs) {
          float xf[VEC], gf[VEC];
          unpack<XT, VEC>(xr[i], xf);
          unpack<XT, VEC>(gr[i], gf);
          dot += backward_vector<XT, M, VEC, true>(p, xf, gf, rstd, v, scale_idx, dscale_row,
                                                   dshift_row, acc_w[i], acc_s[i], acc_h[i]);
        }
      }
    }
    const float c = team_sum<TPR>(dot, red) * p.inv_dim;
    if (active && p.dx != nullptr) {
      void* dxrow = elem_ptr<XT>(p.dx, row * static_cast<int64_t>(p.dim));
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int v = lane + i * TPR;
        if (v < p.dim_vecs) {
          float xf[VEC], gf[VEC];
          unpack<XT, VEC>(xr[i], xf);
          unpack<XT, VEC>(gr[i], gf);
          store_dx<XT, M, VEC>(p, xf, gf, rstd, c, v, scale_idx, dxrow);
        }
      }
    }
  }

  auto flush = [&](float (&acc)[NV][VEC], float* partials) {
    write_block_partials<NV, VEC>(acc, partials, p.dim, p.dim_vecs, lane, TPR, team, TEAMS, team_partials);
  };
  if (p.dweight_partials != nullptr) flush(acc_w, p.dweight_partials);
  if (p.dscale_partials != nullptr) flush(acc_s, p.dscale_partials);
  if (p.dshift_partials != nullptr) flush(acc_h, p.dshift_partials);
}

// backward_const_kernel: the register kernel for blocks whose rows all read the same scale row
// (per-sample / per-frame runs grouped per block, one shared row, or no scale) and the same
// weight, which is most DiT layouts. With m and w constant per column over the block:
//   dweight partial = m * S,  dscale partial = w * S,  S = sum over the block's rows of
//   g * weight_factor(xhat)  (llama: round(xhat); none: xhat),
// so one accumulator per column replaces two (gemma rounds xhat * w, which does not factor: it
// keeps the register kernel), and m*w is loaded once per block instead of twice
// per row (ncu, flux: the register kernel issued an instruction every 2 cycles per scheduler at
// 115 registers and 25% occupancy). Sums are fixed-order as in the register kernel.
// 128 registers: at 85 (three 256-thread blocks per SM) ptxas spills 450 bytes.
template <int THREADS>
constexpr int backward_const_min_blocks() {
  return THREADS >= 512 ? 1 : 512 / THREADS;
}

// RING (sm_90+): x and dy rows come through p.ring_stages shared-memory stages filled by thread
// 0's bulk copies (device_utils.cuh) instead of one row ahead in registers, so a block keeps
// several rows in flight (wan14b forward+backward 78 -> 84% of its floor). Block-wide teams take
// a row per stage; warp teams (short rows) a tile of TEAMS consecutive rows per stage, with their
// rstd, and the block refills a stage after one barrier per tile.
// TOKEN (with RING): per-token scale rows, the third row of each stage. The weight stays in
// registers, m comes per row: dscale = g * weight_factor(xhat) * w is written per row and the
// dweight partial sums g * m * weight_factor(xhat).
constexpr int kMaxRingStages = 8;

// Thread 0's fill of a block-wide ring stage: `expect_bytes` on the stage's barrier, then row
// `row` of x at the stage's start and of dy after it (row_bytes each), by bulk copies.
template <DType XT>
__device__ __forceinline__ void stage_x_dy_row(const BackwardArgs& p, char* stage, uint64_t* bar,
                                               int64_t row, unsigned row_bytes,
                                               unsigned expect_bytes) {
  mbar_expect_bytes(bar, expect_bytes);
  bulk_copy_to_shared(stage, elem_ptr<XT>(p.x, row * p.x_row_stride), row_bytes, bar);
  bulk_copy_to_shared(stage + row_bytes, elem_ptr<XT>(p.dy, row * p.dy_row_stride), row_bytes,
                      bar);
}

template <DType XT, CastingMode M, int VEC, int NV, int TPR, int TEAMS, bool RING = false,
          bool TOKEN = false>
__global__ void __launch_bounds__(TPR* TEAMS, backward_const_min_blocks<TPR * TEAMS>())
    backward_const_kernel(const __grid_constant__ BackwardArgs p) {
  wait_for_prior_grid();  // launched programmatically on sm_90+ (launch_row_pass)
  static_assert(TPR <= 32 || TEAMS == 1, "block-wide teams own the whole block");
  static_assert(M != CastingMode::kGemma, "gemma's dscale does not factor");
  static_assert(!TOKEN || (RING && TEAMS == 1), "per-token scale rows come through the ring");
  constexpr bool kTileRing = RING && TEAMS > 1;
  using Raw = XRaw<XT, VEC>;
  __shared__ float red[32];
  // [TEAMS][dim] team partials when TEAMS > 1; the ring's stages (x row, then dy row) with RING.
  // A tile ring's stages hold [TEAMS x rows][TEAMS dy rows][TEAMS rstd], and the team partials
  // reuse them once every stage has been read.
  extern __shared__ __align__(16) float team_partials[];
  __shared__ uint64_t ring_full[RING ? kMaxRingStages : 1];
  const int team = threadIdx.x / TPR;
  const int lane = threadIdx.x % TPR;

  const RowWalk walk = block_row_walk<TEAMS>(p.rows, p.group_rows, p.blocks_per_group,
                                             p.rows_per_block, p.interleave != 0);
  const int64_t row_begin = walk.begin;
  const int64_t row_end = walk.end;
  const int64_t step = walk.step;
  const int64_t scale_idx =
      p.scale != nullptr && !TOKEN ? map_offset(p.scale_map, row_begin) : 0;
  const bool want_s = p.dweight_partials != nullptr || p.dscale_partials != nullptr;

  // w and m of this thread's vector v (the block's constants; TOKEN: m = 1 here, per row below).
  auto load_w_m = [&](int v, float (&w)[VEC], float (&m)[VEC]) {
    if (v < p.dim_vecs) {
      const int64_t col = static_cast<int64_t>(v) * VEC;
      load_factor<VEC>(p.weight, p.weight_dtype, p.offset, col, w);
      load_factor<VEC>(TOKEN ? nullptr : p.scale, p.scale_dtype, p.scale_offset, scale_idx + col,
                       m);
    }
  };
  float mw[NV][VEC], acc_s[NV][VEC], acc_h[NV][VEC];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int v = lane + i * TPR;
    float w[VEC], m[VEC];
    load_w_m(v, w, m);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      mw[i][e] = v < p.dim_vecs ? m[e] * w[e] : 0.f;
      acc_s[i][e] = acc_h[i][e] = 0.f;
    }
  }

  // The next row's x and dy travel one row ahead in registers (RING: stages ahead in shared
  // memory), and so does its rstd.
  char* ring = reinterpret_cast<char*>(team_partials);
  const unsigned row_bytes = static_cast<unsigned>(p.dim_vecs) * 16u;
  const int scale_bytes = p.scale_dtype == kDtF32 ? 4 : 2;
  const unsigned m_row_bytes = TOKEN ? static_cast<unsigned>(p.dim * scale_bytes) : 0u;
  const unsigned tile_rows_bytes = kTileRing ? TEAMS * row_bytes : row_bytes;
  const unsigned stage_bytes =
      kTileRing ? (2 * tile_rows_bytes + TEAMS * 4 + 15) / 16 * 16 : 2 * row_bytes + m_row_bytes;
  const int stages = p.ring_stages;
  // Tile rings: the tile of rows [base, base + TEAMS) clipped to the block's end, as one bulk copy
  // per tensor where its rows are contiguous, and the tile's rstd as one more where 16-byte
  // aligned, else by cp.async counted on the same barrier.
  auto tile_issue = [&](int slot, int64_t base) {
    char* stage = ring + slot * stage_bytes;
    const int n = static_cast<int>(min(static_cast<int64_t>(TEAMS), row_end - base));
    // (rstd may be any float32 view the caller kept: its address decides, not base alone.)
    const bool rstd_bulk = reinterpret_cast<uintptr_t>(p.rstd + base) % 16 == 0 && n % 4 == 0;
    if (!rstd_bulk) {
      for (int r = 0; r < n; ++r) {
        cp_async_4_on_mbar(stage + 2 * tile_rows_bytes + 4 * r, p.rstd + base + r,
                           &ring_full[slot]);
      }
    }
    mbar_expect_bytes(&ring_full[slot], 2 * n * row_bytes + (rstd_bulk ? 4 * n : 0));
    auto rows_in = [&](char* dst, const void* src, int64_t stride) {
      if (stride * static_cast<int64_t>(sizeof(XRaw<XT, VEC>) / VEC) == row_bytes) {
        bulk_copy_to_shared(dst, elem_ptr<XT>(src, base * stride), n * row_bytes, &ring_full[slot]);
      } else {
        for (int r = 0; r < n; ++r) {
          bulk_copy_to_shared(dst + r * row_bytes, elem_ptr<XT>(src, (base + r) * stride),
                              row_bytes, &ring_full[slot]);
        }
      }
    };
    rows_in(stage, p.x, p.x_row_stride);
    rows_in(stage + tile_rows_bytes, p.dy, p.dy_row_stride);
    if (rstd_bulk) {
      bulk_copy_to_shared(stage + 2 * tile_rows_bytes, p.rstd + base, 4 * n, &ring_full[slot]);
    }
  };
  auto ring_issue = [&](int slot, int64_t row) {
    if constexpr (kTileRing) {
      tile_issue(slot, row);
      return;
    }
    char* stage = ring + slot * stage_bytes;
    stage_x_dy_row<XT>(p, stage, &ring_full[slot], row, row_bytes, stage_bytes);
    if constexpr (TOKEN) {
      const char* m_row =
          static_cast<const char*>(p.scale) + map_offset(p.scale_map, row) * scale_bytes;
      bulk_copy_to_shared(stage + 2 * row_bytes, m_row, m_row_bytes, &ring_full[slot]);
    }
  };
  // This thread's vectors of a staged x row and dy row, into registers. Shared-window addresses,
  // from bases computed once per block: rebuilding them from generic pointers every row cost
  // instructions (t2v backward 61.5 -> 60.5 us, performance log, session 11).
  const unsigned ring_addr = smem_u32(ring);
  const unsigned ring_full_addr = smem_u32(ring_full);
  auto take_staged_rows = [&](unsigned x_row, unsigned g_row, Raw(&xr)[NV], Raw(&gr)[NV]) {
    static_assert(!RING || sizeof(Raw) == 16, "rings stage 16-byte vectors");
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int v = lane + i * TPR;
      if (v < p.dim_vecs) {
        xr[i] = load_shared_16(x_row + 16u * v);
        gr[i] = load_shared_16(g_row + 16u * v);
      }
    }
  };
  RingCursor cursor;
  Raw x_next[RING ? 1 : NV], g_next[RING ? 1 : NV];
  float rstd_next = 0.f;
  if constexpr (RING) {
    if (threadIdx.x == 0) {
      for (int s = 0; s < stages; ++s) mbar_init(&ring_full[s], 1);
      fence_mbar_init();
      for (int s = 0; s < stages && row_begin + s * step < row_end; ++s) {
        ring_issue(s, row_begin + s * step);
      }
    }
    if (!kTileRing && row_begin < row_end) rstd_next = p.rstd[row_begin];
    __syncthreads();  // the barriers are initialized before any thread waits on them
  } else if (row_begin + team < row_end) {
    load_x_dy_row<XT>(p, row_begin + team, lane, TPR, x_next, g_next);
    rstd_next = p.rstd[row_begin + team];
  }

  for (int64_t base = row_begin; base < row_end; base += step) {
    const int64_t row = base + team;
    const bool active = row < row_end;
    Raw xr[NV], gr[NV];
    // TOKEN: this row's m * w, kept until dx (the stage is refilled after the sum).
    float mw_row[TOKEN ? NV : 1][VEC];
    const char* staged_m = nullptr;
    float rstd = rstd_next;
    if constexpr (kTileRing) {
      mbar_wait_at(ring_full_addr + 8u * cursor.slot, cursor.parity);
      const char* stage = ring + cursor.slot * stage_bytes;
      const unsigned stage_addr = ring_addr + cursor.slot * stage_bytes;
      if (active) {
        rstd = reinterpret_cast<const float*>(stage + 2 * tile_rows_bytes)[team];
        take_staged_rows(stage_addr + team * row_bytes,
                         stage_addr + tile_rows_bytes + team * row_bytes, xr, gr);
      }
      __syncthreads();  // every team holds its row: the stage may be refilled
      if (threadIdx.x == 0 && base + stages * step < row_end) {
        ring_issue(cursor.slot, base + stages * step);
      }
      cursor.next(stages);
    } else if constexpr (RING) {
      if (row + step < row_end) rstd_next = p.rstd[row + step];
      mbar_wait_at(ring_full_addr + 8u * cursor.slot, cursor.parity);
      const unsigned stage = ring_addr + cursor.slot * stage_bytes;
      if constexpr (TOKEN) staged_m = ring + cursor.slot * stage_bytes + 2 * row_bytes;
      take_staged_rows(stage, stage + row_bytes, xr, gr);
    } else if (advance_x_dy_rows<XT>(p, row + step, row + step < row_end, lane, TPR, xr, gr,
                                     x_next, g_next)) {
      rstd_next = p.rstd[row + step];
    }

    float dot = 0.f;
    // Warp teams keep xhat and a = g * m * w of their elements from the sum's pass for dx, which
    // then costs a fused multiply-add and a multiply per element instead of unpacking x and dy
    // again and recomputing both (qk-norm backward 62 -> 59 us, H200). Block-wide rows recompute:
    // held, they pushed the kernel from 112 to 128 registers and ran 5-30% slower (mochi, wan14b;
    // performance log, session 11).
    constexpr bool kHold = !TOKEN && TEAMS > 1;
    float xhat_held[kHold ? NV : 1][VEC], a_held[kHold ? NV : 1][VEC];
    if (active) {
      const int64_t dshift_row = p.dshift_direct != nullptr ? map_grad_row(p.shift_map, row) : 0;
      const int64_t dscale_row = TOKEN ? map_grad_row(p.scale_map, row) : 0;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int v = lane + i * TPR;
        if (v < p.dim_vecs) {
          float xf[VEC], gf[VEC];
          unpack<XT, VEC>(xr[i], xf);
          unpack<XT, VEC>(gr[i], gf);
          if constexpr (TOKEN) {
            float m[VEC], ds[VEC];
            load_plain_any<VEC>(staged_m + v * VEC * scale_bytes, p.scale_dtype, m);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              m[e] += p.scale_offset;
              mw_row[i][e] = m[e] * mw[i][e];  // mw holds w alone
              const float xhat = xf[e] * rstd;
              const float wf = weight_factor<M, XT>(xhat);
              dot += gf[e] * mw_row[i][e] * xhat;
              if (p.dweight_partials != nullptr) acc_s[i][e] += gf[e] * m[e] * wf;
              if (p.dshift_partials != nullptr) acc_h[i][e] += gf[e];
              ds[e] = gf[e] * wf * mw[i][e];
            }
            if (p.dscale_direct != nullptr) {
              store_any<VEC>(p.dscale_direct, p.scale_dtype,
                             dscale_row * p.dim + static_cast<int64_t>(v) * VEC, ds,
                             p.dscale_vectorized != 0);
            }
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const float xhat = xf[e] * rstd;
              const float a = gf[e] * mw[i][e];
              dot += a * xhat;
              if constexpr (kHold) {
                xhat_held[i][e] = xhat;
                a_held[i][e] = a;
              }
              if (want_s) acc_s[i][e] += gf[e] * weight_factor<M, XT>(xhat);
              if (p.dshift_partials != nullptr) acc_h[i][e] += gf[e];
            }
          }
          if (p.dshift_direct != nullptr) {
            store_any<VEC>(p.dshift_direct, p.shift_dtype,
                           dshift_row * p.dim + static_cast<int64_t>(v) * VEC, gf,
                           p.dshift_vectorized != 0);
          }
        }
      }
    }
    const float c = team_sum<TPR>(dot, red) * p.inv_dim;
    if constexpr (RING && !kTileRing) {
      // Past the sum's barriers every thread holds this stage's rows in registers: refill it.
      if (threadIdx.x == 0 && row + stages * step < row_end) {
        ring_issue(cursor.slot, row + stages * step);
      }
      cursor.next(stages);
    }
    if (active && p.dx != nullptr) {
      void* dxrow = elem_ptr<XT>(p.dx, row * static_cast<int64_t>(p.dim));
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int v = lane + i * TPR;
        if (v < p.dim_vecs) {
          float out[VEC];
          if constexpr (kHold) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) out[e] = rstd * (a_held[i][e] - xhat_held[i][e] * c);
          } else {
            float xf[VEC], gf[VEC];
            unpack<XT, VEC>(xr[i], xf);
            unpack<XT, VEC>(gr[i], gf);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const float mwe = TOKEN ? mw_row[i][e] : mw[i][e];
              out[e] = rstd * (gf[e] * mwe - xf[e] * rstd * c);
            }
          }
          store_elems<XT, VEC>(dxrow, static_cast<int64_t>(v) * VEC, out, p.dx_vectorized != 0);
        }
      }
    }
  }

  allow_dependent_launch();  // the finalize may start its blocks; it waits for these partials
  // Products with the block's constant m and w, then the fixed-order block partials (TOKEN:
  // acc_s already is the dweight partial).
  if constexpr (TOKEN) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) mw[i][e] = acc_s[i][e];
    }
  } else {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int v = lane + i * TPR;
      float w[VEC], m[VEC];
      load_w_m(v, w, m);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (v < p.dim_vecs) {
          mw[i][e] = acc_s[i][e] * m[e];  // dweight partial
          acc_s[i][e] *= w[e];            // dscale partial
        }
      }
    }
  }
  auto flush = [&](float (&acc)[NV][VEC], float* partials) {
    write_block_partials<NV, VEC>(acc, partials, p.dim, p.dim_vecs, lane, TPR, team, TEAMS,
                                  team_partials);
  };
  if (p.dweight_partials != nullptr) flush(mw, p.dweight_partials);
  if (p.dscale_partials != nullptr) flush(acc_s, p.dscale_partials);
  if (p.dshift_partials != nullptr) flush(acc_h, p.dshift_partials);
}

// m = scale_offset + scale for one vector: from the ring slot when staged per row, from the
// block's cached row when shared, else through L1.
template <int VEC>
__device__ __forceinline__ void pipe_scale(const BackwardArgs& p, const char* st,
                                           const char* cache, int v, int64_t scale_idx, float* m) {
  if (p.m_vec_bytes != 0 || p.cache_s >= 0) {
    const char* src = p.m_vec_bytes != 0
                          ? st + p.m_stage_off + v * p.m_vec_bytes
                          : cache + p.cache_s + v * VEC * (p.scale_dtype == kDtF32 ? 4 : 2);
    load_plain_any<VEC>(src, p.scale_dtype, m);
#pragma unroll
    for (int e = 0; e < VEC; ++e) m[e] += p.scale_offset;
  } else {
    load_factor<VEC>(p.scale, p.scale_dtype, p.scale_offset,
                     scale_idx + static_cast<int64_t>(v) * VEC, m);
  }
}

// w = offset + weight for one vector, from the block's cached copy or through L1.
template <int VEC>
__device__ __forceinline__ void pipe_weight(const BackwardArgs& p, const char* cache, int v,
                                            float* w) {
  if (p.cache_w >= 0) {
    load_plain_any<VEC>(cache + p.cache_w + v * VEC * (p.weight_dtype == kDtF32 ? 4 : 2),
                        p.weight_dtype, w);
#pragma unroll
    for (int e = 0; e < VEC; ++e) w[e] += p.offset;
  } else {
    load_factor<VEC>(p.weight, p.weight_dtype, p.offset, static_cast<int64_t>(v) * VEC, w);
  }
}

template <DType XT, CastingMode M, int VEC, int NV, int TPR>
__global__ void __launch_bounds__(TPR == 0 ? 512 : kTeamBlockThreads, TPR == 0 ? 1 : 2)
    backward_pipe_kernel(const __grid_constant__ BackwardArgs p) {
  wait_for_prior_grid();  // launched programmatically on sm_90+ (launch_row_pass)
  using Raw = XRaw<XT, VEC>;
  static_assert(sizeof(Raw) == 16, "the pipe kernel stages 16-byte vectors");
  __shared__ float red[2][32];
  extern __shared__ __align__(16) char bwd_pipe_mem[];
  const int tpr = TPR == 0 ? static_cast<int>(blockDim.x) : TPR;
  const int teams = TPR == 0 ? 1 : static_cast<int>(blockDim.x) / TPR;
  const int team = TPR == 0 ? 0 : static_cast<int>(threadIdx.x) / TPR;
  const int lane = TPR == 0 ? static_cast<int>(threadIdx.x) : static_cast<int>(threadIdx.x) % TPR;
  float* team_partials = reinterpret_cast<float*>(bwd_pipe_mem);  // [teams][dim], teams > 1
  char* ring = bwd_pipe_mem + p.partials_smem + static_cast<size_t>(team) * p.stages * p.stage_bytes;

  const RowRange range = block_rows(p.rows, p.group_rows, p.blocks_per_group, p.rows_per_block);
  const int64_t row_begin = range.begin;
  const int64_t row_end = range.end;
  // Iterations are uniform over the block, so every lane reaches every sum.
  const int64_t iters = (row_end - row_begin + teams - 1) / teams;
  const int m_es = p.m_vec_bytes / VEC;

  float acc_w[NV][VEC], acc_s[NV][VEC], acc_h[NV][VEC];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc_w[i][e] = acc_s[i][e] = acc_h[i][e] = 0.f;
  }

  auto issue = [&](int64_t j, int slot) {
    const int64_t row = row_begin + j * teams + team;
    if (j < iters && row < row_end) {
      char* st = ring + slot * p.stage_bytes;
      const char* xrow = elem_ptr<XT>(p.x, row * p.x_row_stride);
      // dy may be the dx this kernel writes, but only for rows already finished.
      const char* grow = elem_ptr<XT>(p.dy, row * p.dy_row_stride);
      const char* mrow = p.m_vec_bytes != 0
                             ? static_cast<const char*>(p.scale) + map_offset(p.scale_map, row) * m_es
                             : nullptr;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int v = lane + i * tpr;
        if (v < p.dim_vecs) {
          cp_async_16(st + v * 16, xrow + static_cast<int64_t>(v) * 16);
          cp_async_16(st + p.g_stage_off + v * 16, grow + static_cast<int64_t>(v) * 16);
          if (mrow != nullptr) {
            cp_async_vec(st + p.m_stage_off + v * p.m_vec_bytes,
                         mrow + static_cast<int64_t>(v) * p.m_vec_bytes, p.m_vec_bytes);
          }
        }
      }
    }
    cp_async_commit();
  };
  auto load_rstd = [&](int64_t j) {
    const int64_t row = row_begin + j * teams + team;
    return (j < iters && row < row_end) ? __ldg(p.rstd + row) : 0.f;
  };

  // The cached weight / scale row: one cp.async group ahead of the ring's, so the ring's first
  // wait also covers it; the barrier publishes other threads' copies.
  const char* cache = bwd_pipe_mem;
  const bool cached = p.cache_w >= 0 || p.cache_s >= 0;
  if (cached) {
    cache_operand<VEC>(bwd_pipe_mem, p.cache_w, p.weight, p.weight_dtype, 0, p.dim_vecs);
    cache_operand<VEC>(bwd_pipe_mem, p.cache_s, p.scale, p.scale_dtype,
                       p.cache_s >= 0 ? map_offset(p.scale_map, row_begin) : 0, p.dim_vecs);
    cp_async_commit();
  }

  // rstd travels 4 rows ahead in registers.
  float rs0 = load_rstd(0), rs1 = load_rstd(1), rs2 = load_rstd(2), rs3 = load_rstd(3);
  for (int s = 0; s < p.stages - 1; ++s) issue(s, s);
  if (cached) {
    cp_async_wait_ring(p.stages);  // all but the ring's stages - 1 groups: the cache is in
    __syncthreads();
  }
  int slot = 0;
  int fill = p.stages - 1;
  for (int64_t j = 0; j < iters; ++j) {
    issue(j + p.stages - 1, fill);
    const float rstd = rs0;
    rs0 = rs1;
    rs1 = rs2;
    rs2 = rs3;
    rs3 = load_rstd(j + 4);
    cp_async_wait_ring(p.stages);
    const int64_t row = row_begin + j * teams + team;
    const bool active = row < row_end;
    const char* st = ring + slot * p.stage_bytes;
    Raw xr[NV], gr[NV];
    float dot = 0.f;
    int64_t scale_idx = 0;
    if (active) {
      scale_idx = (p.scale != nullptr && p.m_vec_bytes == 0 && p.cache_s < 0)
                      ? map_offset(p.scale_map, row)
                      : 0;
      const int64_t dscale_row = p.dscale_direct != nullptr ? map_grad_row(p.scale_map, row) : 0;
      const int64_t dshift_row = p.dshift_direct != nullptr ? map_grad_row(p.shift_map, row) : 0;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int v = lane + i * tpr;
        if (v < p.dim_vecs) {
          xr[i] = reinterpret_cast<const Raw*>(st)[v];
          gr[i] = reinterpret_cast<const Raw*>(st + p.g_stage_off)[v];
          float xf[VEC], gf[VEC], w[VEC], m[VEC], direct[VEC];
          unpack<XT, VEC>(xr[i], xf);
          unpack<XT, VEC>(gr[i], gf);
          const int64_t col = static_cast<int64_t>(v) * VEC;
          pipe_weight<VEC>(p, cache, v, w);
          pipe_scale<VEC>(p, st, cache, v, scale_idx, m);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const float xhat = xf[e] * rstd;
            const float dn = gf[e] * m[e];
            dot += dn * w[e] * xhat;
            if (p.dweight_partials != nullptr) acc_w[i][e] += dn * weight_factor<M, XT>(xhat);
            if (p.dscale_partials != nullptr) acc_s[i][e] += gf[e] * norm_value<M, XT>(xhat, w[e]);
            if (p.dshift_partials != nullptr) acc_h[i][e] += gf[e];
            direct[e] = gf[e] * norm_value<M, XT>(xhat, w[e]);
          }
          if (p.dscale_direct != nullptr) {
            store_any<VEC>(p.dscale_direct, p.scale_dtype, dscale_row * p.dim + col, direct,
                           p.dscale_vectorized != 0);
          }
          if (p.dshift_direct != nullptr) {
            store_any<VEC>(p.dshift_direct, p.shift_dtype, dshift_row * p.dim + col, gf,
                           p.dshift_vectorized != 0);
          }
        }
      }
    }
    const float c = team_sum_rt<TPR>(dot, red[j & 1]) * p.inv_dim;
    if (active && p.dx != nullptr) {
      void* dxrow = elem_ptr<XT>(p.dx, row * static_cast<int64_t>(p.dim));
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int v = lane + i * tpr;
        if (v < p.dim_vecs) {
          float xf[VEC], gf[VEC], w[VEC], m[VEC], out[VEC];
          unpack<XT, VEC>(xr[i], xf);
          unpack<XT, VEC>(gr[i], gf);
          const int64_t col = static_cast<int64_t>(v) * VEC;
          pipe_weight<VEC>(p, cache, v, w);
          pipe_scale<VEC>(p, st, cache, v, scale_idx, m);
#pragma unroll
          for (int e = 0; e < VEC; ++e) out[e] = rstd * (gf[e] * m[e] * w[e] - xf[e] * rstd * c);
          store_elems<XT, VEC>(dxrow, col, out, p.dx_vectorized != 0);
        }
      }
    }
    slot = slot + 1 == p.stages ? 0 : slot + 1;
    fill = fill + 1 == p.stages ? 0 : fill + 1;
  }
  cp_async_wait<0>();

  auto flush = [&](float (&acc)[NV][VEC], float* partials) {
    write_block_partials<NV, VEC>(acc, partials, p.dim, p.dim_vecs, lane, tpr, team, teams, team_partials);
  };
  if (p.dweight_partials != nullptr) flush(acc_w, p.dweight_partials);
  if (p.dscale_partials != nullptr) flush(acc_s, p.dscale_partials);
  if (p.dshift_partials != nullptr) flush(acc_h, p.dshift_partials);
}

template <DType XT, CastingMode M, int VEC, int TPR, int TEAMS>
__global__ void __launch_bounds__(TPR* TEAMS, backward_min_blocks<TPR * TEAMS>())
    backward_loop_kernel(const __grid_constant__ BackwardArgs p) {
  wait_for_prior_grid();  // launched programmatically on sm_90+ (launch_kernel)
  static_assert(TPR <= 32 || TEAMS == 1, "block-wide teams own the whole block");
  using Raw = XRaw<XT, VEC>;
  __shared__ float red[32];
  extern __shared__ uint4 stage_mem[];
  Raw* x_stage = reinterpret_cast<Raw*>(stage_mem);  // [dim_vecs], only with TEAMS == 1
  Raw* g_stage = x_stage + p.dim_vecs;
  const int team = threadIdx.x / TPR;
  const int lane = threadIdx.x % TPR;
  const bool staged = p.staged != 0;
  const bool second_walk =
      p.dx != nullptr || p.dscale_direct != nullptr || p.dshift_direct != nullptr;
  float unused[VEC];
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * TEAMS; base < p.rows;
       base += static_cast<int64_t>(gridDim.x) * TEAMS) {
    const int64_t row = base + team;
    const bool active = row < p.rows;
    const Raw* xrow =
        reinterpret_cast<const Raw*>(elem_ptr<XT>(p.x, active ? row * p.x_row_stride : 0));
    const Raw* grow =
        reinterpret_cast<const Raw*>(elem_ptr<XT>(p.dy, active ? row * p.dy_row_stride : 0));
    float rstd = 0.f, dot = 0.f;
    int64_t scale_idx = 0;
    if (active) {
      rstd = p.rstd[row];
      scale_idx = p.scale != nullptr ? map_offset(p.scale_map, row) : 0;
      for (int v = lane; v < p.dim_vecs; v += TPR) {
        const Raw xraw = __ldg(xrow + v);
        const Raw graw = grow[v];
        if (staged) {
          x_stage[v] = xraw;
          g_stage[v] = graw;
        }
        float xf[VEC], gf[VEC], w[VEC], m[VEC];
        unpack<XT, VEC>(xraw, xf);
        unpack<XT, VEC>(graw, gf);
        const int64_t col = static_cast<int64_t>(v) * VEC;
        load_factor<VEC>(p.weight, p.weight_dtype, p.offset, col, w);
        load_factor<VEC>(p.scale, p.scale_dtype, p.scale_offset, scale_idx + col, m);
#pragma unroll
        for (int e = 0; e < VEC; ++e) dot += gf[e] * m[e] * w[e] * (xf[e] * rstd);
      }
    }
    const float c = team_sum<TPR>(dot, red) * p.inv_dim;
    if (!active || !second_walk) continue;
    const int64_t dscale_row = p.dscale_direct != nullptr ? map_grad_row(p.scale_map, row) : 0;
    const int64_t dshift_row = p.dshift_direct != nullptr ? map_grad_row(p.shift_map, row) : 0;
    void* dxrow = p.dx != nullptr ? elem_ptr<XT>(p.dx, row * static_cast<int64_t>(p.dim)) : nullptr;
    for (int v = lane; v < p.dim_vecs; v += TPR) {
      const Raw xraw = staged ? x_stage[v] : __ldg(xrow + v);
      const Raw graw = staged ? g_stage[v] : grow[v];
      float xf[VEC], gf[VEC];
      unpack<XT, VEC>(xraw, xf);
      unpack<XT, VEC>(graw, gf);
      if (p.dscale_direct != nullptr || p.dshift_direct != nullptr) {
        backward_vector<XT, M, VEC, false>(p, xf, gf, rstd, v, scale_idx, dscale_row,
                                            dshift_row, unused, unused, unused);
      }
      if (dxrow != nullptr) store_dx<XT, M, VEC>(p, xf, gf, rstd, c, v, scale_idx, dxrow);
    }
  }
}

struct ColumnArgs {
  const void* x = nullptr;
  const void* dy = nullptr;
  const float* rstd = nullptr;
  int64_t x_row_stride = 0;
  int64_t dy_row_stride = 0;
  int dim = 0;
  int dim_vecs = 0;
  const void* weight = nullptr;
  const void* scale = nullptr;
  int weight_dtype = 0, scale_dtype = 0;
  float offset = 0.f, scale_offset = 1.f;
  DevMap scale_map;      // how rows read scale (for dn = g*m)
  DevMap reduce_map;     // which rows share each gradient row
  int reduce_all_rows = 0;  // one gradient row read by every row, in order (dweight)
  int64_t rows_per_unit = 0;  // rows_per_distinct of reduce_map
  int64_t segments = 1;
  int64_t rows_per_segment = 0;
  // Partials [distinct][segments][dim]; nullptr: not computed.
  float* dweight_partials = nullptr;
  float* dscale_partials = nullptr;
  float* dshift_partials = nullptr;
};

constexpr int kColumnLanes = 32;     // vector columns per block
constexpr int kColumnRowLanes = 8;   // rows in flight per block

// Block (unit, column tile): unit = gradient row * segments + segment; rows of the segment are
// dealt round-robin to the 8 row lanes, whose sums are combined in lane order.
template <DType XT, CastingMode M, int VEC>
__global__ void __launch_bounds__(kColumnLanes* kColumnRowLanes)
    column_grad_kernel(const __grid_constant__ ColumnArgs p) {
  wait_for_prior_grid();  // launched programmatically on sm_90+ (launch_kernel)
  using Raw = XRaw<XT, VEC>;
  constexpr int kTileCols = kColumnLanes * VEC;
  __shared__ float lane_sums[kColumnRowLanes][kTileCols];
  const int tx = threadIdx.x % kColumnLanes;
  const int ty = threadIdx.x / kColumnLanes;
  const int64_t unit = blockIdx.x;
  const int64_t grad_row = unit / p.segments;
  const int64_t segment = unit % p.segments;
  const int v = blockIdx.y * kColumnLanes + tx;
  const bool col_active = v < p.dim_vecs;
  const int64_t col = static_cast<int64_t>(v) * VEC;
  const int64_t k_begin = min(segment * p.rows_per_segment, p.rows_per_unit);
  const int64_t k_end = min(k_begin + p.rows_per_segment, p.rows_per_unit);

  float acc_w[VEC], acc_s[VEC], acc_h[VEC], w[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc_w[e] = acc_s[e] = acc_h[e] = 0.f;
  if (col_active) load_factor<VEC>(p.weight, p.weight_dtype, p.offset, col, w);

  if (col_active) {
    for (int64_t k = k_begin + ty; k < k_end; k += kColumnRowLanes) {
      const int64_t row = p.reduce_all_rows ? k : map_nth_row(p.reduce_map, grad_row, k);
      const Raw xraw = __ldg(reinterpret_cast<const Raw*>(elem_ptr<XT>(p.x, row * p.x_row_stride)) + v);
      const Raw graw = __ldg(reinterpret_cast<const Raw*>(elem_ptr<XT>(p.dy, row * p.dy_row_stride)) + v);
      const float rstd = __ldg(p.rstd + row);
      float xf[VEC], gf[VEC];
      unpack<XT, VEC>(xraw, xf);
      unpack<XT, VEC>(graw, gf);
      if (p.dweight_partials != nullptr) {
        float m[VEC];
        const int64_t scale_idx = p.scale != nullptr ? map_offset(p.scale_map, row) : 0;
        load_factor<VEC>(p.scale, p.scale_dtype, p.scale_offset, scale_idx + col, m);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc_w[e] += gf[e] * m[e] * weight_factor<M, XT>(xf[e] * rstd);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        acc_s[e] += gf[e] * norm_value<M, XT>(xf[e] * rstd, w[e]);
        acc_h[e] += gf[e];
      }
    }
  }

  auto combine = [&](const float (&acc)[VEC], float* partials) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) lane_sums[ty][tx * VEC + e] = acc[e];
    __syncthreads();
    const int64_t tile_col0 = static_cast<int64_t>(blockIdx.y) * kTileCols;
    float* dst = partials + unit * p.dim + tile_col0;
    for (int c = threadIdx.x; c < kTileCols; c += blockDim.x) {
      if (tile_col0 + c < p.dim) {
        float s = 0.f;
#pragma unroll
        for (int l = 0; l < kColumnRowLanes; ++l) s += lane_sums[l][c];
        dst[c] = s;
      }
    }
    __syncthreads();
  };
  if (p.dweight_partials != nullptr) combine(acc_w, p.dweight_partials);
  if (p.dscale_partials != nullptr) combine(acc_s, p.dscale_partials);
  if (p.dshift_partials != nullptr) combine(acc_h, p.dshift_partials);
}

constexpr int kFinalizeCols = 32;

// One reduction: out[group * dest_row_stride][j] = the sum over k < parts of
// partials[(group * parts + k) * dim + j].
struct FinalizeJob {
  const float* partials = nullptr;
  void* out = nullptr;
  int64_t groups = 0, parts = 0, dest_row_stride = 0;
  int out_dtype = 0;
};
constexpr int kMaxFinalizeJobs = 3;  // dweight, dscale, dshift
// The reductions of one backward call share a launch: blocks [first_block[i], first_block[i+1])
// serve job i, each one (column tile, group) of it (three launches of a few us each cost flux
// about 10 us per backward, next to a ~57 us backward kernel).
struct FinalizeArgs {
  FinalizeJob job[kMaxFinalizeJobs];
  int64_t first_block[kMaxFinalizeJobs + 1] = {};
  int64_t dim = 0, col_tiles = 0;
  int jobs = 0;
};

// Each lane sums its parts k = ty, ty + lanes, ... with kLoads loads in flight (accumulators by k
// modulo kLoads strides, combined in a fixed order), then the lanes' sums are added in lane order:
// the order depends on the shape alone, so results are bitwise reproducible.
// Two shapes of 32 columns (the host picks by grid size, launch_finalize):
//   - 16 lanes with eight loads in flight where the grid has a block for every SM: twice the
//     blocks at half the registers, so a block fits beside three resident blocks of the row pass
//     and more of the finalize is placed while the row pass drains (H200, backward op: flux 59.0
//     -> 57.6 us, ltx2b-t2v and ltx13b level);
//   - 32 lanes with four loads in flight for smaller grids (qk-norm's 128 columns: 4 blocks),
//     where 16 lanes lost 0.3-0.7 us and 8 columns x 128 lanes (16 blocks) gained nothing
//     (performance log, session 13).
template <int kLanes, int kLoads>
__global__ void __launch_bounds__(kFinalizeCols* kLanes)
    finalize_kernel(const __grid_constant__ FinalizeArgs a) {
  __shared__ float lane_sums[kLanes][kFinalizeCols + 1];
  wait_for_prior_grid();  // the partials come from the kernels before (programmatic launch)
  int which = 0;
  while (which + 1 < a.jobs && blockIdx.x >= a.first_block[which + 1]) ++which;
  const FinalizeJob& job = a.job[which];
  const int64_t block = blockIdx.x - a.first_block[which];
  const int tx = threadIdx.x % kFinalizeCols;
  const int ty = threadIdx.x / kFinalizeCols;
  const int64_t group = block / a.col_tiles;
  const int64_t j = (block % a.col_tiles) * kFinalizeCols + tx;
  const int64_t dim = a.dim;
  float s = 0.f;
  if (j < dim) {
    const float* src = job.partials + group * job.parts * dim + j;
    constexpr int L = kLanes;
    float acc[kLoads] = {};
    int64_t k = ty;
    for (; k + (kLoads - 1) * L < job.parts; k += kLoads * L) {
#pragma unroll
      for (int u = 0; u < kLoads; ++u) acc[u] += src[(k + u * L) * dim];
    }
    if constexpr (kLoads == 4) {
      for (; k < job.parts; k += L) acc[0] += src[k * dim];
      s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    } else {
      static_assert(kLoads == 8, "four or eight loads in flight");
#pragma unroll
      for (int u = 0; u < kLoads - 1; ++u) {
        if (k + u * L < job.parts) acc[u] += src[(k + u * L) * dim];
      }
      s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
  }
  lane_sums[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && j < dim) {
    float t = 0.f;
#pragma unroll 8
    for (int l = 0; l < kLanes; ++l) t += lane_sums[l][tx];
    store_any<1>(job.out, job.out_dtype, group * job.dest_row_stride * dim + j, &t, false);
  }
}

}  // namespace modnorm::cuda_detail
