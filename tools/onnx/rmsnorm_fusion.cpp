#include "rmsnorm_fusion.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>
#include <set>
#include <sstream>

#include "onnx_graph.h"

namespace modnorm_onnx {
namespace {

// The fused bodies use CastLike (opset 15) so one body serves every element type.
constexpr int64_t kMinimumOpset = 15;
// ReduceMean takes its axes as an input from opset 18 on.
constexpr int64_t kReduceAxesAsInputOpset = 18;
// RMSNormalization joined ai.onnx in opset 23.
constexpr int64_t kRMSNormalizationOpset = 23;
// Model-local functions need IR version 8.
constexpr int64_t kFunctionsIrVersion = 8;

bool is_default_domain(const onnx::NodeProto& node) {
  return node.domain().empty() || node.domain() == "ai.onnx";
}

bool is_op(const onnx::NodeProto& node, const char* op_type) {
  return is_default_domain(node) && node.op_type() == op_type;
}

std::string describe_node(const onnx::NodeProto& node) {
  if (!node.name().empty()) return node.name();
  return node.op_type() + " -> " + (node.output_size() ? node.output(0) : std::string("?"));
}

std::string format_number(double value) {
  std::ostringstream out;
  out.precision(7);  // the attribute is a float: 7 digits show it without float noise
  out << value;
  return out.str();
}

std::string format_dims(const std::vector<int64_t>& dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + "]";
}

// A constant holding exactly one value (any shape whose element count is 1).
std::optional<double> single_constant_value(const GraphIndex& index, const std::string& tensor) {
  auto value = index.constant(tensor);
  if (!value || !value->values_known || value->values.size() != 1) return std::nullopt;
  return value->values[0];
}

// Where a matched site ends and what it computes.
struct SiteMatch {
  std::vector<int> nodes;  // every node the fused node replaces
  std::string x;           // the normalised input (in the norm's compute type)
  std::string gamma;       // per-channel constant, or empty
  std::string scale;       // modulation input, or empty
  std::string shift;       // added after the modulation, or empty
  std::string output;      // the tensor the fused node produces (the site's last output)
  double epsilon = 0.0;
  double scale_offset = 0.0;
  bool has_inner_cast = false;
  int32_t norm_type = 0;  // element type the norm is converted to before gamma/modulation; 0 = unknown
  std::string pattern;
  std::vector<int64_t> gamma_dims;
};

struct MatchFailure {
  std::string reason;
};

class SiteMatcher {
 public:
  SiteMatcher(const GraphIndex& index, int64_t opset) : index_(index), opset_(opset) {}

  // Returns true when `reduce_mean` starts from a power of something (x^2, x*x, x^k): those are the
  // RMSNorm candidates worth reporting; other ReduceMeans are not sites at all.
  bool is_candidate(int reduce_mean) const {
    const int square = index_.producer(index_.node(reduce_mean).input(0));
    if (square < 0) return false;
    const auto& node = index_.node(square);
    return is_op(node, "Pow") || (is_op(node, "Mul") && node.input_size() == 2 && node.input(0) == node.input(1));
  }

