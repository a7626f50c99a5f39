// CPU backend: forward and backward of the fused modulated RMSNorm.
//
// Each row is loaded once into a float32 buffer, reduced, and written once; inner loops are
// plain float loops over __restrict buffers so the compiler vectorizes them (the build enables
// the host's vector ISA). Rows are spread over threads in fixed tasks, and every reduction over
// rows (dweight, shared dscale/dshift) sums fixed per-task partials in a fixed order, so results
// are bitwise identical run to run whatever the thread count.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../backend.h"

namespace modnorm::detail {
namespace {

// ---------------------------------------------------------------------------------------------
// Element conversions. bfloat16 and float16 are handled as raw 16-bit patterns.

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

inline float half_to_float(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}

inline uint16_t float_to_half(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}

template <DType T>
struct Storage;
template <>
struct Storage<DType::kFloat32> {
  using type = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
  static float round(float v) { return v; }
};
template <>
struct Storage<DType::kBFloat16> {
  using type = uint16_t;
  static float load(uint16_t v) { return bf16_to_float(v); }
  static uint16_t store(float v) { return float_to_bf16(v); }
  static float round(float v) { return bf16_to_float(float_to_bf16(v)); }
};
template <>
struct Storage<DType::kFloat16> {
  using type = uint16_t;
  static float load(uint16_t v) { return half_to_float(v); }
  static uint16_t store(float v) { return float_to_half(v); }
  static float round(float v) { return half_to_float(float_to_half(v)); }
};

template <DType T>
void load_row(const void* src, float* __restrict dst, int64_t n) {
  using S = Storage<T>;
  const auto* __restrict s = static_cast<const typename S::type*>(src);
  for (int64_t j = 0; j < n; ++j) dst[j] = S::load(s[j]);
}

template <DType T>
void store_row(const float* __restrict src, void* dst, int64_t n) {
  using S = Storage<T>;
  auto* __restrict d = static_cast<typename S::type*>(dst);
  for (int64_t j = 0; j < n; ++j) d[j] = S::store(src[j]);
}

void load_any(DType t, const void* src, float* dst, int64_t n) {
  switch (t) {
    case DType::kFloat32: return load_row<DType::kFloat32>(src, dst, n);
    case DType::kFloat16: return load_row<DType::kFloat16>(src, dst, n);
    case DType::kBFloat16: return load_row<DType::kBFloat16>(src, dst, n);
  }
}

void store_any(DType t, const float* src, void* dst, int64_t n) {
  switch (t) {
    case DType::kFloat32: return store_row<DType::kFloat32>(src, dst, n);
    case DType::kFloat16: return store_row<DType::kFloat16>(src, dst, n);
    case DType::kBFloat16: return store_row<DType::kBFloat16>(src, dst, n);
  }
}

const void* advance(const void* p, DType t, int64_t elements) {
  return static_cast<const char*>(p) + elements * static_cast<int64_t>(dtype_size(t));
}
void* advance(void* p, DType t, int64_t elements) {
  return static_cast<char*>(p) + elements * static_cast<int64_t>(dtype_size(t));
}

// Row reductions: 16 independent float lanes (they vectorize) over blocks of 512 elements, with
// the block totals carried in double, so even 100K-element rows sum to near float32 rounding.
template <typename Term>
float blocked_sum(int64_t n, Term term) {
  constexpr int64_t kBlock = 512;
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    float acc[16] = {};
    int64_t j = b;
    for (; j + 16 <= e; j += 16) {
      for (int k = 0; k < 16; ++k) acc[k] += term(j + k);
    }
    for (; j < e; ++j) acc[j & 15] += term(j);
    float block = 0.f;
    for (float a : acc) block += a;
    total += block;
  }
  return static_cast<float>(total);
}

float sum_of_squares(const float* __restrict v, int64_t n) {
  return blocked_sum(n, [v](int64_t j) { return v[j] * v[j]; });
}

float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  return blocked_sum(n, [a, b](int64_t j) { return a[j] * b[j]; });
}

// norm(x) for one element, rounded where the casting mode rounds (SPEC 3).
template <CastingMode M, DType T>
inline float norm_value(float xhat, float w) {
  using S = Storage<T>;
  if constexpr (M == CastingMode::kLlama) return S::round(xhat) * w;
  if constexpr (M == CastingMode::kGemma) return S::round(xhat * w);
  return xhat * w;
}

// Per-thread row buffers. Modulation rows are converted to float once and reused while
// consecutive rows read the same one (per-sample and shared modulation).
struct RowScratch {
  std::vector<float> x, g, out, mul, add;
  const void* mul_src = reinterpret_cast<const void*>(-1);
  const void* add_src = reinterpret_cast<const void*>(-1);
  explicit RowScratch(int64_t d) : x(d), g(d), out(d), mul(d), add(d) {}
};

