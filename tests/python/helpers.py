"""Inputs for every SPEC 2 modulation layout, and error measures against float64."""

import torch

from modnorm.reference import broadcast_modulation, modulated_rms_norm_eager, modulated_rms_norm_float64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = [("llama", 0.0), ("gemma", 1.0), ("none", 0.0)]
KINDS = [
    "shared",  # (D,)
    "per_sample",  # (B, D), rule 1
    "per_sample_3d",  # (B, 1, D)
    "per_token",  # (B, T, D)
    "token_shared",  # (T, D): one row per token, shared over the batch
    "token_shared_1",  # (1, T, D)
    "per_frame",  # x (B, F, HW, D), modulation (B, F, 1, D)
    "groups",  # x (B*T, D), modulation (B, D): rule 3
    "chunk",  # (B, 1, D) chunk views of a (B, 1, 6*D) projection, row stride 6*D
]


def make_inputs(kind, dtype, device, B=2, T=12, D=64, weight=True, shift=True, mod_dtype=None, w_dtype=None):
    """Returns (x, weight, proj_leaves, scale, shift): proj_leaves are the leaf tensors the
    modulation is (a view of), so gradients are compared on them."""
    mod_dtype = mod_dtype or dtype
    w_dtype = w_dtype or dtype
    if kind == "per_frame":
        x_shape = (B, T // 2, 2, D)
    elif kind == "groups":
        x_shape = (B * T, D)
    else:
        x_shape = (B, T, D)
    x = (2.0 * torch.randn(x_shape, device=device)).to(dtype).requires_grad_()
    w = (1.0 + 0.5 * torch.randn(D, device=device)).to(w_dtype).requires_grad_() if weight else None
    mod_shape = {
        "shared": (D,),
        "per_sample": (B, D),
        "per_sample_3d": (B, 1, D),
        "per_token": (B, T, D),
        "token_shared": (T, D),
        "token_shared_1": (1, T, D),
        "per_frame": (B, T // 2, 1, D),
        "groups": (B, D),
    }.get(kind)
    if kind == "chunk":
        proj = (0.3 * torch.randn(B, 1, 6 * D, device=device)).to(mod_dtype).requires_grad_()
        chunks = proj.chunk(6, dim=-1)
        return x, w, [proj], chunks[1], chunks[0] if shift else None
    s = (0.3 * torch.randn(mod_shape, device=device)).to(mod_dtype).requires_grad_()
    h = (0.3 * torch.randn(mod_shape, device=device)).to(mod_dtype).requires_grad_() if shift else None
    leaves = [s] + ([h] if h is not None else [])
    return x, w, leaves, s, h


def rel_err(a, b64):
    a = a.double()
    den = b64.norm()
    return ((a - b64).norm() / den).item() if den > 0 else (a - b64).norm().item()


def leaves_of(x, w, proj_leaves):
    return [t for t in [x, w] + list(proj_leaves) if t is not None]


def float64_reference(x, w, proj_leaves, kind, shift_given, eps, offset, scale_offset, dy, magnitudes=False):
    """Float64 forward and gradients, from detached float64 copies of every leaf.

    With ``magnitudes``, every term of the gradients' sums is replaced by its absolute value (x,
    offset + w, scale_offset + scale and dy by their absolute values: the gradients are linear in
    each), which gives the size of the terms a gradient sum cancels down from."""
    leaves64 = [t.detach().double() for t in leaves_of(x, w, proj_leaves)]
    if magnitudes:
        leaves64[0] = leaves64[0].abs()
        if w is not None:
            leaves64[1] = (offset + leaves64[1]).abs() - offset
        i = 2 if w is not None else 1
        if kind == "chunk":  # scale is chunk 1 of the projection
            D = x.shape[-1]
            leaves64[i][..., D : 2 * D] = (scale_offset + leaves64[i][..., D : 2 * D]).abs() - scale_offset
        else:
            leaves64[i] = (scale_offset + leaves64[i]).abs() - scale_offset
        dy = dy.abs()
    leaves64 = [t.requires_grad_() for t in leaves64]
    x64 = leaves64[0]
    w64 = leaves64[1] if w is not None else None
    mods = leaves64[2 if w is not None else 1 :]
    if kind == "chunk":
        chunks = mods[0].chunk(6, dim=-1)
        s64, h64 = chunks[1], (chunks[0] if shift_given else None)
    else:
        s64, h64 = mods[0], (mods[1] if shift_given else None)
    y64 = modulated_rms_norm_float64(x64, w64, s64, h64, eps, offset, scale_offset)
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    return y64.detach(), grads64


def eager_run(x, w, s, h, eps, offset, mode, scale_offset, dy, leaves):
    y = modulated_rms_norm_eager(x, w, s, h, eps, offset, mode, scale_offset)
    grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
    return y, grads


def dx_terms_norm(x, w, s, dy, eps, offset, scale_offset):
    """||rstd * dy * m * w||: the size of the terms dx is the difference of. dx itself can be far
    smaller (at D = 1 it is nearly zero), so dx errors are measured against this."""
    x64 = x.detach().double()
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    t = rstd * dy.double()
    if w is not None:
        t = t * (offset + w.detach().double())
    if s is not None:
        t = t * (scale_offset + broadcast_modulation(s.detach().double(), x64))
    return t.norm().item()
