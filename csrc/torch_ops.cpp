// The PyTorch binding: registers modnorm's ops with torch.library and their autograd formula.
//
//   modnorm::modulated_rms_norm  the public op (autograd kernel below; works under torch.compile)
//   modnorm::fwd                 y, rstd
//   modnorm::fwd_y               y alone (calls that record no graph: no rstd allocated or written)
//   modnorm::bwd                 dx, dweight, dscale, dshift into fresh buffers
//   modnorm::bwd_inplace         the same with dx written over dy (declared as a mutation)
//
// The binding only converts tensors to modnorm::TensorRef and allocates outputs: validation,
// broadcasting and kernels live in the framework-free core. Fake (shape) kernels are registered
// from Python (modnorm/_fake.py) so they work with symbolic shapes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <limits>

#include "modnorm/modnorm.h"

namespace modnorm_torch {

// Set by torch_cuda.cpp when the CUDA backend is built.
void* (*current_cuda_stream)(const at::Tensor&) = nullptr;

namespace {

using OptTensor = std::optional<at::Tensor>;

// Tests set MODNORM_POISON_OUTPUTS=1 so every output starts as NaN and an element a kernel
// forgets to write shows up.
const bool kPoisonOutputs = std::getenv("MODNORM_POISON_OUTPUTS") != nullptr;

// How many backward calls wrote dx over dy; the tests read it to check that in_place saves
// memory when it may and never when it must not.
std::atomic<int64_t> g_inplace_reuses{0};
int64_t inplace_reuses() { return g_inplace_reuses.load(); }

void poison(at::Tensor& t) {
  if (kPoisonOutputs && t.defined() && t.numel() > 0) t.fill_(std::numeric_limits<float>::quiet_NaN());
}

[[noreturn]] void rethrow(const modnorm::Error& e) {
  switch (e.kind()) {
    case modnorm::Error::Kind::kType: TORCH_CHECK_TYPE(false, e.what());
    case modnorm::Error::Kind::kValue: TORCH_CHECK_VALUE(false, e.what());
    case modnorm::Error::Kind::kDevice: TORCH_CHECK(false, e.what());
  }
  TORCH_CHECK(false, e.what());
}

modnorm::DType to_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return modnorm::DType::kFloat32;
    case at::kHalf: return modnorm::DType::kFloat16;
    case at::kBFloat16: return modnorm::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "modnorm: ", name, " has unsupported dtype ", t,
                       " (expected float32, float16 or bfloat16)");
  }
}

modnorm::TensorRef to_ref(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.dim() <= modnorm::kMaxDims, "modnorm: ", name,
                    " must have between 1 and ", modnorm::kMaxDims, " dims, got ", t.dim());
  modnorm::TensorRef r;
  r.data = t.numel() > 0 ? t.data_ptr() : nullptr;
  r.dtype = to_dtype(t.scalar_type(), name);
  const auto dev = t.device();
  TORCH_CHECK(dev.is_cpu() || dev.is_cuda(), "modnorm: ", name, " is on unsupported device ", dev);
  r.device.type = dev.is_cuda() ? modnorm::DeviceType::kCUDA : modnorm::DeviceType::kCPU;
  r.device.index = dev.is_cuda() ? dev.index() : 0;
  r.ndim = static_cast<int>(t.dim());
  for (int i = 0; i < r.ndim; ++i) {
    r.shape[i] = t.size(i);
    r.strides[i] = t.stride(i);
  }
  return r;
}

// Layouts the kernels read in place are passed through; anything else is made contiguous first
// (a transposed x, a weight view with a stride, a modulation with a strided last dim).
at::Tensor readable_rows(const at::Tensor& t) {
  if (t.dim() >= 1 && t.dim() <= modnorm::kMaxDims) {
    modnorm::TensorRef r;
    r.ndim = static_cast<int>(t.dim());
    for (int i = 0; i < r.ndim; ++i) {
      r.shape[i] = t.size(i);
      r.strides[i] = t.stride(i);
    }
    if (modnorm::rows_are_uniform(r)) return t;
  }
  return t.contiguous();
}
OptTensor readable_last_dim(const OptTensor& t) {
  if (!t || t->dim() == 0 || t->size(-1) <= 1 || t->stride(-1) == 1) return t;
  return t->contiguous();
}