  // Matches the norm itself: x^2 -> ReduceMean(last axis) -> + eps -> 1/sqrt -> * x.
  bool match_norm(int reduce_mean, SiteMatch& match, MatchFailure& failure) const {
    const auto& reduce = index_.node(reduce_mean);
    const int square = index_.producer(reduce.input(0));
    const auto& square_node = index_.node(square);
    if (is_op(square_node, "Pow")) {
      auto exponent = single_constant_value(index_, square_node.input(1));
      if (!exponent) return fail(failure, "the Pow exponent is not a constant");
      if (*exponent != 2.0) return fail(failure, "the Pow exponent is " + format_number(*exponent) + ", not 2");
      match.pattern = "Pow(x, 2)";
    } else {
      match.pattern = "Mul(x, x)";
    }
    match.x = square_node.input(0);
    if (is_layer_norm_centring(match.x)) return fail(failure, "x is centred (x - mean(x)): a decomposed LayerNorm");
    if (index_.use_count(reduce.input(0)) != 1) return fail(failure, "x^2 has other consumers");
    match.nodes = {square, reduce_mean};

    if (!match_last_axis_reduction(reduce, match.x, failure)) return false;
    match.pattern += " -> ReduceMean";

    // + eps
    const std::string mean = reduce.output(0);
    int add_eps = sole_consumer(mean);
    if (add_eps < 0) return fail(failure, "the mean has other consumers");
    const auto& add_node = index_.node(add_eps);
    if (!is_op(add_node, "Add")) return fail(failure, "the mean feeds " + add_node.op_type() + ", not Add(eps)");
    const std::string eps_tensor = add_node.input(0) == mean ? add_node.input(1) : add_node.input(0);
    auto eps = index_.constant(eps_tensor);
    if (!eps) return fail(failure, "eps is not a constant");
    if (!eps->values_known) return fail(failure, "eps is stored as external data");
    if (eps->values.size() != 1) return fail(failure, "eps has " + std::to_string(eps->values.size()) + " values, not one");
    if (!std::isfinite(eps->values[0]) || eps->values[0] < 0) return fail(failure, "eps " + format_number(eps->values[0]) + " is negative or not finite");
    const auto x_rank = index_.rank(match.x);
    if (eps->dims.size() > 1 && (!x_rank || static_cast<int64_t>(eps->dims.size()) > *x_rank))
      return fail(failure, "eps has rank " + std::to_string(eps->dims.size()) + ", which could broadcast the result");
    match.epsilon = eps->values[0];
    match.nodes.push_back(add_eps);
    match.pattern += " -> Add(eps)";

    // 1/sqrt(.), or x / sqrt(.)
    const std::string variance = add_node.output(0);
    int after_variance = sole_consumer(variance);
    if (after_variance < 0) return fail(failure, "mean + eps has other consumers");
    const auto& variance_user = index_.node(after_variance);
    match.nodes.push_back(after_variance);
    std::string inverse_std;
    if (is_op(variance_user, "Pow")) {
      auto exponent = single_constant_value(index_, variance_user.input(1));
      if (!exponent || *exponent != -0.5) return fail(failure, "the variance is raised to a power other than -0.5");
      inverse_std = variance_user.output(0);
      match.pattern += " -> Pow(-0.5)";
    } else if (is_op(variance_user, "Sqrt")) {
      const std::string std_dev = variance_user.output(0);
      int after_sqrt = sole_consumer(std_dev);
      if (after_sqrt < 0) return fail(failure, "sqrt(mean + eps) has other consumers");
      const auto& sqrt_user = index_.node(after_sqrt);
      match.nodes.push_back(after_sqrt);
      if (is_op(sqrt_user, "Reciprocal")) {
        inverse_std = sqrt_user.output(0);
        match.pattern += " -> Sqrt -> Reciprocal";
      } else if (is_op(sqrt_user, "Pow") && sqrt_user.input(0) == std_dev) {
        auto exponent = single_constant_value(index_, sqrt_user.input(1));
        if (!exponent || *exponent != -1.0) return fail(failure, "sqrt(mean + eps) is raised to a power other than -1");
        inverse_std = sqrt_user.output(0);
        match.pattern += " -> Sqrt -> Pow(-1)";
      } else if (is_op(sqrt_user, "Div") && sqrt_user.input(1) == std_dev) {
        if (sqrt_user.input(0) == match.x) {
          match.output = sqrt_user.output(0);
          match.pattern += " -> Sqrt -> Div(x, sqrt)";
          return true;
        }
        auto numerator = single_constant_value(index_, sqrt_user.input(0));
        if (!numerator || *numerator != 1.0) return fail(failure, "sqrt(mean + eps) divides something other than 1 or x");
        inverse_std = sqrt_user.output(0);
        match.pattern += " -> Sqrt -> Div(1, sqrt)";
      } else {
        return fail(failure, "sqrt(mean + eps) feeds " + sqrt_user.op_type() + ", not an inverse");
      }
    } else {
      return fail(failure, "mean + eps feeds " + variance_user.op_type() + ", not Sqrt or Pow(-0.5)");
    }

    // * x
    int multiply = sole_consumer(inverse_std);
    if (multiply < 0) return fail(failure, "1/sqrt(mean + eps) has other consumers");
    const auto& multiply_node = index_.node(multiply);
    const bool multiplies_x = is_op(multiply_node, "Mul") &&
        ((multiply_node.input(0) == match.x && multiply_node.input(1) == inverse_std) ||
         (multiply_node.input(1) == match.x && multiply_node.input(0) == inverse_std));
    if (!multiplies_x) return fail(failure, "1/sqrt(mean + eps) is not multiplied by x");
    match.nodes.push_back(multiply);
    match.output = multiply_node.output(0);
    match.pattern += " -> Mul(x)";
    return true;
  }

