// CUDA backend: launch planning for the backward kernels (forward_launch.cu has the forward).
//
// Paths, chosen from the plan alone:
//   backward: up to 1024 16-byte vectors per row, backward_const_kernel when every row of a block
//             reads one scale row (on sm_90+ its rows stream x and dy through a ring of bulk
//             copies: a row a stage for block-wide teams, with per-token scale rows as a third
//             row of each stage; a tile of rows and their rstd a stage for warp teams; the
//             common layout's block-wide rows of whole warps of vectors take
//             backward_lean_kernel instead, and its rows of exactly 8, 16 or 32 vectors, on any
//             architecture, backward_short_kernel),
//             backward_pipe_kernel (rows streamed through a cp.async ring) for other per-token
//             scale and short rows, else backward_reg_kernel, computing dx, dweight
//             partials, per-row dscale/dshift, and fused partials for shared blocked (per-sample /
//             per-frame / groups) modulation; everything else goes through the read-only
//             column_grad_kernel first and backward_loop_kernel for dx.
// Every reduction over rows writes fixed partials that finalize_kernel sums (all of one backward
// in one launch) in a fixed order, and
// the partial layout is a function of the shape and the device only: results are bitwise
// reproducible, with no atomics.
#include <climits>

#include <cstdlib>
#include <string>

#include "backward_kernels.cuh"
#include "backward_lean_kernel.cuh"
#include "backward_short_kernel.cuh"
#include "launch_common.h"

