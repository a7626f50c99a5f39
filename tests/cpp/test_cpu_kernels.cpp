// CPU kernels against the float64 reference: every broadcast rule, casting mode, dtype mix,
// absent inputs, D from 1 to beyond 65536, empty input, determinism, in place, poisoned outputs.
#include <gtest/gtest.h>

#include <cmath>

#include "problem.h"

using namespace modnorm;
using namespace modnorm_test;

namespace {

constexpr DType kDtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
constexpr CastingMode kModes[] = {CastingMode::kLlama, CastingMode::kGemma, CastingMode::kNone};

}  // namespace

TEST(CpuKernels, DtypesModesAndSizes) {
  for (DType t : kDtypes) {
    for (CastingMode m : kModes) {
      for (int64_t D : {1, 7, 128, 1000}) {
        Case c;
        c.xt = c.wt = c.st = c.ht = t;
        c.mode = m;
        c.D = D;
        c.offset = m == CastingMode::kGemma ? 1.0 : 0.0;
        run_and_check(c);
      }
    }
  }
}

TEST(CpuKernels, EveryBroadcastRule) {
  for (Kind k : {Kind::kShared, Kind::kPerSample, Kind::kPerToken, Kind::kTokenShared,
                 Kind::kPerFrame, Kind::kGroups, Kind::kChunk}) {
    for (DType t : {DType::kFloat32, DType::kBFloat16}) {
      Case c;
      c.kind = k;
      c.xt = c.wt = c.st = c.ht = t;
      c.B = 3;
      c.T = 8;
      c.D = 96;
      run_and_check(c);
    }
  }
}

TEST(CpuKernels, MixedDtypes) {
  for (DType xt : kDtypes) {
    for (DType mt : kDtypes) {
      Case c;
      c.xt = xt;
      c.st = c.ht = mt;
      c.wt = mt == DType::kFloat32 ? DType::kBFloat16 : DType::kFloat32;
      c.D = 80;
      run_and_check(c);
    }
  }
  Case c;  // scale and shift of different dtypes and shapes
  c.xt = DType::kBFloat16;
  c.st = DType::kFloat32;
  c.ht = DType::kFloat16;
  run_and_check(c);
}

TEST(CpuKernels, AbsentInputs) {
  for (bool weight : {false, true}) {
    for (int mod = 0; mod < 3; ++mod) {  // no scale; scale only; scale and shift
      Case c;
      c.weight = weight;
      c.scale = mod >= 1;
      c.shift = mod >= 2;
      c.offset = 0.5;  // unused without weight
      run_and_check(c);
    }
  }
}

TEST(CpuKernels, ScaleOffsetZeroMultipliesAsGiven) {
  Case c;
  c.scale_offset = 0.0;
  run_and_check(c);
}

TEST(CpuKernels, LargeD) {
  Case c;
  c.B = 1;
  c.T = 3;
  c.D = 70000;
  c.xt = DType::kBFloat16;
  c.st = c.ht = DType::kFloat32;
  run_and_check(c);
}

TEST(CpuKernels, ManyRowsSharedModulation) {
  // Enough rows that the backward splits them over many tasks and segments.
  for (Kind k : {Kind::kPerSample, Kind::kShared, Kind::kTokenShared}) {
    Case c;
    c.kind = k;
    c.B = 3;
    c.T = 700;
    c.D = 48;
    run_and_check(c);
  }
}

TEST(CpuKernels, EmptyInput) {
  // x (2, 0, D) with per-sample modulation: nothing to compute, parameter gradients are zero.
  const int64_t D = 8;
  Buffer x(DType::kFloat32, 0), dy(DType::kFloat32, 0);
  Buffer w = random_buffer(DType::kFloat32, D), s = random_buffer(DType::kBFloat16, 2 * D);
  const TensorRef xv = make_tensor(nullptr, DType::kFloat32, {2, 0, D});
  const TensorRef wv = make_tensor(w.data(), DType::kFloat32, {D});
  const TensorRef sv = make_tensor(s.data(), DType::kBFloat16, {2, D});
  const ForwardPlan p = plan_forward(xv, &wv, &sv, nullptr, {});
  EXPECT_TRUE(p.empty());
  forward(p, nullptr, nullptr);  // no-op
  const BackwardPlan bp = plan_backward(p, make_tensor(nullptr, DType::kFloat32, {2, 0, D}),
                                        {true, true, true, false});
  Buffer dw(DType::kFloat32, D), ds(DType::kBFloat16, 2 * D);
  dw.poison();
  ds.poison();
  std::vector<uint8_t> ws(backward_workspace_bytes(bp) + 1);
  backward(bp, nullptr, {nullptr, dw.data(), ds.data(), nullptr}, ws.data(), ws.size());
  for (int64_t i = 0; i < D; ++i) EXPECT_EQ(dw.get(i), 0.0);
  for (int64_t i = 0; i < 2 * D; ++i) EXPECT_EQ(ds.get(i), 0.0);
}

TEST(CpuKernels, DeterministicAcrossRunsAndThreadCounts) {
  Case c;
  c.B = 4;
  c.T = 500;
  c.D = 256;
  c.xt = DType::kBFloat16;
  c.st = c.ht = DType::kFloat32;
  Problem p(c);
  const Outputs a = p.run(), b = p.run();
  set_cpu_parallel_for([](int64_t n, void* ctx, ParallelBody body) { body(ctx, 0, n); });
  const Outputs serial = p.run();
  set_cpu_parallel_for(nullptr);
  for (const Outputs* o : {&b, &serial}) {
    EXPECT_TRUE(bitwise_equal(a.y, o->y));
    EXPECT_TRUE(bitwise_equal(a.dx, o->dx));
    EXPECT_TRUE(bitwise_equal(a.dw, o->dw));
    EXPECT_TRUE(bitwise_equal(a.ds, o->ds));
    EXPECT_TRUE(bitwise_equal(a.dh, o->dh));
  }
}

