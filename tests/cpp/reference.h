// Test helpers: typed host buffers, fresh random data, and a float64 reference of the op that
// is independent of the core's RowMap (each test states which modulation row each x row reads).
#pragma once

#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include "modnorm/modnorm.h"

namespace modnorm_test {

// Host buffer of one dtype, stored as raw bytes.
struct Buffer {
  modnorm::DType dtype = modnorm::DType::kFloat32;
  std::vector<uint8_t> bytes;
  Buffer() = default;
  Buffer(modnorm::DType t, int64_t n) : dtype(t), bytes(n * modnorm::dtype_size(t)) {}
  int64_t size() const { return static_cast<int64_t>(bytes.size() / modnorm::dtype_size(dtype)); }
  void* data() { return bytes.data(); }
  double get(int64_t i) const;
  void set(int64_t i, double v);  // rounds to the dtype
  void poison();                  // NaN everywhere
};

// Fresh random values each run (seeded from std::random_device; printed on failure).
std::mt19937_64& rng();
Buffer random_buffer(modnorm::DType t, int64_t n, double scale = 1.0);

// Row r of x reads modulation elements [offset(r), offset(r) + D).
using RowOffset = std::function<int64_t(int64_t)>;

struct Mod {
  const Buffer* buf = nullptr;  // nullptr: absent
  RowOffset offset;
};

struct Reference {
  std::vector<double> y, rstd, dx, dweight;
  // Size of the terms dx is the difference of (rstd * dy * m * w): dx itself can be far smaller
  // (D = 1 makes it nearly zero), so its error is measured against this.
  double dx_terms_norm = 0;
  std::vector<double> dscale, dshift;  // indexed like the modulation buffer's elements
  // Likewise the terms each reduced gradient sums over rows (dy * m * xhat, dy * norm(x), dy):
  // random signs can cancel the sum to far less than its float32 rounding error grows with.
  double dweight_terms_norm = 0, dscale_terms_norm = 0, dshift_terms_norm = 0;
};

// Float64 evaluation of the formula (no intermediate rounding) and its gradients for dy.
Reference reference(const Buffer& x, int64_t rows, int64_t D, const Buffer* weight, Mod scale,
                    Mod shift, const Buffer& dy, double eps, double offset, double scale_offset);

// ||a - b|| / ||b|| over the listed elements.
// ||a - b|| / max(||b||, floor_norm) (||a - b|| when both are 0); NaN anywhere gives infinity.
double rel_error(const Buffer& a, const std::vector<double>& b, double floor_norm = 0);
double rel_error(const std::vector<double>& a, const std::vector<double>& b,
                 double floor_norm = 0);

}  // namespace modnorm_test
