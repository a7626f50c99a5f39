"""SPEC 6: every bad input gets a clear error naming the argument, before anything is written."""

import pytest
import torch

import modnorm
from conftest import DEVICES


def _inputs(device):
    x = torch.randn(2, 4, 8, device=device)
    w = torch.randn(8, device=device)
    s = torch.randn(2, 8, device=device)
    h = torch.randn(2, 8, device=device)
    return x, w, s, h


CASES = [
    # (description, kwargs override, exception, message fragment)
    ("weight shape", dict(W=torch.randn(9)), ValueError, "weight"),
    ("weight rank", dict(W=torch.randn(8, 1)), ValueError, "weight"),
    ("scale unbroadcastable", dict(scale=torch.randn(3, 8)), ValueError, "scale"),
    ("scale last dim", dict(scale=torch.randn(2, 7)), ValueError, "scale"),
    ("shift unbroadcastable", dict(shift=torch.randn(5, 8)), ValueError, "shift"),
    ("shift without scale", dict(scale=None), ValueError, "shift"),
    ("x dtype", dict(X=torch.randn(2, 4, 8, dtype=torch.float64)), TypeError, "x"),
    ("weight dtype", dict(W=torch.randn(8, dtype=torch.float64)), TypeError, "weight"),
    ("scale dtype", dict(scale=torch.randint(0, 3, (2, 8))), TypeError, "scale"),
    ("negative eps", dict(eps=-1.0), ValueError, "eps"),
    ("nan eps", dict(eps=float("nan")), ValueError, "eps"),
    ("inf eps", dict(eps=float("inf")), ValueError, "eps"),
    ("casting mode", dict(casting_mode="fp8"), ValueError, "casting_mode"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,override,exc,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_the_argument(device, name, override, exc, fragment):
    x, w, s, h = _inputs(device)
    args = dict(X=x, W=w, scale=s, shift=h)
    args.update({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in override.items()})
    snapshot = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(exc, match=fragment):
        modnorm.modulated_rms_norm(**args)
    for k, v in snapshot.items():
        assert torch.equal(args[k], v), f"{k} was modified"


@pytest.mark.gpu
def test_tensors_on_different_devices():
    x, w, s, h = _inputs("cuda")
    for kw, frag in ((dict(W=w.cpu()), "weight"), (dict(scale=s.cpu()), "scale"), (dict(shift=h.cpu()), "shift")):
        args = dict(X=x, W=w, scale=s, shift=h)
        args.update(kw)
        with pytest.raises(RuntimeError, match=frag):
            modnorm.modulated_rms_norm(**args)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_errors_write_nothing(device):
    x, w, s, h = _inputs(device)
    y, rstd = torch.ops.modnorm.fwd(x, w, s, h, 1e-6, 0.0, 1.0, "llama")
    dy = torch.randn_like(x)
    dy_copy = dy.clone()
    bad_shift = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match="shift"):
        torch.ops.modnorm.bwd_inplace(dy, x, rstd, w, s, bad_shift, 0.0, 1.0, "llama", [True, True, True, True])
    with pytest.raises(ValueError, match="rstd"):
        torch.ops.modnorm.bwd_inplace(dy, x, rstd[:1], w, s, h, 0.0, 1.0, "llama", [True, True, True, True])
    with pytest.raises(ValueError, match="casting_mode"):
        torch.ops.modnorm.bwd_inplace(dy, x, rstd, w, s, h, 0.0, 1.0, "bad", [True, True, True, True])
    assert torch.equal(dy, dy_copy)
    with pytest.raises(ValueError, match="dy"):
        torch.ops.modnorm.bwd(torch.randn(2, 4, 9, device=device), x, rstd, w, s, h, 0.0, 1.0, "llama", [True] * 4)


def test_unsupported_device():
    x = torch.randn(2, 4, 8, device="meta")
    with pytest.raises(Exception):
        torch.ops.modnorm.bwd(x, x, torch.randn(2, 4, device="meta"), None, None, None, 0.0, 1.0, "llama", [True] * 4).cpu()
