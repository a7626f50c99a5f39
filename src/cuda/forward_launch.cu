// CUDA backend: launch planning for the forward.
//
//   forward_row_block_kernel: vectorized rows of 129-1024 16-byte vectors whose weight is in x's
//     dtype and modulation in x's dtype or float32 (llama and none casting): one row per block.
//   forward_row_tile_kernel: the same for rows up to 128 vectors, a warp team per row; taken
//     before forward_const_kernel without modulation, after it with modulation.
//   forward_const_kernel: vectorized rows up to 768 16-byte vectors whose blocks can each own rows
//     that read one scale/shift row (no modulation, per sample, per frame, shared; llama and
//     none casting): weight * scale and shift held in registers per thread.
//   forward_rows_kernel: other vectorized rows up to 128 vectors (1024 bf16 elements): teams of
//     1-32 lanes, tiles of rows per block, weight and shared modulation cached in shared memory.
//   forward_reg_kernel:  other vectorized rows up to 4096 vectors, one block-wide team per row,
//     per-token modulation vectors prefetched into shared memory with x.
//   forward_loop_kernel: longer rows, or layouts without 16-byte alignment.
#include <type_traits>

#include "launch_common.h"

namespace modnorm::detail {
namespace {

// forward_rows_kernel shapes: NV vectors per lane, TPR lanes per row, by row length in vectors:
// every lane holds 4 vectors (64 bytes of x in flight); rows up to 4 vectors get a lane each.
template <int NV, int TPR>
struct Rows {
  static constexpr int kNV = NV;
  static constexpr int kTPR = TPR;
  static constexpr int kThreads = cuda_detail::kRowsBlockThreads;
  static constexpr int kTeams = kThreads / TPR;
};

template <typename F>
bool visit_rows_config(int dim_vecs, F&& f) {
  if (dim_vecs <= 4) return f(Rows<4, 1>{}), true;
  if (dim_vecs <= 8) return f(Rows<4, 2>{}), true;
  if (dim_vecs <= 16) return f(Rows<4, 4>{}), true;
  if (dim_vecs <= 32) return f(Rows<4, 8>{}), true;
  if (dim_vecs <= 64) return f(Rows<4, 16>{}), true;
  if (dim_vecs <= 128) return f(Rows<4, 32>{}), true;
  return false;
}

// Longer vectorized rows: one block-wide team per row, 2-4 vectors per thread.
template <typename F>
bool visit_block_row_config(int dim_vecs, F&& f) {
  if (dim_vecs <= 256) return f(Config<2, 128, 1>{}), true;
  if (dim_vecs <= 512) return f(Config<4, 128, 1>{}), true;
  if (dim_vecs <= 1024) return f(Config<4, 256, 1>{}), true;
  if (dim_vecs <= 2048) return f(Config<4, 512, 1>{}), true;
  if (dim_vecs <= 4096) return f(Config<4, 1024, 1>{}), true;
  return false;
}

// forward_const_kernel shapes: 128 threads; short rows in teams of 1-32 lanes with 2 vectors
// each, longer rows one block-wide team with 2-6 vectors each (the register budget holds wm, the
// shift and two rows of x per thread).
template <typename F>
bool visit_const_config(int dim_vecs, F&& f) {
  if (dim_vecs <= 2) return f(Config<2, 1, 128>{}), true;
  if (dim_vecs <= 4) return f(Config<2, 2, 64>{}), true;
  if (dim_vecs <= 8) return f(Config<2, 4, 32>{}), true;
  if (dim_vecs <= 16) return f(Config<2, 8, 16>{}), true;
  if (dim_vecs <= 32) return f(Config<2, 16, 8>{}), true;
  if (dim_vecs <= 64) return f(Config<2, 32, 4>{}), true;
  if (dim_vecs <= 128) return f(Config<4, 32, 4>{}), true;
  if (dim_vecs <= 256) return f(Config<2, 128, 1>{}), true;
  if (dim_vecs <= 384) return f(Config<3, 128, 1>{}), true;
  if (dim_vecs <= 512) return f(Config<4, 128, 1>{}), true;
  if (dim_vecs <= 640) return f(Config<5, 128, 1>{}), true;
  if (dim_vecs <= 768) return f(Config<6, 128, 1>{}), true;
  return false;
}

inline int64_t round16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// Rows per modulation row when every present modulation operand is read in runs of one common
// length (per sample, per frame, shared); 0 otherwise.
int64_t modulation_run(const ForwardPlan& p) {
  int64_t run = 0;
  for (const auto* op : {&p.scale, &p.shift}) {
    if (!op->present()) continue;
    const RowMap& m = op == &p.scale ? p.scale_map : p.shift_map;
    if (!m.blocked || m.rows_per_distinct < 1) return 0;
    if (run != 0 && run != m.rows_per_distinct) return 0;
    run = m.rows_per_distinct;
  }
  return run;
}

// Whether forward_row_block_kernel loads scale and shift rows evict-last: each present one is
// read by several x rows, and together they are a small set. Per-token rows (read once) loaded
// evict-last made ltx2b-i2v's forward 1 us faster but left dead lines in L2 that slowed the next
// kernel more (l2_policy). For the small sets the gain inside the kernel is 0-0.3 us; under the
// benchmark's zero flush they also stay in L2 from one timed call to the next, which a model,
// where each call reads its own rows, never sees (performance log, session 18).
constexpr int64_t kModEvictLastMaxBytes = int64_t(4) << 20;
bool modulation_evict_last(const ForwardPlan& p) {
  int64_t bytes = 0;
  for (const auto* op : {&p.scale, &p.shift}) {
    if (!op->present()) continue;
    const RowMap& m = op == &p.scale ? p.scale_map : p.shift_map;
    if (m.rows_per_distinct < 2) return false;
    bytes += m.distinct_rows * p.dim * int64_t(dtype_size(op->dtype));
  }
  return bytes <= kModEvictLastMaxBytes;
}

// Whether forward_row_block_kernel loads x evict-first, as the other forward kernels do (the
// flush's dirty lines stay in L2 longer). Its rows are one block's, read once, and with the normal
// policy the kernel measured faster or level on every row-block case on the H100 (ltx13b 81.6 ->
// 79.8 us, mochi 190.0 -> 187.6; performance log, session 20); on the H200 (session 18) mochi
// gained 2.5% and ltx13b and ltx2b-t2v lost 0.5-1%. MODNORM_FWD_X_POLICY=first, for comparisons.
bool row_block_x_evict_first() {
  static const bool first = env_switch("MODNORM_FWD_X_POLICY") == "first";
  return first;
}

template <DType XT, CastingMode M>
struct ForwardImpl {
  // Per-token modulation in x's dtype, loaded into registers with x (short rows only).
  static bool preload_modulation(const ForwardPlan& p) {
    if (!p.scale.present() && !p.shift.present()) return false;
    return (!p.scale.present() || p.scale.dtype == XT) && (!p.shift.present() || p.shift.dtype == XT);
  }

