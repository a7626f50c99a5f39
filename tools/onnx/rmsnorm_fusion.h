// The graph rewrite behind `modnorm-onnx`: finds decomposed RMSNorm subgraphs (and an existing
// RMSNormalization followed by a modulation) and replaces each with one node.
//
// Fused node kinds (all but RMSNormalization live in the "ai.modnorm" domain, version 1, and come with
// a model-local FunctionProto written in the model's own ai.onnx opset, so a runtime that inlines
// functions runs the rewritten model as is; a runtime that knows the op can run it as one kernel):
//
//   RMSNorm(X)                                          y = X / sqrt(mean(X^2, -1) + epsilon)
//   RMSNormAffine(X, gamma)                             y = norm(X) * gamma
//   ModulatedRMSNorm(X, scale)                          y = norm(X) * (scale_offset + scale)
//   ModulatedRMSNormShift(X, scale, shift)              y = norm(X) * (scale_offset + scale) + shift
//   ModulatedRMSNormAffine(X, gamma, scale)             y = norm(X) * gamma * (scale_offset + scale)
//   ModulatedRMSNormAffineShift(X, gamma, scale, shift) y = norm(X) * gamma * (scale_offset + scale) + shift
//
// Each of these also has a "...Cast" kind (RMSNormAffineCast, ModulatedRMSNormAffineShiftCast, ...)
// for sites with a Cast right after the norm (the HF Llama arrangement: norm in float32, gamma and the
// modulation in float16): the norm is converted to the int attribute norm_type (an onnx
// TensorProto.DataType) before the products that follow.
//
// One op per input list (and Cast) because an ONNX function body cannot test whether an optional
// input was given, and an identity Cast would trip onnxruntime 1.23 on float16. Attributes: epsilon
// (float), scale_offset (float, modulated kinds), norm_type (int, *Cast kinds). The norm is computed in
// X's element type; a Cast in front of the norm stays in front of the fused node, so X is the tensor the
// original norm computed on. With opset >= 23 a plain norm becomes the standard RMSNormalization when
// that is exactly equivalent (float32 X, no Cast inside the site, a (D,) gamma or a known D).
#pragma once

#include <string>
#include <vector>

#include "onnx-ml.pb.h"

namespace modnorm_onnx {

inline constexpr const char* kDomain = "ai.modnorm";
inline constexpr int kDomainVersion = 1;

struct SiteReport {
  std::string anchor;       // name of the node the site was found from (ReduceMean or RMSNormalization)
  std::string pattern;      // what was recognised, e.g. "Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul"
  bool fused = false;
  std::string replacement;  // op type written, when fused
  std::string details;      // eps, scale_offset, nodes replaced (fused) or the reason (skipped)
};

struct FusionReport {
  int64_t opset = 0;
  int nodes_before = 0;
  int nodes_after = 0;
  std::vector<SiteReport> sites;
  int fused_count() const;
  int skipped_count() const;
};

struct FusionOptions {
  // Fold an existing RMSNormalization followed by a modulation into ModulatedRMSNorm* (opset >= 23).
  bool fold_rmsnormalization = true;
};

// Rewrites `model` in place (main graph only; subgraph bodies and functions are left as they are)
// and returns what it found. Never throws for well-formed protos; sites it cannot prove equivalent
// are reported as skipped and left untouched.
FusionReport fuse_rmsnorm(onnx::ModelProto& model, const FusionOptions& options = {});

// Human-readable report, one line per site plus a summary line.
std::string format_report(const FusionReport& report);

// Builds the model-local function for one fused op kind in the given ai.onnx opset (>= 15).
onnx::FunctionProto make_function(const std::string& op_type, int64_t opset);

}  // namespace modnorm_onnx
