// Host-side launch helpers shared by the forward (forward_launch.cu) and backward
// (cuda_backend.cu) translation units, which nvcc compiles in parallel.
#pragma once

#include <climits>
#include <cstdlib>
#include <string>

#include "../backend.h"
#include "forward_kernels.cuh"
#include "host_utils.h"

namespace modnorm::detail {

using cuda_detail::DevMap;
using cuda_detail::ForwardArgs;
using cuda_detail::ForwardKernel;
using cuda_detail::XRaw;
using cuda_detail::allow_dynamic_smem;
using cuda_detail::blocks_per_sm;
using cuda_detail::ceil_div;
using cuda_detail::check_launch;
using cuda_detail::device_info;
using cuda_detail::elem_bytes;

template <int NV, int TPR, int TEAMS>
struct Config {
  static constexpr int kNV = NV;
  static constexpr int kTPR = TPR;
  static constexpr int kTeams = TEAMS;
  static constexpr int kThreads = TPR * TEAMS;
};

template <DType XT>
constexpr int vector_width() {
  return 16 / elem_bytes<XT>();
}

inline DevMap to_dev_map(const RowMap& m) {
  DevMap d;
  d.ndim = m.ndim;
  for (int i = 0; i < m.ndim; ++i) {
    d.size[i] = m.size[i];
    d.stride[i] = m.stride[i];
    d.grad_stride[i] = m.grad_stride[i];
    d.size_div[i] = FastDivisor::make(m.size[i]);
  }
  d.rows_per_distinct = m.rows_per_distinct > 0 ? m.rows_per_distinct : 1;
  d.block_div = FastDivisor::make(d.rows_per_distinct);
  d.distinct_rows = m.distinct_rows;
  d.blocked = m.blocked ? 1 : 0;
  d.block_stride = m.block_stride;
  d.block_grad_stride = (m.blocked && m.ndim > 0) ? m.grad_stride[0] : 0;
  return d;
}

inline int dtype_int(DType t) { return static_cast<int>(t); }

inline void require_int_dim(int64_t dim) {
  if (dim > INT_MAX / 2) {
    throw Error(Error::Kind::kValue, "modnorm CUDA backend: last dim " + std::to_string(dim) +
                                         " is too large");
  }
}

// The plan's fields every kernel argument struct (forward, backward, column) carries alike.
template <typename Args>
void set_common_args(Args& a, const ForwardPlan& p) {
  a.x = p.x;
  a.x_row_stride = p.x_row_stride;
  a.dim = static_cast<int>(p.dim);
  a.weight = p.weight.present() ? p.weight.data : nullptr;
  a.scale = p.scale.present() ? p.scale.data : nullptr;
  a.weight_dtype = dtype_int(p.weight.dtype);
  a.scale_dtype = dtype_int(p.scale.dtype);
  a.offset = p.offset;
  a.scale_offset = p.scale_offset;
  a.scale_map = to_dev_map(p.scale_map);
}

// Rows whose x (and dy) rows, weight and modulation all allow 16-byte vectors of x's dtype.
inline bool rows_vectorizable(const ForwardPlan& p, int vec, const void* dy, int64_t dy_row_stride) {
  const int64_t es = static_cast<int64_t>(dtype_size(p.x_dtype));
  if (p.dim % vec != 0) return false;
  if (!cuda_detail::aligned_to(p.x, 16) || (p.rows > 1 && (p.x_row_stride * es) % 16 != 0)) {
    return false;
  }
  if (dy != nullptr &&
      (!cuda_detail::aligned_to(dy, 16) || (p.rows > 1 && (dy_row_stride * es) % 16 != 0))) {
    return false;
  }
  return cuda_detail::operand_vectorizable(p.weight, vec, nullptr) &&
         cuda_detail::operand_vectorizable(p.scale, vec, &p.scale_map) &&
         cuda_detail::operand_vectorizable(p.shift, vec, &p.shift_map);
}

// Experiment switches (performance log), read once per process: the environment variable's text,
// or "" when unset.
inline std::string env_switch(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::string(v) : std::string();
}
// An integer switch, or `fallback` when unset or not a positive number.
inline int env_int(const char* name, int fallback) {
  const std::string v = env_switch(name);
  const int n = v.empty() ? 0 : std::atoi(v.c_str());
  return n > 0 ? n : fallback;
}

// Whether the shared-modulation kernels interleave their blocks' rows (block_row_walk);
// MODNORM_ROW_ORDER=contiguous gives each block its own run of rows, for comparisons.
inline bool interleave_rows() {
  static const bool on = env_switch("MODNORM_ROW_ORDER") != "contiguous";
  return on;
}

namespace {
// A kernel that does nothing: its PTX version is every modnorm kernel's (one build, one list of
// architectures). In an anonymous namespace, like the launch helpers that use it, so that each
// translation unit asks about its own kernels.
__global__ void ptx_version_probe_kernel() {}

// Whether the kernels this device runs were compiled for sm_90+, where wait_for_prior_grid waits
// (below sm_90 it is empty): a build without a 90 target would run older PTX, JIT-compiled, whose
// kernels would not wait, so they must not launch programmatically.
bool kernels_wait_for_prior_grid(int device) {
  static std::mutex mutex;
  static std::map<int, bool> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  cudaFuncAttributes attributes = {};
  cuda_detail::check_cuda(
      cudaFuncGetAttributes(&attributes, reinterpret_cast<const void*>(ptx_version_probe_kernel)),
      "cudaFuncGetAttributes");
  return cache.emplace(device, attributes.ptxVersion >= 90).first->second;
}

// Whether kernels launch programmatically (programmatic stream serialization): sm_90+ kernels on
// an sm_90+ device, unless MODNORM_PDL=0 (comparisons). Every modnorm kernel waits for the kernel
// before it (wait_for_prior_grid, begin_forward) before it touches global memory, and no block
// leaves before its wait, so its blocks may be placed and start while the kernel before it in the
// stream drains: no read of an input the kernel before wrote and no write over one it still reads
// can come early, and a kernel is done only once the one before it is.
bool programmatic_launches(int device) {
  static const bool off = env_switch("MODNORM_PDL") == "0";
  return !off && device_info(device).cc_major >= 9 && kernels_wait_for_prior_grid(device);
}
// MODNORM_PDL=early: the forward kernels also release the next launch as soon as each block's wait
// returns (begin_forward; tests and comparisons).
bool forward_releases_early(int device) {
  static const bool early = env_switch("MODNORM_PDL") == "early";
  return early && programmatic_launches(device);
}

// A launch configuration for cudaLaunchKernelEx, programmatic where programmatic_launches allows;
// `attribute` is the caller's storage for its one attribute (it must outlive the launch call).
cudaLaunchConfig_t launch_config(dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream,
                                 int device, cudaLaunchAttribute& attribute) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = dynamic_smem;
  config.stream = stream;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = programmatic_launches(device) ? 1 : 0;
  return config;
}

// Launches `kernel` on any grid and block shape with `smem` bytes of dynamic shared memory
// (launch_config: programmatically on sm_90+), opted into first where it is over the default
// (allow_dynamic_smem); `args` are checked against its parameters.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, int device, const char* name, const Args&... args) {
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config = launch_config(grid, block, smem, stream, device, attribute);
  cuda_detail::check_launched(cudaLaunchKernelEx(&config, kernel, args...), name);
}