// mul = scale_offset + scale (or 1 when there is no scale); add = shift (or 0).
void modulation_rows(const ForwardPlan& p, int64_t row, RowScratch& s) {
  const int64_t D = p.dim;
  if (!p.scale.present()) {
    if (s.mul_src != nullptr) {
      std::fill(s.mul.begin(), s.mul.end(), 1.f);
      std::fill(s.add.begin(), s.add.end(), 0.f);
      s.mul_src = s.add_src = nullptr;
    }
    return;
  }
  const void* src = advance(p.scale.data, p.scale.dtype, p.scale_map.element_offset(row));
  if (src != s.mul_src) {
    load_any(p.scale.dtype, src, s.mul.data(), D);
    const float so = p.scale_offset;
    float* __restrict m = s.mul.data();
    for (int64_t j = 0; j < D; ++j) m[j] += so;
    s.mul_src = src;
  }
  if (!p.shift.present()) {
    if (s.add_src != nullptr) {
      std::fill(s.add.begin(), s.add.end(), 0.f);
      s.add_src = nullptr;
    }
    return;
  }
  const void* hsrc = advance(p.shift.data, p.shift.dtype, p.shift_map.element_offset(row));
  if (hsrc != s.add_src) {
    load_any(p.shift.dtype, hsrc, s.add.data(), D);
    s.add_src = hsrc;
  }
}

// offset + weight as float32, or ones when there is no weight (no affine: offset unused).
std::vector<float> effective_weight(const ForwardPlan& p) {
  std::vector<float> w(p.dim, 1.f);
  if (p.weight.present()) {
    load_any(p.weight.dtype, p.weight.data, w.data(), p.dim);
    for (float& v : w) v += p.offset;
  }
  return w;
}

// Fixed task split: depends only on the shape (never on the thread count).
struct TaskSplit {
  int64_t rows_per_task;
  int64_t tasks;
};
TaskSplit split_rows(int64_t rows, int64_t dim, int64_t max_tasks) {
  const int64_t target_elements = 1 << 15;
  int64_t per = std::max<int64_t>(1, target_elements / std::max<int64_t>(dim, 1));
  int64_t tasks = (rows + per - 1) / per;
  if (tasks > max_tasks) {
    per = (rows + max_tasks - 1) / max_tasks;
    tasks = (rows + per - 1) / per;
  }
  return {per, tasks};
}

// ---------------------------------------------------------------------------------------------
// Forward

template <DType T, CastingMode M>
struct ForwardJob {
  const ForwardPlan* p;
  const float* w;
  void* y;
  float* rstd;
  TaskSplit split;

  static void run(void* ctx, int64_t begin, int64_t end) {
    auto& job = *static_cast<ForwardJob*>(ctx);
    const ForwardPlan& p = *job.p;
    const int64_t D = p.dim;
    RowScratch s(D);
    const float inv_d = 1.f / static_cast<float>(D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * job.split.rows_per_task;
      const int64_t r1 = std::min(p.rows, r0 + job.split.rows_per_task);
      for (int64_t r = r0; r < r1; ++r) {
        load_row<T>(advance(p.x, p.x_dtype, r * p.x_row_stride), s.x.data(), D);
        const float rs = 1.f / std::sqrt(sum_of_squares(s.x.data(), D) * inv_d + p.eps);
        if (job.rstd != nullptr) job.rstd[r] = rs;
        modulation_rows(p, r, s);
        const float* __restrict xv = s.x.data();
        const float* __restrict w = job.w;
        const float* __restrict mul = s.mul.data();
        const float* __restrict add = s.add.data();
        float* __restrict out = s.out.data();
        for (int64_t j = 0; j < D; ++j) {
          out[j] = norm_value<M, T>(xv[j] * rs, w[j]) * mul[j] + add[j];
        }
        store_row<T>(out, advance(job.y, p.x_dtype, r * D), D);
      }
    }
  }
};

template <DType T, CastingMode M>
void forward_typed(const ForwardPlan& p, void* y, float* rstd) {
  const std::vector<float> w = effective_weight(p);
  ForwardJob<T, M> job{&p, w.data(), y, rstd, split_rows(p.rows, p.dim, 1 << 20)};
  parallel_for(job.split.tasks, &job, &ForwardJob<T, M>::run);
}

