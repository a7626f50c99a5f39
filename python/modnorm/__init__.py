"""modnorm: fused modulated RMSNorm (AdaLN / FiLM) for diffusion transformers.

    y = rms_norm(x, weight, eps) * (scale_offset + scale) + shift

One fused kernel forward and backward, on the CPU and on NVIDIA GPUs, drop-in for Liger-Kernel's
``liger_modulated_rms_norm`` / ``LigerModulatedRMSNorm`` (same argument names, order and
defaults) plus ``scale_offset``. The ops are registered with ``torch.library`` and work under
``torch.compile(fullgraph=True)``.
"""

from . import _ops  # noqa: F401  (loads the extension and registers the ops)
from .functional import modulated_rms_norm, rms_norm
from .modules import ModulatedRMSNorm, RMSNorm
from . import reference  # noqa: F401  (the unfused eager code, for tests and benchmarks)
from .fusion import compile_backend, fuse
from .patching import patch

__all__ = ["modulated_rms_norm", "rms_norm", "ModulatedRMSNorm", "RMSNorm", "fuse", "compile_backend", "patch"]
__version__ = "0.1.0"