TEST(CpuKernels, InPlaceMatchesSeparateBuffers) {
  for (Kind k : {Kind::kPerSample, Kind::kTokenShared, Kind::kPerToken}) {
    Case c;
    c.kind = k;
    c.xt = c.st = c.ht = c.wt = DType::kBFloat16;
    Problem p(c);
    const Outputs a = p.run(false), b = p.run(true);
    EXPECT_TRUE(bitwise_equal(a.dx, b.dx));
    EXPECT_TRUE(bitwise_equal(a.dw, b.dw));
    EXPECT_TRUE(bitwise_equal(a.ds, b.ds));
    EXPECT_TRUE(bitwise_equal(a.dh, b.dh));
  }
}

TEST(CpuKernels, NothingWrittenOnError) {
  Case c;
  Problem p(c);
  const int64_t rows = c.B * c.T;
  std::vector<float> rstd(rows, 1.f);
  const BackwardPlan bp =
      plan_backward(p.fwd, make_tensor(p.dy.data(), c.xt, {rows, c.D}), {true, true, true, true});
  Buffer dx(c.xt, rows * c.D), dw(c.wt, c.D), ds(c.st, c.B * c.D), dh(c.ht, c.B * c.D);
  for (Buffer* b : {&dx, &dw, &ds, &dh}) b->poison();
  const Buffer before = dx;
  std::vector<uint8_t> ws(backward_workspace_bytes(bp));
  // Too small a workspace, then a missing output: both refused before any write.
  EXPECT_THROW(backward(bp, rstd.data(), {dx.data(), dw.data(), ds.data(), dh.data()},
                        ws.data(), ws.size() ? ws.size() - 1 : 0),
               Error);
  EXPECT_THROW(backward(bp, rstd.data(), {dx.data(), nullptr, ds.data(), dh.data()}, ws.data(),
                        ws.size()),
               Error);
  EXPECT_TRUE(bitwise_equal(dx, before));
  for (int64_t i = 0; i < c.D; ++i) EXPECT_TRUE(std::isnan(dw.get(i)));
}

TEST(CpuKernels, NanAndInfPropagateLikeEager) {
  // One row with an Inf: rstd = 0, finite elements give 0 and the Inf gives NaN (as eager's
  // x * rsqrt(inf) does); a NaN row is NaN throughout; other rows are unaffected.
  const int64_t D = 4;
  Buffer x(DType::kFloat32, 3 * D);
  for (int64_t i = 0; i < 3 * D; ++i) x.set(i, 1.0 + i);
  x.set(1, INFINITY);
  x.set(D + 2, NAN);
  const ForwardPlan p =
      plan_forward(make_tensor(x.data(), DType::kFloat32, {3, D}), nullptr, nullptr, nullptr, {});
  Buffer y(DType::kFloat32, 3 * D);
  std::vector<float> rstd(3);
  forward(p, y.data(), rstd.data());
  EXPECT_EQ(y.get(0), 0.0);
  EXPECT_TRUE(std::isnan(y.get(1)));
  for (int64_t j = 0; j < D; ++j) EXPECT_TRUE(std::isnan(y.get(D + j)));
  for (int64_t j = 0; j < D; ++j) EXPECT_TRUE(std::isfinite(y.get(2 * D + j)));
}

TEST(CpuKernels, ForwardWithoutRstd) {
  // rstd = nullptr (no backward to follow): y is bitwise the same, nothing else written.
  for (Kind k : {Kind::kPerSample, Kind::kPerToken, Kind::kChunk}) {
    Case c;
    c.kind = k;
    c.xt = c.wt = c.st = c.ht = DType::kBFloat16;
    c.D = 300;
    Problem p(c);
    Outputs with = p.poisoned_outputs(), without = p.poisoned_outputs();
    forward(p.fwd, with.y.data(), with.rstd.data());
    forward(p.fwd, without.y.data(), nullptr);
    EXPECT_TRUE(bitwise_equal(with.y, without.y)) << describe(c);
  }
  Problem p(Case{});
  EXPECT_THROW(forward(p.fwd, nullptr, nullptr), Error);  // y is required
}

TEST(CpuKernels, RowsWithAStride) {
  // x is a (rows, D) slice of a (rows, 2D) buffer: read in place.
  const int64_t rows = 5, D = 16;
  Buffer wide = random_buffer(DType::kFloat32, rows * 2 * D);
  Buffer packed(DType::kFloat32, rows * D);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < D; ++j) packed.set(r * D + j, wide.get(r * 2 * D + j));
  }
  auto run = [&](const TensorRef& xv) {
    Buffer y(DType::kFloat32, rows * D);
    std::vector<float> rstd(rows);
    forward(plan_forward(xv, nullptr, nullptr, nullptr, {}), y.data(), rstd.data());
    return y;
  };
  const Buffer a = run(make_strided_tensor(wide.data(), DType::kFloat32, {rows, D}, {2 * D, 1}));
  const Buffer b = run(make_tensor(packed.data(), DType::kFloat32, {rows, D}));
  EXPECT_TRUE(bitwise_equal(a, b));
}
