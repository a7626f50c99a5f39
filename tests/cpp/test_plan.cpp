// Validation and the broadcast plan (SPEC 2 and 6).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

#include "modnorm/modnorm.h"

using namespace modnorm;

namespace {

// Plans need shapes and strides only; a non-null dummy pointer stands in for memory.
void* const kMem = reinterpret_cast<void*>(0x1000);

TensorRef T(std::initializer_list<int64_t> shape, DType t = DType::kFloat32) {
  return make_tensor(kMem, t, shape);
}

// Expands the map into "row -> element offset" for every row.
std::vector<int64_t> offsets(const RowMap& m, int64_t rows) {
  std::vector<int64_t> out;
  for (int64_t r = 0; r < rows; ++r) out.push_back(m.element_offset(r));
  return out;
}

void expect_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    FAIL() << "expected an error mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(Plan, PerSampleRuleWinsOverBroadcasting) {
  // x (3, 3, 4) with scale (3, 4): rule 1 (per sample), although rule 2 would also fit (per token).
  const TensorRef x = T({3, 3, 4}), s = T({3, 4});
  const ForwardPlan p = plan_forward(x, nullptr, &s, nullptr, {});
  EXPECT_EQ(p.scale_map.rule, 1);
  EXPECT_EQ(offsets(p.scale_map, 9), (std::vector<int64_t>{0, 0, 0, 4, 4, 4, 8, 8, 8}));
  EXPECT_TRUE(p.scale_map.blocked);
  EXPECT_EQ(p.scale_map.rows_per_distinct, 3);
}

TEST(Plan, BroadcastShapes) {
  const TensorRef x = T({2, 3, 4});
  struct Case {
    TensorRef m;
    std::vector<int64_t> expected;
    int64_t distinct;
  } cases[] = {
      {T({4}), {0, 0, 0, 0, 0, 0}, 1},                          // shared
      {T({2, 1, 4}), {0, 0, 0, 4, 4, 4}, 2},                    // per sample, 3-D
      {T({2, 3, 4}), {0, 4, 8, 12, 16, 20}, 6},                 // per token
      {T({3, 4}), {0, 4, 8, 0, 4, 8}, 3},                       // (T, D) shared over the batch
      {T({1, 3, 4}), {0, 4, 8, 0, 4, 8}, 3},                    // (1, T, D)
  };
  for (const Case& c : cases) {
    const ForwardPlan p = plan_forward(x, nullptr, &c.m, nullptr, {});
    EXPECT_EQ(offsets(p.scale_map, 6), c.expected);
    EXPECT_EQ(p.scale_map.distinct_rows, c.distinct);
  }
}

TEST(Plan, PerFrameModulation) {
  // x (B=2, F=3, HW=2, D=4), scale (B, F, 1, D): one row per frame, shared by its HW tokens.
  const TensorRef x = T({2, 3, 2, 4}), s = T({2, 3, 1, 4});
  const ForwardPlan p = plan_forward(x, nullptr, &s, nullptr, {});
  EXPECT_EQ(p.scale_map.rule, 2);
  EXPECT_EQ(offsets(p.scale_map, 12),
            (std::vector<int64_t>{0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20}));
  EXPECT_TRUE(p.scale_map.blocked);
}

TEST(Plan, GroupsRule) {
  // x (6, 4) as rows, scale (3, 4): 3 groups of 2 consecutive rows.
  const TensorRef x = T({6, 4}), s = T({3, 4});
  const ForwardPlan p = plan_forward(x, nullptr, &s, nullptr, {});
  EXPECT_EQ(p.scale_map.rule, 3);
  EXPECT_EQ(offsets(p.scale_map, 6), (std::vector<int64_t>{0, 0, 4, 4, 8, 8}));
}

TEST(Plan, ChunkViewsAreReadInPlace) {
  // scale = proj.chunk(6, dim=-1)[1] of a (B, 1, 6*D) projection: row stride 6*D, offset D.
  const int64_t D = 4;
  const TensorRef x = T({2, 5, D});
  const TensorRef s = make_strided_tensor(kMem, DType::kBFloat16, {2, 1, D}, {6 * D, 6 * D, 1});
  const ForwardPlan p = plan_forward(x, nullptr, &s, nullptr, {});
  EXPECT_EQ(p.scale_map.element_offset(0), 0);
  EXPECT_EQ(p.scale_map.element_offset(4), 0);
  EXPECT_EQ(p.scale_map.element_offset(5), 6 * D);
  EXPECT_EQ(p.scale_map.grad_row(5), 1);
  EXPECT_EQ(p.scale_map.block_stride, 6 * D);
}

