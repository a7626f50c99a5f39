// Unit tests of the graph matching and rewriting, on graphs built directly as protos (no runtime):
// what is fused into what, with which inputs and attributes, and why a site is skipped.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "onnx_graph.h"
#include "rmsnorm_fusion.h"

namespace {

using modnorm_onnx::fuse_rmsnorm;

class ModelBuilder {
 public:
  explicit ModelBuilder(int64_t opset) : opset_(opset) {
    model_.set_ir_version(8);
    auto* import = model_.add_opset_import();
    import->set_version(opset);
  }
  ModelBuilder& input(const std::string& name, std::vector<int64_t> dims, int32_t type = onnx::TensorProto::FLOAT) {
    auto* value = model_.mutable_graph()->add_input();
    value->set_name(name);
    value->mutable_type()->mutable_tensor_type()->set_elem_type(type);
    for (int64_t d : dims) value->mutable_type()->mutable_tensor_type()->mutable_shape()->add_dim()->set_dim_value(d);
    return *this;
  }
  ModelBuilder& output(const std::string& name) {
    model_.mutable_graph()->add_output()->set_name(name);
    return *this;
  }
  ModelBuilder& scalar(const std::string& name, float value, std::vector<int64_t> dims = {}) {
    auto* tensor = model_.mutable_graph()->add_initializer();
    tensor->set_name(name);
    tensor->set_data_type(onnx::TensorProto::FLOAT);
    int64_t count = 1;
    for (int64_t d : dims) {
      tensor->add_dims(d);
      count *= d;
    }
    for (int64_t i = 0; i < count; ++i) tensor->add_float_data(value);
    return *this;
  }
  ModelBuilder& ints(const std::string& name, std::vector<int64_t> values) {
    auto* tensor = model_.mutable_graph()->add_initializer();
    tensor->set_name(name);
    tensor->set_data_type(onnx::TensorProto::INT64);
    tensor->add_dims(static_cast<int64_t>(values.size()));
    for (int64_t v : values) tensor->add_int64_data(v);
    return *this;
  }
  onnx::NodeProto& node(const std::string& op, std::vector<std::string> inputs, std::string output) {
    auto* node = model_.mutable_graph()->add_node();
    node->set_op_type(op);
    node->set_name(op + "_" + output);
    for (auto& i : inputs) node->add_input(i);
    node->add_output(output);
    return *node;
  }
  // x -> x*x -> ReduceMean(axes) -> + eps -> Sqrt -> Div(x, .) = "normed"
  ModelBuilder& norm(std::vector<int64_t> axes = {-1}, const std::string& eps = "eps") {
    node("Mul", {"x", "x"}, "sq");
    if (opset_ >= 18) {
      ints("axes", axes);
      node("ReduceMean", {"sq", "axes"}, "mean");
    } else {
      auto& reduce = node("ReduceMean", {"sq"}, "mean");
      auto* attribute = reduce.add_attribute();
      attribute->set_name("axes");
      attribute->set_type(onnx::AttributeProto::INTS);
      for (int64_t a : axes) attribute->add_ints(a);
    }
    node("Add", {"mean", eps}, "var");
    node("Sqrt", {"var"}, "std");
    node("Div", {"x", "std"}, "normed");
    return *this;
  }
  onnx::ModelProto& model() { return model_; }

