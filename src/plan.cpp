// Argument validation and the broadcast plan (SPEC sections 2 and 6), shared by every backend.
#include <cmath>
#include <cstdio>

#include "modnorm/modnorm.h"

namespace modnorm {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

size_t dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

CastingMode parse_casting_mode(const std::string& name) {
  if (name == "llama") return CastingMode::kLlama;
  if (name == "gemma") return CastingMode::kGemma;
  if (name == "none") return CastingMode::kNone;
  throw Error(Error::Kind::kValue,
              "modnorm: casting_mode must be 'llama', 'gemma' or 'none', got '" + name + "'");
}

int64_t TensorRef::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

bool TensorRef::is_contiguous() const {
  int64_t expected = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

namespace {

TensorRef make_view(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device) {
  if (shape.size() > static_cast<size_t>(kMaxDims)) {
    throw Error(Error::Kind::kValue, "modnorm: at most " + std::to_string(kMaxDims) + " dims");
  }
  TensorRef t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.ndim = static_cast<int>(shape.size());
  int i = 0;
  for (int64_t s : shape) t.shape[i++] = s;
  return t;
}

// Messages are built with std::to_string / snprintf, not iostreams: a stream's locale machinery
// crashed inside the PyTorch extension on the GPU machine's toolchain (seen 2026-11-21, cause
// not established), and plain formatting avoids it.
std::string shape_str(const TensorRef& t) {
  std::string s = "(";
  for (int i = 0; i < t.ndim; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  if (t.ndim == 1) s += ",";
  return s + ")";
}

[[noreturn]] void fail(Error::Kind kind, const std::string& msg) {
  throw Error(kind, "modnorm: " + msg);
}

void check_dtype(const TensorRef& t, const char* name) {
  switch (t.dtype) {
    case DType::kFloat32:
    case DType::kFloat16:
    case DType::kBFloat16: return;
  }
  fail(Error::Kind::kType, std::string(name) + " has an unsupported dtype (expected float32, "
                                               "float16 or bfloat16)");
}

void check_common(const TensorRef& t, const char* name, const Device& device) {
  if (t.ndim < 0 || t.ndim > kMaxDims) {
    fail(Error::Kind::kValue, std::string(name) + " must have between 1 and " +
                                  std::to_string(kMaxDims) + " dims");
  }
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] < 0) fail(Error::Kind::kValue, std::string(name) + " has a negative size");
  }
  check_dtype(t, name);
  if (t.device != device) {
    fail(Error::Kind::kDevice, std::string(name) + " is on a different device than x");
  }
}

void check_finite(double v, const char* name, bool non_negative) {
  if (!std::isfinite(v) || (non_negative && v < 0)) {
    char value[64];
    std::snprintf(value, sizeof(value), "%g", v);
    fail(Error::Kind::kValue, std::string(name) + " must be finite" +
                                  (non_negative ? " and >= 0" : "") + ", got " + value);
  }
}

bool last_dim_contiguous(const TensorRef& t) {
  return t.ndim == 0 || t.shape[t.ndim - 1] <= 1 || t.strides[t.ndim - 1] == 1;
}

// One dim of the row space while the map is built: `kept` dims index the modulation.
struct MapDim {
  int64_t size;
  int64_t stride;       // element stride in the modulation (0: broadcast)
  int64_t grad_stride;  // row stride in the contiguous gradient (0: broadcast)
};

RowMap finish_map(const MapDim* dims, int n, int64_t rows, int64_t distinct, int rule) {
  RowMap map;
  map.rule = rule;
  // Canonical form: drop size-1 dims, merge neighbours that address memory the same way, so
  // every backend sees the fewest dims (and most maps become "blocked").
  for (int i = 0; i < n; ++i) {
    const MapDim& d = dims[i];
    if (d.size == 1) continue;
    if (map.ndim > 0) {
      const int j = map.ndim - 1;
      const bool prev_kept = map.stride[j] != 0 || map.grad_stride[j] != 0;
      const bool cur_kept = d.stride != 0 || d.grad_stride != 0;
      const bool mergeable =
          (!prev_kept && !cur_kept) ||
          (prev_kept && cur_kept && map.stride[j] == d.stride * d.size &&
           map.grad_stride[j] == d.grad_stride * d.size);
      if (mergeable) {
        map.size[j] *= d.size;
        map.stride[j] = d.stride;
        map.grad_stride[j] = d.grad_stride;
        continue;
      }
    }
    map.size[map.ndim] = d.size;
    map.stride[map.ndim] = d.stride;
    map.grad_stride[map.ndim] = d.grad_stride;
    ++map.ndim;
  }
  map.distinct_rows = distinct;
  map.rows_per_distinct = distinct > 0 ? rows / distinct : 0;
  const bool kept0 = map.ndim > 0 && map.grad_stride[0] != 0;
  if (map.ndim == 0 || (map.ndim == 1 && !kept0)) {
    map.blocked = true;  // one shared row
    map.block_stride = 0;
  } else if (kept0 && (map.ndim == 1 || (map.ndim == 2 && map.grad_stride[1] == 0))) {
    map.blocked = true;  // runs of rows_per_distinct rows per modulation row
    map.block_stride = map.stride[0];
  }
  return map;
}

// SPEC section 2: the first rule that fits decides.
RowMap plan_modulation(const TensorRef& x, const TensorRef& m, const char* name) {
  const int64_t D = x.shape[x.ndim - 1];
  int64_t rows = 1;
  for (int i = 0; i < x.ndim - 1; ++i) rows *= x.shape[i];
  if (m.ndim < 1 || m.shape[m.ndim - 1] != D) {
    fail(Error::Kind::kValue, std::string(name) + " of shape " + shape_str(m) +
                                  " must have a last dim equal to x's last dim " +
                                  std::to_string(D) + " (x has shape " + shape_str(x) + ")");
  }
  if (!last_dim_contiguous(m)) {
    fail(Error::Kind::kValue, std::string(name) + " must have a contiguous last dim (stride 1)");
  }
  // Row strides of the contiguous gradient, per modulation dim (in rows of D).
  int64_t grad_strides[kMaxDims] = {};
  {
    int64_t acc = 1;
    for (int i = m.ndim - 2; i >= 0; --i) {
      grad_strides[i] = acc;
      acc *= m.shape[i];
    }
  }
  const int64_t distinct = D > 0 ? m.numel() / D : 0;
  MapDim dims[kMaxDims + 1];

  // Rule 1: per-sample (B, D) against x of rank >= 3 with B == x.shape[0].
  if (m.ndim == 2 && x.ndim >= 3 && m.shape[0] == x.shape[0]) {
    const int64_t B = m.shape[0];
    dims[0] = {B, m.strides[0], 1};
    dims[1] = {B > 0 ? rows / B : 0, 0, 0};
    return finish_map(dims, 2, rows, distinct, 1);
  }

  // Rule 2: PyTorch broadcasting, right-aligned, of m's leading dims against x's.
  if (m.ndim <= x.ndim) {
    bool fits = true;
    const int lead = x.ndim - m.ndim;  // x dims with no modulation dim
    for (int i = 0; i < m.ndim - 1; ++i) {
      if (m.shape[i] != 1 && m.shape[i] != x.shape[i + lead]) fits = false;
    }
    if (fits) {
      int n = 0;
      for (int j = 0; j < x.ndim - 1; ++j) {
        const int i = j - lead;
        if (i >= 0 && m.shape[i] == x.shape[j] && m.shape[i] != 1) {
          dims[n++] = {x.shape[j], m.strides[i], grad_strides[i]};
        } else {
          dims[n++] = {x.shape[j], 0, 0};
        }
      }
      return finish_map(dims, n, rows, distinct, 2);
    }
  }

  // Rule 3: groups. G*D elements and rows % G == 0: G consecutive runs of rows / G rows.
  if (distinct >= 1 && rows % distinct == 0) {
    int n = 0;
    for (int i = 0; i < m.ndim - 1; ++i) dims[n++] = {m.shape[i], m.strides[i], grad_strides[i]};
    dims[n++] = {rows / distinct, 0, 0};
    return finish_map(dims, n, rows, distinct, 3);
  }

  fail(Error::Kind::kValue,
       std::string(name) + " of shape " + shape_str(m) + " cannot be broadcast to x of shape " +
           shape_str(x) + ": expected (B, D) per sample, a shape that broadcasts against x, or "
           "G*D elements with G dividing the " + std::to_string(rows) + " rows of x");
}

int64_t uniform_row_stride(const TensorRef& t) {
  // Stride between consecutive rows when the leading dims collapse to one index; -1 otherwise.
  const int64_t D = t.ndim > 0 ? t.shape[t.ndim - 1] : 1;
  int64_t row_stride = -1;
  int64_t expected = -1;
  for (int i = t.ndim - 2; i >= 0; --i) {
    if (t.shape[i] == 1) continue;
    if (row_stride < 0) {
      row_stride = t.strides[i];
      expected = row_stride * t.shape[i];
    } else {
      if (t.strides[i] != expected) return -1;
      expected *= t.shape[i];
    }
  }
  return row_stride < 0 ? D : row_stride;
}

}  // namespace