namespace modnorm::detail {
namespace {

using cuda_detail::BackwardArgs;
using cuda_detail::BackwardKernel;
using cuda_detail::ColumnArgs;


// Pipe kernel shapes: NV vectors per thread, TPR lanes per team (0: one team = the block).
template <int NV, int TPR>
struct Pipe {
  static constexpr int kNV = NV;
  static constexpr int kTPR = TPR;
};

// Threads of a pipe kernel's block for a row of dim_vecs vectors.
int pipe_threads(int dim_vecs, int nv, int tpr) {
  return tpr > 0 ? cuda_detail::kTeamBlockThreads
                 : round_up(std::max<int64_t>(1, ceil_div(dim_vecs, nv)), 32);
}

// Ring depth from the bytes of one stage of the whole block: 2 to 4 stages within `budget`.
int ring_stages(int64_t block_stage_bytes, int64_t budget) {
  return static_cast<int>(std::max<int64_t>(2, std::min<int64_t>(4, budget / block_stage_bytes)));
}

constexpr int64_t kBackwardRingBudget = 64 * 1024;
// Stages of backward_const_kernel's block-wide ring (a row of x and of dy each). Three measured
// best or level on every case against the 3-6 that ~64 KB in flight per SM gave (H200:
// ltx2b-t2v 60.8 -> 59.7 us, flux 68.8 -> 68.1, dit-xl 18.6 -> 17.5, the rest within 0.5%;
// performance log, session 11).
constexpr int kBlockRingStages = 3;

// Whether backward_lean_kernel takes block-wide rows of dim_vecs vectors: one vector on each of
// dim_vecs threads, so whole warps and at most 1024. With the block partials stored coalesced it
// measured faster than the generic ring on every BENCH row length (H200 op, 2-3 blocks an SM:
// ltx2b-t2v 54.4 -> 51.2 us, flux 61.2 -> 58.8, ltx13b 95.5 -> 94.1, mochi 206.1 -> 204.3, wan14b
// 273.8 -> 261.8; performance log, session 12), where two vectors a thread did not.
bool lean_fits(int64_t dim_vecs) {
  return dim_vecs % 32 == 0 && dim_vecs <= cuda_detail::kLeanMaxThreads;
}
// Resident blocks an SM its grid is planned for, at most: the 64-register bound allows four of
// 256 threads, but the fourth's partial sums cost more than it gave (ltx2b-t2v: 51.2 us at three,
// 53.3 at four, 52.2 at two; ltx13b's 512-thread blocks fit two).
constexpr int kLeanBlocksPerSm = 3;

// Whether backward_short_kernel takes rows of dim_vecs vectors: a team of exactly dim_vecs lanes.
bool short_fits(int64_t dim_vecs) { return dim_vecs == 8 || dim_vecs == 16 || dim_vecs == 32; }

template <DType XT, CastingMode M, int VEC, typename F>
void visit_short_kernel(int dim_vecs, bool shift, F&& f) {
  auto pick = [&](auto tpr) {
    constexpr int TPR = decltype(tpr)::value;
    shift ? f(cuda_detail::backward_short_kernel<XT, M, VEC, TPR, true>)
          : f(cuda_detail::backward_short_kernel<XT, M, VEC, TPR, false>);
  };
  if (dim_vecs == 8) {
    pick(std::integral_constant<int, 8>{});
  } else if (dim_vecs == 16) {
    pick(std::integral_constant<int, 16>{});
  } else {
    pick(std::integral_constant<int, 32>{});
  }
}

template <DType XT, CastingMode M, int VEC, typename F>
void visit_lean_kernel(bool shift, F&& f) {
  shift ? f(cuda_detail::backward_lean_kernel<XT, M, VEC, true>)
        : f(cuda_detail::backward_lean_kernel<XT, M, VEC, false>);
}
// Row traffic (x, dy, dx) below which a backward pass is latency-bound (~8 us at full bandwidth).
constexpr int64_t kLatencyBoundBytes = 32ll << 20;

// ---------------------------------------------------------------------------------------------
// Backward

// Register-resident configurations (short rows: teams of 8-32 lanes, 8-32 rows per block): at
// most 16 elements per thread, since each thread also keeps up to three partial sums per element
// across its rows, and no more than 512 threads per block so the compiler may give each thread
// 128 registers. RING: backward_const_kernel's block-wide bulk-copy ring, whose rows of 129-256
// vectors (without per-token scale rows, `token`) take one vector on each of 256 threads: 84
// registers instead of 112, so 24 warps an SM instead of 16 hide more of the per-row chain (H200:
// ltx2b-t2v backward 63.5 -> 61.4 us; ltx2b-i2v's token ring 1% slower; on rows of 257-512 vectors
// one vector a thread ran 7-35% slower; performance log, session 11).
template <int VEC, bool RING = false, typename F>
bool visit_backward_config(int dim_vecs, F&& f, bool token = false) {
  if constexpr (RING) {
    if (!token && dim_vecs > 128 && dim_vecs <= 256) return f(Config<1, 256, 1>{}), true;
  }
  if (dim_vecs <= 8) return f(Config<1, 8, 32>{}), true;
  if (dim_vecs <= 16) return f(Config<1, 16, 16>{}), true;
  if (dim_vecs <= 32) return f(Config<1, 32, 8>{}), true;
  if (dim_vecs <= 64) return f(Config<2, 32, 8>{}), true;
  if (dim_vecs <= 128) return f(Config<1, 128, 1>{}), true;
  if (dim_vecs <= 256) return f(Config<2, 128, 1>{}), true;
  if (dim_vecs <= 512) return f(Config<2, 256, 1>{}), true;
  if (dim_vecs <= 1024) return f(Config<2, 512, 1>{}), true;
  return false;
}

// Backward pipe shapes: at most 16 elements per thread, since each thread also keeps up to three
// partial sums per element across its rows, and no more than 512 threads per block so the
// compiler may give each thread 128 registers.
template <typename F>
bool visit_backward_pipe(int dim_vecs, F&& f) {
  if (dim_vecs <= 8) return f(Pipe<1, 8>{}), true;
  if (dim_vecs <= 16) return f(Pipe<1, 16>{}), true;
  if (dim_vecs <= 32) return f(Pipe<1, 32>{}), true;
  if (dim_vecs <= 256) return f(Pipe<1, 0>{}), true;
  if (dim_vecs <= 1024) return f(Pipe<2, 0>{}), true;
  return false;
}

enum class GradRoute { kNone, kDirect, kFused, kColumn };

struct ColumnPlan {
  int64_t units = 0;  // distinct gradient rows * segments
  int64_t distinct = 0;
  int64_t rows_per_unit = 0;
  int64_t segments = 1;
  int64_t rows_per_segment = 0;
};

struct BackwardLayout {
  bool vectorized = false;
  bool reg_path = false;
  int threads = 0, teams = 1;
  size_t reg_smem = 0;
  bool pipe = false;  // backward_pipe_kernel, else backward_reg_kernel
  int stages = 2, stage_bytes = 0, m_stage_off = 0, m_vec_bytes = 0, partials_smem = 0;
  int cache_w = -1, cache_s = -1;  // pipe kernel: weight / shared scale row in shared memory
  bool const_mod = false;           // backward_const_kernel instead of backward_reg_kernel
  int ring_stages = 0;              // backward_const_kernel<RING>: x/dy stages in shared memory
  bool lean = false;                // backward_lean_kernel (block-wide ring, common layout)
  bool short_rows = false;          // backward_short_kernel (warp teams, common layout)
  bool token = false;               // ... with per-token scale rows in the stages (TOKEN)
  int64_t blocks = 0, groups = 1, group_rows = 0, blocks_per_group = 1, rows_per_block = 0;
  GradRoute dweight = GradRoute::kNone, dscale = GradRoute::kNone, dshift = GradRoute::kNone;
  bool shift_with_scale = false;  // one column pass computes both
  ColumnPlan col_w, col_s, col_h;
  int64_t off_w = 0, off_s = 0, off_h = 0, total_floats = 0;
};

constexpr int kColumnBlocksPerSm = 8;

ColumnPlan plan_column(int64_t distinct, int64_t rows_per_unit, int64_t dim_vecs, int sm_count) {
  ColumnPlan c;
  c.distinct = distinct;
  c.rows_per_unit = rows_per_unit;
  const int64_t col_tiles = ceil_div(dim_vecs, cuda_detail::kColumnLanes);
  const int64_t target = int64_t(sm_count) * kColumnBlocksPerSm;
  int64_t segments = ceil_div(target, std::max<int64_t>(1, distinct * col_tiles));
  // At least 4 rows per row lane, so a segment's partial is worth its write.
  segments = std::max<int64_t>(
      1, std::min(segments, rows_per_unit / (4 * cuda_detail::kColumnRowLanes)));
  c.rows_per_segment = std::max<int64_t>(1, ceil_div(rows_per_unit, segments));
  c.segments = std::max<int64_t>(1, ceil_div(rows_per_unit, c.rows_per_segment));
  c.units = distinct * c.segments;
  return c;
}

// Per-token scale rows a bulk copy can fetch: 16-byte aligned start and length on every row.
bool scale_rows_bulk_copyable(const ForwardPlan& p) {
  if (!p.scale.present()) return false;
  const int64_t es = static_cast<int64_t>(dtype_size(p.scale.dtype));
  if (!cuda_detail::aligned_to(p.scale.data, 16) || (p.dim * es) % 16 != 0) return false;
  for (int i = 0; i < p.scale_map.ndim; ++i) {
    if ((p.scale_map.stride[i] * es) % 16 != 0) return false;
  }
  return true;
}

template <DType XT, CastingMode M>
struct BackwardImpl {
  static constexpr int kVec = vector_width<XT>();

