"""Loads the compiled extension, which registers the ``torch.ops.modnorm`` ops, and their fake
(shape) kernels."""

import os

import torch

_LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_modnorm_ops.so")
if not os.path.exists(_LIBRARY):
    raise ImportError(
        f"modnorm: compiled extension not found at {_LIBRARY}; "
        "install with `pip install --no-build-isolation .` from the repository root"
    )
torch.ops.load_library(_LIBRARY)

from . import _fake  # noqa: E402,F401  (registers fake kernels for the ops just loaded)

ops = torch.ops.modnorm