  template <int VEC, typename C>
  static void launch_rows(const ForwardPlan& p, ForwardArgs& a, cudaStream_t stream, int device) {
    const cuda_detail::DeviceInfo& info = device_info(device);
    const int64_t vec_bytes_w = VEC * int64_t(dtype_size(p.weight.dtype));
    const int64_t vec_bytes_s = VEC * int64_t(dtype_size(p.scale.dtype));
    const int64_t vec_bytes_h = VEC * int64_t(dtype_size(p.shift.dtype));
    int64_t run = modulation_run(p);
    if (run < C::kTeams) run = 0;  // too few rows per modulation row to be worth a copy
    if (run > 0 && p.rows / run > INT_MAX) run = 0;  // a tile per run would not fit the grid
    int64_t smem = 0;
    a.cache_w = a.cache_s = a.cache_h = -1;
    if (p.weight.present()) {
      a.cache_w = static_cast<int>(smem);
      smem += round16(a.dim_vecs * vec_bytes_w);
    }
    if (run > 0) {
      const int64_t mod_bytes = (p.scale.present() ? round16(a.dim_vecs * vec_bytes_s) : 0) +
                                (p.shift.present() ? round16(a.dim_vecs * vec_bytes_h) : 0);
      if (size_t(smem + mod_bytes) + kStaticSmemReserve <= info.max_smem_optin) {
        if (p.scale.present()) {
          a.cache_s = static_cast<int>(smem);
          smem += round16(a.dim_vecs * vec_bytes_s);
        }
        if (p.shift.present()) {
          a.cache_h = static_cast<int>(smem);
          smem += round16(a.dim_vecs * vec_bytes_h);
        }
      } else {
        run = 0;
      }
    }
    const bool pre = run == 0 && preload_modulation(p);
    const ForwardKernel kernel =
        pre ? cuda_detail::forward_rows_kernel<XT, M, VEC, C::kNV, C::kTPR, true>
            : cuda_detail::forward_rows_kernel<XT, M, VEC, C::kNV, C::kTPR, false>;
    // Tiles: a few rows per team, as many as leave at least two waves of blocks.
    const int occupancy = blocks_per_sm(device, kernel, C::kThreads, size_t(smem));
    const int64_t wave_rows = int64_t(info.sm_count) * occupancy * C::kTeams;
    const int64_t iters = std::max<int64_t>(1, std::min<int64_t>(16, p.rows / (2 * wave_rows)));
    int64_t tile_rows = C::kTeams * iters;
    int64_t grid = 0;
    for (;; tile_rows *= 2) {
      a.run_rows = run;
      a.tiles_per_run = run > 0 ? ceil_div(run, tile_rows) : 1;
      grid = run > 0 ? (p.rows / run) * a.tiles_per_run : ceil_div(p.rows, tile_rows);
      if (grid <= INT_MAX) break;
    }
    a.tile_rows = tile_rows;
    launch_kernel(kernel, grid, C::kThreads, size_t(smem), a, stream, device,
                  "modnorm forward_rows_kernel");
  }