  static BackwardLayout layout(const BackwardPlan& bp, bool allow_ring = true) {
    const ForwardPlan& p = bp.fwd;
    const int device = p.device.index;
    const cuda_detail::DeviceInfo& info = device_info(device);
    BackwardLayout l;
    require_int_dim(p.dim);
    l.vectorized = rows_vectorizable(p, kVec, bp.dy, bp.dy_row_stride);
    const int64_t dim_vecs = l.vectorized ? p.dim / kVec : p.dim;
    const bool scale_shared = bp.need_dscale && p.scale_map.rows_per_distinct > 1;
    const bool shift_shared = bp.need_dshift && p.shift_map.rows_per_distinct > 1;
    l.dscale = !bp.need_dscale ? GradRoute::kNone
                               : (scale_shared ? GradRoute::kColumn : GradRoute::kDirect);
    l.dshift = !bp.need_dshift ? GradRoute::kNone
                               : (shift_shared ? GradRoute::kColumn : GradRoute::kDirect);
    l.dweight = bp.need_dweight ? GradRoute::kColumn : GradRoute::kNone;

    BackwardKernel kernel = nullptr;
    if (l.vectorized) {
      const int dv = static_cast<int>(dim_vecs);
      // The pipe kernel where it measured faster (v0.2, H200): per-token scale rows streamed
      // through its ring, and short rows (warp teams); elsewhere the register kernel, whose
      // weight/shared-modulation re-reads through L1 ran faster than the pipe's.
      const bool stage_m = p.scale.present() && p.scale_map.rows_per_distinct == 1;
      // Experiment switch (performance log): MODNORM_BACKWARD_KERNEL=pipe takes the pipe kernel
      // for every row length it has a shape for.
      static const std::string forced = env_switch("MODNORM_BACKWARD_KERNEL");
      static const int forced_stages = env_int("MODNORM_BWD_RING_STAGES", 0);
      const bool force_pipe = forced == "pipe";
      // Rows of a block that read one scale row (checked again once blocks are grouped) take
      // backward_const_kernel; MODNORM_BACKWARD_KERNEL=reg turns it off for comparisons.
      const bool const_candidate =
          M != CastingMode::kGemma && forced != "reg" &&
          (!p.scale.present() || (p.scale_map.blocked && p.scale_map.rows_per_distinct > 1));
      // On sm_90+, block-wide rows of backward_const_kernel stream x and dy (and per-token scale
      // rows, TOKEN) through a ring of bulk-copy stages: blocks of one scale row, or per-token
      // scale rows whose start and length are 16-byte aligned. MODNORM_BACKWARD_KERNEL=const keeps
      // rows in registers (and per-token scale on the pipe kernel), =pipe or =reg skip the ring.
      const bool token_ring = stage_m && forced != "reg" && scale_rows_bulk_copyable(p);
      // Plans backward_const_kernel<RING> `ring_kernel`: stages so that the blocks its registers
      // allow keep ~`in_flight` bytes per SM (0: kBlockRingStages), as far as shared memory
      // allows (none if two do not fit). The stages also hold a tile ring's team partials at the
      // end (>= teams * dim floats).
      auto take_ring = [&](BackwardKernel ring_kernel, int threads, int teams,
                           int64_t stage_bytes, int64_t in_flight, bool token) {
        const int reg_blocks = blocks_per_sm(device, ring_kernel, threads, 0);
        int stages = forced_stages > 0 ? forced_stages
                     : in_flight == 0  ? kBlockRingStages
                                       : 1 + int(ceil_div(in_flight, reg_blocks * stage_bytes));
        stages = std::max(2, std::min(stages, cuda_detail::kMaxRingStages));
        auto fits = [&](int n) {
          return n * stage_bytes + kStaticSmemReserve <= info.max_smem_optin;
        };
        while (stages > 2 && !fits(stages)) --stages;
        if (!fits(stages)) return;
        kernel = ring_kernel;
        l.ring_stages = stages;
        l.token = token;
        l.reg_smem = size_t(stages * stage_bytes);
        l.threads = threads;
        l.teams = teams;
        l.const_mod = true;
        l.reg_path = true;
      };
      if constexpr (M != CastingMode::kGemma) {
        // The common layout (dx, no per-row modulation gradient) in rows of exactly 8, 16 or 32
        // vectors takes backward_short_kernel: four rows ahead in registers and no barrier per
        // tile (H200 qk-norm backward 56.5 -> 52.1 us against the tile ring below; two rows ahead
        // at four blocks an SM 55.3, eight at one 55.0; performance log, session 14).
        // MODNORM_BWD_SHORT=0 keeps the tile ring (or, before sm_90, backward_const_kernel's warp
        // teams).
        static const bool short_off = env_switch("MODNORM_BWD_SHORT") == "0";
        if (const_candidate && allow_ring && forced != "const" && !force_pipe && !short_off &&
            short_fits(dv) && bp.need_dx && l.dscale != GradRoute::kDirect &&
            l.dshift != GradRoute::kDirect) {
          visit_short_kernel<XT, M, kVec>(dv, bp.need_dshift, [&](auto short_kernel) {
            kernel = short_kernel;
          });
          l.threads = cuda_detail::kShortThreads;
          l.teams = cuda_detail::kShortThreads / dv;
          l.reg_smem = size_t(l.teams) * p.dim * sizeof(float);  // the team partials at the end
          l.const_mod = true;
          l.reg_path = true;
          l.short_rows = true;
        } else if (const_candidate && !token_ring && allow_ring && forced != "const" &&
                   !force_pipe && dv <= 64 && info.cc_major >= 9) {
          // Other short rows (warp teams) take a tile ring on sm_90+: TEAMS consecutive rows and
          // their rstd a stage (qk-norm backward 72 -> 77% of its floor on H100, performance log,
          // session 8).
          visit_backward_config<kVec>(dv, [&](auto config) {
            using C = decltype(config);
            if constexpr (C::kTeams > 1) {
              const BackwardKernel ring_kernel =
                  cuda_detail::backward_const_kernel<XT, M, kVec, C::kNV, C::kTPR, C::kTeams,
                                                     true, false>;
              const int64_t stage_bytes =
                  round_up(2 * int64_t(C::kTeams) * dv * 16 + int64_t(C::kTeams) * 4, 16);
              // ~32 KB in flight per SM: on qk-norm 3 stages (33 KB) beat 5 (66 KB) and 8 by
              // 3 points, as fewer concurrent row streams did for the block-wide ring.
              take_ring(ring_kernel, C::kThreads, C::kTeams, stage_bytes, 32 * 1024, false);
            }
          });
        }
        // The common layout (dx, no per-row modulation gradient) takes backward_lean_kernel
        // where its blocks own a row exactly; MODNORM_BWD_LEAN=0 keeps the generic ring.
        static const bool lean_off = env_switch("MODNORM_BWD_LEAN") == "0";
        if (const_candidate && !token_ring && allow_ring && forced != "const" && !force_pipe &&
            !lean_off && dv > 64 && info.cc_major >= 9 && lean_fits(dv) && bp.need_dx &&
            l.dscale != GradRoute::kDirect && l.dshift != GradRoute::kDirect) {
          visit_lean_kernel<XT, M, kVec>(bp.need_dshift, [&](auto lean_kernel) {
            take_ring(lean_kernel, dv, 1, 2 * int64_t(dv) * 16, 0, false);
          });
          l.lean = l.reg_path;
        }
        if ((const_candidate || token_ring) && allow_ring && forced != "const" && !force_pipe &&
            dv > 64 && info.cc_major >= 9 && !l.reg_path) {
          visit_backward_config<kVec, true>(dv, [&](auto config) {
            using C = decltype(config);
            if constexpr (C::kTeams == 1) {  // dv > 64: block-wide shapes only
              const BackwardKernel ring_kernel =
                  token_ring
                      ? cuda_detail::backward_const_kernel<XT, M, kVec, C::kNV, C::kTPR, 1, true, true>
                      : cuda_detail::backward_const_kernel<XT, M, kVec, C::kNV, C::kTPR, 1, true, false>;
              const int64_t m_row_bytes =
                  token_ring ? p.dim * int64_t(dtype_size(p.scale.dtype)) : 0;
              const int64_t stage_bytes = 2 * int64_t(dv) * 16 + m_row_bytes;
              take_ring(ring_kernel, C::kThreads, 1, stage_bytes, 0, token_ring);
            }
          }, token_ring);
        }
      }
      if (!l.reg_path && (stage_m || force_pipe || (dv <= 32 && !const_candidate))) {
        visit_backward_pipe(dv, [&](auto shape) {
          using S = decltype(shape);
          const int threads = pipe_threads(dv, S::kNV, S::kTPR);
          const int teams = S::kTPR > 0 ? threads / S::kTPR : 1;
          const int m_vec_bytes = stage_m ? kVec * static_cast<int>(dtype_size(p.scale.dtype)) : 0;
          const int m_off = 2 * dv * 16;
          const int64_t stage_bytes = round_up(int64_t(m_off) + int64_t(dv) * m_vec_bytes, 16);
          const int partials_smem = teams > 1 ? round_up(int64_t(teams) * p.dim * 4, 16) : 0;
          const int stages = ring_stages(teams * stage_bytes, kBackwardRingBudget);
          size_t smem = size_t(partials_smem) + size_t(teams) * stages * stage_bytes;
          // The weight and a scale row shared by runs of rows sit in shared memory, copied
          // once per block, instead of coming back through L1 for every row.
          int cache_w = -1, cache_s = -1;
          if (p.weight.present()) {
            cache_w = static_cast<int>(smem);
            smem += round_up(int64_t(dv) * kVec * dtype_size(p.weight.dtype), 16);
          }
          if (p.scale.present() && !stage_m && p.scale_map.blocked) {
            cache_s = static_cast<int>(smem);
            smem += round_up(int64_t(dv) * kVec * dtype_size(p.scale.dtype), 16);
          }
          if (smem + kStaticSmemReserve > info.max_smem_optin) return;
          l.cache_w = cache_w;
          l.cache_s = cache_s;
          kernel = cuda_detail::backward_pipe_kernel<XT, M, kVec, S::kNV, S::kTPR>;
          l.threads = threads;
          l.teams = teams;
          l.reg_smem = smem;
          l.stages = stages;
          l.stage_bytes = static_cast<int>(stage_bytes);
          l.m_stage_off = m_off;
          l.m_vec_bytes = m_vec_bytes;
          l.partials_smem = partials_smem;
          l.reg_path = true;
          l.pipe = true;
        });
      }
      if (!l.reg_path) {
        l.reg_path = visit_backward_config<kVec>(dv, [&](auto config) {
          using C = decltype(config);
          kernel = cuda_detail::backward_reg_kernel<XT, M, kVec, C::kNV, C::kTPR, C::kTeams>;
          if constexpr (M != CastingMode::kGemma) {
            if (const_candidate) {
              kernel = cuda_detail::backward_const_kernel<XT, M, kVec, C::kNV, C::kTPR, C::kTeams>;
              l.const_mod = true;
            }
          }
          l.threads = C::kThreads;
          l.teams = C::kTeams;
          l.reg_smem = C::kTeams > 1 ? size_t(C::kTeams) * p.dim * sizeof(float) : 0;
        });
      }
    }
    if (l.reg_path) {
      if (bp.need_dweight) l.dweight = GradRoute::kFused;
      // Shared modulation gradients fuse when their rows come in runs (blocked map) of one
      // common length: each block then stays inside one run.
      int64_t fuse_rows = 0;
      if (scale_shared && p.scale_map.blocked) {
        l.dscale = GradRoute::kFused;
        fuse_rows = p.scale_map.rows_per_distinct;
      }
      if (shift_shared && p.shift_map.blocked &&
          (fuse_rows == 0 || fuse_rows == p.shift_map.rows_per_distinct)) {
        l.dshift = GradRoute::kFused;
        fuse_rows = p.shift_map.rows_per_distinct;
      }
      const int streams = (l.dweight == GradRoute::kFused) + (l.dscale == GradRoute::kFused) +
                          (l.dshift == GradRoute::kFused);
      // MODNORM_BWD_BLOCKS_PER_SM=N plans for at most N resident blocks an SM (comparisons).
      static const int forced_blocks_per_sm = env_int("MODNORM_BWD_BLOCKS_PER_SM", 0);
      int occupancy = blocks_per_sm(device, kernel, l.threads, l.reg_smem);
      if (forced_blocks_per_sm > 0) {
        occupancy = std::min(occupancy, forced_blocks_per_sm);
      } else if (l.lean) {
        occupancy = std::min(occupancy, kLeanBlocksPerSm);
      }
      int64_t target = int64_t(info.sm_count) * occupancy;
      const int64_t row_traffic = p.rows * p.dim * 3 * int64_t(dtype_size(p.x_dtype));  // x, dy, dx
      if (streams > 0 && row_traffic >= kLatencyBoundBytes) {
        // Keep the partials' round trip (write + read, 8 bytes per float) under ~10% of the
        // row traffic, unless that leaves SMs idle. Smaller passes are bound by the rows each
        // block walks in series, each a memory latency, not by bytes: they keep every slot
        // (dit-xl: 15.5 rows a block -> 3.9, backward kernel 15.3 -> 11.0 us).
        const int64_t cap = row_traffic / (p.dim * 80 * streams);
        target = std::min(target, std::max<int64_t>(info.sm_count, cap));
      }
      target = std::max<int64_t>(1, target);
      if (fuse_rows > 0 && p.rows / fuse_rows > target) {
        // Too many groups for one block each: reduce them in the column pass instead.
        if (l.dscale == GradRoute::kFused) l.dscale = GradRoute::kColumn;
        if (l.dshift == GradRoute::kFused) l.dshift = GradRoute::kColumn;
        fuse_rows = 0;
      }
      l.groups = fuse_rows > 0 ? p.rows / fuse_rows : 1;
      l.group_rows = fuse_rows > 0 ? fuse_rows : p.rows;
      // A cached (pipe) or constant (const kernel) scale row must serve every row of a block:
      // one row for all, or blocks grouped by the scale's runs.
      const bool one_scale_row_per_block =
          !p.scale.present() || p.scale_map.rows_per_distinct == p.rows ||
          l.group_rows == p.scale_map.rows_per_distinct;
      if (!one_scale_row_per_block && !l.token) {
        l.cache_s = -1;
        l.const_mod = false;
        if (l.ring_stages > 0 || l.short_rows) {
          return layout(bp, false);  // plan the register kernel instead
        }
      }
      // Blocks per group: the target's share, each with a team's rows at least.
      // backward_const_kernel deals a group's rows out in turn (block_row_walk), so it takes that
      // count as it is; the other kernels own runs of whole teams' rows, which may need fewer.
      const int64_t per_group =
          std::max<int64_t>(1, std::min(target / l.groups, ceil_div(l.group_rows, l.teams)));
      l.rows_per_block = ceil_div(ceil_div(l.group_rows, per_group), l.teams) * l.teams;
      l.blocks_per_group = l.const_mod && interleave_rows()
                               ? per_group
                               : ceil_div(l.group_rows, l.rows_per_block);
      l.blocks = l.groups * l.blocks_per_group;
      if (l.blocks > INT_MAX) {
        throw Error(Error::Kind::kValue, "modnorm CUDA backend: too many row groups");
      }
    }

    l.shift_with_scale = l.dscale == GradRoute::kColumn && l.dshift == GradRoute::kColumn &&
                         same_map(p.scale_map, p.shift_map);
    if (l.dweight == GradRoute::kColumn) l.col_w = plan_column(1, p.rows, dim_vecs, info.sm_count);
    if (l.dscale == GradRoute::kColumn) {
      l.col_s = plan_column(p.scale_map.distinct_rows, p.scale_map.rows_per_distinct, dim_vecs,
                            info.sm_count);
    }
    if (l.dshift == GradRoute::kColumn) {
      l.col_h = l.shift_with_scale ? l.col_s
                                   : plan_column(p.shift_map.distinct_rows,
                                                 p.shift_map.rows_per_distinct, dim_vecs,
                                                 info.sm_count);
    }
    auto floats_for = [&](GradRoute route, const ColumnPlan& c) -> int64_t {
      if (route == GradRoute::kFused) return l.blocks * p.dim;
      if (route == GradRoute::kColumn) return c.units * p.dim;
      return 0;
    };
    l.off_w = 0;
    l.off_s = l.off_w + floats_for(l.dweight, l.col_w);
    l.off_h = l.off_s + floats_for(l.dscale, l.col_s);
    l.total_floats = l.off_h + floats_for(l.dshift, l.col_h);
    return l;
  }

