"""Shared helpers for the modnorm-onnx end-to-end tests: build models, run the command, compare
onnxruntime's outputs on the original and the rewritten model."""

import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

TOOL = os.environ.get("MODNORM_ONNX_TOOL")
MODNORM_DOMAIN = "ai.modnorm"
# The newest IR version each opset needs; onnxruntime refuses IR versions newer than it knows.
IR_VERSION = {13: 7, 15: 8, 17: 8, 18: 8, 21: 10, 23: 11}


def tool_path():
    assert TOOL and Path(TOOL).is_file(), "set MODNORM_ONNX_TOOL to the built modnorm-onnx (ctest does)"
    return TOOL


def make_model(nodes, inputs, outputs, opset, initializers=(), value_info=()):
    graph = helper.make_graph(list(nodes), "site", list(inputs), list(outputs), list(initializers),
                              value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=IR_VERSION[opset])
    # Outputs may be given by name only: their types come from onnx's shape inference.
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v.type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for output in model.graph.output:
        if not output.HasField("type") and output.name in known:
            output.type.CopyFrom(known[output.name])
    onnx.checker.check_model(model, full_check=True)
    return model


def run_tool(model, tmp_path, *extra_args):
    """Writes `model`, runs the command on it; returns (rewritten model, report text)."""
    source = Path(tmp_path) / "in.onnx"
    target = Path(tmp_path) / "out.onnx"
    onnx.save(model, source)
    result = subprocess.run([tool_path(), *extra_args, str(source), str(target)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + result.stdout
    rewritten = onnx.load(target)
    onnx.checker.check_model(rewritten, full_check=True)
    return rewritten, result.stdout


def op_types(model):
    return [node.op_type for node in model.graph.node]


def fused_nodes(model):
    return [n for n in model.graph.node if n.domain == MODNORM_DOMAIN or n.op_type == "RMSNormalization"]


def attribute(node, name):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    raise KeyError(name)


NUMPY_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}


def random_feeds(model, seed=0):
    """Fresh standard-normal inputs for every graph input (never zeros), shapes as declared."""
    rng = np.random.default_rng(seed)
    initializer_names = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializer_names:
            continue
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 3 for d in tensor_type.shape.dim]
        data = rng.standard_normal(shape) + 0.25
        feeds[value.name] = data.astype(NUMPY_TYPES[tensor_type.elem_type])
    return feeds


def run(model, feeds):
    options = ort.SessionOptions()
    # Run the graph as written: onnxruntime's own fusions must not hide a difference between the two models.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_same_outputs(original, rewritten, seeds=(0, 1)):
    """onnxruntime gives the same outputs (dtype, shape, values) for both models on random inputs."""
    assert [o.name for o in original.graph.output] == [o.name for o in rewritten.graph.output]
    for seed in seeds:
        feeds = random_feeds(original, seed)
        expected = run(original, feeds)
        actual = run(rewritten, feeds)
        for e, a in zip(expected, actual):
            assert e.dtype == a.dtype and e.shape == a.shape
            finite = np.isfinite(e)
            assert finite.all() and np.abs(e).max() > 0, "degenerate test: the output is not finite or all zeros"
            tolerance = 4e-3 if e.dtype == np.float16 else 1e-5
            np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=tolerance, atol=tolerance)


def constant(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
