"""SPEC 5: in_place reuses dy's memory for dx only when nothing else reads dy."""

import pytest
import torch

import modnorm
from conftest import DEVICES


def reuses():
    return torch.ops.modnorm._inplace_reuses()


@pytest.mark.parametrize("device", DEVICES)
def test_reuses_dy_when_exclusive(device):
    x = torch.randn(2, 8, 32, device=device, requires_grad=True)
    s = torch.randn(2, 32, device=device)
    before = reuses()
    y = modnorm.modulated_rms_norm(x, None, s)
    (gx,) = torch.autograd.grad((y * 2.0).sum(), x)  # dy = 2 * ones, made by MulBackward, held by no one else
    assert reuses() == before + 1
    y_ref = modnorm.reference.modulated_rms_norm_eager(x, None, s)
    (gx_ref,) = torch.autograd.grad((y_ref * 2.0).sum(), x)
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("branch_first", [True, False], ids=["branch_made_first", "leaf_branch"])
def test_shared_dy_of_residual_never_corrupted(device, dtype, branch_first):
    # out = norm(x) + residual: the same dy flows to both branches. When the residual branch was
    # built first, the engine runs it after the norm's backward, so dy is still to be read there.
    x = torch.randn(2, 8, 32, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(2, 8, 32, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(32, device=device, dtype=dtype, requires_grad=True)
    s = torch.randn(2, 32, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(2, 8, 32, device=device, dtype=dtype)
    before = reuses()
    residual = r * 1.0 if branch_first else r
    out = modnorm.modulated_rms_norm(x, w, s) + residual
    (out * 3.0).backward(dy)
    torch.testing.assert_close(r.grad, dy * 3.0, atol=0, rtol=0)
    if branch_first:
        assert reuses() == before, "dy was reused while the residual branch still held it"
    # and the norm's own gradients are right
    x2, w2, s2 = (t.detach().clone().requires_grad_() for t in (x, w, s))
    (modnorm.modulated_rms_norm(x2, w2, s2, in_place=False) * 3.0).backward(dy)
    for a, b in ((x.grad, x2.grad), (w.grad, w2.grad), (s.grad, s2.grad)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_user_held_dy_never_written(device):
    x = torch.randn(2, 8, 32, device=device, requires_grad=True)
    s = torch.randn(2, 32, device=device)
    dy = torch.randn(2, 8, 32, device=device)
    dy_copy = dy.clone()
    before = reuses()
    torch.autograd.grad(modnorm.modulated_rms_norm(x, None, s), x, dy)
    assert torch.equal(dy, dy_copy)
    assert reuses() == before


@pytest.mark.parametrize("device", DEVICES)
def test_in_place_false_and_strided_dy_use_fresh_buffers(device):
    x = torch.randn(2, 8, 32, device=device, requires_grad=True)
    s = torch.randn(2, 32, device=device)
    before = reuses()
    torch.autograd.grad((modnorm.modulated_rms_norm(x, None, s, in_place=False) * 2.0).sum(), x)
    # y.sum()'s dy is an expanded (stride 0) tensor: never written
    torch.autograd.grad(modnorm.modulated_rms_norm(x, None, s).sum(), x)
    assert reuses() == before


@pytest.mark.parametrize("device", DEVICES)
def test_bwd_inplace_op_writes_dx_over_dy(device):
    x = torch.randn(3, 16, device=device)
    s = torch.randn(3, 16, device=device)
    y, rstd = torch.ops.modnorm.fwd(x, None, s, None, 1e-6, 0.0, 1.0, "llama")
    dy = torch.randn_like(x)
    dx, *_ = torch.ops.modnorm.bwd(dy, x, rstd, None, s, None, 0.0, 1.0, "llama", [True, False, True, False])
    torch.ops.modnorm.bwd_inplace(dy, x, rstd, None, s, None, 0.0, 1.0, "llama", [True, False, True, False])
    assert torch.equal(dy, dx)