  // Launches a row kernel of the backward (the lean, short, const, pipe or register kernel),
  // programmatically on sm_90+ (launch_kernel): its blocks are placed and start while the kernel
  // before it (the forward, in a training step) drains.
  // H100, the forward and backward ops back to back, plain / programmatic (performance log,
  // session 19): ltx2b-t2v 102.2-103.1 / 100.0-100.8 us, ltx13b 203.0-204.0 / 200.8-201.6,
  // mochi 472.7-473.3 / 470.0-470.9, wan14b 578.7-579.9 / 576.1-577.4, qk-norm 110.5-111.8 /
  // 109.5-110.3, flux level; the backward alone (after do_bench's flush) level.
  static void launch_row_pass(BackwardKernel kernel, const BackwardArgs& a, const BackwardLayout& l,
                              int threads, int device, cudaStream_t stream, const char* what) {
    launch_kernel(kernel, dim3(static_cast<unsigned>(l.blocks)), dim3(static_cast<unsigned>(threads)),
                  l.reg_smem, stream, device, what, a);
  }

  static void launch_column(const BackwardPlan& bp, const BackwardLayout& l, const ColumnPlan& c,
                            const RowMap* reduce_map, float* w_part, float* s_part,
                            float* h_part, const float* rstd, cudaStream_t stream) {
    const ForwardPlan& p = bp.fwd;
    ColumnArgs a;
    set_common_args(a, p);
    a.dy = bp.dy;
    a.rstd = rstd;
    a.dy_row_stride = bp.dy_row_stride;
    if (reduce_map != nullptr) a.reduce_map = to_dev_map(*reduce_map);
    a.reduce_all_rows = reduce_map == nullptr ? 1 : 0;
    a.rows_per_unit = c.rows_per_unit;
    a.segments = c.segments;
    a.rows_per_segment = c.rows_per_segment;
    a.dweight_partials = w_part;
    a.dscale_partials = s_part;
    a.dshift_partials = h_part;
    auto go = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      a.dim_vecs = static_cast<int>(p.dim / VEC);
      const int64_t col_tiles = ceil_div(a.dim_vecs, cuda_detail::kColumnLanes);
      if (col_tiles > 65535 || c.units > INT_MAX) {
        throw Error(Error::Kind::kValue, "modnorm CUDA backend: reduction grid too large");
      }
      launch_kernel(cuda_detail::column_grad_kernel<XT, M, VEC>,
                    dim3(static_cast<unsigned>(c.units), static_cast<unsigned>(col_tiles)),
                    dim3(cuda_detail::kColumnLanes * cuda_detail::kColumnRowLanes), 0, stream,
                    p.device.index, "modnorm column_grad_kernel", a);
    };
    if (l.vectorized) {
      go(std::integral_constant<int, kVec>{});
    } else {
      go(std::integral_constant<int, 1>{});
    }
  }

