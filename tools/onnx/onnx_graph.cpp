#include "onnx_graph.h"

#include <cmath>
#include <cstring>
#include <set>

namespace modnorm_onnx {
namespace {

double half_bits_to_double(uint16_t bits) {
  const int sign = (bits >> 15) & 1;
  const int exponent = (bits >> 10) & 0x1f;
  const int mantissa = bits & 0x3ff;
  double magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<double>(mantissa), -24);
  } else if (exponent == 31) {
    magnitude = mantissa ? std::nan("") : INFINITY;
  } else {
    magnitude = std::ldexp(static_cast<double>(mantissa | 0x400), exponent - 25);
  }
  return sign ? -magnitude : magnitude;
}

double bfloat16_bits_to_double(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof value);
  return value;
}

template <typename T>
std::vector<double> decode_raw(const std::string& raw) {
  std::vector<double> values(raw.size() / sizeof(T));
  for (size_t i = 0; i < values.size(); ++i) {
    T element;
    std::memcpy(&element, raw.data() + i * sizeof(T), sizeof(T));
    values[i] = static_cast<double>(element);
  }
  return values;
}

std::vector<double> decode_raw_16bit(const std::string& raw, bool is_bfloat16) {
  std::vector<double> values(raw.size() / 2);
  for (size_t i = 0; i < values.size(); ++i) {
    uint16_t bits;
    std::memcpy(&bits, raw.data() + 2 * i, 2);
    values[i] = is_bfloat16 ? bfloat16_bits_to_double(bits) : half_bits_to_double(bits);
  }
  return values;
}

// A tensor's elements of storage type T: from raw_data when present, else from its typed field.
template <typename T, typename Field>
std::vector<double> decode_elements(const onnx::TensorProto& tensor, const Field& field) {
  if (tensor.has_raw_data()) return decode_raw<T>(tensor.raw_data());
  return std::vector<double>(field.begin(), field.end());
}

// Collects every tensor name a nested graph reads, so that outer-scope references from If/Loop/Scan
// bodies count as uses. Names the body defines itself are counted too: over-counting can only make
// the pass more cautious.
void collect_subgraph_reads(const onnx::GraphProto& graph, std::vector<std::string>& reads) {
  for (const auto& node : graph.node()) {
    for (const auto& input : node.input()) reads.push_back(input);
    for (const auto& attribute : node.attribute()) {
      if (attribute.has_g()) collect_subgraph_reads(attribute.g(), reads);
      for (const auto& subgraph : attribute.graphs()) collect_subgraph_reads(subgraph, reads);
    }
  }
  for (const auto& output : graph.output()) reads.push_back(output.name());
}

bool is_type_preserving(const std::string& op_type) {
  // Ops whose (first) output has the element type of their first input; enough to reach a declared
  // type from the usual producers of a DiT block's activations.
  static const std::set<std::string> ops = {
      "Mul", "Add", "Sub", "Div", "Sqrt", "Reciprocal", "Pow", "ReduceMean", "Identity", "Neg", "Abs",
      "RMSNormalization", "LayerNormalization", "MatMul", "Gemm", "Reshape", "Transpose", "Flatten",
      "Squeeze", "Unsqueeze", "Slice", "Split", "Gather", "Concat", "Expand", "Tile", "Softmax", "Relu",
      "Sigmoid", "Tanh", "Erf", "Gelu", "Dropout", "Max", "Min"};
  return ops.count(op_type) > 0;
}

}  // namespace

int64_t ConstantTensor::element_count() const {
  int64_t count = 1;
  for (int64_t dim : dims) count *= dim;
  return count;
}

std::optional<std::vector<double>> tensor_values_as_double(const onnx::TensorProto& tensor) {
  if (tensor.data_location() == onnx::TensorProto::EXTERNAL) return std::nullopt;
  switch (tensor.data_type()) {
    case onnx::TensorProto::FLOAT:
      return decode_elements<float>(tensor, tensor.float_data());
    case onnx::TensorProto::DOUBLE:
      return decode_elements<double>(tensor, tensor.double_data());
    case onnx::TensorProto::FLOAT16:
    case onnx::TensorProto::BFLOAT16: {
      const bool is_bfloat16 = tensor.data_type() == onnx::TensorProto::BFLOAT16;
      if (tensor.has_raw_data()) return decode_raw_16bit(tensor.raw_data(), is_bfloat16);
      std::vector<double> values;
      for (int32_t bits : tensor.int32_data()) {
        const auto bits16 = static_cast<uint16_t>(bits);
        values.push_back(is_bfloat16 ? bfloat16_bits_to_double(bits16) : half_bits_to_double(bits16));
      }
      return values;
    }
    case onnx::TensorProto::INT64:
      return decode_elements<int64_t>(tensor, tensor.int64_data());
    case onnx::TensorProto::INT32:
      return decode_elements<int32_t>(tensor, tensor.int32_data());
    case onnx::TensorProto::INT8:
      return decode_elements<int8_t>(tensor, tensor.int32_data());
    case onnx::TensorProto::UINT8:
      return decode_elements<uint8_t>(tensor, tensor.int32_data());
    default:
      return std::nullopt;
  }
}