  // Whether `op` is absent or of `dtype` (the row kernels load operands as raw vectors).
  static bool absent_or(const Operand& op, DType dtype) { return !op.present() || op.dtype == dtype; }

  // The row-block / row-tile kernel instance for the present operands (weight, scale, shift as
  // template flags), from make(W, S, H); nullptr for a shift without a scale, which the plan
  // rejects anyway.
  template <typename Make>
  static ForwardKernel operand_set_kernel(const ForwardPlan& p, Make&& make) {
    const bool w = p.weight.present(), s = p.scale.present(), h = p.shift.present();
    ForwardKernel kernel = nullptr;
    auto pick = [&](auto wc, auto sc, auto hc) {
      if (w == wc.value && s == sc.value && h == hc.value) kernel = make(wc, sc, hc);
    };
    using T = std::true_type;
    using F = std::false_type;
    pick(F{}, F{}, F{});
    pick(F{}, T{}, F{});
    pick(F{}, T{}, T{});
    pick(T{}, F{}, F{});
    pick(T{}, T{}, F{});
    pick(T{}, T{}, T{});
    return kernel;
  }

  // Launches `kernel` (if any) on `grid` blocks; false when there is none or the grid is too big.
  static bool launch_rows_grid(ForwardKernel kernel, int64_t grid, int threads, const ForwardArgs& a,
                               cudaStream_t stream, int device, const char* name) {
    if (kernel == nullptr || grid > INT_MAX) return false;
    launch_kernel(kernel, grid, threads, 0, a, stream, device, name);
    return true;
  }

  // forward_row_block_kernel: rows of 129-1024 vectors with 16-byte stores, llama or no
  // casting, scale and shift in MT (raw vector loads; see try_row_block). THREADS threads with kNV
  // vectors each: two (Liger's shape; 4 vectors on half the threads lost on 3 of 5 cases,
  // performance log, session 7), or three where two would leave a quarter of the threads empty
  // (see try_row_block). Returns whether it launched.
  template <int VEC, int THREADS, int kNV = 2, DType MT = XT>
  static bool launch_row_block(const ForwardPlan& p, ForwardArgs& a, cudaStream_t stream) {
    const ForwardKernel kernel = operand_set_kernel(p, [](auto wc, auto sc, auto hc) -> ForwardKernel {
      if constexpr (MT != XT && !decltype(sc)::value) {
        return nullptr;  // no scale: the x-dtype instance takes it
      } else {
        return cuda_detail::forward_row_block_kernel<XT, M, VEC, kNV, THREADS, wc.value, sc.value,
                                                     hc.value, MT>;
      }
    });
    a.mod_evict_last = modulation_evict_last(p) ? 1 : 0;
    a.x_evict_first = row_block_x_evict_first() ? 1 : 0;
    return launch_rows_grid(kernel, p.rows, THREADS, a, stream, p.device.index,
                            "modnorm forward_row_block_kernel");
  }