  // Queues one fixed-order reduction of partials; launch_finalize runs the queue in one launch.
  static void finalize(cuda_detail::FinalizeArgs& f, const float* partials, int64_t groups,
                       int64_t parts, int64_t dest_row_stride, void* out, DType out_dtype) {
    cuda_detail::FinalizeJob& job = f.job[f.jobs];
    job.partials = partials;
    job.groups = groups;
    job.parts = parts;
    job.dest_row_stride = dest_row_stride;
    job.out = out;
    job.out_dtype = dtype_int(out_dtype);
    f.first_block[f.jobs + 1] = f.first_block[f.jobs] + groups * f.col_tiles;
    ++f.jobs;
  }

  static void launch_finalize(const cuda_detail::FinalizeArgs& f, int device, cudaStream_t stream) {
    if (f.jobs == 0) return;
    const int64_t grid = f.first_block[f.jobs];
    if (grid > INT_MAX) {
      throw Error(Error::Kind::kValue, "modnorm CUDA backend: gradient too large to reduce");
    }
    // Launched programmatically (sm_90+): its blocks start while the row pass drains, and wait
    // in the kernel for the partials.
    // finalize_kernel's 16-lane shape where the grid has a block for every SM (see the kernel).
    const bool narrow = grid >= device_info(device).sm_count;
    using cuda_detail::finalize_kernel;
    const dim3 block(cuda_detail::kFinalizeCols * (narrow ? 16 : 32));
    launch_kernel(narrow ? finalize_kernel<16, 8> : finalize_kernel<32, 4>,
                  dim3(static_cast<unsigned>(grid)), block, 0, stream, device,
                  "modnorm finalize_kernel launch", f);
  }

