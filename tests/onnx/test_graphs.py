"""Hand-built RMSNorm sites at opsets 17, 18 and 23: every form the command fuses, and every form it
must leave alone. Each positive case checks the rewritten node types and the fused node's inputs and
attributes, and each case (positive or negative) checks onnxruntime's outputs against the original."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from fusion_helpers import (MODNORM_DOMAIN, assert_same_outputs, attribute, constant, fused_nodes, make_model,
                            op_types, run_tool)

OPSETS = [17, 18, 23]
B, T, D = 2, 5, 16


def build_site(opset, square="pow", inverse="div_one", axes=(-1,), eps=1e-6, eps_kind="initializer", exponent=2.0,
               in_cast=False, out_cast=False, gamma=None, modulation=None, shift=False, leak=None, keepdims=1,
               x_type=TensorProto.FLOAT):
    """One decomposed RMSNorm (plus optional gamma, modulation, shift) as a model.

    in_cast: x arrives as float16 and is cast to float32 for the norm; out_cast: the norm is cast back to
    float16 before gamma/modulation (the HF Llama arrangement). leak: an intermediate also made a graph output.
    """
    nodes, inits, inputs, extra_outputs = [], [], [], []
    outer_type = TensorProto.FLOAT16 if (in_cast or out_cast) else x_type
    compute_np = np.float32 if x_type == TensorProto.FLOAT or in_cast else np.float16
    outer_np = np.float16 if outer_type == TensorProto.FLOAT16 else np.float32
    inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT16 if in_cast else x_type, [B, T, D]))
    x = "x"
    if in_cast:
        nodes.append(helper.make_node("Cast", ["x"], ["x_f32"], to=TensorProto.FLOAT))
        x = "x_f32"

    if square == "pow":
        inits.append(constant("exponent", exponent, compute_np))
        nodes.append(helper.make_node("Pow", [x, "exponent"], ["sq"]))
    else:
        nodes.append(helper.make_node("Mul", [x, x], ["sq"]))

    if opset >= 18:
        inits.append(constant("axes", list(axes), np.int64))
        nodes.append(helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], keepdims=keepdims))
    else:
        nodes.append(helper.make_node("ReduceMean", ["sq"], ["mean"], axes=list(axes), keepdims=keepdims))

    if eps_kind == "initializer":
        inits.append(constant("eps", eps, compute_np))
    elif eps_kind == "constant_node":
        nodes.append(helper.make_node("Constant", [], ["eps"], value=constant("eps_value", [eps], compute_np)))
    elif eps_kind == "input":  # not a constant: the caller feeds it
        inputs.append(helper.make_tensor_value_info("eps", x_type if not in_cast else TensorProto.FLOAT, [1]))
    elif eps_kind == "overridable":  # an initializer that is also a graph input: a default, not a constant
        inits.append(constant("eps", [eps], compute_np))
        inputs.append(helper.make_tensor_value_info("eps", TensorProto.FLOAT, [1]))
    nodes.append(helper.make_node("Add", ["mean", "eps"], ["var"]))

    if inverse == "pow_m05":
        inits.append(constant("minus_half", -0.5, compute_np))
        nodes.append(helper.make_node("Pow", ["var", "minus_half"], ["rstd"]))
    else:
        nodes.append(helper.make_node("Sqrt", ["var"], ["std"]))
        if inverse == "div_one":
            inits.append(constant("one_num", 1.0, compute_np))
            nodes.append(helper.make_node("Div", ["one_num", "std"], ["rstd"]))
        elif inverse == "div_minus_one":
            inits.append(constant("one_num", -1.0, compute_np))
            nodes.append(helper.make_node("Div", ["one_num", "std"], ["rstd"]))
        elif inverse == "pow_m1":
            inits.append(constant("minus_one", -1.0, compute_np))
            nodes.append(helper.make_node("Pow", ["std", "minus_one"], ["rstd"]))
        elif inverse == "pow_p1":
            inits.append(constant("plus_one", 1.0, compute_np))
            nodes.append(helper.make_node("Pow", ["std", "plus_one"], ["rstd"]))
        elif inverse == "reciprocal":
            nodes.append(helper.make_node("Reciprocal", ["std"], ["rstd"]))
    if inverse == "div_x":
        nodes.append(helper.make_node("Div", [x, "std"], ["normed"]))
    else:
        nodes.append(helper.make_node("Mul", ["rstd", x], ["normed"]))
    current = "normed"
    if out_cast:
        nodes.append(helper.make_node("Cast", [current], ["normed_f16"], to=TensorProto.FLOAT16))
        current = "normed_f16"

    if gamma is not None:
        shapes = {"vector": [D], "row": [1, 1, D], "matrix": [T, D], "column": [T, 1]}
        rng = np.random.default_rng(7)
        values = rng.uniform(0.5, 1.5, shapes[gamma]).astype(outer_np)
        inits.append(constant("gamma", values, outer_np))
        nodes.append(helper.make_node("Mul", [current, "gamma"], ["affine"]))
        current = "affine"

    if modulation is not None:
        inputs.append(helper.make_tensor_value_info("scale", outer_type, [B, 1, D]))
        factor = "scale"
        if modulation in ("one_plus", "plus_one"):
            inits.append(constant("one", 1.0, outer_np))
            operands = ["one", "scale"] if modulation == "one_plus" else ["scale", "one"]
            nodes.append(helper.make_node("Add", operands, ["factor"]))
            factor = "factor"
        nodes.append(helper.make_node("Mul", [factor, current], ["modulated"]))
        current = "modulated"
        if shift:
            inputs.append(helper.make_tensor_value_info("shift", outer_type, [B, 1, D]))
            nodes.append(helper.make_node("Add", [current, "shift"], ["shifted"]))
            current = "shifted"

    nodes.append(helper.make_node("Identity", [current], ["y"]))
    # Outputs carry names only: onnx and onnxruntime infer their types, as they would for an exporter's graph.
    outputs = [helper.make_empty_tensor_value_info("y")]
    if leak:
        outputs.append(helper.make_empty_tensor_value_info(leak))
    return make_model(nodes, inputs, outputs + extra_outputs, opset, inits)


def assert_fused(model, tmp_path, op_type, inputs, epsilon=1e-6, scale_offset=None, eps_rel=1e-6):
    """Runs the command and checks one fused node of `op_type` with those inputs replaced the site."""
    rewritten, report = run_tool(model, tmp_path)
    fused = fused_nodes(rewritten)
    assert len(fused) == 1, (op_types(rewritten), report)
    node = fused[0]
    assert node.op_type == op_type, report
    assert list(node.input) == inputs, report
    assert attribute(node, "epsilon") == pytest.approx(epsilon, rel=eps_rel)
    if scale_offset is not None:
        assert attribute(node, "scale_offset") == scale_offset
    # Nothing of the norm remains outside the fused node.
    leftovers = {"Pow", "ReduceMean", "Sqrt", "Reciprocal", "Div"} & set(op_types(rewritten))
    assert not leftovers, op_types(rewritten)
    if node.domain == MODNORM_DOMAIN:
        assert [(f.domain, f.name) for f in rewritten.functions] == [(MODNORM_DOMAIN, op_type)]
        assert any(o.domain == MODNORM_DOMAIN for o in rewritten.opset_import)
    assert "1 fused, 0 skipped" in report
    assert_same_outputs(model, rewritten)
    return rewritten, node, report


def assert_left_alone(model, tmp_path, reason):
    rewritten, report = run_tool(model, tmp_path)
    assert op_types(rewritten) == op_types(model), report
    assert not fused_nodes(rewritten) and not rewritten.functions
    assert "skipped: " in report and reason in report, report
    assert "0 fused" in report
    assert_same_outputs(model, rewritten)


def plain_norm_op(opset):
    return "RMSNormalization" if opset >= 23 else "RMSNorm"


# ---- positives -------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("inverse", ["div_one", "pow_m1", "reciprocal", "div_x", "pow_m05"])
@pytest.mark.parametrize("square", ["pow", "mul"])
def test_plain_norm_forms(opset, inverse, square, tmp_path):
    model = build_site(opset, square=square, inverse=inverse)
    rewritten, node, _ = assert_fused(model, tmp_path, plain_norm_op(opset),
                                      ["x", "modnorm_fused_0_ones"] if opset >= 23 else ["x"])
    assert op_types(rewritten) == [node.op_type, "Identity"]
    # Constants only the site used (exponents, eps, axes) are gone.
    assert {i.name for i in rewritten.graph.initializer} <= {"modnorm_fused_0_ones"}


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("axes", [(-1,), (2,)])
@pytest.mark.parametrize("eps_kind", ["initializer", "constant_node"])
def test_axes_and_eps_spellings(opset, axes, eps_kind, tmp_path):
    model = build_site(opset, axes=axes, eps_kind=eps_kind, eps=1e-5, gamma="vector")
    assert_fused(model, tmp_path, "RMSNormalization" if opset >= 23 else "RMSNormAffine", ["x", "gamma"],
                 epsilon=1e-5)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("gamma", ["vector", "row"])
def test_gamma(opset, gamma, tmp_path):
    model = build_site(opset, gamma=gamma)
    # RMSNormalization takes a (D,) scale; a (1, 1, D) gamma keeps the function form.
    expected = "RMSNormalization" if opset >= 23 and gamma == "vector" else "RMSNormAffine"
    assert_fused(model, tmp_path, expected, ["x", "gamma"])


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("modulation", ["one_plus", "plus_one"])
@pytest.mark.parametrize("gamma", [None, "vector"])
@pytest.mark.parametrize("shift", [False, True])
def test_modulation(opset, modulation, gamma, shift, tmp_path):
    model = build_site(opset, inverse="reciprocal", gamma=gamma, modulation=modulation, shift=shift)
    op = "ModulatedRMSNorm" + ("Affine" if gamma else "") + ("Shift" if shift else "")
    inputs = ["x"] + (["gamma"] if gamma else []) + ["scale"] + (["shift"] if shift else [])
    rewritten, _, report = assert_fused(model, tmp_path, op, inputs, scale_offset=1.0)
    assert "Add" not in op_types(rewritten) and "Mul" not in op_types(rewritten)
    assert "Mul(1 + scale)" in report


@pytest.mark.parametrize("opset", OPSETS)
def test_precomputed_multiplier(opset, tmp_path):
    model = build_site(opset, modulation="plain", shift=True)
    assert_fused(model, tmp_path, "ModulatedRMSNormShift", ["x", "scale", "shift"], scale_offset=0.0)


@pytest.mark.parametrize("opset", OPSETS)
def test_casts_llama_style(opset, tmp_path):
    """float16 x -> Cast(float32) -> norm -> Cast(float16) -> * gamma -> * (1 + scale) + shift: the input
    Cast stays in front of the fused node (which computes in float32 like the original), the output Cast
    becomes the conversion to gamma's type inside it, and y stays float16."""
    model = build_site(opset, in_cast=True, out_cast=True, gamma="vector", modulation="one_plus", shift=True)
    rewritten, node, _ = assert_fused(model, tmp_path, "ModulatedRMSNormAffineShiftCast",
                                      ["x_f32", "gamma", "scale", "shift"], scale_offset=1.0)
    assert op_types(rewritten) == ["Cast", "ModulatedRMSNormAffineShiftCast", "Identity"]
    assert attribute(node, "norm_type") == TensorProto.FLOAT16


