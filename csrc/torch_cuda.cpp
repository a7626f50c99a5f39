// CUDA side of the PyTorch binding: hands the core torch's current stream for a tensor's device,
// so modnorm's kernels order with the surrounding torch work.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

namespace modnorm_torch {
extern void* (*current_cuda_stream)(const at::Tensor&);

namespace {
void* torch_current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
const int kInstallStream = (current_cuda_stream = &torch_current_stream, 0);
}  // namespace
}  // namespace modnorm_torch