const onnx::AttributeProto* find_attribute(const onnx::NodeProto& node, const std::string& name) {
  for (const auto& attribute : node.attribute()) {
    if (attribute.name() == name) return &attribute;
  }
  return nullptr;
}

std::optional<int64_t> int_attribute(const onnx::NodeProto& node, const std::string& name) {
  const auto* attribute = find_attribute(node, name);
  if (!attribute) return std::nullopt;
  return attribute->i();
}

std::optional<std::vector<int64_t>> ints_attribute(const onnx::NodeProto& node, const std::string& name) {
  const auto* attribute = find_attribute(node, name);
  if (!attribute) return std::nullopt;
  return std::vector<int64_t>(attribute->ints().begin(), attribute->ints().end());
}

int64_t default_opset(const onnx::ModelProto& model) {
  for (const auto& opset : model.opset_import()) {
    if (opset.domain().empty() || opset.domain() == "ai.onnx") return opset.version();
  }
  return 0;
}

GraphIndex::GraphIndex(const onnx::GraphProto& graph) : graph_(graph) {
  for (int i = 0; i < graph.node_size(); ++i) {
    const auto& node = graph.node(i);
    for (const auto& output : node.output()) {
      if (!output.empty()) producer_[output] = i;
    }
    for (const auto& input : node.input()) {
      if (input.empty()) continue;
      consumers_[input].push_back(i);
      ++use_count_[input];
    }
    std::vector<std::string> subgraph_reads;
    for (const auto& attribute : node.attribute()) {
      if (attribute.has_g()) collect_subgraph_reads(attribute.g(), subgraph_reads);
      for (const auto& subgraph : attribute.graphs()) collect_subgraph_reads(subgraph, subgraph_reads);
    }
    for (const auto& name : subgraph_reads) ++use_count_[name];
  }
  for (const auto& output : graph.output()) {
    graph_outputs_[output.name()] = true;
    ++use_count_[output.name()];
    declared_types_[output.name()] = &output.type();
  }
  for (const auto& input : graph.input()) {
    graph_inputs_[input.name()] = true;
    declared_types_[input.name()] = &input.type();
  }
  for (const auto& info : graph.value_info()) declared_types_.emplace(info.name(), &info.type());
  for (const auto& tensor : graph.initializer()) initializers_[tensor.name()] = &tensor;
}

int GraphIndex::producer(const std::string& tensor) const {
  auto it = producer_.find(tensor);
  return it == producer_.end() ? -1 : it->second;
}

int GraphIndex::use_count(const std::string& tensor) const {
  auto it = use_count_.find(tensor);
  return it == use_count_.end() ? 0 : it->second;
}

const std::vector<int>& GraphIndex::consumer_nodes(const std::string& tensor) const {
  static const std::vector<int> none;
  auto it = consumers_.find(tensor);
  return it == consumers_.end() ? none : it->second;
}

bool GraphIndex::is_graph_output(const std::string& tensor) const { return graph_outputs_.count(tensor) > 0; }

const onnx::TensorProto* GraphIndex::initializer(const std::string& tensor) const {
  auto it = initializers_.find(tensor);
  return it == initializers_.end() ? nullptr : it->second;
}

