// Host-side helpers for the CUDA backend: error checks, the current-device guard, cached
// device properties and occupancy, alignment tests.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <map>

#include "modnorm/modnorm.h"

namespace modnorm::cuda_detail {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("modnorm CUDA backend: ") + what + " failed: " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

// Launch errors (bad configuration, no kernel image for this GPU) surface here, right away.
inline void check_launch(const char* kernel_name) {
  check_cuda(cudaGetLastError(), kernel_name);
}

// The result of a cudaLaunchKernel / cudaLaunchKernelEx call: a failed launch also leaves its error
// in the thread's last-error slot, which check_launch reads and clears before it is reported, so
// the next launch's check does not see it again.
inline void check_launched(cudaError_t launched, const char* kernel_name) {
  check_launch(kernel_name);
  check_cuda(launched, kernel_name);
}

// Makes the plan's device current for the calls in scope and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) {
      check_cuda(cudaSetDevice(device), "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

struct DeviceInfo {
  int sm_count = 1;
  size_t max_smem_optin = 48 * 1024;  // dynamic + static shared memory one block may use
  int cc_major = 0;                    // compute capability (9: Hopper's bulk copies)
};

inline const DeviceInfo& device_info(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceInfo info;
  int value = 0;
  check_cuda(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute(MultiProcessorCount)");
  info.sm_count = value > 0 ? value : 1;
  check_cuda(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  info.max_smem_optin = static_cast<size_t>(value);
  check_cuda(cudaDeviceGetAttribute(&value, cudaDevAttrComputeCapabilityMajor, device),
             "cudaDeviceGetAttribute(ComputeCapabilityMajor)");
  info.cc_major = value;
  return cache.emplace(device, info).first->second;
}

// Kernels needing more than the default 48 KB of dynamic shared memory must opt in; launch_kernel
// does it before every such launch, since another shape may have set the kernel's limit lower
// since.
inline void allow_dynamic_smem(const void* kernel, size_t dynamic_smem) {
  // The default 48 KB covers static and dynamic shared memory together.
  if (dynamic_smem + 1024 > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(dynamic_smem)),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
}

// Resident blocks per SM for a kernel at a launch shape; cached, since the backward's fixed
// row-to-block assignment (and so its workspace size) is derived from it.
inline int blocks_per_sm(int device, const void* kernel, int threads, size_t dynamic_smem) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int, size_t>, int> cache;
  const auto key = std::make_tuple(device, kernel, threads, dynamic_smem);
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  allow_dynamic_smem(kernel, dynamic_smem);
  int blocks = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, dynamic_smem),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  if (blocks < 1) blocks = 1;
  std::lock_guard<std::mutex> lock(mutex);
  cache.emplace(key, blocks);
  return blocks;
}
template <typename... Params>
int blocks_per_sm(int device, void (*kernel)(Params...), int threads, size_t dynamic_smem) {
  return blocks_per_sm(device, reinterpret_cast<const void*>(kernel), threads, dynamic_smem);
}

inline bool aligned_to(const void* p, size_t alignment) {
  return reinterpret_cast<uintptr_t>(p) % alignment == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether a weight/modulation operand allows loads of `vec` elements at every offset a row map
// can produce: base and every map stride aligned to min(16 bytes, vec elements).
inline bool operand_vectorizable(const Operand& op, int vec, const RowMap* map) {
  if (!op.present()) return true;
  const int64_t es = static_cast<int64_t>(dtype_size(op.dtype));
  const int64_t alignment = std::min<int64_t>(16, vec * es);
  if (!aligned_to(op.data, static_cast<size_t>(alignment))) return false;
  if (map != nullptr) {
    for (int i = 0; i < map->ndim; ++i) {
      if ((map->stride[i] * es) % alignment != 0) return false;
    }
    if ((map->block_stride * es) % alignment != 0) return false;
  }
  return true;
}

// Whether an output of `dtype` at `p` allows stores of `vec` elements at multiples of vec.
inline bool output_vectorizable(const void* p, DType dtype, int vec) {
  const size_t es = dtype_size(dtype);
  return aligned_to(p, std::min<size_t>(16, vec * es));
}

}  // namespace modnorm::cuda_detail
