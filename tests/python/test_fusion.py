"""modnorm.fuse on FX graphs from torch.fx.symbolic_trace and torch.export: every spelling of the
pattern it must fuse, the cases it must leave alone, and the torch.compile route."""

import pytest
import torch
import torch.nn as nn

import modnorm
from conftest import DEVICES
from modnorm.fusion import _fused_site

D = 32


def rms_pow_mean_rsqrt(x, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class LlamaModulated(nn.Module):
    """HF LlamaRMSNorm with weight, then * (1 + scale) + shift."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(D))

    def forward(self, x, scale, shift):
        dt = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(dt) * (1 + scale) + shift


class SumDivReciprocalNoGamma(nn.Module):
    def forward(self, x, scale, shift):
        var = (x * x).sum(-1, keepdim=True) / D
        n = x * (1 / torch.sqrt(var + 1e-5))
        return (1 + scale) * n


class GemmaSquareOffset(nn.Module):
    """GemmaRMSNorm: zero-centred weight used as (1 + w), upcast, rounded after the weight."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(D))

    def forward(self, x, scale, shift):
        h = x.float()
        h = h * torch.reciprocal(torch.sqrt(torch.square(h).mean(-1, keepdim=True) + 1e-6))
        h = h * (1.0 + self.weight.float())
        return h.type_as(x) * (1 + scale) + shift


class DivBySqrtWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(D))

    def forward(self, x, scale, shift):
        n = x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
        return shift + (n * self.weight) * (1 + scale)


class PowMinusHalfPrecomputedMultiplier(nn.Module):
    def forward(self, x, scale, shift):
        n = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5)
        return n * scale  # Z-Image passes 1 + scale precomputed: scale_offset = 0


class PowSqrtMinusOne(nn.Module):
    def forward(self, x, scale, shift):
        r = torch.pow(torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), -1)
        return (r * x) * (2.0 + scale) + shift


class BareNorm(nn.Module):
    def forward(self, x, scale, shift):
        return rms_pow_mean_rsqrt(x) + scale.sum() * 0  # modulation not part of the pattern


POSITIVE = [
    (LlamaModulated, "rms_norm + gamma + scale(scale_offset 1) + shift [llama]"),
    (SumDivReciprocalNoGamma, "rms_norm + scale(scale_offset 1) [none]"),
    (GemmaSquareOffset, "rms_norm + gamma(offset 1) + scale(scale_offset 1) + shift [gemma]"),
    (DivBySqrtWeight, "rms_norm + gamma + scale(scale_offset 1) + shift [none]"),
    (PowMinusHalfPrecomputedMultiplier, "rms_norm + scale(scale_offset 0) [none]"),
    (PowSqrtMinusOne, "rms_norm + scale(scale_offset 2) + shift [none]"),
    (BareNorm, "rms_norm [none]"),
]


class OtherAxis(nn.Module):
    def forward(self, x, scale, shift):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6) * (1 + scale)


class SeveralAxes(nn.Module):
    def forward(self, x, scale, shift):
        return x * torch.rsqrt(x.pow(2).mean((-2, -1), keepdim=True) + 1e-6) * (1 + scale)


class TensorEps(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("eps", torch.tensor(1e-6))

    def forward(self, x, scale, shift):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + scale)


class CubeExponent(nn.Module):
    def forward(self, x, scale, shift):
        return x * torch.rsqrt(x.abs().pow(3).mean(-1, keepdim=True) + 1e-6) * (1 + scale)


class VarianceUsedElsewhere(nn.Module):
    def forward(self, x, scale, shift):
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + 1e-6) * (1 + scale) + var


class NormUsedElsewhere(nn.Module):
    def forward(self, x, scale, shift):
        n = rms_pow_mean_rsqrt(x)
        return n * (1 + scale) + shift + n.sum(-1, keepdim=True)


class NoKeepdim(nn.Module):
    def forward(self, x, scale, shift):
        return x * torch.rsqrt(x.pow(2).mean(-1) + 1e-6).unsqueeze(-1) * (1 + scale)


NEGATIVE = [OtherAxis, SeveralAxes, TensorEps, CubeExponent, VarianceUsedElsewhere, NoKeepdim]


class GammaNotPerChannel(nn.Module):
    """A (T, D) constant multiplying the norm is no gamma: the norm is fused, the multiply stays."""

    def __init__(self, T):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(T, D))

    def forward(self, x, scale, shift):
        return rms_pow_mean_rsqrt(x) * self.weight


def inputs(device, dtype=torch.float32, B=2, T=6):
    x = torch.randn(B, T, D, device=device, dtype=dtype, requires_grad=True)
    scale = (0.2 * torch.randn(B, 1, D, device=device, dtype=dtype)).requires_grad_()
    shift = (0.2 * torch.randn(B, 1, D, device=device, dtype=dtype)).requires_grad_()
    return x, scale, shift


def traced(module, how, args):
    if how == "symbolic_trace":
        return torch.fx.symbolic_trace(module)
    return torch.export.export(module, tuple(a.detach() for a in args)).module()


def count_fused(gm):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is _fused_site)