// ---------------------------------------------------------------------------------------------
// Backward
//
// With g = dy, m = scale_offset + scale, dn = g * m, xhat = x * rstd, w = offset + weight:
//   dx     = rstd * (dn*w - xhat * mean(dn*w*xhat))
//   dw    += dn * xhat          (llama: dn * round(xhat), the value the forward multiplied)
//   dscale = sum g * norm(x)    (norm rounded as in the forward)
//   dshift = sum g
// Modulation rows shared by several x rows are reduced in a separate read-only pass that runs
// first, so an in-place dx (written over dy) can never feed it.

struct Workspace {
  float* dweight_partials = nullptr;  // [tasks][D]
  float* scale_partials = nullptr;    // [segments][distinct][D]
  float* shift_partials = nullptr;
};

// Segments per modulation row for the shared-gradient pass: enough tasks to feed the threads,
// a fixed function of the shape.
int64_t segments_for(const RowMap& map) {
  if (map.rows_per_distinct <= 1) return 1;
  const int64_t target_tasks = 64;
  const int64_t seg = (target_tasks + map.distinct_rows - 1) / map.distinct_rows;
  return std::max<int64_t>(1, std::min(seg, map.rows_per_distinct));
}

bool shared(const RowMap& m) { return m.rows_per_distinct > 1; }

template <DType T, CastingMode M>
struct SharedGradJob {
  const BackwardPlan* bp;
  const float* w;
  const float* rstd;
  const RowMap* map;
  bool want_scale, want_shift;
  float* scale_partials;  // [segments][distinct][D]
  float* shift_partials;
  int64_t segments;

  static void run(void* ctx, int64_t begin, int64_t end) {
    auto& job = *static_cast<SharedGradJob*>(ctx);
    const ForwardPlan& p = job.bp->fwd;
    const int64_t D = p.dim;
    const RowMap& map = *job.map;
    const int64_t per_seg = (map.rows_per_distinct + job.segments - 1) / job.segments;
    RowScratch s(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t d = task / job.segments;
      const int64_t seg = task % job.segments;
      const int64_t k0 = seg * per_seg;
      const int64_t k1 = std::min(map.rows_per_distinct, k0 + per_seg);
      const int64_t slot = (seg * map.distinct_rows + d) * D;
      float* __restrict ds = job.want_scale ? job.scale_partials + slot : nullptr;
      float* __restrict dh = job.want_shift ? job.shift_partials + slot : nullptr;
      if (ds) std::fill(ds, ds + D, 0.f);
      if (dh) std::fill(dh, dh + D, 0.f);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r = map.nth_row_of(d, k);
        load_row<T>(advance(job.bp->dy, p.x_dtype, r * job.bp->dy_row_stride), s.g.data(), D);
        const float* __restrict g = s.g.data();
        if (dh) {
          for (int64_t j = 0; j < D; ++j) dh[j] += g[j];
        }
        if (ds) {
          load_row<T>(advance(p.x, p.x_dtype, r * p.x_row_stride), s.x.data(), D);
          const float rs = job.rstd[r];
          const float* __restrict xv = s.x.data();
          const float* __restrict w = job.w;
          for (int64_t j = 0; j < D; ++j) ds[j] += g[j] * norm_value<M, T>(xv[j] * rs, w[j]);
        }
      }
    }
  }
};

template <DType T, CastingMode M>
struct RowGradJob {
  const BackwardPlan* bp;
  const float* w;
  const float* rstd;
  Gradients grads;
  float* dweight_partials;
  bool direct_dscale, direct_dshift;  // modulation rows read by one x row each: write directly
  TaskSplit split;