  // Extends a matched norm over what follows it: [Cast] [Mul(gamma)] [Mul(scale) [Add(shift)]].
  // Stops at the first node it cannot take, so the fused node always ends at a tensor nobody else reads
  // in the middle. Returns false (and a reason) only for a constant factor that is not per-channel.
  bool extend_tail(SiteMatch& match, bool allow_gamma, MatchFailure& failure) const {
    if (allow_gamma) {
      auto cast_then = peel_cast(match.output);
      int multiply = cast_then.second;
      if (multiply >= 0 && is_op(index_.node(multiply), "Mul")) {
        const auto& node = index_.node(multiply);
        const std::string& input = cast_then.first;
        const std::string other = node.input(0) == input ? node.input(1) : node.input(0);
        if (auto gamma = index_.constant(other)) {
          if (!is_per_channel(gamma->dims, match.x))
            return fail(failure, "the constant factor after the norm has shape " + format_dims(gamma->dims) + ", not per-channel");
          take_cast(match, input);
          match.gamma = other;
          match.gamma_dims = gamma->dims;
          match.nodes.push_back(multiply);
          match.output = node.output(0);
          match.pattern += " -> Mul(gamma)";
        }
      }
    }
    // A Cast is taken only right after the norm: the fused body converts once, before any product.
    auto cast_then = match.gamma.empty() ? peel_cast(match.output) : std::make_pair(match.output, sole_consumer(match.output));
    int multiply = cast_then.second;
    if (multiply < 0 || !is_op(index_.node(multiply), "Mul")) return true;
    const auto& node = index_.node(multiply);
    const std::string& input = cast_then.first;
    const std::string factor = node.input(0) == input ? node.input(1) : node.input(0);
    if (factor == input || index_.is_constant(factor)) return true;  // x*x or a second constant: not a modulation
    take_cast(match, input);
    match.nodes.push_back(multiply);
    match.output = node.output(0);
    match.scale = factor;
    match.scale_offset = 0.0;
    match.pattern += " -> Mul(scale)";
    // (1 + scale) computed just for this product folds into scale_offset = 1.
    const int add_one = index_.producer(factor);
    if (add_one >= 0 && index_.use_count(factor) == 1 && is_op(index_.node(add_one), "Add")) {
      const auto& add_node = index_.node(add_one);
      for (int side = 0; side < 2; ++side) {
        auto one = index_.constant(add_node.input(side));
        auto other = add_node.input(1 - side);
        if (one && one->values_known && one->values.size() == 1 && one->values[0] == 1.0 &&
            one->dims.size() <= 1 && !index_.is_constant(other)) {
          match.scale = other;
          match.scale_offset = 1.0;
          match.nodes.push_back(add_one);
          match.pattern.replace(match.pattern.size() - std::string("Mul(scale)").size(), std::string::npos,
                                "Mul(1 + scale)");
          break;
        }
      }
    }
    int add_shift = sole_consumer(match.output);
    if (add_shift >= 0 && is_op(index_.node(add_shift), "Add")) {
      const auto& add_node = index_.node(add_shift);
      const std::string shift = add_node.input(0) == match.output ? add_node.input(1) : add_node.input(0);
      if (shift != match.output) {
        match.shift = shift;
        match.nodes.push_back(add_shift);
        match.output = add_node.output(0);
        match.pattern += " -> Add(shift)";
      }
    }
    return true;
  }

  // Matches RMSNormalization(X, scale) as the start of a site (for folding a modulation into it).
  bool match_rmsnormalization(int node_index, SiteMatch& match, MatchFailure& failure) const {
    const auto& node = index_.node(node_index);
    match.x = node.input(0);
    match.pattern = "RMSNormalization";
    match.nodes = {node_index};
    match.output = node.output(0);
    match.epsilon = 1e-5;  // the operator's default
    if (const auto* epsilon = find_attribute(node, "epsilon")) match.epsilon = epsilon->f();
    const int64_t axis = int_attribute(node, "axis").value_or(-1);
    const auto rank = index_.rank(match.x);
    if (axis != -1 && !(rank && axis == *rank - 1))
      return fail(failure, "RMSNormalization normalises from axis " + std::to_string(axis) + ", not the last axis only");
    const int64_t stash_type = int_attribute(node, "stash_type").value_or(onnx::TensorProto::FLOAT);
    const int32_t x_type = index_.element_type(match.x);
    if (x_type != stash_type)
      return fail(failure, "RMSNormalization computes in another type (stash_type) than its input's");
    if (node.output_size() > 1) {
      for (int i = 1; i < node.output_size(); ++i)
        if (!node.output(i).empty() && index_.use_count(node.output(i)) > 0)
          return fail(failure, "RMSNormalization's inverse std output is used");
    }
    if (node.input_size() < 2 || node.input(1).empty()) return true;
    auto weight = index_.constant(node.input(1));
    if (!weight) return fail(failure, "RMSNormalization's scale is not a constant");
    const bool all_ones = weight->values_known &&
        std::all_of(weight->values.begin(), weight->values.end(), [](double v) { return v == 1.0; });
    if (all_ones) return true;  // exporters write weight=None as a ones tensor: no gamma
    if (!is_per_channel(weight->dims, match.x))
      return fail(failure, "RMSNormalization's scale has shape " + format_dims(weight->dims) + ", not per-channel");
    match.gamma = node.input(1);
    match.gamma_dims = weight->dims;
    return true;
  }

