// The CUDA backend through the C++ API alone (no PyTorch), as a C++ caller uses it: device memory
// the caller owns, plans over device views, a stream or none. The CPU tests' problems are checked
// against the same float64 reference; on top, what only a C++ caller can do: hand in a dx that
// is not 16-byte aligned (the kernels that store dx in 16-byte vectors must fall back), or dx over
// dy. Every output region sits between guard bytes that must survive, and starts poisoned (NaN)
// so that unwritten elements show. Each test skips where no CUDA device is present (the CPU CI
// builds and lists them); run them on a GPU: `ctest -R CudaApi` or `modnorm_cuda_tests`.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <memory>
#include <stdexcept>
#include <string>

#include "problem.h"

using namespace modnorm;
using namespace modnorm_test;

namespace {

bool cuda_device_present() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define SKIP_WITHOUT_GPU() \
  if (!cuda_device_present()) GTEST_SKIP() << "no CUDA device"

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

constexpr Device kGpu{DeviceType::kCUDA, 0};

// `bytes` of device memory starting `shift` bytes past a 256-byte boundary, between guard bytes.
class DeviceRegion {
 public:
  explicit DeviceRegion(size_t bytes, size_t shift = 0) : bytes_(bytes), shift_(shift) {
    check_cuda(cudaMalloc(&base_, total()), "cudaMalloc");
    check_cuda(cudaMemset(base_, kGuard, total()), "cudaMemset");
  }
  ~DeviceRegion() { cudaFree(base_); }
  DeviceRegion(const DeviceRegion&) = delete;
  DeviceRegion& operator=(const DeviceRegion&) = delete;

  void* data() const { return static_cast<char*>(base_) + kPad + shift_; }
  void upload(const void* host) {
    if (bytes_ > 0) check_cuda(cudaMemcpy(data(), host, bytes_, cudaMemcpyHostToDevice), "upload");
  }
  void download(void* host) const {
    if (bytes_ > 0) check_cuda(cudaMemcpy(host, data(), bytes_, cudaMemcpyDeviceToHost), "download");
  }
  // Whether every byte outside [data(), data() + bytes) still holds the guard pattern.
  bool guards_intact() const {
    std::vector<unsigned char> all(total());
    check_cuda(cudaMemcpy(all.data(), base_, total(), cudaMemcpyDeviceToHost), "download guards");
    for (size_t i = 0; i < all.size(); ++i) {
      const bool inside = i >= kPad + shift_ && i < kPad + shift_ + bytes_;
      if (!inside && all[i] != kGuard) return false;
    }
    return true;
  }

 private:
  static constexpr size_t kPad = 256;
  static constexpr unsigned char kGuard = 0x5A;
  size_t total() const { return kPad + shift_ + bytes_ + kPad; }
  void* base_ = nullptr;
  size_t bytes_, shift_;
};

// A device copy of a host buffer (in its own guarded region).
std::unique_ptr<DeviceRegion> to_device(const Buffer& b, size_t shift = 0) {
  auto d = std::make_unique<DeviceRegion>(b.bytes.size(), shift);
  d->upload(b.bytes.data());
  return d;
}

// The host view `v` of `host` moved onto `device_copy` (same shape, strides and element offset).
TensorRef on_device(const TensorRef& v, const Buffer& host, const DeviceRegion& device_copy) {
  TensorRef r = v;
  r.data = static_cast<char*>(device_copy.data()) +
           (static_cast<const char*>(v.data) - reinterpret_cast<const char*>(host.bytes.data()));
  r.device = kGpu;
  return r;
}

struct DeviceRun {
  bool in_place = false;    // dx written over dy's device copy
  size_t dx_shift = 0;      // bytes past 16-byte alignment of a separate dx
  cudaStream_t stream = nullptr;
};

// One problem's inputs on the device and its plans over them.
struct DeviceProblem {
  Problem& p;
  std::unique_ptr<DeviceRegion> x, w, s, h, dy;
  ForwardPlan fwd;

  explicit DeviceProblem(Problem& problem) : p(problem) {
    const Case& c = p.c;
    x = to_device(p.x);
    w = to_device(p.w);
    s = to_device(p.s.buf);
    h = to_device(p.h.buf);
    dy = to_device(p.dy);
    const TensorRef wv = make_tensor(w->data(), c.wt, {c.D}, kGpu);
    const TensorRef sv = c.scale ? on_device(p.s.view, p.s.buf, *s) : TensorRef{};
    const TensorRef hv = c.shift ? on_device(p.h.view, p.h.buf, *h) : TensorRef{};
    fwd = plan_forward(p.x_view(x->data(), kGpu), c.weight ? &wv : nullptr,
                       c.scale ? &sv : nullptr, c.shift ? &hv : nullptr, p.options);
  }

