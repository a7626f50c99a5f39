// modnorm: fused modulated RMSNorm for diffusion transformers.
//
//   y = norm(x) * (scale_offset + scale) + shift
//   norm(x) = x * rstd * (offset + weight),  rstd = 1 / sqrt(mean(x^2 over the last dim) + eps)
//
// This header is the framework-free C++ API (no PyTorch): tensors are raw pointers with shapes,
// strides and dtypes. Every call validates its arguments in one place (plan_forward /
// plan_backward) and throws modnorm::Error naming the bad argument before anything is written.
// The CPU and CUDA backends consume the same plan, so the broadcast rules live here once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

namespace modnorm {

enum class DType : int8_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class CastingMode : int8_t { kLlama = 0, kGemma = 1, kNone = 2 };
enum class DeviceType : int8_t { kCPU = 0, kCUDA = 1 };

struct Device {
  DeviceType type = DeviceType::kCPU;
  int index = 0;
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

constexpr int kMaxDims = 8;

const char* dtype_name(DType dtype);
size_t dtype_size(DType dtype);
// "llama" | "gemma" | "none"; throws Error for anything else.
CastingMode parse_casting_mode(const std::string& name);

// A strided view of caller-owned memory. Strides are in elements.
struct TensorRef {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  Device device{};
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};

  int64_t numel() const;
  bool is_contiguous() const;
};

// A contiguous view (strides derived from the shape).
TensorRef make_tensor(void* data, DType dtype, std::initializer_list<int64_t> shape,
                      Device device = {});
// A view with explicit strides, e.g. a chunk of a larger modulation projection.
TensorRef make_strided_tensor(void* data, DType dtype, std::initializer_list<int64_t> shape,
                              std::initializer_list<int64_t> strides, Device device = {});

class Error : public std::invalid_argument {
 public:
  enum class Kind { kValue, kType, kDevice };
  Error(Kind kind, const std::string& what) : std::invalid_argument(what), kind_(kind) {}
  Kind kind() const { return kind_; }

 private:
  Kind kind_;
};

struct Options {
  double eps = 1e-6;
  double offset = 0.0;        // added to weight (Gemma-style zero-centred weights use 1.0)
  double scale_offset = 1.0;  // added to scale: 1.0 is AdaLN's (1 + scale)
  CastingMode casting_mode = CastingMode::kLlama;
};

// How x's rows read one modulation tensor (SPEC section 2), in a form every backend shares.
//
// Row r of x (0 <= r < rows) is written as mixed-radix digits over `size` (outermost first,
// product == rows). Dims with stride != 0 are "kept": the modulation row r reads starts at
// element  sum_i digit_i * stride[i]  and its gradient row is  sum_i digit_i * grad_stride[i]
// (in rows of D, in the contiguous layout of the modulation's shape). Dims with stride 0 are
// broadcast: the rows along them share one modulation row, and their gradients are summed.
struct RowMap {
  int ndim = 0;  // 0: a single modulation row shared by every x row
  int64_t size[kMaxDims] = {};
  int64_t stride[kMaxDims] = {};
  int64_t grad_stride[kMaxDims] = {};
  int64_t distinct_rows = 1;      // modulation rows (= numel / D)
  int64_t rows_per_distinct = 0;  // x rows that read each modulation row (rows / distinct_rows)
  int rule = 0;                   // SPEC 2 rule that matched: 1 per-sample, 2 broadcast, 3 groups

  // Modulation row r reads is r / rows_per_distinct, at element (r / rows_per_distinct) * block_stride:
  // true for per-sample, per-frame-with-contiguous-runs, per-token, groups and shared maps.
  bool blocked = false;
  int64_t block_stride = 0;

