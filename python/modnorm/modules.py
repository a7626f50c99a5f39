"""Modules, drop-in for Liger-Kernel's ``LigerModulatedRMSNorm`` and ``LigerRMSNorm``."""

import torch
import torch.nn as nn

from .functional import modulated_rms_norm, rms_norm


def _make_weight(hidden_size, init_fn, elementwise_affine):
    if init_fn not in ("ones", "zeros"):
        raise ValueError(f"init_fn must be either 'ones' or 'zeros', got {init_fn}")
    if not elementwise_affine:
        return None
    return nn.Parameter(torch.ones(hidden_size) if init_fn == "ones" else torch.zeros(hidden_size))


class ModulatedRMSNorm(nn.Module):
    """``y = RMSNorm(x) * (scale_offset + scale) + shift`` in one fused kernel."""

    def __init__(
        self,
        hidden_size,
        eps=1e-6,
        offset=0.0,
        casting_mode="llama",
        init_fn="ones",
        in_place=True,
        elementwise_affine=True,
        *,
        scale_offset=1.0,
    ):
        super().__init__()
        self.elementwise_affine = elementwise_affine
        weight = _make_weight(hidden_size, init_fn, elementwise_affine)
        if weight is None:
            self.register_parameter("weight", None)
        else:
            self.weight = weight
        self.variance_epsilon = eps
        self.offset = offset
        self.casting_mode = casting_mode
        self.in_place = in_place
        self.scale_offset = scale_offset

    def forward(self, hidden_states, scale, shift=None):
        return modulated_rms_norm(
            hidden_states,
            self.weight,
            scale,
            shift,
            self.variance_epsilon,
            self.offset,
            self.casting_mode,
            self.in_place,
            scale_offset=self.scale_offset,
        )

    def extra_repr(self):
        weight_shape = tuple(self.weight.shape) if self.weight is not None else None
        return (
            f"weight_shape={weight_shape}, eps={self.variance_epsilon}, offset={self.offset}, "
            f"casting_mode={self.casting_mode}, in_place={self.in_place}, scale_offset={self.scale_offset}"
        )


class RMSNorm(nn.Module):
    """RMSNorm with modnorm's kernels. ``row_mode`` is accepted for Liger compatibility and unused:
    modnorm picks its launch shape itself."""

    def __init__(
        self,
        hidden_size,
        eps=1e-6,
        offset=0.0,
        casting_mode="llama",
        init_fn="ones",
        in_place=True,
        row_mode=None,
        elementwise_affine=True,
    ):
        super().__init__()
        self.elementwise_affine = elementwise_affine
        weight = _make_weight(hidden_size, init_fn, elementwise_affine)
        if weight is None:
            self.register_parameter("weight", None)
        else:
            self.weight = weight
        self.variance_epsilon = eps
        self.offset = offset
        self.casting_mode = casting_mode
        self.in_place = in_place
        self.row_mode = row_mode

    def forward(self, hidden_states):
        return rms_norm(
            hidden_states, self.weight, self.variance_epsilon, self.offset, self.casting_mode, self.in_place
        )

    def extra_repr(self):
        weight_shape = tuple(self.weight.shape) if self.weight is not None else None
        return (
            f"weight_shape={weight_shape}, eps={self.variance_epsilon}, offset={self.offset}, "
            f"casting_mode={self.casting_mode}, in_place={self.in_place}"
        )