  // Rows of 257-384 and 513-768 vectors take three vectors a thread: with two, a quarter of the
  // threads of a 256 / 512-thread block held nothing (H200: mochi and flux, 384 vectors, 6% and
  // 8% faster; performance log, session 10).
  template <int VEC, DType MT>
  static bool launch_row_block_sized(const ForwardPlan& p, ForwardArgs& a, cudaStream_t stream) {
    if (a.dim_vecs <= 256) return launch_row_block<VEC, 128, 2, MT>(p, a, stream);
    if (a.dim_vecs <= 384) return launch_row_block<VEC, 128, 3, MT>(p, a, stream);
    if (a.dim_vecs <= 512) return launch_row_block<VEC, 256, 2, MT>(p, a, stream);
    if (a.dim_vecs <= 768) return launch_row_block<VEC, 256, 3, MT>(p, a, stream);
    return launch_row_block<VEC, 512, 2, MT>(p, a, stream);
  }

  // The weight in x's dtype; scale and shift in x's dtype, or both float32 per token beside 16-bit
  // x (Wan 2.2's modulation: forward_reg_kernel took it 10% slower). Float32 rows shared by many
  // rows stay with forward_const_kernel, which holds them in registers: here every block would
  // read 8 bytes of them per element of x through L2 (wan14b 177 -> 271 us; performance log,
  // session 10).
  template <int VEC>
  static bool try_row_block(const ForwardPlan& p, ForwardArgs& a, cudaStream_t stream) {
    if constexpr (M == CastingMode::kGemma) {
      return false;
    } else {
      if (!a.y_vectorized || p.rows > INT_MAX || a.dim_vecs <= 128 || a.dim_vecs > 1024) return false;
      if (!absent_or(p.weight, XT)) return false;
      if (absent_or(p.scale, XT) && absent_or(p.shift, XT)) {
        return launch_row_block_sized<VEC, XT>(p, a, stream);
      }
      if constexpr (XT != DType::kFloat32) {
        auto per_token_f32 = [](const Operand& op, const RowMap& map) {
          return absent_or(op, DType::kFloat32) && (!op.present() || map.rows_per_distinct == 1);
        };
        if (per_token_f32(p.scale, p.scale_map) && per_token_f32(p.shift, p.shift_map)) {
          return launch_row_block_sized<VEC, DType::kFloat32>(p, a, stream);
        }
      }
      return false;
    }
  }

  // forward_row_tile_kernel: rows of at most 128 vectors, same operand rules as the row block.
  // Teams of TPR lanes with NV vectors each.
  template <int VEC, int NV, int TPR>
  static bool launch_row_tile(const ForwardPlan& p, ForwardArgs& a, cudaStream_t stream) {
    const ForwardKernel kernel = operand_set_kernel(p, [](auto wc, auto sc, auto hc) -> ForwardKernel {
      return cuda_detail::forward_row_tile_kernel<XT, M, VEC, NV, TPR, wc.value, sc.value, hc.value>;
    });
    return launch_rows_grid(kernel, ceil_div(p.rows, int64_t(cuda_detail::kRowTileThreads / TPR)),
                            cuda_detail::kRowTileThreads, a, stream, p.device.index,
                            "modnorm forward_row_tile_kernel");
  }

  template <int VEC>
  static bool try_row_tile(const ForwardPlan& p, ForwardArgs& a, cudaStream_t stream) {
    if constexpr (M == CastingMode::kGemma) {
      return false;
    } else {
      if (!a.y_vectorized || a.dim_vecs > 128) return false;
      if (!absent_or(p.weight, XT) || !absent_or(p.scale, XT) || !absent_or(p.shift, XT)) return false;
      if (a.dim_vecs <= 4) return launch_row_tile<VEC, 1, 4>(p, a, stream);
      if (a.dim_vecs <= 8) return launch_row_tile<VEC, 1, 8>(p, a, stream);
      if (a.dim_vecs <= 16) return launch_row_tile<VEC, 1, 16>(p, a, stream);
      if (a.dim_vecs <= 32) return launch_row_tile<VEC, 1, 32>(p, a, stream);
      if (a.dim_vecs <= 64) return launch_row_tile<VEC, 2, 32>(p, a, stream);
      return launch_row_tile<VEC, 4, 32>(p, a, stream);
    }
  }

