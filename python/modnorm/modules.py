"""Modules, drop-in for Liger-Kernel's ``LigerModulatedRMSNorm`` and ``LigerRMSNorm``."""

import torch
import torch.nn as nn

from .functional import modulated_rms_norm, rms_norm


class _NormBase(nn.Module):
    """The state both modules share: an optional (D,) weight and the norm's options."""

    def __init__(self, hidden_size, eps, offset, casting_mode, init_fn, in_place, elementwise_affine):
        super().__init__()
        if init_fn not in ("ones", "zeros"):
            raise ValueError(f"init_fn must be either 'ones' or 'zeros', got {init_fn}")
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            init = torch.ones if init_fn == "ones" else torch.zeros
            self.weight = nn.Parameter(init(hidden_size))
        else:
            self.register_parameter("weight", None)
        self.variance_epsilon = eps
        self.offset = offset
        self.casting_mode = casting_mode
        self.in_place = in_place

    def extra_repr(self):
        weight_shape = tuple(self.weight.shape) if self.weight is not None else None
        return (
            f"weight_shape={weight_shape}, eps={self.variance_epsilon}, offset={self.offset}, "
            f"casting_mode={self.casting_mode}, in_place={self.in_place}"
        )


class ModulatedRMSNorm(_NormBase):
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
        super().__init__(hidden_size, eps, offset, casting_mode, init_fn, in_place, elementwise_affine)
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
        return super().extra_repr() + f", scale_offset={self.scale_offset}"


class RMSNorm(_NormBase):
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
        super().__init__(hidden_size, eps, offset, casting_mode, init_fn, in_place, elementwise_affine)
        self.row_mode = row_mode

    def forward(self, hidden_states):
        return rms_norm(
            hidden_states, self.weight, self.variance_epsilon, self.offset, self.casting_mode, self.in_place
        )