// The same for a kernel taking one argument struct, on a 1-D grid of `grid` blocks of `threads`.
template <typename Args>
void launch_kernel(void (*kernel)(Args), int64_t grid, int threads, size_t smem, const Args& a,
                   cudaStream_t stream, int device, const char* name) {
  launch_kernel(kernel, dim3(static_cast<unsigned>(grid)), dim3(static_cast<unsigned>(threads)),
                smem, stream, device, name, a);
}
}  // namespace

inline int round_up(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b * b); }

constexpr int kLoopBlockThreads = 512;
constexpr int kSmallLoopDim = 1024;  // unvectorized rows up to this use warp teams
constexpr size_t kStaticSmemReserve = 1024;

// Launches a loop kernel (forward or backward): as many blocks as fit at once, each walking rows;
// the row is staged in dynamic shared memory when `stage_bytes` (0: never) fits beside the
// static reservation.
template <typename Args>
void launch_loop_kernel(void (*kernel)(Args), Args& a, int threads, int teams, size_t stage_bytes,
                        int64_t rows, int device, cudaStream_t stream, const char* name) {
  const cuda_detail::DeviceInfo& info = device_info(device);
  size_t smem = 0;
  a.staged = 0;
  if (stage_bytes > 0 && stage_bytes + kStaticSmemReserve <= info.max_smem_optin) {
    smem = stage_bytes;
    a.staged = 1;
  }
  const int occupancy = blocks_per_sm(device, kernel, threads, smem);
  const int64_t grid = std::min<int64_t>(ceil_div(rows, teams), int64_t(info.sm_count) * occupancy);
  launch_kernel(kernel, grid, threads, smem, a, stream, device, name);
}

template <template <DType, CastingMode> class Impl, typename F>
decltype(auto) dispatch(DType x_dtype, CastingMode mode, F&& f) {
  // float32 x never rounds, so one casting mode serves all three.
  switch (x_dtype) {
    case DType::kFloat32: return f(Impl<DType::kFloat32, CastingMode::kNone>{});
    case DType::kFloat16:
      switch (mode) {
        case CastingMode::kLlama: return f(Impl<DType::kFloat16, CastingMode::kLlama>{});
        case CastingMode::kGemma: return f(Impl<DType::kFloat16, CastingMode::kGemma>{});
        case CastingMode::kNone: return f(Impl<DType::kFloat16, CastingMode::kNone>{});
      }
      break;
    case DType::kBFloat16:
      switch (mode) {
        case CastingMode::kLlama: return f(Impl<DType::kBFloat16, CastingMode::kLlama>{});
        case CastingMode::kGemma: return f(Impl<DType::kBFloat16, CastingMode::kGemma>{});
        case CastingMode::kNone: return f(Impl<DType::kBFloat16, CastingMode::kNone>{});
      }
      break;
  }
  throw Error(Error::Kind::kType, "modnorm CUDA backend: unsupported dtype or casting mode");
}


}  // namespace modnorm::detail