struct Inputs {
  at::Tensor x;
  OptTensor weight, scale, shift;
  modnorm::TensorRef x_ref, w_ref, s_ref, h_ref;
  modnorm::ForwardPlan plan;
};

Inputs plan_inputs(const at::Tensor& x_in, const OptTensor& weight, const OptTensor& scale,
                   const OptTensor& shift, double eps, double offset, double scale_offset,
                   c10::string_view casting_mode) {
  Inputs in;
  in.x = readable_rows(x_in);
  in.weight = weight ? OptTensor(weight->contiguous()) : weight;
  in.scale = readable_last_dim(scale);
  in.shift = readable_last_dim(shift);
  try {
    in.x_ref = to_ref(in.x, "x");
    if (in.weight) in.w_ref = to_ref(*in.weight, "weight");
    if (in.scale) in.s_ref = to_ref(*in.scale, "scale");
    if (in.shift) in.h_ref = to_ref(*in.shift, "shift");
    modnorm::Options opt;
    opt.eps = eps;
    opt.offset = offset;
    opt.scale_offset = scale_offset;
    opt.casting_mode = modnorm::parse_casting_mode(std::string(casting_mode));
    in.plan = modnorm::plan_forward(in.x_ref, in.weight ? &in.w_ref : nullptr,
                                    in.scale ? &in.s_ref : nullptr,
                                    in.shift ? &in.h_ref : nullptr, opt);
  } catch (const modnorm::Error& e) {
    rethrow(e);
  }
  return in;
}

void* stream_for(const at::Tensor& t) {
  if (!t.is_cuda()) return nullptr;
  TORCH_CHECK(current_cuda_stream != nullptr, "modnorm: built without CUDA support");
  return current_cuda_stream(t);
}

// y, and rstd when `with_rstd` (else an undefined tensor: nothing allocated or written).
std::tuple<at::Tensor, at::Tensor> forward_outputs(const at::Tensor& x, const OptTensor& weight,
                                                   const OptTensor& scale, const OptTensor& shift,
                                                   double eps, double offset, double scale_offset,
                                                   c10::string_view casting_mode, bool with_rstd) {
  Inputs in = plan_inputs(x, weight, scale, shift, eps, offset, scale_offset, casting_mode);
  const c10::DeviceGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor rstd;
  poison(y);
  if (with_rstd) {
    rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
    poison(rstd);
  }
  try {
    modnorm::forward(in.plan, y.data_ptr(), with_rstd ? rstd.data_ptr<float>() : nullptr,
                     stream_for(x));
  } catch (const modnorm::Error& e) {
    rethrow(e);
  }
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& x, const OptTensor& weight,
                                       const OptTensor& scale, const OptTensor& shift, double eps,
                                       double offset, double scale_offset,
                                       c10::string_view casting_mode) {
  return forward_outputs(x, weight, scale, shift, eps, offset, scale_offset, casting_mode, true);
}

// The forward of a call that records no graph (inference, no_grad): y alone, no rstd to
// allocate or write.
at::Tensor fwd_y(const at::Tensor& x, const OptTensor& weight, const OptTensor& scale,
                 const OptTensor& shift, double eps, double offset, double scale_offset,
                 c10::string_view casting_mode) {
  return std::get<0>(
      forward_outputs(x, weight, scale, shift, eps, offset, scale_offset, casting_mode, false));
}

