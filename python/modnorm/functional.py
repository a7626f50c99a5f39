"""Functional API, drop-in for Liger-Kernel's ``liger_modulated_rms_norm`` and ``liger_rms_norm``."""

import torch

from ._ops import ops

# The overload itself, not the packet: resolving the packet on every call costs about a
# microsecond of host time, which small shapes pay in full.
_modulated_rms_norm = ops.modulated_rms_norm.default


def modulated_rms_norm(
    X: torch.Tensor,
    W: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None = None,
    eps: float = 1e-6,
    offset: float = 0.0,
    casting_mode: str = "llama",
    in_place: bool = True,
    *,
    scale_offset: float = 1.0,
) -> torch.Tensor:
    """``rms_norm(X, W, eps, offset) * (scale_offset + scale) + shift``, fused.

    ``W`` may be None (no affine). ``scale``/``shift`` broadcast over X's rows per sample
    ``(B, D)``, by PyTorch broadcasting (``(D,)``, ``(B, 1, D)``, ``(B, T, D)``, ``(B, F, 1, D)``,
    ...) or in G consecutive groups; strided ``chunk`` views are read in place. ``in_place``
    lets the backward write dX over dY when nothing else reads dY.
    """
    return _modulated_rms_norm(
        X, W, scale, shift, float(eps), float(offset), float(scale_offset), casting_mode, bool(in_place)
    )


def rms_norm(
    X: torch.Tensor,
    W: torch.Tensor | None,
    eps: float = 1e-6,
    offset: float = 0.0,
    casting_mode: str = "llama",
    in_place: bool = True,
) -> torch.Tensor:
    """Plain RMSNorm with the same kernels (no modulation)."""
    return _modulated_rms_norm(X, W, None, None, float(eps), float(offset), 1.0, casting_mode, bool(in_place))
