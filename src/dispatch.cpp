// Routes validated plans to the backend of their device.
#include <string>

#include "backend.h"

namespace modnorm {

bool cuda_available_in_build() {
#ifdef MODNORM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

namespace {
[[noreturn]] void no_cuda() {
  throw Error(Error::Kind::kDevice, "modnorm: this build has no CUDA backend");
}
void check_grads(const BackwardPlan& plan, const Gradients& g) {
  const bool nonempty = !plan.fwd.empty();
  if (plan.need_dx && nonempty && g.dx == nullptr) {
    throw Error(Error::Kind::kValue, "modnorm: dx output is missing");
  }
  if (plan.need_dweight && g.dweight == nullptr) {
    throw Error(Error::Kind::kValue, "modnorm: dweight output is missing");
  }
  if (plan.need_dscale && g.dscale == nullptr && plan.fwd.scale_map.distinct_rows > 0) {
    throw Error(Error::Kind::kValue, "modnorm: dscale output is missing");
  }
  if (plan.need_dshift && g.dshift == nullptr && plan.fwd.shift_map.distinct_rows > 0) {
    throw Error(Error::Kind::kValue, "modnorm: dshift output is missing");
  }
}
}  // namespace

void forward(const ForwardPlan& plan, void* y, float* rstd, void* stream) {
  if (plan.empty()) return;
  if (y == nullptr) throw Error(Error::Kind::kValue, "modnorm: forward output y is required");
  if (plan.device.type == DeviceType::kCUDA) {
#ifdef MODNORM_WITH_CUDA
    detail::cuda_forward(plan, y, rstd, stream);
    return;
#else
    (void)stream;
    no_cuda();
#endif
  }
  detail::cpu_forward(plan, y, rstd);
}

size_t backward_workspace_bytes(const BackwardPlan& plan) {
  if (plan.fwd.device.type == DeviceType::kCUDA) {
#ifdef MODNORM_WITH_CUDA
    return detail::cuda_backward_workspace_bytes(plan);
#else
    no_cuda();
#endif
  }
  return detail::cpu_backward_workspace_bytes(plan);
}

void backward(const BackwardPlan& plan, const float* rstd, const Gradients& grads, void* workspace,
              size_t workspace_bytes, void* stream) {
  check_grads(plan, grads);
  if (workspace_bytes < backward_workspace_bytes(plan)) {
    throw Error(Error::Kind::kValue, "modnorm: backward workspace is too small");
  }
  if (plan.fwd.device.type == DeviceType::kCUDA) {
#ifdef MODNORM_WITH_CUDA
    detail::cuda_backward(plan, rstd, grads, workspace, workspace_bytes, stream);
    return;
#else
    (void)stream;
    no_cuda();
#endif
  }
  detail::cpu_backward(plan, rstd, grads, workspace, workspace_bytes);
}

}  // namespace modnorm
