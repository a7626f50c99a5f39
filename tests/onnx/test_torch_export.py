"""Models exported from PyTorch: an LTX-Video-style block (RMSNorm without weight, then
* (1 + scale) + shift) and one with a weight, through the legacy TorchScript exporter (which cannot export
aten::rms_norm, so the norm is written out as ops, as in HF Llama/LTX code) and through the dynamo exporter
(which decomposes nn.RMSNorm below opset 23 and emits RMSNormalization from 23 on)."""

import io

import numpy as np
import onnx
import pytest
import torch

from fusion_helpers import assert_same_outputs, attribute, fused_nodes, op_types, run_tool

D = 64


class ExplicitRMSNorm(torch.nn.Module):
    """RMSNorm as the model code writes it: float32 statistics, result back in the input's dtype."""

    def __init__(self, dim, eps=1e-6, elementwise_affine=True):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.rand(dim) + 0.5) if elementwise_affine else None

    def forward(self, x):
        hidden = x.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        hidden = hidden.to(x.dtype)
        return hidden * self.weight.to(x.dtype) if self.weight is not None else hidden


class ModulatedBlock(torch.nn.Module):
    """norm(x) * (1 + scale) + shift, with scale and shift chunked from an AdaLN projection."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm
        self.ada = torch.nn.Linear(D, 2 * D)

    def forward(self, x, temb):
        scale, shift = self.ada(temb).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


def export(module, dtype, opset, dynamo):
    module = module.to(dtype).eval()
    torch.manual_seed(0)
    args = (torch.randn(2, 7, D, dtype=dtype), torch.randn(2, D, dtype=dtype))
    buffer = io.BytesIO()
    kwargs = {"dynamo": dynamo, "input_names": ["x", "temb"], "output_names": ["y"]}
    if dynamo:
        kwargs["external_data"] = False
    torch.onnx.export(module, args, buffer, opset_version=opset, **kwargs)
    model = onnx.load_from_string(buffer.getvalue())
    if dynamo:
        # The dynamo exporter may raise the opset it was asked for; the assertions below need the real one.
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return model, opset


def check_one_modulated_node(model, tmp_path, expected_op):
    rewritten, report = run_tool(model, tmp_path)
    fused = fused_nodes(rewritten)
    assert [n.op_type for n in fused] == [expected_op], (report, op_types(rewritten))
    assert attribute(fused[0], "scale_offset") == 1.0
    assert attribute(fused[0], "epsilon") == pytest.approx(1e-6, rel=1e-6)
    # (Div stays: the exported chunk computes its split size with one.)
    assert not {"Pow", "ReduceMean", "Sqrt", "Reciprocal"} & set(op_types(rewritten)), op_types(rewritten)
    assert "1 fused, 0 skipped" in report
    assert_same_outputs(model, rewritten)
    return rewritten, report


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("affine", [False, True])
def test_legacy_export_float32(opset, affine, tmp_path):
    model, _ = export(ModulatedBlock(ExplicitRMSNorm(D, elementwise_affine=affine)), torch.float32, opset, False)
    assert "ReduceMean" in op_types(model)
    # x.float() and .to(x.dtype) export as Casts even in float32: the second sits right after the norm.
    op = "ModulatedRMSNorm" + ("Affine" if affine else "") + "ShiftCast"
    check_one_modulated_node(model, tmp_path, op)


@pytest.mark.parametrize("affine", [False, True])
def test_legacy_export_float16_llama_casts(affine, tmp_path):
    model, _ = export(ModulatedBlock(ExplicitRMSNorm(D, elementwise_affine=affine)), torch.float16, 17, False)
    rewritten, _ = check_one_modulated_node(model, tmp_path,
                                            "ModulatedRMSNorm" + ("Affine" if affine else "") + "ShiftCast")
    assert attribute(fused_nodes(rewritten)[0], "norm_type") == onnx.TensorProto.FLOAT16


def torch_rmsnorm_block(affine):
    """A modulated block around torch.nn.RMSNorm, with a weight away from ones when it has one."""
    block = ModulatedBlock(torch.nn.RMSNorm(D, eps=1e-6, elementwise_affine=affine))
    if affine:
        with torch.no_grad():
            block.norm.weight.uniform_(0.5, 1.5)
    return block


@pytest.mark.parametrize("affine", [False, True])
def test_dynamo_export_decomposed(affine, tmp_path):
    pytest.importorskip("onnxscript")
    block = torch_rmsnorm_block(affine)
    model, opset = export(block, torch.float32, 18, True)
    assert opset < 23 and "ReduceMean" in op_types(model)
    check_one_modulated_node(model, tmp_path, "ModulatedRMSNorm" + ("Affine" if affine else "") + "Shift")


@pytest.mark.parametrize("affine", [False, True])
def test_dynamo_export_rmsnormalization_folds_modulation(affine, tmp_path):
    """Opset 23: the exporter writes RMSNormalization (weight=None as a ones tensor); the modulation after
    it is folded in."""
    pytest.importorskip("onnxscript")
    block = torch_rmsnorm_block(affine)
    model, opset = export(block, torch.float32, 23, True)
    assert opset >= 23 and "RMSNormalization" in op_types(model)
    rewritten, report = check_one_modulated_node(
        model, tmp_path, "ModulatedRMSNorm" + ("Affine" if affine else "") + "Shift")
    assert "RMSNormalization" not in op_types(rewritten) and "ConstantOfShape" not in op_types(rewritten)
    # --keep-rmsnormalization leaves such a model as it was.
    kept, report = run_tool(model, tmp_path, "--keep-rmsnormalization")
    assert op_types(kept) == op_types(model) and "0 site(s) found" in report
