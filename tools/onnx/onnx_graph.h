// Read-only index over an ONNX graph: who produces and who consumes each tensor, which tensors are
// constants (and their values), and what shape/dtype information the model itself declares.
// The fusion pass asks these questions many times per site, so they are answered from maps built once.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "onnx-ml.pb.h"

namespace modnorm_onnx {

// A constant's element values widened to double (enough for eps, exponents, the 1 of (1 + scale)),
// with its declared dims. `values` is empty when only the dims are known (external data).
struct ConstantTensor {
  std::vector<int64_t> dims;
  std::vector<double> values;
  int32_t data_type = 0;
  bool values_known = false;
  int64_t element_count() const;
};

// Decodes a TensorProto's elements as doubles; nullopt for element types we don't read (strings,
// 4-bit, complex) and for tensors whose data lives in an external file.
std::optional<std::vector<double>> tensor_values_as_double(const onnx::TensorProto& tensor);

class GraphIndex {
 public:
  explicit GraphIndex(const onnx::GraphProto& graph);

  // Index of the node producing `tensor`, or -1 (graph input, initializer, or unknown).
  int producer(const std::string& tensor) const;
  // Every use of `tensor`: node inputs in this graph, references from nested subgraphs, and graph
  // outputs each count as one use, so "one consumer" really means nobody else can observe it.
  int use_count(const std::string& tensor) const;
  const std::vector<int>& consumer_nodes(const std::string& tensor) const;
  bool is_graph_output(const std::string& tensor) const;

  // The tensor's value when the graph fixes it: an initializer that is not also a graph input
  // (those can be overridden at run time), a Constant node, ConstantOfShape of a constant shape,
  // or a Cast/Identity of one of those.
  std::optional<ConstantTensor> constant(const std::string& tensor) const;
  bool is_constant(const std::string& tensor) const { return constant(tensor).has_value(); }

  // Declared element type (onnx::TensorProto::DataType) or 0 when the model doesn't say; follows
  // the type-preserving ops a norm is built from so that exporters' sparse value_info is enough.
  int32_t element_type(const std::string& tensor) const;
  // Declared rank, or nullopt; and the last dimension when it is a fixed number.
  std::optional<int64_t> rank(const std::string& tensor) const;
  std::optional<int64_t> last_dim(const std::string& tensor) const;

  const onnx::GraphProto& graph() const { return graph_; }
  const onnx::NodeProto& node(int index) const { return graph_.node(index); }

 private:
  const onnx::TypeProto* declared_type(const std::string& tensor) const;
  const onnx::TensorProto* initializer(const std::string& tensor) const;
  // The input of the Cast/Identity producing `tensor` (same shape), or nullopt.
  std::optional<std::string> same_shape_input(const std::string& tensor) const;

  const onnx::GraphProto& graph_;
  std::map<std::string, int> producer_;
  std::map<std::string, std::vector<int>> consumers_;
  std::map<std::string, int> use_count_;
  std::map<std::string, const onnx::TypeProto*> declared_types_;
  std::map<std::string, const onnx::TensorProto*> initializers_;
  std::map<std::string, bool> graph_inputs_;
  std::map<std::string, bool> graph_outputs_;
};

// Attribute helpers: nullopt when absent.
const onnx::AttributeProto* find_attribute(const onnx::NodeProto& node, const std::string& name);
std::optional<int64_t> int_attribute(const onnx::NodeProto& node, const std::string& name);
std::optional<std::vector<int64_t>> ints_attribute(const onnx::NodeProto& node, const std::string& name);

// The opset version the model imports for the default (ai.onnx) domain; 0 when it imports none.
int64_t default_opset(const onnx::ModelProto& model);

}  // namespace modnorm_onnx
