// modnorm-onnx INPUT.onnx OUTPUT.onnx: fuses decomposed RMSNorm (and the modulation after it) in an
// ONNX model and prints what it did. Exit status: 0 written, 1 bad input or write failure, 2 usage.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "onnx-ml.pb.h"
#include "onnx_graph.h"
#include "rmsnorm_fusion.h"

namespace fs = std::filesystem;

namespace {

constexpr const char* kUsage =
    "usage: modnorm-onnx [--keep-rmsnormalization] INPUT.onnx OUTPUT.onnx\n"
    "  Rewrites decomposed RMSNorm subgraphs (and a following * (1 + scale) + shift) into single nodes.\n"
    "  --keep-rmsnormalization  do not fold a modulation into an existing RMSNormalization node\n";

int fail(const std::string& message) {
  std::cerr << "modnorm-onnx: error: " << message << "\n";
  return 1;
}

// A tensor whose bytes live in a side file; we keep such references as they are, so the output must sit
// next to the input for them to resolve.
const onnx::TensorProto* first_external_tensor(const onnx::GraphProto& graph) {
  for (const auto& tensor : graph.initializer())
    if (tensor.data_location() == onnx::TensorProto::EXTERNAL) return &tensor;
  for (const auto& node : graph.node()) {
    for (const auto& attribute : node.attribute()) {
      if (attribute.has_t() && attribute.t().data_location() == onnx::TensorProto::EXTERNAL) return &attribute.t();
      if (attribute.has_g())
        if (const auto* found = first_external_tensor(attribute.g())) return found;
      for (const auto& subgraph : attribute.graphs())
        if (const auto* found = first_external_tensor(subgraph)) return found;
    }
  }
  return nullptr;
}

std::string external_location(const onnx::TensorProto& tensor) {
  for (const auto& entry : tensor.external_data())
    if (entry.key() == "location") return entry.value();
  return "?";
}

fs::path directory_of(const fs::path& file) {
  std::error_code error;
  const fs::path absolute = fs::weakly_canonical(fs::absolute(file), error);
  return (error ? fs::absolute(file) : absolute).parent_path();
}

}  // namespace

int main(int argc, char** argv) {
  GOOGLE_PROTOBUF_VERIFY_VERSION;
  modnorm_onnx::FusionOptions options;
  std::string paths[2];
  int path_count = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string argument = argv[i];
    if (argument == "-h" || argument == "--help") {
      std::cout << kUsage;
      return 0;
    }
    if (argument == "--keep-rmsnormalization") {
      options.fold_rmsnormalization = false;
    } else if (path_count < 2 && !(argument.size() > 1 && argument[0] == '-')) {
      paths[path_count++] = argument;
    } else {
      std::cerr << kUsage;
      return 2;
    }
  }
  if (path_count != 2) {
    std::cerr << kUsage;
    return 2;
  }
  const fs::path input_path = paths[0];
  const fs::path output_path = paths[1];

  std::ifstream input(input_path, std::ios::binary);
  if (!input) return fail("cannot open " + input_path.string());
  std::ostringstream buffer;
  buffer << input.rdbuf();
  const std::string bytes = buffer.str();

  onnx::ModelProto model;
  if (bytes.empty() || !model.ParseFromString(bytes))
    return fail(input_path.string() + " is not a valid ONNX model (it does not parse as an ONNX ModelProto)");
  // An arbitrary byte string can parse as a proto with unknown fields; a model states these three.
  if (!model.has_graph() || model.ir_version() <= 0 || model.opset_import_size() == 0)
    return fail(input_path.string() + " is not a valid ONNX model (no graph, IR version or opset import)");
  if (modnorm_onnx::default_opset(model) == 0)
    return fail(input_path.string() + " imports no ai.onnx opset; nothing here can be an RMSNorm");

  const auto* external = first_external_tensor(model.graph());
  if (external && directory_of(input_path) != directory_of(output_path)) {
    return fail(input_path.string() + " keeps tensor '" + external->name() + "' in external data ('" +
                external_location(*external) + "'); write OUTPUT into the same directory as INPUT so "
                "those references stay valid");
  }

  const auto report = modnorm_onnx::fuse_rmsnorm(model, options);
  std::cout << "modnorm-onnx: " << input_path.string() << "\n" << modnorm_onnx::format_report(report);
  if (external) std::cout << "external data references kept (relative to " << directory_of(output_path).string() << ")\n";

  std::string serialized;
  if (!model.SerializeToString(&serialized))
    return fail("cannot serialize the rewritten model (over 2 GiB? save it with external data first)");
  // Write beside the target and rename, so a failed write never leaves a truncated model behind.
  const fs::path temporary = output_path.string() + ".modnorm-tmp";
  {
    std::ofstream output(temporary, std::ios::binary | std::ios::trunc);
    if (!output) return fail("cannot write " + output_path.string());
    output.write(serialized.data(), static_cast<std::streamsize>(serialized.size()));
    output.close();
    if (!output) {
      std::error_code ignored;
      fs::remove(temporary, ignored);
      return fail("cannot write " + output_path.string());
    }
  }
  std::error_code rename_error;
  fs::rename(temporary, output_path, rename_error);
  if (rename_error) {
    std::error_code ignored;
    fs::remove(temporary, ignored);
    return fail("cannot write " + output_path.string() + ": " + rename_error.message());
  }
  std::cout << "wrote " << output_path.string() << "\n";
  return 0;
}