std::optional<ConstantTensor> GraphIndex::constant(const std::string& tensor) const {
  if (tensor.empty()) return std::nullopt;
  auto from_tensor_proto = [](const onnx::TensorProto& proto) {
    ConstantTensor result;
    result.dims.assign(proto.dims().begin(), proto.dims().end());
    result.data_type = proto.data_type();
    if (auto values = tensor_values_as_double(proto)) {
      result.values = std::move(*values);
      result.values_known = true;
    }
    return result;
  };
  if (const auto* init = initializer(tensor)) {
    // An initializer listed among the graph inputs is only a default: the caller may feed another value.
    if (graph_inputs_.count(tensor)) return std::nullopt;
    return from_tensor_proto(*init);
  }
  const int index = producer(tensor);
  if (index < 0) return std::nullopt;
  const auto& node = graph_.node(index);
  if (!node.domain().empty() && node.domain() != "ai.onnx") return std::nullopt;
  if (node.op_type() == "Constant") {
    for (const auto& attribute : node.attribute()) {
      ConstantTensor result;
      result.values_known = true;
      if (attribute.name() == "value") return from_tensor_proto(attribute.t());
      if (attribute.name() == "value_float") {
        result.data_type = onnx::TensorProto::FLOAT;
        result.values = {attribute.f()};
        return result;
      }
      if (attribute.name() == "value_floats") {
        result.data_type = onnx::TensorProto::FLOAT;
        result.values.assign(attribute.floats().begin(), attribute.floats().end());
        result.dims = {static_cast<int64_t>(result.values.size())};
        return result;
      }
      if (attribute.name() == "value_int") {
        result.data_type = onnx::TensorProto::INT64;
        result.values = {static_cast<double>(attribute.i())};
        return result;
      }
      if (attribute.name() == "value_ints") {
        result.data_type = onnx::TensorProto::INT64;
        for (int64_t v : attribute.ints()) result.values.push_back(static_cast<double>(v));
        result.dims = {static_cast<int64_t>(result.values.size())};
        return result;
      }
    }
    return std::nullopt;
  }
  if ((node.op_type() == "Cast" || node.op_type() == "Identity") && node.input_size() >= 1) {
    auto source = constant(node.input(0));
    if (!source) return std::nullopt;
    if (node.op_type() == "Cast") {
      source->data_type = static_cast<int32_t>(int_attribute(node, "to").value_or(0));
      // Narrowing casts round; the values we compare (2, -0.5, -1, 1) are exact in every float type,
      // and eps is re-rounded to the compute type inside the fused node, so the widened value is kept.
    }
    return source;
  }
  if (node.op_type() == "ConstantOfShape" && node.input_size() >= 1) {
    auto shape = constant(node.input(0));
    if (!shape || !shape->values_known) return std::nullopt;
    ConstantTensor result;
    for (double dim : shape->values) result.dims.push_back(static_cast<int64_t>(dim));
    double fill = 0.0;
    result.data_type = onnx::TensorProto::FLOAT;
    if (const auto* value = find_attribute(node, "value")) {
      auto fill_values = tensor_values_as_double(value->t());
      if (!fill_values || fill_values->size() != 1) return std::nullopt;
      fill = (*fill_values)[0];
      result.data_type = value->t().data_type();
    }
    // Materialise only small fills; for big ones the dims (and that it is a constant) are what matter.
    const int64_t count = result.element_count();
    result.values_known = count >= 0 && count <= (int64_t{1} << 20);
    if (result.values_known) result.values.assign(static_cast<size_t>(count), fill);
    return result;
  }
  return std::nullopt;
}

const onnx::TypeProto* GraphIndex::declared_type(const std::string& tensor) const {
  auto it = declared_types_.find(tensor);
  if (it == declared_types_.end() || !it->second->has_tensor_type()) return nullptr;
  return it->second;
}

int32_t GraphIndex::element_type(const std::string& tensor) const {
  // Bounded walk: graphs are acyclic, but a malformed one must not hang the tool.
  std::string current = tensor;
  for (int depth = 0; depth < 64 && !current.empty(); ++depth) {
    if (const auto* type = declared_type(current)) {
      if (type->tensor_type().elem_type() != 0) return type->tensor_type().elem_type();
    }
    if (const auto* init = initializer(current)) return init->data_type();
    const int index = producer(current);
    if (index < 0) return 0;
    const auto& node = graph_.node(index);
    if (node.op_type() == "Cast") return static_cast<int32_t>(int_attribute(node, "to").value_or(0));
    if (node.op_type() == "Constant") {
      auto value = constant(current);
      return value ? value->data_type : 0;
    }
    if (!is_type_preserving(node.op_type()) || node.input_size() == 0) return 0;
    // Binary ops require equal input types; prefer a non-constant operand, whose type a model states more often.
    current = node.input(0);
    if (node.input_size() > 1 && is_constant(current) && !is_constant(node.input(1))) current = node.input(1);
  }
  return 0;
}

std::optional<int64_t> GraphIndex::rank(const std::string& tensor) const {
  std::string current = tensor;
  for (int depth = 0; depth < 64; ++depth) {
    if (const auto* type = declared_type(current)) {
      if (type->tensor_type().has_shape()) return type->tensor_type().shape().dim_size();
    }
    if (const auto* init = initializer(current)) return init->dims_size();
    auto input = same_shape_input(current);
    if (!input) return std::nullopt;
    current = *input;
  }
  return std::nullopt;
}

std::optional<int64_t> GraphIndex::last_dim(const std::string& tensor) const {
  std::string current = tensor;
  for (int depth = 0; depth < 64; ++depth) {
    if (const auto* type = declared_type(current)) {
      const auto& shape = type->tensor_type().shape();
      if (type->tensor_type().has_shape() && shape.dim_size() > 0) {
        const auto& dim = shape.dim(shape.dim_size() - 1);
        if (dim.has_dim_value()) return dim.dim_value();
      }
    }
    auto input = same_shape_input(current);
    if (!input) return std::nullopt;
    current = *input;
  }
  return std::nullopt;
}

std::optional<std::string> GraphIndex::same_shape_input(const std::string& tensor) const {
  const int index = producer(tensor);
  if (index < 0) return std::nullopt;
  const auto& node = graph_.node(index);
  // Only ops that keep the shape exactly; broadcasting ops could change the rank.
  if (node.op_type() != "Cast" && node.op_type() != "Identity") return std::nullopt;
  return node.input(0);
}

}  // namespace modnorm_onnx
