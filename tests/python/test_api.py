"""Python API: Liger-compatible names, order and defaults; modules; torch.compile(fullgraph=True)
forward and backward with no graph break; torch.library.opcheck."""

import inspect

import pytest
import torch

import modnorm
from conftest import DEVICES


def _params(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def test_functional_signature_matches_liger():
    # liger_modulated_rms_norm(X, W, scale, shift=None, eps=1e-6, offset=0.0, casting_mode="llama", in_place=True)
    empty = inspect.Parameter.empty
    assert _params(modnorm.modulated_rms_norm) == [
        ("X", empty), ("W", empty), ("scale", empty), ("shift", None), ("eps", 1e-6), ("offset", 0.0),
        ("casting_mode", "llama"), ("in_place", True), ("scale_offset", 1.0),
    ]
    assert inspect.signature(modnorm.modulated_rms_norm).parameters["scale_offset"].kind == inspect.Parameter.KEYWORD_ONLY
    assert [n for n, _ in _params(modnorm.rms_norm)] == ["X", "W", "eps", "offset", "casting_mode", "in_place"]


def test_module_signatures_match_liger():
    assert _params(modnorm.ModulatedRMSNorm.__init__)[1:] == [
        ("hidden_size", inspect.Parameter.empty), ("eps", 1e-6), ("offset", 0.0), ("casting_mode", "llama"),
        ("init_fn", "ones"), ("in_place", True), ("elementwise_affine", True), ("scale_offset", 1.0),
    ]
    assert [n for n, _ in _params(modnorm.ModulatedRMSNorm.forward)] == ["self", "hidden_states", "scale", "shift"]
    assert _params(modnorm.RMSNorm.__init__)[1:] == [
        ("hidden_size", inspect.Parameter.empty), ("eps", 1e-6), ("offset", 0.0), ("casting_mode", "llama"),
        ("init_fn", "ones"), ("in_place", True), ("row_mode", None), ("elementwise_affine", True),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", [True, False])
def test_modules(device, affine):
    m = modnorm.ModulatedRMSNorm(64, elementwise_affine=affine).to(device)
    assert (m.weight is not None) == affine
    x = torch.randn(2, 5, 64, device=device, requires_grad=True)
    s, h = torch.randn(2, 64, device=device), torch.randn(2, 64, device=device)
    y = m(x, s, h)
    expect = modnorm.reference.modulated_rms_norm_eager(x, m.weight, s, h)
    torch.testing.assert_close(y, expect, atol=1e-4, rtol=1e-6)
    y.sum().backward()
    assert x.grad is not None and (not affine or m.weight.grad is not None)
    assert "weight_shape" in repr(m)

    r = modnorm.RMSNorm(64, init_fn="zeros", offset=1.0, casting_mode="gemma").to(device)
    torch.testing.assert_close(r(x), modnorm.reference.modulated_rms_norm_eager(x, r.weight, None, None, 1e-6, 1.0, "gemma"))
    with pytest.raises(ValueError, match="init_fn"):
        modnorm.RMSNorm(8, init_fn="randn")


def _block(x, w, s, h):
    # a DiT-style use: the fused op between other work, so compile has to keep it in the graph
    return modnorm.modulated_rms_norm(x * 1.5, w, s, h).relu() + 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph_forward_and_backward(device, dynamic):
    torch._dynamo.reset()
    compiled = torch.compile(_block, fullgraph=True, dynamic=dynamic)
    for T in (7, 9):
        x = torch.randn(2, T, 48, device=device, requires_grad=True)
        w = torch.randn(48, device=device, requires_grad=True)
        proj = torch.randn(2, 1, 96, device=device, requires_grad=True)
        s, h = proj.chunk(2, dim=-1)
        dy = torch.randn(2, T, 48, device=device)
        y_c = compiled(x, w, s, h)
        g_c = torch.autograd.grad(y_c, (x, w, proj), dy)
        y_e = _block(x, w, s, h)
        g_e = torch.autograd.grad(y_e, (x, w, proj), dy)
        torch.testing.assert_close(y_c, y_e)
        for a, b in zip(g_c, g_e):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_graph_calls_modnorm(device):
    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    f = torch.compile(_block, backend=backend, fullgraph=True)
    x = torch.randn(2, 4, 16, device=device)
    f(x, None, torch.randn(2, 16, device=device), None)
    assert any("modnorm.modulated_rms_norm" in t for t in seen), seen


def _opcheck_args(device):
    x = torch.randn(2, 6, 32, device=device, requires_grad=True)
    w = torch.randn(32, device=device, requires_grad=True)
    proj = torch.randn(2, 1, 64, device=device)
    s, h = proj.chunk(2, dim=-1)
    return x, w, s.requires_grad_(), h.requires_grad_()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, w, s, h = _opcheck_args(device)
    torch.library.opcheck(torch.ops.modnorm.modulated_rms_norm.default, (x, w, s, h, 1e-6, 0.0, 1.0, "llama", True))
    torch.library.opcheck(torch.ops.modnorm.modulated_rms_norm.default, (x, None, s, None, 1e-5, 0.0, 0.0, "gemma", False))
    torch.library.opcheck(torch.ops.modnorm.modulated_rms_norm.default, (x, w, None, None, 1e-5, 1.0, 1.0, "none", True))
    xd, wd, sd, hd = (t.detach() for t in (x, w, s, h))
    y, rstd = torch.ops.modnorm.fwd(xd, wd, sd, hd, 1e-6, 0.0, 1.0, "llama")
    torch.library.opcheck(torch.ops.modnorm.fwd.default, (xd, wd, sd, hd, 1e-6, 0.0, 1.0, "llama"))
    torch.library.opcheck(torch.ops.modnorm.fwd_y.default, (xd, wd, sd, hd, 1e-6, 0.0, 1.0, "llama"))
    assert torch.equal(torch.ops.modnorm.fwd_y(xd, wd, sd, hd, 1e-6, 0.0, 1.0, "llama"), y)
    dy = torch.randn_like(xd)
    for mask in ([True, True, True, True], [False, True, False, True], [True, False, True, False]):
        torch.library.opcheck(torch.ops.modnorm.bwd.default, (dy, xd, rstd, wd, sd, hd, 0.0, 1.0, "llama", mask))
    torch.library.opcheck(torch.ops.modnorm.bwd_inplace.default, (dy.clone(), xd, rstd, wd, sd, hd, 0.0, 1.0, "llama", [True, True, True, True]))


@pytest.mark.parametrize("device", DEVICES)
def test_inference_mode_and_no_grad(device):
    x = torch.randn(2, 3, 16, device=device)
    s = torch.randn(2, 16, device=device)
    expect = modnorm.reference.modulated_rms_norm_eager(x, None, s)
    with torch.inference_mode():
        torch.testing.assert_close(modnorm.modulated_rms_norm(x, None, s), expect)
    with torch.no_grad():
        torch.testing.assert_close(modnorm.modulated_rms_norm(x, None, s), expect)


# The autograd kernel records a node only when there is a graph to record; otherwise it runs the
# forward alone (host time). Either way the values are the same, bit for bit.
@pytest.mark.parametrize("device", DEVICES)
def test_autograd_node_only_when_recorded(device):
    x = torch.randn(2, 3, 16, device=device, requires_grad=True)
    w = (1 + 0.5 * torch.randn(16, device=device)).requires_grad_()
    s = torch.randn(2, 16, device=device, requires_grad=True)
    h = torch.randn(2, 16, device=device, requires_grad=True)
    y = modnorm.modulated_rms_norm(x, w, s, h)
    assert y.grad_fn is not None
    with torch.no_grad():
        y_no_grad = modnorm.modulated_rms_norm(x, w, s, h)
    y_detached = modnorm.modulated_rms_norm(x.detach(), w.detach(), s.detach(), h.detach())
    for out in (y_no_grad, y_detached):
        assert out.grad_fn is None and not out.requires_grad
        assert torch.equal(out, y.detach())
    # One input requiring grad is enough for a node, and it gets the eager code's gradient.
    dy = torch.randn_like(y)
    y_w = modnorm.modulated_rms_norm(x.detach(), w, s.detach(), None)
    assert y_w.grad_fn is not None
    (dw,) = torch.autograd.grad(y_w, w, dy)
    y_eager = modnorm.reference.modulated_rms_norm_eager(x.detach(), w, s.detach(), None)
    (dw_eager,) = torch.autograd.grad(y_eager, w, dy)
    torch.testing.assert_close(dw, dw_eager, atol=1e-4, rtol=1e-5)


# Forward-mode AD is not implemented; a dual input is refused with or without grad mode, never
# silently run without its tangent.
@pytest.mark.parametrize("grad_mode", [True, False])
def test_forward_mode_ad_is_refused(grad_mode):
    import torch.autograd.forward_ad as fwAD

    s = torch.randn(2, 16)
    with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
        x = fwAD.make_dual(torch.randn(2, 3, 16), torch.randn(2, 3, 16))
        with pytest.raises(RuntimeError, match="jvp is not implemented"):
            modnorm.modulated_rms_norm(x, None, s)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_input(device):
    x = torch.randn(2, 0, 16, device=device, requires_grad=True)
    w = torch.randn(16, device=device, requires_grad=True)
    s = torch.randn(2, 16, device=device, requires_grad=True)
    y = modnorm.modulated_rms_norm(x, w, s, None)
    assert y.shape == x.shape
    gx, gw, gs = torch.autograd.grad(y, (x, w, s), torch.randn_like(y))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w)) and torch.equal(gs, torch.zeros_like(s))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_x_and_dy(device):
    base = torch.randn(2, 64, 10, device=device)
    x = base.transpose(1, 2).requires_grad_()  # last dim strided: made contiguous by the binding
    s = torch.randn(2, 64, device=device)
    y = modnorm.modulated_rms_norm(x, None, s)
    dy = torch.randn(2, 64, 10, device=device).transpose(1, 2)
    (gx,) = torch.autograd.grad(y, x, dy)
    y_e = modnorm.reference.modulated_rms_norm_eager(x, None, s)
    (gx_e,) = torch.autograd.grad(y_e, x, dy)
    torch.testing.assert_close(y, y_e, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(gx, gx_e, atol=1e-4, rtol=1e-6)