// Shared by bwd and bwd_inplace: dx is written to `dx` (which may be dy itself).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_into(
    const at::Tensor& dy_in, at::Tensor dx, const at::Tensor& x, const at::Tensor& rstd,
    const OptTensor& weight, const OptTensor& scale, const OptTensor& shift, double offset,
    double scale_offset, c10::string_view casting_mode, std::array<bool, 4> mask) {
  Inputs in = plan_inputs(x, weight, scale, shift, 0.0, offset, scale_offset, casting_mode);
  TORCH_CHECK_VALUE(rstd.scalar_type() == at::kFloat && rstd.numel() == in.plan.rows &&
                        rstd.device() == x.device(),
                    "modnorm: rstd must be the float32 rstd the forward returned for x");
  const at::Tensor rstd_c = rstd.contiguous();
  const at::Tensor dy = dy_in.scalar_type() == x.scalar_type() ? readable_rows(dy_in)
                                                                 : dy_in.to(x.scalar_type());
  modnorm::BackwardPlan plan;
  try {
    plan = modnorm::plan_backward(in.plan, to_ref(dy, "dy"),
                                  {mask[0], mask[1] && in.weight.has_value(),
                                   mask[2] && in.scale.has_value(), mask[3] && in.shift.has_value()});
  } catch (const modnorm::Error& e) {
    rethrow(e);
  }
  const c10::DeviceGuard guard(x.device());
  auto grad_like = [](const OptTensor& t, bool want) {
    return want ? at::empty(t->sizes(), t->options().memory_format(at::MemoryFormat::Contiguous))
                : at::Tensor();
  };
  at::Tensor dweight = grad_like(in.weight, plan.need_dweight);
  at::Tensor dscale = grad_like(in.scale, plan.need_dscale);
  at::Tensor dshift = grad_like(in.shift, plan.need_dshift);
  poison(dweight);
  poison(dscale);
  poison(dshift);
  const size_t ws_bytes = modnorm::backward_workspace_bytes(plan);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  modnorm::Gradients g;
  g.dx = plan.need_dx && dx.numel() > 0 ? dx.data_ptr() : nullptr;
  g.dweight = dweight.defined() && dweight.numel() ? dweight.data_ptr() : nullptr;
  g.dscale = dscale.defined() && dscale.numel() ? dscale.data_ptr() : nullptr;
  g.dshift = dshift.defined() && dshift.numel() ? dshift.data_ptr() : nullptr;
  try {
    modnorm::backward(plan, rstd_c.numel() ? rstd_c.data_ptr<float>() : nullptr, g,
                      ws_bytes ? workspace.data_ptr() : nullptr, ws_bytes, stream_for(x));
  } catch (const modnorm::Error& e) {
    rethrow(e);
  }
  auto or_empty = [&](const at::Tensor& t) {
    return t.defined() ? t : at::empty({0}, x.options());
  };
  return {or_empty(dweight), or_empty(dscale), or_empty(dshift)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd, const OptTensor& weight,
    const OptTensor& scale, const OptTensor& shift, double offset, double scale_offset,
    c10::string_view casting_mode, std::array<bool, 4> mask) {
  at::Tensor dx = mask[0] ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                          : at::empty({0}, x.options());
  if (mask[0]) poison(dx);
  auto [dw, ds, dh] = backward_into(dy, dx, x, rstd, weight, scale, shift, offset, scale_offset,
                                    casting_mode, mask);
  return {dx, dw, ds, dh};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_inplace(
    at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd, const OptTensor& weight,
    const OptTensor& scale, const OptTensor& shift, double offset, double scale_offset,
    c10::string_view casting_mode, std::array<bool, 4> mask) {
  TORCH_CHECK_VALUE(dy.is_contiguous() && dy.scalar_type() == x.scalar_type() &&
                        dy.sizes() == x.sizes(),
                    "modnorm: bwd_inplace needs a contiguous dy with x's shape and dtype");
  return backward_into(dy, dy, x, rstd, weight, scale, shift, offset, scale_offset, casting_mode,
                       {true, mask[1], mask[2], mask[3]});
}

// ---- autograd -----------------------------------------------------------------------------------

// dx may overwrite dy only when nothing else can observe dy: we hold its only reference and its
// storage's only reference (the grad of `y + residual` is shared with the other branch and
// fails this), it is a plain dense tensor (not being traced, no dispatch mode active), and its
// layout and dtype are dx's.
bool dy_reusable(const at::Tensor& dy, const at::Tensor& x) {
  if (!dy.defined() || dy.requires_grad() || !dy.is_contiguous() ||
      dy.scalar_type() != x.scalar_type() || dy.sizes() != x.sizes()) {
    return false;
  }
  if (!(dy.is_cpu() || dy.is_cuda()) || dy.is_inference()) return false;
  if (c10::impl::TorchDispatchModeTLS::any_modes_set()) return false;
  const auto traced = c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                           c10::DispatchKey::PythonTLSSnapshot,
                                           c10::DispatchKey::FuncTorchGradWrapper,
                                           c10::DispatchKey::FuncTorchBatched});
  if (dy.key_set().has_any(traced)) return false;
  return dy.use_count() == 1 && dy.storage().use_count() == 1 && dy.storage_offset() == 0;
}