 private:
  static bool fail(MatchFailure& failure, std::string reason) {
    failure.reason = std::move(reason);
    return false;
  }

  // The single node reading `tensor`, or -1 when it has several readers, none, or is a graph output.
  int sole_consumer(const std::string& tensor) const {
    if (index_.use_count(tensor) != 1) return -1;
    const auto& consumers = index_.consumer_nodes(tensor);
    return consumers.size() == 1 ? consumers[0] : -1;
  }

  // Steps over one Cast after `tensor` if there is one: returns the tensor the next op reads and that op.
  std::pair<std::string, int> peel_cast(const std::string& tensor) const {
    int next = sole_consumer(tensor);
    if (next < 0) return {tensor, -1};
    if (is_op(index_.node(next), "Cast") && opset_ >= kMinimumOpset) {
      const std::string cast_output = index_.node(next).output(0);
      return {cast_output, sole_consumer(cast_output)};
    }
    return {tensor, next};
  }

  void take_cast(SiteMatch& match, const std::string& input) const {
    if (input == match.output) return;
    const int cast = index_.producer(input);
    match.nodes.push_back(cast);
    match.output = input;
    match.has_inner_cast = true;
    match.norm_type = static_cast<int32_t>(int_attribute(index_.node(cast), "to").value_or(0));
    match.pattern += " -> Cast";
  }

  bool match_last_axis_reduction(const onnx::NodeProto& reduce, const std::string& x, MatchFailure& failure) const {
    if (int_attribute(reduce, "keepdims").value_or(1) != 1) return fail(failure, "ReduceMean has keepdims=0");
    std::optional<std::vector<int64_t>> axes = ints_attribute(reduce, "axes");
    if (!axes && opset_ >= kReduceAxesAsInputOpset && reduce.input_size() >= 2 && !reduce.input(1).empty()) {
      auto axes_constant = index_.constant(reduce.input(1));
      if (!axes_constant || !axes_constant->values_known) return fail(failure, "ReduceMean's axes are not a constant");
      axes.emplace();
      for (double axis : axes_constant->values) axes->push_back(static_cast<int64_t>(axis));
    }
    if (!axes || axes->empty()) return fail(failure, "ReduceMean reduces over all axes");
    if (axes->size() != 1) return fail(failure, "ReduceMean reduces over axes " + format_dims(*axes) + ", not the last axis only");
    const int64_t axis = (*axes)[0];
    if (axis == -1) return true;
    const auto rank = index_.rank(x);
    if (!rank) return fail(failure, "ReduceMean reduces over axis " + std::to_string(axis) + " and x's rank is unknown");
    if (axis != *rank - 1)
      return fail(failure, "ReduceMean reduces over axis " + std::to_string(axis) + ", not the last axis " + std::to_string(*rank - 1));
    return true;
  }

  // gamma broadcasts over every axis but the last, and along the last matches x's channels, so the
  // product keeps x's shape.
  bool is_per_channel(const std::vector<int64_t>& dims, const std::string& x) const {
    if (dims.empty()) return false;
    for (size_t i = 0; i + 1 < dims.size(); ++i)
      if (dims[i] != 1) return false;
    const auto rank = index_.rank(x);
    if (rank ? static_cast<int64_t>(dims.size()) > *rank : dims.size() != 1) return false;
    const auto channels = index_.last_dim(x);
    if (channels) return dims.back() == *channels;
    return dims.back() > 1;
  }

