// Calling modnorm's core from C++ on raw buffers, without PyTorch: a DiT block's
//   y = rms_norm(x) * (1 + scale) + shift
// with per-sample scale/shift taken as views of one (B, 1, 6*D) AdaLN projection, as the
// models' chunk(6) produces them, read in place. The program checks its own result against a
// direct evaluation and exits non-zero on a mismatch (ctest runs it).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "modnorm/modnorm.h"

int main() {
  const int64_t B = 2, T = 16, D = 64;
  std::mt19937 gen(std::random_device{}());
  std::normal_distribution<float> normal(0.f, 1.f);

  std::vector<float> x(B * T * D), proj(B * 6 * D);
  for (float& v : x) v = normal(gen);
  for (float& v : proj) v = 0.1f * normal(gen);

  using modnorm::DType;
  const modnorm::TensorRef xv = modnorm::make_tensor(x.data(), DType::kFloat32, {B, T, D});
  // shift = chunk 0, scale = chunk 1 of the projection: shape (B, 1, D), row stride 6*D.
  const modnorm::TensorRef shift = modnorm::make_strided_tensor(
      proj.data(), DType::kFloat32, {B, 1, D}, {6 * D, 6 * D, 1});
  const modnorm::TensorRef scale = modnorm::make_strided_tensor(
      proj.data() + D, DType::kFloat32, {B, 1, D}, {6 * D, 6 * D, 1});

  modnorm::Options options;  // eps 1e-6, (1 + scale), llama casting
  modnorm::ForwardPlan plan;
  try {
    plan = modnorm::plan_forward(xv, /*weight=*/nullptr, &scale, &shift, options);
  } catch (const modnorm::Error& e) {
    std::fprintf(stderr, "bad arguments: %s\n", e.what());
    return 1;
  }
  std::vector<float> y(B * T * D), rstd(B * T);
  modnorm::forward(plan, y.data(), rstd.data());

  double max_err = 0;
  for (int64_t r = 0; r < B * T; ++r) {
    const int64_t b = r / T;
    double ss = 0;
    for (int64_t j = 0; j < D; ++j) ss += double(x[r * D + j]) * x[r * D + j];
    const double rs = 1.0 / std::sqrt(ss / D + 1e-6);
    for (int64_t j = 0; j < D; ++j) {
      const double expect =
          x[r * D + j] * rs * (1.0 + proj[b * 6 * D + D + j]) + proj[b * 6 * D + j];
      max_err = std::fmax(max_err, std::fabs(expect - y[r * D + j]));
    }
  }
  std::printf("modnorm raw-buffer example: rows=%lld D=%lld max |error| = %.3g\n",
              static_cast<long long>(B * T), static_cast<long long>(D), max_err);
  return max_err < 1e-4 ? 0 : 1;
}