  int64_t element_offset(int64_t row) const { return dot_digits(row, stride); }
  int64_t grad_row(int64_t row) const { return dot_digits(row, grad_stride); }
  // sum_i digit_i(row) * weights[i], the digits of `row` in the mixed radix `size`.
  int64_t dot_digits(int64_t row, const int64_t* weights) const {
    int64_t acc = 0;
    for (int i = ndim - 1; i >= 0; --i) {
      acc += (row % size[i]) * weights[i];
      row /= size[i];
    }
    return acc;
  }
  // The k-th x row (0 <= k < rows_per_distinct, in increasing row order) reading gradient row g.
  int64_t nth_row_of(int64_t g, int64_t k) const;
};

struct Operand {
  const void* data = nullptr;  // may be nullptr for an empty tensor
  DType dtype = DType::kFloat32;
  bool given = false;  // false: the argument is None
  bool present() const { return given; }
};

// A validated forward problem: x seen as rows x dim, with everything a kernel needs.
struct ForwardPlan {
  int64_t rows = 0;
  int64_t dim = 0;
  Device device{};
  DType x_dtype = DType::kFloat32;
  const void* x = nullptr;
  int64_t x_row_stride = 0;  // elements between consecutive rows of x
  Operand weight;            // (D,), contiguous
  Operand scale;
  Operand shift;
  RowMap scale_map;
  RowMap shift_map;
  float eps = 1e-6f;
  float offset = 0.f;
  float scale_offset = 1.f;
  CastingMode casting_mode = CastingMode::kLlama;

  bool empty() const { return rows == 0 || dim == 0; }
};

// Validates x, weight, scale, shift and options (SPEC 6). weight/scale/shift may be nullptr.
// Throws Error naming the argument on bad input.
ForwardPlan plan_forward(const TensorRef& x, const TensorRef* weight, const TensorRef* scale,
                         const TensorRef* shift, const Options& options);

// True when x's leading dims collapse to one row index with a uniform stride and the last dim
// is contiguous, i.e. plan_forward accepts its layout without a copy.
bool rows_are_uniform(const TensorRef& t);

// Writes y (contiguous rows x dim, x's dtype) and rstd (rows floats, what the backward reads).
// rstd may be nullptr where no backward follows (inference): it is then not written.
// `stream` is a cudaStream_t for CUDA plans and ignored on the CPU.
void forward(const ForwardPlan& plan, void* y, float* rstd, void* stream = nullptr);

struct BackwardPlan {
  ForwardPlan fwd;
  const void* dy = nullptr;  // x's dtype, shape of x
  int64_t dy_row_stride = 0;
  bool need_dx = true;
  bool need_dweight = false;
  bool need_dscale = false;
  bool need_dshift = false;
};

// Which gradients to compute. A gradient of an absent input must be false.
struct GradMask {
  bool dx = true;
  bool dweight = false;
  bool dscale = false;
  bool dshift = false;
};

BackwardPlan plan_backward(const ForwardPlan& fwd, const TensorRef& dy, GradMask mask);

struct Gradients {
  void* dx = nullptr;       // contiguous rows x dim, x's dtype; may be dy's own memory (in place)
  void* dweight = nullptr;  // (D,), weight's dtype
  void* dscale = nullptr;   // contiguous in scale's shape, scale's dtype
  void* dshift = nullptr;   // contiguous in shift's shape, shift's dtype
};

// Scratch memory the backward needs on the plan's device (fixed-order partial sums).
size_t backward_workspace_bytes(const BackwardPlan& plan);

// Computes the requested gradients. Deterministic: no floating-point atomics, every reduction
// over rows is a fixed-order sum of fixed partials. dx may alias dy (in place).
void backward(const BackwardPlan& plan, const float* rstd, const Gradients& grads, void* workspace,
              size_t workspace_bytes, void* stream = nullptr);

// CPU threading. By default the core runs its own worker pool; a host framework can route the
// work through its pool instead (the PyTorch binding installs at::parallel_for). `body` is
// called on disjoint [begin, end) ranges covering [0, n) and must be safe to run concurrently.
using ParallelBody = void (*)(void* ctx, int64_t begin, int64_t end);
using ParallelForFn = void (*)(int64_t n, void* ctx, ParallelBody body);
void set_cpu_parallel_for(ParallelForFn fn);  // nullptr restores the built-in pool

bool cuda_available_in_build();

}  // namespace modnorm