struct ModulatedRMSNormFunction : public torch::autograd::Function<ModulatedRMSNormFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const OptTensor& weight, const OptTensor& scale,
                            const OptTensor& shift, double eps, double offset,
                            double scale_offset, c10::string_view casting_mode, bool in_place) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("modnorm::fwd", "")
                         .typed<decltype(fwd)>();
    auto [y, rstd] = op.call(x, weight, scale, shift, eps, offset, scale_offset, casting_mode);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), scale.value_or(at::Tensor()),
                            shift.value_or(at::Tensor()), rstd});
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["scale_offset"] = scale_offset;
    ctx->saved_data["casting_mode"] = std::string(casting_mode);
    ctx->saved_data["in_place"] = in_place;
    return y;
  }

  // `grads` by reference: the autograd node passes its own vector, so moving dy out of it
  // leaves this function holding dy's only reference when nothing else does.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list& grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    auto opt = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
    const OptTensor weight = opt(saved[1]), scale = opt(saved[2]), shift = opt(saved[3]);
    const at::Tensor& rstd = saved[4];
    const double offset = ctx->saved_data["offset"].toDouble();
    const double scale_offset = ctx->saved_data["scale_offset"].toDouble();
    const std::string casting_mode = ctx->saved_data["casting_mode"].toStringRef();
    const bool in_place = ctx->saved_data["in_place"].toBool();
    // needs_input_grad counts only the tensors that were given (None makes no autograd edge).
    std::array<bool, 4> mask = {ctx->needs_input_grad(0), false, false, false};
    size_t edge = 1;
    if (weight) mask[1] = ctx->needs_input_grad(edge++);
    if (scale) mask[2] = ctx->needs_input_grad(edge++);
    if (shift) mask[3] = ctx->needs_input_grad(edge++);
    at::Tensor dy = std::move(grads[0]);
    grads.clear();
    saved.clear();
    at::Tensor dx, dweight, dscale, dshift;
    if (!dy.defined()) {
      dy = at::zeros_like(x);
    }
    if (in_place && mask[0] && dy_reusable(dy, x)) {
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("modnorm::bwd_inplace", "")
                           .typed<decltype(bwd_inplace)>();
      std::tie(dweight, dscale, dshift) = op.call(dy, x, rstd, weight, scale, shift, offset,
                                                  scale_offset, casting_mode, mask);
      dx = dy;
      g_inplace_reuses.fetch_add(1);
    } else {
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("modnorm::bwd", "")
                           .typed<decltype(bwd)>();
      std::tie(dx, dweight, dscale, dshift) =
          op.call(dy, x, rstd, weight, scale, shift, offset, scale_offset, casting_mode, mask);
    }
    auto keep = [](bool want, const at::Tensor& t) { return want ? t : at::Tensor(); };
    return {keep(mask[0], dx),      keep(mask[1], dweight), keep(mask[2], dscale),
            keep(mask[3], dshift),  at::Tensor(),           at::Tensor(),
            at::Tensor(),           at::Tensor(),           at::Tensor()};
  }
};

// Below autograd (inference mode, or after the autograd kernel): just the forward.
at::Tensor modulated_rms_norm_plain(const at::Tensor& x, const OptTensor& weight,
                                    const OptTensor& scale, const OptTensor& shift, double eps,
                                    double offset, double scale_offset,
                                    c10::string_view casting_mode, bool /*in_place*/) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("modnorm::fwd_y", "")
                       .typed<decltype(fwd_y)>();
  return op.call(x, weight, scale, shift, eps, offset, scale_offset, casting_mode);
}