  // forward_const_kernel when every block can own rows reading one weight, scale and shift row:
  // runs of at least 8 rows per modulation row (or no modulation). Returns whether it launched.
  template <int VEC>
  static bool launch_const(const ForwardPlan& p, ForwardArgs& a, cudaStream_t stream, int device) {
    if constexpr (M == CastingMode::kGemma) {
      return false;
    } else {
      const bool any_mod = p.scale.present() || p.shift.present();
      const int64_t run = any_mod ? modulation_run(p) : p.rows;
      if (run < 8 && run != p.rows) return false;
      if (!a.y_vectorized) return false;  // its stores are 16 bytes wide
      bool launched = false;
      visit_const_config(a.dim_vecs, [&](auto config) {
        using C = decltype(config);
        const ForwardKernel kernel =
            p.shift.present()
                ? cuda_detail::forward_const_kernel<XT, M, VEC, C::kNV, C::kTPR, C::kTeams, true>
                : cuda_detail::forward_const_kernel<XT, M, VEC, C::kNV, C::kTPR, C::kTeams, false>;
        const cuda_detail::DeviceInfo& info = device_info(device);
        // About two waves of blocks, 1-64 rows per team (at least 2 for block-wide teams, whose
        // constants cost as much to load as a row), balanced inside each run.
        const int occupancy = blocks_per_sm(device, kernel, C::kThreads, 0);
        a.interleave = interleave_rows() ? 1 : 0;
        const int64_t target = std::max<int64_t>(1, int64_t(info.sm_count) * occupancy * 2);
        const int64_t iters = std::max<int64_t>(
            C::kTeams == 1 ? 2 : 1, std::min<int64_t>(64, ceil_div(p.rows, target * C::kTeams)));
        const int64_t per_block = iters * C::kTeams;
        const int64_t groups = p.rows / run;
        const int64_t blocks_per_group = ceil_div(run, per_block);
        a.group_rows = run;
        a.blocks_per_group = blocks_per_group;
        a.rows_per_block = ceil_div(run, blocks_per_group);
        const int64_t grid = groups * blocks_per_group;
        if (grid > INT_MAX) return;  // the register kernel strides instead
        launch_kernel(kernel, grid, C::kThreads, 0, a, stream, device,
                      "modnorm forward_const_kernel");
        launched = true;
      });
      return launched;
    }
  }

