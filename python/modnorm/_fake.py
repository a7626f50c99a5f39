"""Fake (meta) kernels: output shapes and dtypes for FakeTensor, torch.compile and export.

Written in Python so symbolic shapes propagate. Validation of values happens in the C++ core
when the real kernel runs; here only what decides the output metadata is checked.
"""

import torch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtype(t, name):
    if t is not None and t.dtype not in _DTYPES:
        raise TypeError(f"modnorm: {name} has unsupported dtype {t.dtype} (expected float32, float16 or bfloat16)")


@torch.library.register_fake("modnorm::fwd")
def _fwd_fake(x, weight, scale, shift, eps, offset, scale_offset, casting_mode):
    for t, name in ((x, "x"), (weight, "weight"), (scale, "scale"), (shift, "shift")):
        _check_dtype(t, name)
    if shift is not None and scale is None:
        raise ValueError("modnorm: shift was given without scale")
    y = x.new_empty(x.shape)
    rstd = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return y, rstd


@torch.library.register_fake("modnorm::fwd_y")
def _fwd_y_fake(x, weight, scale, shift, eps, offset, scale_offset, casting_mode):
    return _fwd_fake(x, weight, scale, shift, eps, offset, scale_offset, casting_mode)[0]


def _grad_like(t, want, x):
    return t.new_empty(t.shape) if (want and t is not None) else x.new_empty((0,))


@torch.library.register_fake("modnorm::bwd")
def _bwd_fake(dy, x, rstd, weight, scale, shift, offset, scale_offset, casting_mode, grad_mask):
    dx = x.new_empty(x.shape) if grad_mask[0] else x.new_empty((0,))
    return (
        dx,
        _grad_like(weight, grad_mask[1], x),
        _grad_like(scale, grad_mask[2], x),
        _grad_like(shift, grad_mask[3], x),
    )


@torch.library.register_fake("modnorm::bwd_inplace")
def _bwd_inplace_fake(dy, x, rstd, weight, scale, shift, offset, scale_offset, casting_mode, grad_mask):
    return (
        _grad_like(weight, grad_mask[1], x),
        _grad_like(scale, grad_mask[2], x),
        _grad_like(shift, grad_mask[3], x),
    )