  BackwardPlan backward_plan() const {
    return plan_backward(fwd, make_tensor(dy->data(), p.c.xt, {p.c.rows(), p.c.D}, kGpu), p.mask());
  }

  // Forward and backward on the GPU into poisoned, guarded outputs, copied back to the host.
  // Inputs are restored afterwards (an in-place run writes dx over dy's copy).
  Outputs run(const DeviceRun& how = {}) {
    Outputs o = p.poisoned_outputs();
    auto y = to_device(o.y);
    auto dx = to_device(o.dx, how.dx_shift);
    auto dw = to_device(o.dw), ds = to_device(o.ds), dh = to_device(o.dh);
    DeviceRegion rstd(o.rstd.size() * sizeof(float));
    rstd.upload(o.rstd.data());
    forward(fwd, y->data(), static_cast<float*>(rstd.data()), how.stream);

    const BackwardPlan bp = backward_plan();
    DeviceRegion ws(backward_workspace_bytes(bp));
    const Gradients g{how.in_place ? dy->data() : dx->data(), p.c.weight ? dw->data() : nullptr,
                      p.c.scale ? ds->data() : nullptr, p.c.shift ? dh->data() : nullptr};
    backward(bp, static_cast<const float*>(rstd.data()), g, ws.data(), backward_workspace_bytes(bp),
             how.stream);
    check_cuda(cudaGetLastError(), "launch");
    check_cuda(cudaDeviceSynchronize(), "synchronize");

    y->download(o.y.data());
    rstd.download(o.rstd.data());
    (how.in_place ? *dy : *dx).download(o.dx.data());
    dw->download(o.dw.data());
    ds->download(o.ds.data());
    dh->download(o.dh.data());
    for (const DeviceRegion* r : {y.get(), dx.get(), dw.get(), ds.get(), dh.get(), &rstd, &ws,
                                  x.get(), w.get(), s.get(), h.get(), dy.get()}) {
      EXPECT_TRUE(r->guards_intact()) << "a write outside its buffer: " << describe(p.c);
    }
    if (how.in_place) dy->upload(p.dy.bytes.data());
    return o;
  }
};

void run_and_check_on_gpu(const Case& c, const DeviceRun& how = {}) {
  Problem p(c);
  DeviceProblem d(p);
  p.check(d.run(how));
}

Case bf16_case(int64_t D, Kind kind = Kind::kPerSample, int64_t T = 300) {
  Case c;
  c.xt = c.wt = c.st = c.ht = DType::kBFloat16;
  c.D = D;
  c.T = T;
  c.kind = kind;
  return c;
}

}  // namespace

// Row lengths that take each forward and backward kernel: scalar rows (odd D), warp teams and
// the short-row backward (8-32 vectors), the tile ring (64), block-wide rows and the lean
// backward (144-640 vectors), and a row longer than the register kernels hold.
TEST(CudaApi, RowLengthsAgainstFloat64) {
  SKIP_WITHOUT_GPU();
  for (int64_t D : {8, 127, 64, 128, 256, 512, 1152, 2048, 5120, 40000}) {
    run_and_check_on_gpu(bf16_case(D, Kind::kPerSample, D > 10000 ? 20 : 300));
  }
}

TEST(CudaApi, EveryBroadcastRule) {
  SKIP_WITHOUT_GPU();
  for (Kind k : {Kind::kShared, Kind::kPerSample, Kind::kPerToken, Kind::kTokenShared,
                 Kind::kPerFrame, Kind::kGroups, Kind::kChunk}) {
    for (int64_t D : {96, 2048}) run_and_check_on_gpu(bf16_case(D, k));
  }
}

TEST(CudaApi, DtypesModesAndOperands) {
  SKIP_WITHOUT_GPU();
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (CastingMode m : {CastingMode::kLlama, CastingMode::kGemma, CastingMode::kNone}) {
      for (int64_t D : {128, 2048}) {
        Case c = bf16_case(D);
        c.xt = c.wt = c.st = c.ht = t;
        c.mode = m;
        c.offset = m == CastingMode::kGemma ? 1.0 : 0.0;
        run_and_check_on_gpu(c);
      }
    }
  }
  // Wan's layout: bf16 x, float32 scale and shift, shared and per token.
  for (Kind k : {Kind::kShared, Kind::kPerToken}) {
    Case c = bf16_case(5120, k);
    c.st = c.ht = DType::kFloat32;
    run_and_check_on_gpu(c);
  }
  for (bool weight : {false, true}) {
    for (int mod = 0; mod < 3; ++mod) {  // no scale; scale only; scale and shift
      Case c = bf16_case(2048);
      c.weight = weight;
      c.scale = mod >= 1;
      c.shift = mod >= 2;
      run_and_check_on_gpu(c);
    }
  }
}