  static void run(void* ctx, int64_t begin, int64_t end) {
    auto& job = *static_cast<RowGradJob*>(ctx);
    const BackwardPlan& bp = *job.bp;
    const ForwardPlan& p = bp.fwd;
    const int64_t D = p.dim;
    const float inv_d = 1.f / static_cast<float>(D);
    RowScratch s(D);
    std::vector<float> dxh(D), xh(D);
    for (int64_t t = begin; t < end; ++t) {
      float* __restrict dw = job.dweight_partials ? job.dweight_partials + t * D : nullptr;
      if (dw) std::fill(dw, dw + D, 0.f);
      const int64_t r0 = t * job.split.rows_per_task;
      const int64_t r1 = std::min(p.rows, r0 + job.split.rows_per_task);
      for (int64_t r = r0; r < r1; ++r) {
        load_row<T>(advance(p.x, p.x_dtype, r * p.x_row_stride), s.x.data(), D);
        load_row<T>(advance(bp.dy, p.x_dtype, r * bp.dy_row_stride), s.g.data(), D);
        modulation_rows(p, r, s);
        const float rs = job.rstd[r];
        const float* __restrict xv = s.x.data();
        const float* __restrict g = s.g.data();
        const float* __restrict w = job.w;
        const float* __restrict mul = s.mul.data();
        float* __restrict a = dxh.data();
        float* __restrict h = xh.data();
        for (int64_t j = 0; j < D; ++j) {
          h[j] = xv[j] * rs;
          a[j] = g[j] * mul[j] * w[j];
        }
        if (dw) {
          for (int64_t j = 0; j < D; ++j) {
            const float xw = M == CastingMode::kLlama ? Storage<T>::round(h[j]) : h[j];
            dw[j] += g[j] * mul[j] * xw;
          }
        }
        if (job.direct_dscale) {
          float* __restrict o = s.out.data();
          for (int64_t j = 0; j < D; ++j) o[j] = g[j] * norm_value<M, T>(h[j], w[j]);
          store_any(p.scale.dtype, o,
                    advance(job.grads.dscale, p.scale.dtype, p.scale_map.grad_row(r) * D), D);
        }
        if (job.direct_dshift) {
          store_any(p.shift.dtype, g,
                    advance(job.grads.dshift, p.shift.dtype, p.shift_map.grad_row(r) * D), D);
        }
        if (bp.need_dx) {
          const float c = dot(a, h, D) * inv_d;
          float* __restrict o = s.out.data();
          for (int64_t j = 0; j < D; ++j) o[j] = rs * (a[j] - h[j] * c);
          // dx may be dy's own memory: this row of dy has been fully read above.
          store_row<T>(o, advance(job.grads.dx, p.x_dtype, r * D), D);
        }
      }
    }
  }
};

struct ReduceJob {
  const float* partials;  // [parts][n]
  int64_t parts, n, chunk;
  DType out_dtype;
  void* out;
  static void run(void* ctx, int64_t begin, int64_t end) {
    auto& job = *static_cast<ReduceJob*>(ctx);
    std::vector<float> acc;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t j0 = c * job.chunk;
      const int64_t len = std::min(job.n, j0 + job.chunk) - j0;
      acc.assign(len, 0.f);
      float* __restrict a = acc.data();
      for (int64_t part = 0; part < job.parts; ++part) {  // fixed order
        const float* __restrict src = job.partials + part * job.n + j0;
        for (int64_t j = 0; j < len; ++j) a[j] += src[j];
      }
      store_any(job.out_dtype, a, advance(job.out, job.out_dtype, j0), len);
    }
  }
};

void reduce_partials(const float* partials, int64_t parts, int64_t n, DType dtype, void* out) {
  ReduceJob job{partials, parts, n, 1 << 14, dtype, out};
  parallel_for((n + job.chunk - 1) / job.chunk, &job, &ReduceJob::run);
}

void zero_fill(DType dtype, void* out, int64_t n) {
  if (out != nullptr && n > 0) std::memset(out, 0, n * dtype_size(dtype));
}

struct WorkspaceLayout {
  TaskSplit split;
  int64_t dweight_floats = 0;
  int64_t scale_floats = 0, shift_floats = 0;
  int64_t scale_segments = 1, shift_segments = 1;
  bool shift_with_scale = false;  // shift's shared gradient reduced in the scale pass
  size_t bytes() const { return (dweight_floats + scale_floats + shift_floats) * sizeof(float); }
};

WorkspaceLayout layout_for(const BackwardPlan& bp) {
  const ForwardPlan& p = bp.fwd;
  WorkspaceLayout l;
  l.split = split_rows(p.rows, p.dim, 256);
  if (p.empty()) return l;
  if (bp.need_dweight) l.dweight_floats = l.split.tasks * p.dim;
  const bool scale_shared = bp.need_dscale && shared(p.scale_map);
  const bool shift_shared = bp.need_dshift && shared(p.shift_map);
  if (scale_shared) {
    l.scale_segments = segments_for(p.scale_map);
    l.scale_floats = l.scale_segments * p.scale_map.distinct_rows * p.dim;
  }
  if (shift_shared) {
    l.shift_with_scale = scale_shared && same_map(p.scale_map, p.shift_map);
    l.shift_segments = l.shift_with_scale ? l.scale_segments : segments_for(p.shift_map);
    l.shift_floats = l.shift_segments * p.shift_map.distinct_rows * p.dim;
  }
  return l;
}