  template <int VEC>
  static void launch(const ForwardPlan& p, ForwardArgs& a, cudaStream_t stream, int device) {
    a.dim_vecs = static_cast<int>(p.dim / VEC);
    a.y_vectorized = cuda_detail::output_vectorizable(a.y, p.x_dtype, VEC) ? 1 : 0;
    if constexpr (VEC > 1) {
      // Comparison switch (performance log): MODNORM_FORWARD_KERNEL=persistent skips the
      // row-block kernel and takes the ones it replaced (const, or reg for per-token rows).
      static const bool row_block = env_switch("MODNORM_FORWARD_KERNEL") != "persistent";
      if (row_block && try_row_block<VEC>(p, a, stream)) return;
      // Short rows: the row tile, except where the const kernel can hold a per-sample / shared
      // scale and shift in registers (H200, D = 256 with weight, scale and shift per sample: row
      // tile 47.4 us, const 45.9; without modulation the row tile won by 3-4%).
      const bool modulated = p.scale.present() || p.shift.present();
      if (row_block && !modulated && try_row_tile<VEC>(p, a, stream)) return;
      if (launch_const<VEC>(p, a, stream, device)) return;
      if (row_block && modulated && try_row_tile<VEC>(p, a, stream)) return;
      if (visit_rows_config(a.dim_vecs, [&](auto config) {
            launch_rows<VEC, decltype(config)>(p, a, stream, device);
          })) {
        return;
      }
      const bool done = visit_block_row_config(a.dim_vecs, [&](auto config) {
        using C = decltype(config);
        ForwardKernel kernel =
            cuda_detail::forward_reg_kernel<XT, M, VEC, C::kNV, C::kTPR, C::kTeams, false>;
        // Slots for per-token scale/shift rows, prefetched with x by cp.async: those are a
        // second DRAM stream, and waiting for them after the row sum put two memory latencies in
        // series (ltx2b-i2v 78% -> 86%). Weight and shared rows stay L1 reads: copying them per
        // row cost 6-19 points (v0.4 log).
        int64_t slot_bytes = 0;
        a.pre_s = a.pre_h = -1;
        auto slot = [&](const Operand& op, const RowMap& map, int& off) {
          if (!op.present() || map.rows_per_distinct != 1) return;
          off = static_cast<int>(slot_bytes);
          slot_bytes += round16(int64_t(a.dim_vecs) * VEC * int64_t(dtype_size(op.dtype)));
        };
        slot(p.scale, p.scale_map, a.pre_s);
        slot(p.shift, p.shift_map, a.pre_h);
        const size_t smem = size_t(slot_bytes) * C::kTeams;
        if (smem + kStaticSmemReserve > device_info(device).max_smem_optin) {
          a.pre_s = a.pre_h = -1;
          slot_bytes = 0;
        }
        a.pre_slot_bytes = static_cast<int>(slot_bytes);
        if (slot_bytes > 0) {
          kernel = cuda_detail::forward_reg_kernel<XT, M, VEC, C::kNV, C::kTPR, C::kTeams, true>;
        }
        // A block per row: short blocks retire and are replaced while others still wait on
        // memory (measured faster than a persistent grid here). The kernel strides over rows,
        // so the launch limit is the only cap.
        const int64_t grid = std::min<int64_t>(ceil_div(p.rows, C::kTeams), INT_MAX);
        launch_kernel(kernel, grid, C::kThreads, size_t(slot_bytes) * C::kTeams, a, stream, device,
                      "modnorm forward_reg_kernel");
      });
      if (done) return;
    }
    // Unvectorized short rows: warp teams. Everything else: one 512-thread block per row.
    const bool warp_teams = VEC == 1 && p.dim <= kSmallLoopDim;
    const ForwardKernel kernel =
        warp_teams ? cuda_detail::forward_loop_kernel<XT, M, 1, 32, 8>
                   : cuda_detail::forward_loop_kernel<XT, M, VEC, kLoopBlockThreads, 1>;
    const int threads = warp_teams ? 256 : kLoopBlockThreads;
    const int teams = warp_teams ? 8 : 1;
    const size_t stage_bytes = warp_teams ? 0 : size_t(a.dim_vecs) * sizeof(XRaw<XT, VEC>);
    launch_loop_kernel(kernel, a, threads, teams, stage_bytes, p.rows, device, stream,
                       "modnorm forward_loop_kernel");
  }

  static void run(const ForwardPlan& p, void* y, float* rstd, cudaStream_t stream) {
    require_int_dim(p.dim);
    ForwardArgs a;
    a.release_early = forward_releases_early(p.device.index) ? 1 : 0;
    set_common_args(a, p);
    a.y = y;
    a.rstd = rstd;
    a.rows = p.rows;
    a.shift = p.shift.present() ? p.shift.data : nullptr;
    a.shift_dtype = dtype_int(p.shift.dtype);
    a.eps = p.eps;
    a.inv_dim = 1.f / static_cast<float>(p.dim);
    a.shift_map = to_dev_map(p.shift_map);
    constexpr int kVec = vector_width<XT>();
    if (rows_vectorizable(p, kVec, nullptr, 0)) {
      launch<kVec>(p, a, stream, p.device.index);
    } else {
      launch<1>(p, a, stream, p.device.index);
    }
  }
};

}  // namespace

void cuda_forward(const ForwardPlan& plan, void* y, float* rstd, void* stream) {
  if (plan.empty()) return;
  cuda_detail::DeviceGuard guard(plan.device.index);
  dispatch<ForwardImpl>(plan.x_dtype, plan.casting_mode, [&](auto impl) {
    decltype(impl)::run(plan, y, rstd, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace modnorm::detail
