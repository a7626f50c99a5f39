// Entry points each backend implements; dispatch.cpp routes a validated plan to one of them.
#pragma once

#include "modnorm/modnorm.h"

namespace modnorm::detail {

void cpu_forward(const ForwardPlan& plan, void* y, float* rstd);
size_t cpu_backward_workspace_bytes(const BackwardPlan& plan);
void cpu_backward(const BackwardPlan& plan, const float* rstd, const Gradients& grads,
                  void* workspace, size_t workspace_bytes);

#ifdef MODNORM_WITH_CUDA
void cuda_forward(const ForwardPlan& plan, void* y, float* rstd, void* stream);
size_t cuda_backward_workspace_bytes(const BackwardPlan& plan);
void cuda_backward(const BackwardPlan& plan, const float* rstd, const Gradients& grads,
                   void* workspace, size_t workspace_bytes, void* stream);
#endif

// Whether two modulation maps send every x row to the same gradient row (same sizes and
// gradient strides): one column pass can then reduce both gradients.
inline bool same_map(const RowMap& a, const RowMap& b) {
  if (a.ndim != b.ndim) return false;
  for (int i = 0; i < a.ndim; ++i) {
    if (a.size[i] != b.size[i] || a.grad_stride[i] != b.grad_stride[i]) return false;
  }
  return true;
}

// Runs body over [0, n) through the installed parallel-for (the built-in pool by default).
void parallel_for(int64_t n, void* ctx, ParallelBody body);

}  // namespace modnorm::detail