// A caller's dx one element past 16-byte alignment: the kernels that store 16-byte vectors of dx
// (the short-row and lean backward among them) must hand over to a path that does not.
TEST(CudaApi, MisalignedCallerDx) {
  SKIP_WITHOUT_GPU();
  for (int64_t D : {64, 128, 256, 512, 2048, 5120}) {
    for (Kind k : {Kind::kPerSample, Kind::kShared}) {
      Case c = bf16_case(D, k, 600);
      Problem p(c);
      DeviceProblem d(p);
      const Outputs aligned = d.run();
      DeviceRun shifted;
      shifted.dx_shift = dtype_size(c.xt);
      const Outputs o = d.run(shifted);
      p.check(o);
      p.check(aligned);
    }
  }
  Case c = bf16_case(128, Kind::kPerSample, 600);  // 32 float32 vectors: the short-row kernel
  c.xt = c.wt = c.st = c.ht = DType::kFloat32;
  DeviceRun shifted;
  shifted.dx_shift = sizeof(float);
  run_and_check_on_gpu(c, shifted);
}

// dx over dy's own memory gives bitwise the gradients of separate buffers.
TEST(CudaApi, InPlaceMatchesSeparateBuffers) {
  SKIP_WITHOUT_GPU();
  for (int64_t D : {128, 2048}) {
    for (Kind k : {Kind::kPerSample, Kind::kTokenShared, Kind::kPerToken}) {
      Problem p(bf16_case(D, k));
      DeviceProblem d(p);
      const Outputs a = d.run();
      DeviceRun in_place;
      in_place.in_place = true;
      const Outputs b = d.run(in_place);
      p.check(b);
      EXPECT_TRUE(bitwise_equal(a.dx, b.dx)) << describe(p.c);
      EXPECT_TRUE(bitwise_equal(a.dw, b.dw)) << describe(p.c);
      EXPECT_TRUE(bitwise_equal(a.ds, b.ds)) << describe(p.c);
      EXPECT_TRUE(bitwise_equal(a.dh, b.dh)) << describe(p.c);
    }
  }
}

// Three runs, on the default stream and on a stream of the caller's, agree bitwise.
TEST(CudaApi, RepeatableOnAnyStream) {
  SKIP_WITHOUT_GPU();
  cudaStream_t stream = nullptr;
  check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  for (Kind k : {Kind::kPerSample, Kind::kShared}) {
    for (int64_t D : {128, 2048, 5120}) {
      Problem p(bf16_case(D, k, 2000));
      DeviceProblem d(p);
      DeviceRun on_stream;
      on_stream.stream = stream;
      const Outputs a = d.run(), b = d.run(on_stream), e = d.run(on_stream);
      p.check(a);
      for (const Outputs* o : {&b, &e}) {
        EXPECT_TRUE(bitwise_equal(a.y, o->y)) << describe(p.c);
        EXPECT_TRUE(a.rstd == o->rstd) << describe(p.c);
        EXPECT_TRUE(bitwise_equal(a.dx, o->dx)) << describe(p.c);
        EXPECT_TRUE(bitwise_equal(a.dw, o->dw)) << describe(p.c);
        EXPECT_TRUE(bitwise_equal(a.ds, o->ds)) << describe(p.c);
        EXPECT_TRUE(bitwise_equal(a.dh, o->dh)) << describe(p.c);
      }
    }
  }
  check_cuda(cudaStreamDestroy(stream), "cudaStreamDestroy");
}

// rstd = nullptr (no backward to follow): every forward kernel gives bitwise the y of the forward
// that writes rstd, and writes nothing else.
TEST(CudaApi, ForwardWithoutRstd) {
  SKIP_WITHOUT_GPU();
  for (int64_t D : {64, 128, 127, 1152, 2048, 5120, 40000}) {
    for (Kind k : {Kind::kPerSample, Kind::kPerToken}) {
      Case c = bf16_case(D, k, D > 10000 ? 20 : 300);
      Problem p(c);
      DeviceProblem d(p);
      const Outputs with = d.run();
      const Outputs poison = p.poisoned_outputs();
      auto y = to_device(poison.y);
      forward(d.fwd, y->data(), nullptr);
      check_cuda(cudaDeviceSynchronize(), "synchronize");
      Buffer y_only = poison.y;
      y->download(y_only.data());
      EXPECT_TRUE(bitwise_equal(with.y, y_only)) << describe(c);
      EXPECT_TRUE(y->guards_intact()) << describe(c);
    }
  }
}

