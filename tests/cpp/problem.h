// Test cases shared by the CPU and CUDA backend tests: a case (dtypes, shape, broadcast rule,
// operands), its fresh random inputs on the host, the core's plan for them, and the check of a
// backend's outputs against the float64 reference.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "reference.h"

namespace modnorm_test {

enum class Kind { kShared, kPerSample, kPerToken, kTokenShared, kPerFrame, kGroups, kChunk };

struct Case {
  modnorm::DType xt = modnorm::DType::kFloat32, wt = modnorm::DType::kFloat32,
                 st = modnorm::DType::kFloat32, ht = modnorm::DType::kFloat32;
  modnorm::CastingMode mode = modnorm::CastingMode::kLlama;
  int64_t B = 2, T = 6, D = 64;
  bool weight = true, scale = true, shift = true;
  Kind kind = Kind::kPerSample;
  double offset = 0.0, scale_offset = 1.0;

  int64_t rows() const { return B * T; }
};

std::string describe(const Case& c);

// Relative error a result in dtype t may have against the float64 reference.
double tolerance(modnorm::DType t);

// One modulation tensor of a case: its memory, its view and the reference's row mapping.
struct Modulation {
  Buffer buf;
  modnorm::TensorRef view;
  RowOffset offset;                      // x row -> element offset in buf
  std::function<int64_t(int64_t)> grad;  // gradient row -> element offset in buf
  int64_t grad_rows = 0;
};

struct Outputs {
  Buffer y, dx, dw, ds, dh;
  std::vector<float> rstd;
};

struct Problem {
  Case c;
  Buffer x, w, dy;
  Modulation s, h;
  modnorm::Options options;
  modnorm::ForwardPlan fwd;  // over the host buffers

  explicit Problem(const Case& cs);

  // x's view (its shape depends on the broadcast rule) over `data` on `device`.
  modnorm::TensorRef x_view(void* data, modnorm::Device device = {}) const;
  modnorm::GradMask mask() const { return {true, c.weight, c.scale, c.shift}; }
  // Output buffers of the case's shapes, poisoned (NaN) so that unwritten elements show.
  Outputs poisoned_outputs() const;

  // Forward and backward on the CPU backend (in place: dx written over a copy of dy).
  Outputs run(bool in_place = false);
  // Every output against the float64 reference.
  void check(const Outputs& o) const;
};

void run_and_check(const Case& c);

bool bitwise_equal(const Buffer& a, const Buffer& b);

}  // namespace modnorm_test