@pytest.mark.parametrize("opset", OPSETS)
def test_cast_before_gamma_only(opset, tmp_path):
    model = build_site(opset, in_cast=True, out_cast=True, gamma="vector")
    rewritten, _, _ = assert_fused(model, tmp_path, "RMSNormAffineCast", ["x_f32", "gamma"])
    assert op_types(rewritten) == ["Cast", "RMSNormAffineCast", "Identity"]


@pytest.mark.parametrize("opset", OPSETS)
def test_float16_throughout(opset, tmp_path):
    model = build_site(opset, x_type=TensorProto.FLOAT16, modulation="one_plus", shift=True)
    # eps is a float16 constant here (1e-6 is subnormal there): the attribute holds its float16 value.
    assert_fused(model, tmp_path, "ModulatedRMSNormShift", ["x", "scale", "shift"], scale_offset=1.0,
                 eps_rel=5e-2)


@pytest.mark.parametrize("opset", OPSETS)
def test_norm_with_a_second_reader_fuses_only_the_norm(opset, tmp_path):
    """The norm's output also feeds a graph output: the modulation cannot be folded, the norm can."""
    model = build_site(opset, modulation="one_plus", leak="normed")
    rewritten, report = run_tool(model, tmp_path)
    assert [n.op_type for n in fused_nodes(rewritten)] == [plain_norm_op(opset)]
    assert "Mul" in op_types(rewritten) and "1 fused" in report
    assert_same_outputs(model, rewritten)