TEST(Plan, NthRowOfInvertsTheMap) {
  const TensorRef x = T({2, 3, 2, 4});
  const TensorRef mods[] = {T({3, 1, 4}), T({2, 1, 1, 4}), T({4}), T({2, 3, 2, 4}), T({1, 2, 4})};
  for (const TensorRef& m : mods) {
    const RowMap map = plan_forward(x, nullptr, &m, nullptr, {}).scale_map;
    std::vector<int> seen(12, 0);
    for (int64_t g = 0; g < map.distinct_rows; ++g) {
      int64_t prev = -1;
      for (int64_t k = 0; k < map.rows_per_distinct; ++k) {
        const int64_t r = map.nth_row_of(g, k);
        ASSERT_GE(r, 0);
        ASSERT_LT(r, 12);
        EXPECT_EQ(map.grad_row(r), g);
        EXPECT_GT(r, prev);
        prev = r;
        ++seen[r];
      }
    }
    for (int c : seen) EXPECT_EQ(c, 1);
  }
}

TEST(Plan, ShiftMayDifferFromScale) {
  const TensorRef x = T({2, 3, 4}), s = T({2, 4}), h = T({2, 3, 4});
  const ForwardPlan p = plan_forward(x, nullptr, &s, &h, {});
  EXPECT_EQ(p.scale_map.distinct_rows, 2);
  EXPECT_EQ(p.shift_map.distinct_rows, 6);
}

TEST(Plan, Errors) {
  const TensorRef x = T({2, 3, 4});
  const TensorRef good_s = T({2, 4});
  expect_error([&] { TensorRef w = T({5}); plan_forward(x, &w, nullptr, nullptr, {}); }, "weight");
  expect_error([&] { TensorRef s = T({5, 4}); plan_forward(x, nullptr, &s, nullptr, {}); }, "scale");
  expect_error([&] { TensorRef s = T({2, 3}); plan_forward(x, nullptr, &s, nullptr, {}); }, "scale");
  expect_error([&] { TensorRef h = T({7, 4}); plan_forward(x, nullptr, &good_s, &h, {}); }, "shift");
  expect_error([&] { TensorRef h = T({2, 4}); plan_forward(x, nullptr, nullptr, &h, {}); }, "shift");
  for (double eps : {-1e-6, std::nan(""), std::numeric_limits<double>::infinity()}) {
    Options o;
    o.eps = eps;
    expect_error([&] { plan_forward(x, nullptr, nullptr, nullptr, o); }, "eps");
  }
  expect_error([&] { parse_casting_mode("fp32"); }, "casting_mode");
  expect_error([&] {
    TensorRef s = good_s;
    s.device = {DeviceType::kCUDA, 0};
    plan_forward(x, nullptr, &s, nullptr, {});
  }, "scale");
  expect_error([&] {
    TensorRef w = T({4});
    w.dtype = static_cast<DType>(9);
    plan_forward(x, &w, nullptr, nullptr, {});
  }, "weight");
  expect_error([&] {
    TensorRef xs = make_strided_tensor(kMem, DType::kFloat32, {2, 3, 4}, {12, 1, 3});
    plan_forward(xs, nullptr, nullptr, nullptr, {});
  }, "x");
  expect_error([&] {
    TensorRef s = make_strided_tensor(kMem, DType::kFloat32, {2, 4}, {1, 2});
    plan_forward(x, nullptr, &s, nullptr, {});
  }, "scale");
  expect_error([&] {
    TensorRef xs = make_strided_tensor(kMem, DType::kFloat32, {2, 3, 4}, {4, 8, 1});
    plan_forward(xs, nullptr, nullptr, nullptr, {});
  }, "x");
}

TEST(Plan, UniformRowsAcceptsSlices) {
  // x[:, :, :4] of a (2, 3, 8) tensor: rows 8 apart, read in place.
  const TensorRef xs = make_strided_tensor(kMem, DType::kFloat32, {2, 3, 4}, {24, 8, 1});
  EXPECT_TRUE(rows_are_uniform(xs));
  EXPECT_EQ(plan_forward(xs, nullptr, nullptr, nullptr, {}).x_row_stride, 8);
}

TEST(Plan, BackwardChecks) {
  const TensorRef x = T({2, 3, 4});
  const ForwardPlan p = plan_forward(x, nullptr, nullptr, nullptr, {});
  expect_error([&] { plan_backward(p, T({2, 3, 5}), {}); }, "dy");
  expect_error([&] { plan_backward(p, T({2, 3, 4}, DType::kBFloat16), {}); }, "dy");
  GradMask m;
  m.dweight = true;
  expect_error([&] { plan_backward(p, T({2, 3, 4}), m); }, "weight");
}