  static void run(const BackwardPlan& bp, const float* rstd, const Gradients& grads,
                  float* workspace, cudaStream_t stream) {
    const ForwardPlan& p = bp.fwd;
    const int device = p.device.index;
    const BackwardLayout l = layout(bp);
    float* w_part = l.dweight == GradRoute::kNone ? nullptr : workspace + l.off_w;
    float* s_part = (l.dscale == GradRoute::kFused || l.dscale == GradRoute::kColumn)
                        ? workspace + l.off_s
                        : nullptr;
    float* h_part = (l.dshift == GradRoute::kFused || l.dshift == GradRoute::kColumn)
                        ? workspace + l.off_h
                        : nullptr;

    // 1. Read-only reductions, before anything may overwrite dy.
    if (l.dweight == GradRoute::kColumn) {
      launch_column(bp, l, l.col_w, nullptr, w_part, nullptr, nullptr, rstd, stream);
    }
    if (l.dscale == GradRoute::kColumn) {
      launch_column(bp, l, l.col_s, &p.scale_map, nullptr, s_part,
                    l.shift_with_scale ? h_part : nullptr, rstd, stream);
    }
    if (l.dshift == GradRoute::kColumn && !l.shift_with_scale) {
      launch_column(bp, l, l.col_h, &p.shift_map, nullptr, nullptr, h_part, rstd, stream);
    }

    // 2. The row pass: dx, per-row modulation gradients, fused partials.
    BackwardArgs a;
    set_common_args(a, p);
    a.dy = bp.dy;
    a.rstd = rstd;
    a.dx = bp.need_dx ? grads.dx : nullptr;
    a.rows = p.rows;
    a.dy_row_stride = bp.dy_row_stride;
    a.shift_dtype = dtype_int(p.shift.dtype);
    a.inv_dim = 1.f / static_cast<float>(p.dim);
    a.shift_map = to_dev_map(p.shift_map);
    a.dscale_direct = l.dscale == GradRoute::kDirect ? grads.dscale : nullptr;
    a.dshift_direct = l.dshift == GradRoute::kDirect ? grads.dshift : nullptr;
    const int vec = l.vectorized ? kVec : 1;
    a.dim_vecs = static_cast<int>(p.dim / vec);
    a.dx_vectorized = a.dx != nullptr && cuda_detail::output_vectorizable(a.dx, p.x_dtype, vec);
    a.dscale_vectorized =
        a.dscale_direct != nullptr &&
        cuda_detail::output_vectorizable(a.dscale_direct, p.scale.dtype, vec);
    a.dshift_vectorized =
        a.dshift_direct != nullptr &&
        cuda_detail::output_vectorizable(a.dshift_direct, p.shift.dtype, vec);

    if (l.reg_path) {
      a.dweight_partials = l.dweight == GradRoute::kFused ? w_part : nullptr;
      a.dscale_partials = l.dscale == GradRoute::kFused ? s_part : nullptr;
      a.dshift_partials = l.dshift == GradRoute::kFused ? h_part : nullptr;
      a.group_rows = l.group_rows;
      a.blocks_per_group = l.blocks_per_group;
      a.rows_per_block = l.rows_per_block;
      // backward_const_kernel walks its rows interleaved with the other blocks of its group
      // (mochi f+b 85 -> 92%).
      a.interleave = interleave_rows() ? 1 : 0;
      const bool any_work = a.dx != nullptr || a.dscale_direct != nullptr ||
                            a.dshift_direct != nullptr || a.dweight_partials != nullptr ||
                            a.dscale_partials != nullptr || a.dshift_partials != nullptr;
      if (any_work) {
        a.stages = l.stages;
        a.stage_bytes = l.stage_bytes;
        a.g_stage_off = a.dim_vecs * 16;
        a.m_stage_off = l.m_stage_off;
        a.m_vec_bytes = l.m_vec_bytes;
        a.partials_smem = l.partials_smem;
        a.cache_w = l.pipe ? l.cache_w : -1;
        a.cache_s = l.pipe ? l.cache_s : -1;
        if (l.pipe) {
          visit_backward_pipe(a.dim_vecs, [&](auto shape) {
            using S = decltype(shape);
            auto kernel = cuda_detail::backward_pipe_kernel<XT, M, kVec, S::kNV, S::kTPR>;
            launch_row_pass(kernel, a, l, l.threads, device, stream, "modnorm backward_pipe_kernel");
          });
        } else if (l.short_rows && a.dx_vectorized) {  // (no direct gradients either)
          if constexpr (M != CastingMode::kGemma) {
            visit_short_kernel<XT, M, kVec>(
                a.dim_vecs, a.dshift_partials != nullptr, [&](auto kernel) {
                  launch_row_pass(kernel, a, l, l.threads, device, stream,
                                  "modnorm backward_short_kernel");
                });
          }
        } else if (l.lean && a.dx_vectorized) {  // (lean layouts have no direct gradients)
          if constexpr (M != CastingMode::kGemma) {
            visit_lean_kernel<XT, M, kVec>(
                a.dshift_partials != nullptr, [&](auto kernel) {
                  a.ring_stages = l.ring_stages;
                  launch_row_pass(kernel, a, l, l.threads, device, stream,
                                  "modnorm backward_lean_kernel");
                });
          }
        } else if (l.ring_stages > 0) {
          // (Also a lean layout whose dx turned out unaligned: the same blocks, rows and stages.)
          if constexpr (M != CastingMode::kGemma) {
            visit_backward_config<kVec, true>(a.dim_vecs, [&](auto config) {
              using C = decltype(config);
              constexpr int NV = C::kNV, TPR = C::kTPR, TEAMS = C::kTeams;
              auto kernel = cuda_detail::backward_const_kernel<XT, M, kVec, NV, TPR, TEAMS, true>;
              if constexpr (TEAMS == 1) {
                if (l.token) {
                  kernel = cuda_detail::backward_const_kernel<XT, M, kVec, NV, TPR, 1, true, true>;
                }
              }
              a.ring_stages = l.ring_stages;
              launch_row_pass(kernel, a, l, C::kThreads, device, stream,
                              "modnorm backward_const_kernel");
            }, l.token);
          }
        } else {
          visit_backward_config<kVec>(a.dim_vecs, [&](auto config) {
            using C = decltype(config);
            if constexpr (M != CastingMode::kGemma) {
              if (l.const_mod) {
                auto kernel =
                    cuda_detail::backward_const_kernel<XT, M, kVec, C::kNV, C::kTPR, C::kTeams>;
                launch_row_pass(kernel, a, l, C::kThreads, device, stream,
                                "modnorm backward_const_kernel");
                return;
              }
            }
            auto kernel = cuda_detail::backward_reg_kernel<XT, M, kVec, C::kNV, C::kTPR, C::kTeams>;
            launch_row_pass(kernel, a, l, C::kThreads, device, stream,
                            "modnorm backward_reg_kernel");
          });
        }
      }
    } else if (a.dx != nullptr || a.dscale_direct != nullptr || a.dshift_direct != nullptr) {
      auto go = [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        const bool warp_teams = VEC == 1 && p.dim <= kSmallLoopDim;
        const BackwardKernel kernel =
            warp_teams ? cuda_detail::backward_loop_kernel<XT, M, 1, 32, 8>
                       : cuda_detail::backward_loop_kernel<XT, M, VEC, kLoopBlockThreads, 1>;
        const int threads = warp_teams ? 256 : kLoopBlockThreads;
        const int teams = warp_teams ? 8 : 1;
        const size_t stage_bytes = warp_teams ? 0 : 2 * size_t(a.dim_vecs) * sizeof(XRaw<XT, VEC>);
        launch_loop_kernel(kernel, a, threads, teams, stage_bytes, p.rows, device, stream,
                           "modnorm backward_loop_kernel");
      };
      if (l.vectorized) {
        go(std::integral_constant<int, kVec>{});
      } else {
        go(std::integral_constant<int, 1>{});
      }
    }

    // 3. Fixed-order sums of the partials, in one launch.
    cuda_detail::FinalizeArgs fin;
    fin.dim = p.dim;
    fin.col_tiles = ceil_div(p.dim, cuda_detail::kFinalizeCols);
    if (l.dweight == GradRoute::kFused) {
      finalize(fin, w_part, 1, l.blocks, 0, grads.dweight, p.weight.dtype);
    } else if (l.dweight == GradRoute::kColumn) {
      finalize(fin, w_part, 1, l.col_w.segments, 0, grads.dweight, p.weight.dtype);
    }
    auto finish_modulation = [&](GradRoute route, const ColumnPlan& c, const RowMap& map,
                                 float* part, void* out, DType dtype) {
      if (route == GradRoute::kFused) {
        const int64_t dest_stride = map.ndim > 0 ? map.grad_stride[0] : 0;
        finalize(fin, part, l.groups, l.blocks_per_group, dest_stride, out, dtype);
      } else if (route == GradRoute::kColumn) {
        finalize(fin, part, c.distinct, c.segments, 1, out, dtype);
      }
    };
    finish_modulation(l.dscale, l.col_s, p.scale_map, s_part, grads.dscale, p.scale.dtype);
    finish_modulation(l.dshift, l.col_h, p.shift_map, h_part, grads.dshift, p.shift.dtype);
    launch_finalize(fin, device, stream);
  }
};

void zero_fill(void* out, DType dtype, int64_t elements, cudaStream_t stream) {
  if (out == nullptr || elements <= 0) return;
  cuda_detail::check_cuda(cudaMemsetAsync(out, 0, size_t(elements) * dtype_size(dtype), stream),
                          "cudaMemsetAsync (zero gradient)");
}

}  // namespace