// Whether a call records an autograd node: grad mode on and some input requiring grad, or a
// forward-mode gradient (dual tensor) that the Function must see to reject.
bool records_autograd(const at::Tensor& x, const OptTensor& weight, const OptTensor& scale,
                      const OptTensor& shift) {
  auto touched = [](const at::Tensor& t, bool grad_mode) {
    return t.defined() && ((grad_mode && t.requires_grad()) || t._fw_grad(0).defined());
  };
  const bool grad_mode = at::GradMode::is_enabled();
  return touched(x, grad_mode) || (weight && touched(*weight, grad_mode)) ||
         (scale && touched(*scale, grad_mode)) || (shift && touched(*shift, grad_mode));
}

at::Tensor modulated_rms_norm_autograd(const at::Tensor& x, const OptTensor& weight,
                                       const OptTensor& scale, const OptTensor& shift, double eps,
                                       double offset, double scale_offset,
                                       c10::string_view casting_mode, bool in_place) {
  if (!records_autograd(x, weight, scale, shift)) {
    // No graph to record (no_grad, or no input requiring grad): the forward alone, without the
    // Function's context and saved state: one eager call 6.7 -> 4.6 us of host time on the CPU
    // backend (performance log, session 9).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return modulated_rms_norm_plain(x, weight, scale, shift, eps, offset, scale_offset,
                                    casting_mode, in_place);
  }
  return ModulatedRMSNormFunction::apply(x, weight, scale, shift, eps, offset, scale_offset,
                                         casting_mode, in_place);
}

void torch_parallel_for(int64_t n, void* ctx, modnorm::ParallelBody body) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) { body(ctx, begin, end); });
}

const int kInstallPool = (modnorm::set_cpu_parallel_for(&torch_parallel_for), 0);

}  // namespace
}  // namespace modnorm_torch

TORCH_LIBRARY(modnorm, m) {
  m.def(
      "modulated_rms_norm(Tensor x, Tensor? weight, Tensor? scale, Tensor? shift, float eps, "
      "float offset, float scale_offset, str casting_mode, bool in_place) -> Tensor");
  m.def(
      "fwd(Tensor x, Tensor? weight, Tensor? scale, Tensor? shift, float eps, float offset, "
      "float scale_offset, str casting_mode) -> (Tensor, Tensor)");
  m.def(
      "fwd_y(Tensor x, Tensor? weight, Tensor? scale, Tensor? shift, float eps, float offset, "
      "float scale_offset, str casting_mode) -> Tensor");
  m.def(
      "bwd(Tensor dy, Tensor x, Tensor rstd, Tensor? weight, Tensor? scale, Tensor? shift, "
      "float offset, float scale_offset, str casting_mode, bool[4] grad_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bwd_inplace(Tensor(a!) dy, Tensor x, Tensor rstd, Tensor? weight, Tensor? scale, "
      "Tensor? shift, float offset, float scale_offset, str casting_mode, bool[4] grad_mask) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("_inplace_reuses() -> int", &modnorm_torch::inplace_reuses);
}

TORCH_LIBRARY_IMPL(modnorm, CPU, m) {
  m.impl("fwd", &modnorm_torch::fwd);
  m.impl("fwd_y", &modnorm_torch::fwd_y);
  m.impl("bwd", &modnorm_torch::bwd);
  m.impl("bwd_inplace", &modnorm_torch::bwd_inplace);
}

TORCH_LIBRARY_IMPL(modnorm, CUDA, m) {
  m.impl("fwd", &modnorm_torch::fwd);
  m.impl("fwd_y", &modnorm_torch::fwd_y);
  m.impl("bwd", &modnorm_torch::bwd);
  m.impl("bwd_inplace", &modnorm_torch::bwd_inplace);
}

TORCH_LIBRARY_IMPL(modnorm, Autograd, m) {
  m.impl("modulated_rms_norm", &modnorm_torch::modulated_rms_norm_autograd);
}

TORCH_LIBRARY_IMPL(modnorm, CompositeExplicitAutograd, m) {
  m.impl("modulated_rms_norm", &modnorm_torch::modulated_rms_norm_plain);
}