 private:
  int64_t opset_;
  onnx::ModelProto model_;
};

const onnx::NodeProto* find_op(const onnx::ModelProto& model, const std::string& op_type) {
  for (const auto& node : model.graph().node())
    if (node.op_type() == op_type) return &node;
  return nullptr;
}

std::vector<std::string> inputs_of(const onnx::NodeProto& node) { return {node.input().begin(), node.input().end()}; }

float float_attribute(const onnx::NodeProto& node, const std::string& name) {
  const auto* attribute = modnorm_onnx::find_attribute(node, name);
  EXPECT_NE(attribute, nullptr) << name;
  return attribute ? attribute->f() : -1.0f;
}

ModelBuilder modulated_site(int64_t opset) {
  ModelBuilder builder(opset);
  builder.input("x", {2, 3, 8}).input("scale", {2, 1, 8}).input("shift", {2, 1, 8}).scalar("eps", 1e-6f).scalar("one", 1.0f);
  builder.norm();
  builder.node("Add", {"scale", "one"}, "factor");
  builder.node("Mul", {"normed", "factor"}, "modulated");
  builder.node("Add", {"shift", "modulated"}, "y");
  builder.output("y");
  return builder;
}

TEST(Fusion, ModulatedSiteWithOnePlusScaleAndShift) {
  for (int64_t opset : {17, 18}) {
    auto builder = modulated_site(opset);
    auto report = fuse_rmsnorm(builder.model());
    ASSERT_EQ(report.fused_count(), 1) << modnorm_onnx::format_report(report);
    const auto& model = builder.model();
    ASSERT_EQ(model.graph().node_size(), 1);
    const auto& fused = model.graph().node(0);
    EXPECT_EQ(fused.op_type(), "ModulatedRMSNormShift");
    EXPECT_EQ(fused.domain(), "ai.modnorm");
    EXPECT_EQ(inputs_of(fused), (std::vector<std::string>{"x", "scale", "shift"}));
    EXPECT_EQ(fused.output(0), "y");
    EXPECT_FLOAT_EQ(float_attribute(fused, "epsilon"), 1e-6f);
    EXPECT_FLOAT_EQ(float_attribute(fused, "scale_offset"), 1.0f);
    // eps, the 1 and the axes were used by the site only: gone.
    EXPECT_EQ(model.graph().initializer_size(), 0);
    ASSERT_EQ(model.functions_size(), 1);
    const auto& function = model.functions(0);
    EXPECT_EQ(function.name(), "ModulatedRMSNormShift");
    ASSERT_EQ(function.opset_import_size(), 1);
    EXPECT_EQ(function.opset_import(0).version(), opset);
    const auto reduce = std::find_if(function.node().begin(), function.node().end(),
                                      [](const onnx::NodeProto& n) { return n.op_type() == "ReduceMean"; });
    ASSERT_NE(reduce, function.node().end());
    // Axes as an input from opset 18, as an attribute before.
    EXPECT_EQ(reduce->input_size(), opset >= 18 ? 2 : 1);
    bool imports_domain = false;
    for (const auto& import : model.opset_import()) imports_domain |= import.domain() == "ai.modnorm";
    EXPECT_TRUE(imports_domain);
  }
}

TEST(Fusion, DynamicMultiplierWithoutOnePlusHasScaleOffsetZero) {
  ModelBuilder builder(17);
  builder.input("x", {2, 3, 8}).input("m", {2, 1, 8}).scalar("eps", 1e-5f).norm();
  builder.node("Mul", {"m", "normed"}, "y");
  builder.output("y");
  auto report = fuse_rmsnorm(builder.model());
  ASSERT_EQ(report.fused_count(), 1);
  const auto& fused = builder.model().graph().node(0);
  EXPECT_EQ(fused.op_type(), "ModulatedRMSNorm");
  EXPECT_EQ(inputs_of(fused), (std::vector<std::string>{"x", "m"}));
  EXPECT_FLOAT_EQ(float_attribute(fused, "scale_offset"), 0.0f);
}

TEST(Fusion, OnePlusScaleWithAnotherReaderKeepsTheAdd) {
  auto builder = modulated_site(17);
  builder.output("factor");  // 1 + scale is also a graph output
  auto report = fuse_rmsnorm(builder.model());
  ASSERT_EQ(report.fused_count(), 1);
  const auto* fused = find_op(builder.model(), "ModulatedRMSNormShift");
  ASSERT_NE(fused, nullptr);
  EXPECT_EQ(inputs_of(*fused), (std::vector<std::string>{"x", "factor", "shift"}));
  EXPECT_FLOAT_EQ(float_attribute(*fused, "scale_offset"), 0.0f);
  EXPECT_NE(find_op(builder.model(), "Add"), nullptr);
}

TEST(Fusion, Opset23PlainNormWithGammaIsRMSNormalization) {
  ModelBuilder builder(23);
  builder.input("x", {2, 3, 8}).scalar("eps", 1e-6f).scalar("gamma", 0.5f, {8}).norm();
  builder.node("Mul", {"normed", "gamma"}, "y");
  builder.output("y");
  auto report = fuse_rmsnorm(builder.model());
  ASSERT_EQ(report.fused_count(), 1);
  const auto& fused = builder.model().graph().node(0);
  EXPECT_EQ(fused.op_type(), "RMSNormalization");
  EXPECT_TRUE(fused.domain().empty());
  EXPECT_EQ(inputs_of(fused), (std::vector<std::string>{"x", "gamma"}));
  EXPECT_EQ(builder.model().functions_size(), 0);
}

struct SkipCase {
  const char* name;
  std::vector<int64_t> axes;
  const char* eps;
  const char* expected_reason;
};

TEST(Fusion, SitesLeftAloneWithTheirReason) {
  const std::vector<SkipCase> cases = {
      {"other axis", {1}, "eps", "not the last axis 2"},
      {"several axes", {1, 2}, "eps", "not the last axis only"},
      {"eps input", {-1}, "eps_in", "eps is not a constant"},
  };
  for (const auto& c : cases) {
    ModelBuilder builder(18);
    builder.input("x", {2, 3, 8}).input("eps_in", {1}).scalar("eps", 1e-6f).norm(c.axes, c.eps);
    builder.output("normed");
    const int nodes_before = builder.model().graph().node_size();
    auto report = fuse_rmsnorm(builder.model());
    ASSERT_EQ(report.sites.size(), 1u) << c.name;
    EXPECT_FALSE(report.sites[0].fused) << c.name;
    EXPECT_NE(report.sites[0].details.find(c.expected_reason), std::string::npos)
        << c.name << ": " << report.sites[0].details;
    EXPECT_EQ(builder.model().graph().node_size(), nodes_before);
    EXPECT_EQ(builder.model().functions_size(), 0);
  }
}

TEST(Fusion, KeepdimsZeroIsSkipped) {
  ModelBuilder builder(17);
  builder.input("x", {2, 3, 8}).scalar("eps", 1e-6f).norm();
  auto* reduce = builder.model().mutable_graph()->mutable_node(1);
  auto* keepdims = reduce->add_attribute();
  keepdims->set_name("keepdims");
  keepdims->set_type(onnx::AttributeProto::INT);
  keepdims->set_i(0);
  builder.output("normed");
  auto report = fuse_rmsnorm(builder.model());
  ASSERT_EQ(report.sites.size(), 1u);
  EXPECT_EQ(report.sites[0].details, "ReduceMean has keepdims=0");
}

TEST(Fusion, UseInsideASubgraphCountsAsAConsumer) {
  ModelBuilder builder(17);
  builder.input("x", {2, 3, 8}).input("cond", {}, onnx::TensorProto::BOOL).scalar("eps", 1e-6f).norm();
  builder.output("normed");
  // An If whose branch reads `mean` from the outer scope.
  auto& branch_user = builder.node("If", {"cond"}, "branch_out");
  for (const char* name : {"then_branch", "else_branch"}) {
    auto* attribute = branch_user.add_attribute();
    attribute->set_name(name);
    attribute->set_type(onnx::AttributeProto::GRAPH);
    auto* body = attribute->mutable_g();
    auto* identity = body->add_node();
    identity->set_op_type("Identity");
    identity->add_input("mean");
    identity->add_output("inner");
    body->add_output()->set_name("inner");
  }
  builder.output("branch_out");
  auto report = fuse_rmsnorm(builder.model());
  ASSERT_EQ(report.sites.size(), 1u);
  EXPECT_FALSE(report.sites[0].fused);
  EXPECT_EQ(report.sites[0].details, "the mean has other consumers");
}

TEST(Fusion, OpsetBelow15IsReportedNotFused) {
  ModelBuilder builder(13);
  builder.input("x", {2, 3, 8}).scalar("eps", 1e-6f).norm();
  builder.output("normed");
  auto report = fuse_rmsnorm(builder.model());
  ASSERT_EQ(report.sites.size(), 1u);
  EXPECT_FALSE(report.sites[0].fused);
  EXPECT_NE(report.sites[0].details.find("opset 13 < 15"), std::string::npos);
}

TEST(Fusion, LayerNormCentringIsNotAnRMSNorm) {
  ModelBuilder builder(17);
  builder.input("raw", {2, 3, 8}).scalar("eps", 1e-6f);
  auto& mean = builder.node("ReduceMean", {"raw"}, "raw_mean");
  auto* axes = mean.add_attribute();
  axes->set_name("axes");
  axes->set_type(onnx::AttributeProto::INTS);
  axes->add_ints(-1);
  builder.node("Sub", {"raw", "raw_mean"}, "x");
  builder.norm();
  builder.output("normed");
  auto report = fuse_rmsnorm(builder.model());
  ASSERT_EQ(report.sites.size(), 1u);
  EXPECT_NE(report.sites[0].details.find("LayerNorm"), std::string::npos);
}

TEST(GraphIndex, DecodesFloat16RawConstants) {
  onnx::TensorProto tensor;
  tensor.set_data_type(onnx::TensorProto::FLOAT16);
  const uint16_t bits[3] = {0x3c00 /* 1 */, 0xb800 /* -0.5 */, 0x4000 /* 2 */};
  tensor.set_raw_data(std::string(reinterpret_cast<const char*>(bits), sizeof bits));
  auto values = modnorm_onnx::tensor_values_as_double(tensor);
  ASSERT_TRUE(values.has_value());
  EXPECT_EQ(*values, (std::vector<double>{1.0, -0.5, 2.0}));
}

TEST(Functions, CastKindConvertsToNormType) {
  const auto function = modnorm_onnx::make_function("RMSNormAffineCast", 17);
  EXPECT_EQ(std::vector<std::string>(function.input().begin(), function.input().end()),
            (std::vector<std::string>{"X", "gamma"}));
  EXPECT_EQ(std::vector<std::string>(function.attribute().begin(), function.attribute().end()),
            (std::vector<std::string>{"epsilon", "norm_type"}));
  bool converts = false;
  for (const auto& node : function.node())
    if (node.op_type() == "Cast" && node.attribute(0).ref_attr_name() == "norm_type") converts = true;
  EXPECT_TRUE(converts);
  EXPECT_EQ(function.node(function.node_size() - 1).output(0), "Y");
}

}  // namespace