// Refused arguments throw before anything is written: the outputs keep their poison.
TEST(CudaApi, NothingWrittenOnError) {
  SKIP_WITHOUT_GPU();
  Problem p(bf16_case(2048));
  DeviceProblem d(p);
  const Outputs poison = p.poisoned_outputs();
  auto dx = to_device(poison.dx), dw = to_device(poison.dw), ds = to_device(poison.ds),
       dh = to_device(poison.dh);
  DeviceRegion rstd(p.c.rows() * sizeof(float));
  const BackwardPlan bp = d.backward_plan();
  const size_t need = backward_workspace_bytes(bp);
  ASSERT_GT(need, 0u);
  DeviceRegion ws(need + 16);
  const Gradients g{dx->data(), dw->data(), ds->data(), dh->data()};
  const auto* r = static_cast<const float*>(rstd.data());
  EXPECT_THROW(backward(bp, r, g, ws.data(), need - 1), Error);  // too small a workspace
  EXPECT_THROW(backward(bp, r, g, static_cast<char*>(ws.data()) + 1, need), Error);  // misaligned
  EXPECT_THROW(backward(bp, r, {dx->data(), nullptr, ds->data(), dh->data()}, ws.data(), need),
               Error);  // a requested gradient without its buffer
  check_cuda(cudaDeviceSynchronize(), "synchronize");
  Outputs after = p.poisoned_outputs();
  dx->download(after.dx.data());
  dw->download(after.dw.data());
  ds->download(after.ds.data());
  dh->download(after.dh.data());
  EXPECT_TRUE(bitwise_equal(after.dx, poison.dx));
  EXPECT_TRUE(bitwise_equal(after.dw, poison.dw));
  EXPECT_TRUE(bitwise_equal(after.ds, poison.ds));
  EXPECT_TRUE(bitwise_equal(after.dh, poison.dh));
  // Inputs on two devices: refused by the plan.
  const TensorRef host_weight = make_tensor(p.w.data(), p.c.wt, {p.c.D});
  EXPECT_THROW(plan_forward(p.x_view(d.x->data(), kGpu), &host_weight, nullptr, nullptr, p.options),
               Error);
}

// x (2, 0, D): nothing to compute; the parameter gradients are zeros.
TEST(CudaApi, EmptyInput) {
  SKIP_WITHOUT_GPU();
  const int64_t D = 2048;
  Buffer w = random_buffer(DType::kBFloat16, D), s = random_buffer(DType::kBFloat16, 2 * D);
  auto wd = to_device(w), sd = to_device(s);
  const TensorRef wv = make_tensor(wd->data(), DType::kBFloat16, {D}, kGpu);
  const TensorRef sv = make_tensor(sd->data(), DType::kBFloat16, {2, D}, kGpu);
  const ForwardPlan fp = plan_forward(make_tensor(nullptr, DType::kBFloat16, {2, 0, D}, kGpu), &wv,
                                      &sv, nullptr, {});
  EXPECT_TRUE(fp.empty());
  forward(fp, nullptr, nullptr);
  const BackwardPlan bp =
      plan_backward(fp, make_tensor(nullptr, DType::kBFloat16, {2, 0, D}, kGpu), {true, true, true, false});
  Buffer dw(DType::kBFloat16, D), ds(DType::kBFloat16, 2 * D);
  dw.poison();
  ds.poison();
  auto dwd = to_device(dw), dsd = to_device(ds);
  DeviceRegion ws(backward_workspace_bytes(bp) + 16);
  backward(bp, nullptr, {nullptr, dwd->data(), dsd->data(), nullptr}, ws.data(),
           backward_workspace_bytes(bp) + 16);
  check_cuda(cudaDeviceSynchronize(), "synchronize");
  dwd->download(dw.data());
  dsd->download(ds.data());
  for (int64_t i = 0; i < D; ++i) EXPECT_EQ(dw.get(i), 0.0);
  for (int64_t i = 0; i < 2 * D; ++i) EXPECT_EQ(ds.get(i), 0.0);
  EXPECT_TRUE(dwd->guards_intact());
  EXPECT_TRUE(dsd->guards_intact());
}
