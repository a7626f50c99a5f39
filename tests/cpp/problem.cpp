#include "problem.h"

#include <gtest/gtest.h>

#include <cmath>
#include <sstream>

using namespace modnorm;

namespace modnorm_test {

std::string describe(const Case& c) {
  std::ostringstream os;
  os << "x=" << dtype_name(c.xt) << " w=" << dtype_name(c.wt) << " s=" << dtype_name(c.st)
     << " h=" << dtype_name(c.ht) << " mode=" << static_cast<int>(c.mode) << " B=" << c.B
     << " T=" << c.T << " D=" << c.D << " weight=" << c.weight << " scale=" << c.scale
     << " shift=" << c.shift << " kind=" << static_cast<int>(c.kind);
  return os.str();
}

double tolerance(DType t) {
  switch (t) {
    case DType::kFloat32: return 2e-6;
    case DType::kFloat16: return 2e-3;
    case DType::kBFloat16: return 1.5e-2;
  }
  return 0;
}

namespace {

Modulation make_modulation(const Case& c, DType t) {
  const int64_t B = c.B, T = c.T, D = c.D;
  Modulation m;
  auto contiguous = [&](std::initializer_list<int64_t> shape, int64_t rows, RowOffset off) {
    m.buf = random_buffer(t, rows * D, 0.5);
    m.view = make_tensor(m.buf.data(), t, shape);
    m.offset = off;
    m.grad = [D](int64_t g) { return g * D; };
    m.grad_rows = rows;
  };
  switch (c.kind) {
    case Kind::kShared: contiguous({D}, 1, [](int64_t) { return 0; }); break;
    case Kind::kPerSample: contiguous({B, D}, B, [=](int64_t r) { return (r / T) * D; }); break;
    case Kind::kGroups: contiguous({B, D}, B, [=](int64_t r) { return (r / T) * D; }); break;
    case Kind::kPerToken: contiguous({B, T, D}, B * T, [=](int64_t r) { return r * D; }); break;
    case Kind::kTokenShared: contiguous({T, D}, T, [=](int64_t r) { return (r % T) * D; }); break;
    case Kind::kPerFrame:  // T = F * HW with HW = 2
      contiguous({B, T / 2, 1, D}, B * T / 2, [=](int64_t r) { return (r / 2) * D; });
      break;
    case Kind::kChunk: {  // chunk 1 of a (B, 1, 3*D) projection
      m.buf = random_buffer(t, B * 3 * D, 0.5);
      m.view = make_strided_tensor(static_cast<char*>(m.buf.data()) + D * dtype_size(t), t,
                                   {B, 1, D}, {3 * D, 3 * D, 1});
      m.offset = [=](int64_t r) { return (r / T) * 3 * D + D; };
      m.grad = [=](int64_t g) { return g * 3 * D + D; };
      m.grad_rows = B;
      break;
    }
  }
  return m;
}

}  // namespace

Problem::Problem(const Case& cs) : c(cs) {
  const int64_t rows = c.rows();
  x = random_buffer(c.xt, rows * c.D, 2.0);
  dy = random_buffer(c.xt, rows * c.D, 1.0);
  if (c.weight) w = random_buffer(c.wt, c.D, 1.0);
  if (c.scale) s = make_modulation(c, c.st);
  if (c.shift) h = make_modulation(c, c.ht);
  const TensorRef wv = make_tensor(w.data(), c.wt, {c.D});
  options.casting_mode = c.mode;
  options.offset = c.offset;
  options.scale_offset = c.scale_offset;
  fwd = plan_forward(x_view(x.data()), c.weight ? &wv : nullptr, c.scale ? &s.view : nullptr,
                     c.shift ? &h.view : nullptr, options);
}

TensorRef Problem::x_view(void* data, Device device) const {
  switch (c.kind) {
    case Kind::kGroups: return make_tensor(data, c.xt, {c.B * c.T, c.D}, device);
    case Kind::kPerFrame: return make_tensor(data, c.xt, {c.B, c.T / 2, 2, c.D}, device);
    default: return make_tensor(data, c.xt, {c.B, c.T, c.D}, device);
  }
}

Outputs Problem::poisoned_outputs() const {
  Outputs o;
  (o.y = Buffer(c.xt, c.rows() * c.D)).poison();
  (o.dx = Buffer(c.xt, c.rows() * c.D)).poison();
  o.rstd.assign(c.rows(), std::nanf(""));
  if (c.weight) (o.dw = Buffer(c.wt, c.D)).poison();
  if (c.scale) (o.ds = Buffer(c.st, s.grad_rows * c.D)).poison();
  if (c.shift) (o.dh = Buffer(c.ht, h.grad_rows * c.D)).poison();
  return o;
}

Outputs Problem::run(bool in_place) {
  const int64_t rows = c.rows();
  Outputs o = poisoned_outputs();
  forward(fwd, o.y.data(), o.rstd.data());

  const BackwardPlan bp = plan_backward(fwd, make_tensor(dy.data(), c.xt, {rows, c.D}), mask());
  BackwardPlan bpi = bp;
  if (in_place) {
    o.dx = dy;  // dx written over (a copy of) dy
    bpi.dy = o.dx.data();
  }
  std::vector<uint8_t> ws(backward_workspace_bytes(bpi));
  Gradients g{o.dx.data(), c.weight ? o.dw.data() : nullptr, c.scale ? o.ds.data() : nullptr,
              c.shift ? o.dh.data() : nullptr};
  backward(bpi, o.rstd.data(), g, ws.data(), ws.size());
  return o;
}

void Problem::check(const Outputs& o) const {
  const Reference ref = reference(x, c.rows(), c.D, c.weight ? &w : nullptr,
                                  {c.scale ? &s.buf : nullptr, s.offset},
                                  {c.shift ? &h.buf : nullptr, h.offset}, dy, 1e-6, c.offset,
                                  c.scale_offset);
  const double tol = tolerance(c.xt);
  EXPECT_LT(rel_error(o.y, ref.y), tol) << describe(c);
  std::vector<double> rstd(o.rstd.begin(), o.rstd.end());
  EXPECT_LT(rel_error(rstd, ref.rstd), 1e-6) << describe(c);
  EXPECT_LT(rel_error(o.dx, ref.dx, ref.dx_terms_norm), 2 * tol) << describe(c);
  auto gathered = [&](const Modulation& m, const std::vector<double>& full) {
    std::vector<double> out;
    for (int64_t g = 0; g < m.grad_rows; ++g) {
      for (int64_t j = 0; j < c.D; ++j) out.push_back(full[m.grad(g) + j]);
    }
    return out;
  };
  // Gradients stored in their own dtypes add that dtype's rounding.
  if (c.weight) {
    EXPECT_LT(rel_error(o.dw, ref.dweight, ref.dweight_terms_norm), 2 * tol + tolerance(c.wt))
        << describe(c);
  }
  if (c.scale) {
    EXPECT_LT(rel_error(o.ds, gathered(s, ref.dscale), ref.dscale_terms_norm),
              2 * tol + tolerance(c.st))
        << describe(c);
  }
  if (c.shift) {
    EXPECT_LT(rel_error(o.dh, gathered(h, ref.dshift), ref.dshift_terms_norm),
              2 * tol + tolerance(c.ht))
        << describe(c);
  }
}

void run_and_check(const Case& c) {
  Problem p(c);
  p.check(p.run());
}

bool bitwise_equal(const Buffer& a, const Buffer& b) { return a.bytes == b.bytes; }

}  // namespace modnorm_test