TensorRef make_tensor(void* data, DType dtype, std::initializer_list<int64_t> shape,
                      Device device) {
  TensorRef t = make_view(data, dtype, shape, device);
  int64_t acc = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    t.strides[i] = acc;
    acc *= t.shape[i];
  }
  return t;
}

TensorRef make_strided_tensor(void* data, DType dtype, std::initializer_list<int64_t> shape,
                              std::initializer_list<int64_t> strides, Device device) {
  TensorRef t = make_view(data, dtype, shape, device);
  if (strides.size() != shape.size()) {
    throw Error(Error::Kind::kValue, "modnorm: shape and strides differ in length");
  }
  int i = 0;
  for (int64_t s : strides) t.strides[i++] = s;
  return t;
}

bool rows_are_uniform(const TensorRef& t) {
  if (t.ndim < 1 || !last_dim_contiguous(t)) return false;
  const int64_t D = t.shape[t.ndim - 1];
  const int64_t stride = uniform_row_stride(t);
  return stride >= D || t.numel() == 0;
}

int64_t RowMap::nth_row_of(int64_t g, int64_t k) const {
  // Kept digits come from g (contiguous gradient order), broadcast digits from k.
  int64_t row = 0;
  int64_t row_stride = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    int64_t digit;
    if (grad_stride[i] != 0) {
      digit = (g / grad_stride[i]) % size[i];
    } else {
      digit = k % size[i];
      k /= size[i];
    }
    row += digit * row_stride;
    row_stride *= size[i];
  }
  return row;
}