size_t cuda_backward_workspace_bytes(const BackwardPlan& plan) {
  if (plan.fwd.empty()) return 0;
  cuda_detail::DeviceGuard guard(plan.fwd.device.index);
  return dispatch<BackwardImpl>(plan.fwd.x_dtype, plan.fwd.casting_mode, [&](auto impl) {
    return size_t(decltype(impl)::layout(plan).total_floats) * sizeof(float);
  });
}

void cuda_backward(const BackwardPlan& plan, const float* rstd, const Gradients& grads,
                   void* workspace, size_t workspace_bytes, void* stream) {
  const ForwardPlan& p = plan.fwd;
  cuda_detail::DeviceGuard guard(p.device.index);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.empty()) {  // sums over no rows are zero
    if (plan.need_dweight) zero_fill(grads.dweight, p.weight.dtype, p.dim, s);
    if (plan.need_dscale) {
      zero_fill(grads.dscale, p.scale.dtype, p.scale_map.distinct_rows * p.dim, s);
    }
    if (plan.need_dshift) {
      zero_fill(grads.dshift, p.shift.dtype, p.shift_map.distinct_rows * p.dim, s);
    }
    return;
  }
  dispatch<BackwardImpl>(p.x_dtype, p.casting_mode, [&](auto impl) {
    using Impl = decltype(impl);
    const size_t needed = size_t(Impl::layout(plan).total_floats) * sizeof(float);
    if (workspace_bytes < needed || (needed > 0 && workspace == nullptr)) {
      throw Error(Error::Kind::kValue, "modnorm CUDA backend: backward workspace is too small");
    }
    if (needed > 0 && !cuda_detail::aligned_to(workspace, alignof(float))) {
      throw Error(Error::Kind::kValue, "modnorm CUDA backend: workspace must be 4-byte aligned");
    }
    Impl::run(plan, rstd, grads, static_cast<float*>(workspace), s);
  });
}

}  // namespace modnorm::detail