  // LayerNorm decomposes as (x - mean(x)) normalised by its RMS: that is a LayerNorm site, not ours.
  bool is_layer_norm_centring(const std::string& x) const {
    const int sub = index_.producer(x);
    if (sub < 0 || !is_op(index_.node(sub), "Sub")) return false;
    const int mean = index_.producer(index_.node(sub).input(1));
    return mean >= 0 && is_op(index_.node(mean), "ReduceMean") &&
           index_.node(mean).input(0) == index_.node(sub).input(0);
  }

  const GraphIndex& index_;
  int64_t opset_;
};

std::string function_name(const SiteMatch& match) {
  std::string name = match.scale.empty() ? "RMSNorm" : "ModulatedRMSNorm";
  if (!match.gamma.empty()) name += "Affine";
  if (!match.shift.empty()) name += "Shift";
  if (match.has_inner_cast) name += "Cast";
  return name;
}

onnx::AttributeProto float_attribute(const std::string& name, double value) {
  onnx::AttributeProto attribute;
  attribute.set_name(name);
  attribute.set_type(onnx::AttributeProto::FLOAT);
  attribute.set_f(static_cast<float>(value));
  return attribute;
}

// Appends a node to a function body; inputs and output are function-local names.
onnx::NodeProto* add_body_node(onnx::FunctionProto& function, const std::string& op_type,
                               std::vector<std::string> inputs, const std::string& output) {
  auto* node = function.add_node();
  node->set_op_type(op_type);
  for (auto& input : inputs) node->add_input(input);
  node->add_output(output);
  return node;
}

// Constant(value_float = <the fused node's attribute>), then cast to `like`'s element type.
std::string attribute_constant_like(onnx::FunctionProto& function, const std::string& attribute_name,
                                    const std::string& like) {
  const std::string as_float = attribute_name + "_f32";
  auto* constant = add_body_node(function, "Constant", {}, as_float);
  auto* value = constant->add_attribute();
  value->set_name("value_float");
  value->set_type(onnx::AttributeProto::FLOAT);
  value->set_ref_attr_name(attribute_name);
  add_body_node(function, "CastLike", {as_float, like}, attribute_name + "_t");
  return attribute_name + "_t";
}

}  // namespace

int FusionReport::fused_count() const {
  return static_cast<int>(std::count_if(sites.begin(), sites.end(), [](const SiteReport& s) { return s.fused; }));
}

int FusionReport::skipped_count() const { return static_cast<int>(sites.size()) - fused_count(); }

onnx::FunctionProto make_function(const std::string& op_type, int64_t opset) {
  const bool modulated = op_type.rfind("ModulatedRMSNorm", 0) == 0;
  const bool affine = op_type.find("Affine") != std::string::npos;
  const bool shifted = op_type.find("Shift") != std::string::npos;
  const bool converted = op_type.size() > 4 && op_type.compare(op_type.size() - 4, 4, "Cast") == 0;
  onnx::FunctionProto function;
  function.set_name(op_type);
  function.set_domain(kDomain);
  function.set_doc_string(
      "modnorm: y = X / sqrt(mean(X^2, axis=-1) + epsilon)" + std::string(affine ? " * gamma" : "") +
      (modulated ? " * (scale_offset + scale)" : "") + (shifted ? " + shift" : "") + ", the norm in X's element type" +
      (converted ? ", then cast to norm_type." : "."));
  function.add_input("X");
  if (affine) function.add_input("gamma");
  if (modulated) function.add_input("scale");
  if (shifted) function.add_input("shift");
  function.add_output("Y");
  function.add_attribute("epsilon");
  if (converted) function.add_attribute("norm_type");
  if (modulated) function.add_attribute("scale_offset");
  auto* opset_import = function.add_opset_import();
  opset_import->set_domain("");
  opset_import->set_version(opset);

  add_body_node(function, "Mul", {"X", "X"}, "x_squared");
  onnx::NodeProto* reduce;
  if (opset >= kReduceAxesAsInputOpset) {
    auto* axes = add_body_node(function, "Constant", {}, "last_axis");
    auto* value = axes->add_attribute();
    value->set_name("value_ints");
    value->set_type(onnx::AttributeProto::INTS);
    value->add_ints(-1);
    reduce = add_body_node(function, "ReduceMean", {"x_squared", "last_axis"}, "mean_square");
  } else {
    reduce = add_body_node(function, "ReduceMean", {"x_squared"}, "mean_square");
    auto* axes = reduce->add_attribute();
    axes->set_name("axes");
    axes->set_type(onnx::AttributeProto::INTS);
    axes->add_ints(-1);
  }
  auto* keepdims = reduce->add_attribute();
  keepdims->set_name("keepdims");
  keepdims->set_type(onnx::AttributeProto::INT);
  keepdims->set_i(1);
  const std::string epsilon = attribute_constant_like(function, "epsilon", "mean_square");
  add_body_node(function, "Add", {"mean_square", epsilon}, "variance");
  add_body_node(function, "Sqrt", {"variance"}, "std_dev");
  add_body_node(function, "Div", {"X", "std_dev"}, "normalized");
  // The *Cast kinds convert the norm once, to the type gamma, scale and shift share (Mul and Add require
  // one type). Kinds without a Cast have no conversion at all rather than an identity one: onnxruntime
  // 1.23 mis-types an identity Cast/CastLike on float16 after the casts it inserts around float16 ops.
  std::string current = "normalized";
  if (converted) {
    current = "normalized_converted";
    auto* convert = add_body_node(function, "Cast", {"normalized"}, current);
    auto* to = convert->add_attribute();
    to->set_name("to");
    to->set_type(onnx::AttributeProto::INT);
    to->set_ref_attr_name("norm_type");
  }
  if (affine) {
    add_body_node(function, "Mul", {current, "gamma"}, "affine");
    current = "affine";
  }
  if (modulated) {
    const std::string offset = attribute_constant_like(function, "scale_offset", "scale");
    add_body_node(function, "Add", {offset, "scale"}, "factor");
    add_body_node(function, "Mul", {current, "factor"}, "modulated");
    current = "modulated";
  }
  if (shifted) {
    add_body_node(function, "Add", {current, "shift"}, "Y");
  } else {
    function.mutable_node(function.node_size() - 1)->set_output(0, "Y");
  }
  return function;
}

namespace {

struct PlannedSite {
  SiteMatch match;
  std::vector<onnx::NodeProto> replacement;  // emitted where the site's last node was
  std::vector<onnx::TensorProto> new_initializers;
  std::string function;                      // model-local function it needs, or empty
};

// Decides what replaces a matched site. Returns false with a reason when nothing exactly equivalent
// can be written for this model.
bool plan_replacement(const GraphIndex& index, const SiteMatch& match, int64_t opset, int site_number,
                      PlannedSite& plan, std::string& reason) {
  const std::string node_name = "modnorm_fused_" + std::to_string(site_number);
  onnx::NodeProto fused;
  fused.set_name(node_name);
  fused.add_output(match.output);

  const bool plain = match.scale.empty();
  const bool float_input = index.element_type(match.x) == onnx::TensorProto::FLOAT;
  const auto channels = index.last_dim(match.x);
  const bool gamma_is_vector = match.gamma.empty() || match.gamma_dims.size() == 1;
  if (plain && opset >= kRMSNormalizationOpset && float_input && !match.has_inner_cast && gamma_is_vector &&
      (!match.gamma.empty() || channels)) {
    fused.set_op_type("RMSNormalization");
    fused.add_input(match.x);
    if (match.gamma.empty()) {
      // RMSNormalization requires a scale: a ones vector is exact in float32.
      onnx::TensorProto ones;
      ones.set_name(node_name + "_ones");
      ones.set_data_type(onnx::TensorProto::FLOAT);
      ones.add_dims(*channels);
      for (int64_t i = 0; i < *channels; ++i) ones.add_float_data(1.0f);
      fused.add_input(ones.name());
      plan.new_initializers.push_back(ones);
    } else {
      fused.add_input(match.gamma);
    }
    *fused.add_attribute() = float_attribute("epsilon", match.epsilon);
    auto* axis = fused.add_attribute();
    axis->set_name("axis");
    axis->set_type(onnx::AttributeProto::INT);
    axis->set_i(-1);
    plan.replacement.push_back(fused);
    return true;
  }
  if (opset < kMinimumOpset) {
    reason = "model opset " + std::to_string(opset) + " < 15: the fused node's function needs CastLike";
    return false;
  }
  plan.function = function_name(match);
  fused.set_op_type(plan.function);
  fused.set_domain(kDomain);
  fused.add_input(match.x);
  if (!match.gamma.empty()) fused.add_input(match.gamma);
  if (!match.scale.empty()) fused.add_input(match.scale);
  if (!match.shift.empty()) fused.add_input(match.shift);
  *fused.add_attribute() = float_attribute("epsilon", match.epsilon);
  if (match.has_inner_cast) {
    auto* norm_type = fused.add_attribute();
    norm_type->set_name("norm_type");
    norm_type->set_type(onnx::AttributeProto::INT);
    norm_type->set_i(match.norm_type);
  }
  if (!plain) *fused.add_attribute() = float_attribute("scale_offset", match.scale_offset);
  plan.replacement.push_back(fused);
  return true;
}

// Tensors read anywhere in the graph (nodes, nested subgraphs, graph outputs).
std::set<std::string> tensors_read(const onnx::GraphProto& graph) {
  std::set<std::string> names;
  std::vector<const onnx::GraphProto*> pending = {&graph};
  while (!pending.empty()) {
    const auto* current = pending.back();
    pending.pop_back();
    for (const auto& node : current->node()) {
      for (const auto& input : node.input()) names.insert(input);
      for (const auto& attribute : node.attribute()) {
        if (attribute.has_g()) pending.push_back(&attribute.g());
        for (const auto& subgraph : attribute.graphs()) pending.push_back(&subgraph);
      }
    }
    for (const auto& output : current->output()) names.insert(output.name());
  }
  return names;
}

// Removes constants that only the replaced nodes used (eps, exponents, axes, the 1 of 1 + scale, a
// ones weight), repeating so that Cast-of-Constant chains go too. Only names the fusion released are
// considered, so constants the model simply never used are left as they were.
void remove_released_constants(onnx::GraphProto& graph, std::set<std::string> released) {
  std::set<std::string> graph_inputs;
  for (const auto& input : graph.input()) graph_inputs.insert(input.name());
  for (bool changed = true; changed;) {
    changed = false;
    const auto read = tensors_read(graph);
    auto* nodes = graph.mutable_node();
    for (int i = nodes->size() - 1; i >= 0; --i) {
      const auto& node = nodes->Get(i);
      const bool constant_like = is_default_domain(node) &&
          (node.op_type() == "Constant" || node.op_type() == "ConstantOfShape" || node.op_type() == "Cast" ||
           node.op_type() == "Identity");
      if (!constant_like || node.output_size() != 1 || !released.count(node.output(0)) || read.count(node.output(0)))
        continue;
      // Only remove a Cast/Identity whose input is itself a constant: otherwise it is real computation.
      if (node.op_type() == "Cast" || node.op_type() == "Identity") {
        GraphIndex index(graph);
        if (!index.is_constant(node.input(0))) continue;
      }
      for (const auto& input : node.input()) released.insert(input);
      nodes->DeleteSubrange(i, 1);
      changed = true;
    }
    auto* initializers = graph.mutable_initializer();
    for (int i = initializers->size() - 1; i >= 0; --i) {
      const auto& name = initializers->Get(i).name();
      if (released.count(name) && !read.count(name) && !graph_inputs.count(name)) {
        initializers->DeleteSubrange(i, 1);
        changed = true;
      }
    }
  }
}

}  // namespace

FusionReport fuse_rmsnorm(onnx::ModelProto& model, const FusionOptions& options) {
  FusionReport report;
  report.opset = default_opset(model);
  onnx::GraphProto& graph = *model.mutable_graph();
  report.nodes_before = graph.node_size();

  std::vector<PlannedSite> plans;
  {
    const GraphIndex index(graph);
    const SiteMatcher matcher(index, report.opset);
    std::set<int> claimed;
    for (int i = 0; i < graph.node_size(); ++i) {
      const auto& node = graph.node(i);
      SiteMatch match;
      MatchFailure failure;
      bool matched;
      if (is_op(node, "ReduceMean") && node.input_size() >= 1 && matcher.is_candidate(i)) {
        matched = matcher.match_norm(i, match, failure) && matcher.extend_tail(match, true, failure);
      } else if (is_op(node, "RMSNormalization") && options.fold_rmsnormalization && node.input_size() >= 1) {
        // A standard RMSNormalization is only a site when a modulation follows it: alone it already is
        // what this tool would write.
        SiteMatch probe;
        probe.x = node.input(0);
        probe.output = node.output(0);
        MatchFailure probe_failure;
        if (matcher.extend_tail(probe, true, probe_failure) && probe.scale.empty()) continue;
        matched = matcher.match_rmsnormalization(i, match, failure) &&
                  matcher.extend_tail(match, match.gamma.empty(), failure);
        if (matched && match.scale.empty()) continue;
      } else {
        continue;
      }
      SiteReport site;
      site.anchor = describe_node(node);
      site.pattern = match.pattern;
      if (!matched) {
        site.details = failure.reason;
        report.sites.push_back(site);
        continue;
      }
      bool overlaps = false;
      for (int n : match.nodes) overlaps |= claimed.count(n) > 0;
      PlannedSite plan;
      std::string reason;
      if (overlaps) {
        site.details = "overlaps a site fused before it";
      } else if (!plan_replacement(index, match, report.opset, static_cast<int>(plans.size()), plan, reason)) {
        site.details = reason;
      } else {
        claimed.insert(match.nodes.begin(), match.nodes.end());
        site.fused = true;
        site.replacement = plan.replacement.front().op_type();
        site.details = "epsilon=" + format_number(match.epsilon);
        if (!match.scale.empty()) site.details += ", scale_offset=" + format_number(match.scale_offset);
        site.details += "; " + std::to_string(match.nodes.size()) + " nodes -> 1";
        plan.match = std::move(match);
        plans.push_back(std::move(plan));
      }
      report.sites.push_back(site);
    }
  }
  if (plans.empty()) {
    report.nodes_after = graph.node_size();
    return report;
  }

  // Rebuild the node list: each fused node takes the place of its site's last node, where all of its
  // inputs are already computed, so the graph stays topologically sorted.
  std::map<int, const PlannedSite*> emit_at;
  std::set<int> removed;
  std::set<std::string> released;
  std::set<std::string> removed_outputs;
  for (const auto& plan : plans) {
    emit_at[*std::max_element(plan.match.nodes.begin(), plan.match.nodes.end())] = &plan;
    for (int n : plan.match.nodes) {
      removed.insert(n);
      for (const auto& input : graph.node(n).input()) released.insert(input);
      for (const auto& output : graph.node(n).output()) removed_outputs.insert(output);
    }
    removed_outputs.erase(plan.match.output);
  }
  google::protobuf::RepeatedPtrField<onnx::NodeProto> rebuilt;
  for (int i = 0; i < graph.node_size(); ++i) {
    if (!removed.count(i)) {
      *rebuilt.Add() = graph.node(i);
      continue;
    }
    auto it = emit_at.find(i);
    if (it == emit_at.end()) continue;
    for (const auto& node : it->second->replacement) *rebuilt.Add() = node;
  }
  graph.mutable_node()->Swap(&rebuilt);
  for (const auto& plan : plans)
    for (const auto& tensor : plan.new_initializers) *graph.add_initializer() = tensor;

  // Drop value_info for tensors that no longer exist.
  auto* value_info = graph.mutable_value_info();
  for (int i = value_info->size() - 1; i >= 0; --i)
    if (removed_outputs.count(value_info->Get(i).name())) value_info->DeleteSubrange(i, 1);
  remove_released_constants(graph, released);

  // Functions and the domain import the fused nodes need.
  std::set<std::string> functions;
  for (const auto& plan : plans)
    if (!plan.function.empty()) functions.insert(plan.function);
  if (!functions.empty()) {
    for (const auto& existing : model.functions())
      if (existing.domain() == kDomain) functions.erase(existing.name());
    for (const auto& name : functions) *model.add_functions() = make_function(name, report.opset);
    bool imports_domain = false;
    for (const auto& opset : model.opset_import()) imports_domain |= opset.domain() == kDomain;
    if (!imports_domain) {
      auto* opset = model.add_opset_import();
      opset->set_domain(kDomain);
      opset->set_version(kDomainVersion);
    }
    if (model.ir_version() < kFunctionsIrVersion) model.set_ir_version(kFunctionsIrVersion);
  }
  report.nodes_after = graph.node_size();
  return report;
}

std::string format_report(const FusionReport& report) {
  std::ostringstream out;
  for (size_t i = 0; i < report.sites.size(); ++i) {
    const auto& site = report.sites[i];
    out << "  site " << (i + 1) << " at " << site.anchor << ": " << site.pattern << "\n";
    if (site.fused) {
      out << "    fused -> " << site.replacement << " (" << site.details << ")\n";
    } else {
      out << "    skipped: " << site.details << "\n";
    }
  }
  out << report.sites.size() << " site(s) found, " << report.fused_count() << " fused, " << report.skipped_count()
      << " skipped; " << report.nodes_before << " nodes -> " << report.nodes_after << " (opset " << report.opset
      << ")\n";
  return out.str();
}

}  // namespace modnorm_onnx