@pytest.mark.parametrize("opset", OPSETS)
def test_two_sites(opset, tmp_path):
    first = build_site(opset, gamma="vector")
    # A second, independent norm on another input, sharing nothing: both fuse.
    second_nodes = []
    for node in first.graph.node:
        copy = helper.make_node(node.op_type, [i + "_b" if i in {n for nd in first.graph.node for n in nd.output} or
                                                i == "x" else i for i in node.input],
                                [o + "_b" for o in node.output])
        copy.attribute.extend(node.attribute)
        second_nodes.append(copy)
    graph = first.graph
    graph.node.extend(second_nodes)
    graph.input.append(helper.make_tensor_value_info("x_b", TensorProto.FLOAT, [B, T, D]))
    graph.output.append(helper.make_tensor_value_info("y_b", TensorProto.FLOAT, [B, T, D]))
    rewritten, report = run_tool(first, tmp_path)
    assert len(fused_nodes(rewritten)) == 2 and "2 site(s) found, 2 fused, 0 skipped" in report
    assert_same_outputs(first, rewritten)


# ---- negatives -------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", OPSETS)
def test_reduction_over_another_axis(opset, tmp_path):
    assert_left_alone(build_site(opset, axes=(1,)), tmp_path, "not the last axis")


@pytest.mark.parametrize("opset", OPSETS)
def test_reduction_over_several_axes(opset, tmp_path):
    assert_left_alone(build_site(opset, axes=(-2, -1)), tmp_path, "not the last axis only")


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("eps_kind", ["input", "overridable"])
def test_non_constant_eps(opset, eps_kind, tmp_path):
    assert_left_alone(build_site(opset, eps_kind=eps_kind), tmp_path, "eps is not a constant")


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("exponent", [4.0, -2.0])
def test_exponent_other_than_two(opset, exponent, tmp_path):
    assert_left_alone(build_site(opset, exponent=exponent), tmp_path, "not 2")


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("inverse,reason", [("div_minus_one", "divides something other than 1"),
                                            ("pow_p1", "power other than -1")])
def test_not_an_inverse_sqrt(opset, inverse, reason, tmp_path):
    assert_left_alone(build_site(opset, inverse=inverse), tmp_path, reason)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("leak", ["mean", "var", "rstd", "sq"])
def test_intermediate_with_other_consumers(opset, leak, tmp_path):
    assert_left_alone(build_site(opset, leak=leak), tmp_path, "has other consumers")


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("gamma", ["matrix", "column"])
def test_gamma_not_per_channel(opset, gamma, tmp_path):
    assert_left_alone(build_site(opset, gamma=gamma), tmp_path, "not per-channel")
