"""Unfused PyTorch references: the eager code frameworks run today, and a float64 evaluation.

Used by the tests (accuracy rule of SPEC 3) and by the benchmark (the "eager" providers).
"""

import torch
import torch.nn.functional as F


def broadcast_modulation(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``m`` shaped to broadcast against ``x`` by the rules of SPEC 2 (per-sample, PyTorch
    broadcasting, groups). Rule 3 materializes the rows, as the unfused code has to."""
    D = x.shape[-1]
    if m.dim() == 2 and x.dim() >= 3 and m.shape[0] == x.shape[0]:
        return m.view(m.shape[0], *([1] * (x.dim() - 2)), D)
    if m.dim() <= x.dim():
        try:
            if torch.broadcast_shapes(m.shape, x.shape) == x.shape:
                return m
        except RuntimeError:
            pass
    rows = x.numel() // D
    groups = m.numel() // D
    if m.shape[-1] == D and groups >= 1 and rows % groups == 0:
        return m.reshape(groups, D).repeat_interleave(rows // groups, dim=0).reshape(x.shape)
    raise ValueError(f"modulation of shape {tuple(m.shape)} does not broadcast to {tuple(x.shape)}")


def _norm_eager(x, weight, eps, offset, casting_mode):
    # Liger-Kernel's ModulatedRMSNormReference / HF LlamaRMSNorm and GemmaRMSNorm.
    input_dtype = x.dtype
    if casting_mode == "llama":
        n = x.to(torch.float32)
        n = n * torch.rsqrt(n.pow(2).mean(-1, keepdim=True) + eps)
        n = n.to(input_dtype)
        return n * (offset + weight) if weight is not None else n
    if casting_mode == "gemma":
        n = x.to(torch.float32)
        n = n * torch.rsqrt(n.pow(2).mean(-1, keepdim=True) + eps)
        if weight is not None:
            n = n * (offset + weight.float())
        return n.to(input_dtype)
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return n * (offset + weight) if weight is not None else n


def _modulate(n, x, scale, shift, scale_offset):
    """``n * (scale_offset + scale) + shift`` as separate eager kernels."""
    if scale is None:
        return n
    out = n * (scale_offset + broadcast_modulation(scale, x))
    return out + broadcast_modulation(shift, x) if shift is not None else out


def modulated_rms_norm_eager(x, weight, scale, shift=None, eps=1e-6, offset=0.0, casting_mode="llama", scale_offset=1.0):
    """The unfused code: norm, then ``* (scale_offset + scale) + shift`` as separate kernels."""
    return _modulate(_norm_eager(x, weight, eps, offset, casting_mode), x, scale, shift, scale_offset)


def modulated_rms_norm_f_rms_norm(x, weight, scale, shift=None, eps=1e-6, offset=0.0, casting_mode="llama", scale_offset=1.0):
    """``F.rms_norm`` for the norm, then eager modulation (what recent diffusers code does)."""
    w = weight if offset == 0.0 or weight is None else offset + weight
    return _modulate(F.rms_norm(x, (x.shape[-1],), w, eps), x, scale, shift, scale_offset)


def modulated_rms_norm_float64(x, weight, scale, shift=None, eps=1e-6, offset=0.0, scale_offset=1.0):
    """The formula evaluated in float64, with no intermediate rounding (autograd-capable)."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return modulated_rms_norm_eager(d(x), d(weight), d(scale), d(shift), eps, offset, "none", scale_offset)