ForwardPlan plan_forward(const TensorRef& x, const TensorRef* weight, const TensorRef* scale,
                         const TensorRef* shift, const Options& options) {
  if (x.ndim < 1) fail(Error::Kind::kValue, "x must have at least 1 dim");
  check_common(x, "x", x.device);
  if (!last_dim_contiguous(x)) {
    fail(Error::Kind::kValue, "x must have a contiguous last dim (stride 1)");
  }
  if (!rows_are_uniform(x)) {
    fail(Error::Kind::kValue,
         "x's leading dims must collapse to rows with one stride; make x contiguous");
  }
  check_finite(options.eps, "eps", true);
  check_finite(options.offset, "offset", false);
  check_finite(options.scale_offset, "scale_offset", false);
  switch (options.casting_mode) {
    case CastingMode::kLlama:
    case CastingMode::kGemma:
    case CastingMode::kNone: break;
    default: fail(Error::Kind::kValue, "casting_mode is not one of llama, gemma, none");
  }

  if (x.shape[x.ndim - 1] < 1) fail(Error::Kind::kValue, "x's last dim must be >= 1");
  ForwardPlan plan;
  plan.dim = x.shape[x.ndim - 1];
  plan.rows = 1;
  for (int i = 0; i < x.ndim - 1; ++i) plan.rows *= x.shape[i];
  plan.device = x.device;
  plan.x_dtype = x.dtype;
  plan.x = x.data;
  plan.x_row_stride = uniform_row_stride(x);
  plan.eps = static_cast<float>(options.eps);
  plan.offset = static_cast<float>(options.offset);
  plan.scale_offset = static_cast<float>(options.scale_offset);
  plan.casting_mode = options.casting_mode;

  if (weight != nullptr) {
    check_common(*weight, "weight", x.device);
    if (weight->ndim != 1 || weight->shape[0] != plan.dim) {
      fail(Error::Kind::kValue, "weight of shape " + shape_str(*weight) + " must have shape (" +
                                    std::to_string(plan.dim) + ",), the last dim of x");
    }
    if (!last_dim_contiguous(*weight)) fail(Error::Kind::kValue, "weight must be contiguous");
    plan.weight = {weight->data, weight->dtype, true};
  }
  if (shift != nullptr && scale == nullptr) {
    fail(Error::Kind::kValue, "shift was given without scale");
  }
  if (scale != nullptr) {
    check_common(*scale, "scale", x.device);
    plan.scale_map = plan_modulation(x, *scale, "scale");
    plan.scale = {scale->data, scale->dtype, true};
  }
  if (shift != nullptr) {
    check_common(*shift, "shift", x.device);
    plan.shift_map = plan_modulation(x, *shift, "shift");
    plan.shift = {shift->data, shift->dtype, true};
  }
  return plan;
}

BackwardPlan plan_backward(const ForwardPlan& fwd, const TensorRef& dy, GradMask mask) {
  check_common(dy, "dy", fwd.device);
  if (dy.dtype != fwd.x_dtype) {
    fail(Error::Kind::kType, std::string("dy must have x's dtype ") + dtype_name(fwd.x_dtype) +
                                 ", got " + dtype_name(dy.dtype));
  }
  int64_t rows = 1;
  for (int i = 0; i < dy.ndim - 1; ++i) rows *= dy.shape[i];
  if (dy.ndim < 1 || dy.shape[dy.ndim - 1] != fwd.dim || rows != fwd.rows) {
    fail(Error::Kind::kValue, "dy of shape " + shape_str(dy) + " does not match x");
  }
  if (!rows_are_uniform(dy)) {
    fail(Error::Kind::kValue, "dy's leading dims must collapse to rows with one stride");
  }
  if (mask.dweight && !fwd.weight.present()) {
    fail(Error::Kind::kValue, "dweight requested but weight is None");
  }
  if (mask.dscale && !fwd.scale.present()) {
    fail(Error::Kind::kValue, "dscale requested but scale is None");
  }
  if (mask.dshift && !fwd.shift.present()) {
    fail(Error::Kind::kValue, "dshift requested but shift is None");
  }
  BackwardPlan plan;
  plan.fwd = fwd;
  plan.dy = dy.data;
  plan.dy_row_stride = uniform_row_stride(dy);
  plan.need_dx = mask.dx;
  plan.need_dweight = mask.dweight;
  plan.need_dscale = mask.dscale;
  plan.need_dshift = mask.dshift;
  return plan;
}

}  // namespace modnorm