template <DType T, CastingMode M>
void backward_typed(const BackwardPlan& bp, const float* rstd, const Gradients& grads,
                    float* workspace) {
  const ForwardPlan& p = bp.fwd;
  const WorkspaceLayout l = layout_for(bp);
  const std::vector<float> w = effective_weight(p);
  float* dweight_partials = l.dweight_floats ? workspace : nullptr;
  float* scale_partials = l.scale_floats ? workspace + l.dweight_floats : nullptr;
  float* shift_partials = l.shift_floats ? workspace + l.dweight_floats + l.scale_floats : nullptr;

  // 1. Shared modulation gradients (read-only over x and dy; runs before dx may overwrite dy).
  if (scale_partials) {
    SharedGradJob<T, M> job{&bp, w.data(), rstd, &p.scale_map, true, l.shift_with_scale,
                            scale_partials, shift_partials, l.scale_segments};
    parallel_for(p.scale_map.distinct_rows * l.scale_segments, &job, &SharedGradJob<T, M>::run);
  }
  if (shift_partials && !l.shift_with_scale) {
    SharedGradJob<T, M> job{&bp, w.data(), rstd, &p.shift_map, false, true,
                            nullptr, shift_partials, l.shift_segments};
    parallel_for(p.shift_map.distinct_rows * l.shift_segments, &job, &SharedGradJob<T, M>::run);
  }
  // 2. Per-row pass: dx, dweight partials, unshared modulation gradients.
  RowGradJob<T, M> job{&bp, w.data(), rstd, grads, dweight_partials,
                       bp.need_dscale && !shared(p.scale_map),
                       bp.need_dshift && !shared(p.shift_map), l.split};
  if (bp.need_dx || job.dweight_partials || job.direct_dscale || job.direct_dshift) {
    parallel_for(l.split.tasks, &job, &RowGradJob<T, M>::run);
  }
  // 3. Fixed-order reductions of the partials.
  if (dweight_partials) {
    reduce_partials(dweight_partials, l.split.tasks, p.dim, p.weight.dtype, grads.dweight);
  }
  if (scale_partials) {
    reduce_partials(scale_partials, l.scale_segments, p.scale_map.distinct_rows * p.dim,
                    p.scale.dtype, grads.dscale);
  }
  if (shift_partials) {
    reduce_partials(shift_partials, l.shift_segments, p.shift_map.distinct_rows * p.dim,
                    p.shift.dtype, grads.dshift);
  }
}

template <template <DType, CastingMode> class F, typename... Args>
void dispatch_types(DType t, CastingMode m, Args&&... args) {
  auto by_mode = [&](auto dt) {
    constexpr DType T = decltype(dt)::value;
    switch (m) {
      case CastingMode::kLlama: return F<T, CastingMode::kLlama>::call(args...);
      case CastingMode::kGemma: return F<T, CastingMode::kGemma>::call(args...);
      case CastingMode::kNone: return F<T, CastingMode::kNone>::call(args...);
    }
  };
  switch (t) {
    case DType::kFloat32: return by_mode(std::integral_constant<DType, DType::kFloat32>{});
    case DType::kFloat16: return by_mode(std::integral_constant<DType, DType::kFloat16>{});
    case DType::kBFloat16: return by_mode(std::integral_constant<DType, DType::kBFloat16>{});
  }
}

template <DType T, CastingMode M>
struct ForwardCall {
  static void call(const ForwardPlan& p, void* y, float* rstd) { forward_typed<T, M>(p, y, rstd); }
};
template <DType T, CastingMode M>
struct BackwardCall {
  static void call(const BackwardPlan& bp, const float* rstd, const Gradients& g, float* ws) {
    backward_typed<T, M>(bp, rstd, g, ws);
  }
};

}  // namespace

void cpu_forward(const ForwardPlan& plan, void* y, float* rstd) {
  dispatch_types<ForwardCall>(plan.x_dtype, plan.casting_mode, plan, y, rstd);
}

size_t cpu_backward_workspace_bytes(const BackwardPlan& plan) { return layout_for(plan).bytes(); }

void cpu_backward(const BackwardPlan& plan, const float* rstd, const Gradients& grads,
                  void* workspace, size_t /*workspace_bytes*/) {
  const ForwardPlan& p = plan.fwd;
  if (p.empty()) {  // sums over no rows are zero
    if (plan.need_dweight) zero_fill(p.weight.dtype, grads.dweight, p.dim);
    if (plan.need_dscale) zero_fill(p.scale.dtype, grads.dscale, p.scale_map.distinct_rows * p.dim);
    if (plan.need_dshift) zero_fill(p.shift.dtype, grads.dshift, p.shift_map.distinct_rows * p.dim);
    return;
  }
  dispatch_types<BackwardCall>(p.x_dtype, p.casting_mode, plan, rstd, grads,
                               static_cast<float*>(workspace));
}

}  // namespace modnorm::detail