def check_same(module, gm, args):
    params = [p for p in module.parameters()]
    leaves = list(args) + params
    dy = None
    y_ref = module(*args)
    dy = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, leaves, dy, allow_unused=True)
    y = gm(*args)
    if isinstance(y, (tuple, list)):
        y = y[0]
    gm_params = list(gm.parameters())
    g = torch.autograd.grad(y, list(args) + gm_params, dy, allow_unused=True)
    tol = dict(atol=1e-5, rtol=1e-5) if args[0].dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y, y_ref, **tol)
    for a, b in zip(g[: len(args)], g_ref[: len(args)]):
        if b is None:
            continue
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(g[len(args) :], g_ref[len(args) :]):
        if b is not None:
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["symbolic_trace", "export"])
@pytest.mark.parametrize("cls,kind", POSITIVE, ids=[c.__name__ for c, _ in POSITIVE])
def test_fuses_every_spelling(device, how, cls, kind, capsys):
    module = cls().to(device)
    args = inputs(device)
    # symbolic_trace graphs carry no shapes; sum(-1) / D needs D, from example inputs
    example = args if (how == "symbolic_trace" and cls is SumDivReciprocalNoGamma) else None
    gm = modnorm.fuse(traced(module, how, args), example)
    assert count_fused(gm) == 1, gm.graph
    if how == "export":  # export drops float32 -> float32 casts: no casting mode to read back
        kind = kind.split(" [")[0]
    assert gm.modnorm_report[0].startswith("modnorm.fuse: site 1: " + kind), gm.modnorm_report
    assert gm.modnorm_report[-1] == "modnorm.fuse: 1 site(s) fused"
    assert "site 1" in capsys.readouterr().out
    check_same(module, gm, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["symbolic_trace", "export"])
@pytest.mark.parametrize("cls,mode", [(LlamaModulated, "llama"), (GemmaSquareOffset, "gemma")], ids=["llama", "gemma"])
def test_bf16_casting_modes(device, how, cls, mode):
    module = cls().to(device)
    args = inputs(device, torch.bfloat16)
    gm = modnorm.fuse(traced(module, how, args), verbose=False)
    assert count_fused(gm) == 1
    assert f"[{mode}]" in gm.modnorm_report[0], gm.modnorm_report
    check_same(module, gm, args)


@pytest.mark.parametrize("how", ["symbolic_trace", "export"])
@pytest.mark.parametrize("cls", NEGATIVE, ids=lambda c: c.__name__)
def test_leaves_alone(how, cls):
    module = cls()
    args = inputs("cpu")
    gm = modnorm.fuse(traced(module, how, args), verbose=False)
    assert count_fused(gm) == 0, gm.graph
    assert gm.modnorm_report == ["modnorm.fuse: 0 site(s) fused"]
    check_same(module, gm, args)


@pytest.mark.parametrize("how", ["symbolic_trace", "export"])
def test_shared_normalized_value_stops_the_site(how):
    # n feeds the modulation and something else: the norm is fused, the modulation stays outside
    module = NormUsedElsewhere()
    args = inputs("cpu")
    gm = modnorm.fuse(traced(module, how, args), verbose=False)
    assert count_fused(gm) == 1
    assert gm.modnorm_report[0].startswith("modnorm.fuse: site 1: rms_norm [none]")
    check_same(module, gm, args)


@pytest.mark.parametrize("how", ["symbolic_trace", "export"])
def test_gamma_not_per_channel_stays_outside(how):
    module = GammaNotPerChannel(6)
    args = inputs("cpu")
    gm = modnorm.fuse(traced(module, how, args), verbose=False)
    assert count_fused(gm) == 1
    assert "gamma left out: not per channel" in gm.modnorm_report[0]
    assert "rms_norm [none]" in gm.modnorm_report[0]
    check_same(module, gm, args)


def test_several_sites_and_per_sample_modulation():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(D, 4 * D)

        def forward(self, x, c, unused):
            shift1, scale1, shift2, scale2 = self.proj(c).unsqueeze(1).chunk(4, dim=-1)
            h = rms_pow_mean_rsqrt(x) * (1 + scale1) + shift1
            h = h.relu()
            return rms_pow_mean_rsqrt(h) * (1 + scale2) + shift2

    module = Block()
    x = torch.randn(2, 6, D, requires_grad=True)
    c = torch.randn(2, D, requires_grad=True)
    for how in ("symbolic_trace", "export"):
        gm = modnorm.fuse(traced(module, how, (x, c, c)), verbose=False)
        assert count_fused(gm) == 2
        assert gm.modnorm_report[-1] == "modnorm.fuse: 2 site(s) fused"
        check_same(module, gm, (x, c, c))


def test_modulation_that_the_op_does_not_take_still_correct():
    # scale of shape (B, T, 1): broadcast over channels. Fused norm, eager modulation.
    module = SumDivReciprocalNoGamma()
    x = torch.randn(2, 6, D, requires_grad=True)
    s = torch.randn(2, 6, 1, requires_grad=True)
    gm = modnorm.fuse(torch.fx.symbolic_trace(module), (x, s, s), verbose=False)
    assert count_fused(gm) == 1
    check_same(module, gm, (x, s, s))


def test_torch_compile_backend_runs_the_fused_op():
    torch._dynamo.reset()
    module = LlamaModulated()
    args = inputs("cpu")
    before = len(modnorm.fusion.compile_reports)
    compiled = torch.compile(module, backend="modnorm")
    check_same(module, compiled, args)
    reports = modnorm.fusion.compile_reports[before:]
    assert any("rms_norm + gamma + scale(scale_offset 1) + shift [llama]" in line for r in reports for line in r), reports
