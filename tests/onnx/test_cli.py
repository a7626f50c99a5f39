"""The command's contract: clear errors, non-zero exit and no output file for bad input; external data;
a model with nothing to fuse; running twice."""

import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from fusion_helpers import assert_same_outputs, constant, fused_nodes, make_model, op_types, run_tool, tool_path


def invoke(*args):
    return subprocess.run([tool_path(), *map(str, args)], capture_output=True, text=True)


def norm_model(dim=256):
    """x -> RMSNorm with a (dim,) gamma big enough for onnx to store it as external data."""
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["mean"], axes=[-1]),
        helper.make_node("Add", ["mean", "eps"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["std"]),
        helper.make_node("Div", ["x", "std"], ["normed"]),
        helper.make_node("Mul", ["normed", "gamma"], ["y"]),
    ]
    gamma = np.random.default_rng(3).uniform(0.5, 1.5, dim).astype(np.float32)
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, dim])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, dim])], 17,
                      [constant("eps", 1e-6), constant("gamma", gamma)])


@pytest.mark.parametrize("content", [b"", b"this is not a model", bytes(range(256)) * 4])
def test_invalid_file(content, tmp_path):
    source, target = tmp_path / "bad.onnx", tmp_path / "out.onnx"
    source.write_bytes(content)
    result = invoke(source, target)
    assert result.returncode == 1
    assert "is not a valid ONNX model" in result.stderr
    assert not target.exists() and not list(tmp_path.glob("out.onnx*"))


def test_missing_input(tmp_path):
    result = invoke(tmp_path / "absent.onnx", tmp_path / "out.onnx")
    assert result.returncode == 1 and "cannot open" in result.stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("args", [[], ["only.onnx"], ["a.onnx", "b.onnx", "c.onnx"], ["--bogus", "a", "b"]])
def test_usage(args):
    result = invoke(*args)
    assert result.returncode == 2 and "usage: modnorm-onnx" in result.stderr


def test_unwritable_output(tmp_path):
    source = tmp_path / "in.onnx"
    onnx.save(norm_model(), source)
    result = invoke(source, tmp_path / "no_such_dir" / "out.onnx")
    assert result.returncode == 1 and "cannot write" in result.stderr


def test_external_data(tmp_path):
    model = norm_model()
    source_dir, other_dir = tmp_path / "model", tmp_path / "elsewhere"
    source_dir.mkdir()
    other_dir.mkdir()
    source = source_dir / "in.onnx"
    onnx.save(model, source, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
              size_threshold=64)
    assert any(t.data_location == TensorProto.EXTERNAL for t in onnx.load(source, load_external_data=False)
               .graph.initializer)

    # Elsewhere the references would dangle: refused, nothing written.
    result = invoke(source, other_dir / "out.onnx")
    assert result.returncode == 1 and "external data" in result.stderr and "weights.bin" in result.stderr
    assert not list(other_dir.iterdir())

    # Beside the input they resolve: fused, and runs the same.
    target = source_dir / "out.onnx"
    result = invoke(source, target)
    assert result.returncode == 0, result.stderr
    assert "1 fused" in result.stdout and "external data references kept" in result.stdout
    rewritten = onnx.load(target, load_external_data=False)
    assert [n.op_type for n in fused_nodes(rewritten)] == ["RMSNormAffine"]
    x = np.random.default_rng(0).standard_normal((2, 3, 256)).astype(np.float32)
    expected = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    actual = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_nothing_to_fuse(tmp_path):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], 17)
    rewritten, report = run_tool(model, tmp_path)
    assert op_types(rewritten) == ["Relu"] and "0 site(s) found" in report


def test_second_run_is_a_no_op(tmp_path):
    once, _ = run_tool(norm_model(), tmp_path / "a" if (tmp_path / "a").mkdir() is None else tmp_path)
    twice, report = run_tool(once, tmp_path)
    assert op_types(twice) == op_types(once) and len(twice.functions) == 1
    assert "0 site(s) found" in report
    assert_same_outputs(norm_model(), twice)
