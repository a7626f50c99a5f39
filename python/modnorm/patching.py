"""modnorm.patch: swap the RMSNorm + modulation sites of diffusers transformers for the fused op.

Two kinds of site:

- norm modules that apply the modulation themselves (Mochi's ``MochiRMSNormZero`` and
  ``MochiModulatedRMSNorm``, Lumina's ``LuminaRMSNormZero``): their ``forward`` is replaced by
  one that calls modnorm's op;
- blocks that write ``self.norm(x) * (1 + scale) + shift`` inline (LTX-Video, Lumina2 and
  Z-Image blocks, and any block class named in ``block_types``): the block's forward is captured once per block class by TorchDynamo and
  rewritten by ``modnorm.fuse``; everything else in the block runs as the same eager ops. The
  sites a block class fused are known after its first call (``PatchReport.sites``).

Parameters, buffers and state_dict keys are untouched.
"""

from __future__ import annotations

import dataclasses
import types

import torch

from .fusion import _fused_site, fuse
from .functional import modulated_rms_norm, rms_norm

# Blocks known to hold inline RMSNorm + modulation sites; patch(block_types=...) adds others.
# (Tested on tiny configs of each; other blocks, e.g. LTX-2's, can be named in block_types.)
KNOWN_BLOCKS = (
    "LTXVideoTransformerBlock",
    "Lumina2TransformerBlock",
    "ZImageTransformerBlock",
)


@dataclasses.dataclass
class PatchReport:
    modules: list = dataclasses.field(default_factory=list)  # "name: Class" per swapped norm module
    blocks: dict = dataclasses.field(default_factory=dict)  # block class -> names of its instances
    # block class -> the fuse report of each graph Dynamo captured for it (known after a call;
    # instances configured differently, e.g. with and without modulation, capture separately)
    sites: dict = dataclasses.field(default_factory=dict)

    def lines(self):
        out = [f"modnorm.patch: swapped {m}" for m in self.modules]
        for cls, names in self.blocks.items():
            graphs = self.sites.get(cls, [])
            what = ", ".join(f"{len(r) - 1} site(s)" for r in graphs) or "sites fused at first call"
            out.append(f"modnorm.patch: captured {len(names)} x {cls} ({what})")
            for r in graphs:
                out += ["    " + line.replace("modnorm.fuse: ", "") for line in r[:-1]]
        out.append(f"modnorm.patch: {len(self.modules)} norm module(s) swapped, "
                   f"{sum(len(v) for v in self.blocks.values())} block(s) captured")  # fmt: skip
        return out

    def __str__(self):
        return "\n".join(self.lines())


# ---- norm modules that carry their modulation ------------------------------------------------------


def _mochi_rms_norm_zero_forward(self, hidden_states, emb):
    # norm in float32, * (1 + scale_msa) in float32, rounded to the input dtype once: exactly
    # what casting "none" on the input does, without materializing a float32 copy of it.
    emb = self.linear(self.silu(emb))
    scale_msa, gate_msa, scale_mlp, gate_mlp = emb.chunk(4, dim=1)
    y = modulated_rms_norm(hidden_states, None, scale_msa, None, self.norm.eps, casting_mode="none")
    return y, gate_msa, scale_mlp, gate_mlp


def _mochi_modulated_rms_norm_forward(self, hidden_states, scale=None):
    # scale arrives with the 1 already added (or is a gate): scale_offset 0
    if scale is None:
        return rms_norm(hidden_states, None, self.eps, casting_mode="none")
    return modulated_rms_norm(hidden_states, None, scale, None, self.eps, casting_mode="none", scale_offset=0.0)


def _lumina_rms_norm_zero_forward(self, x, emb=None):
    emb = self.linear(self.silu(emb))
    scale_msa, gate_msa, scale_mlp, gate_mlp = emb.chunk(4, dim=1)
    norm = self.norm
    w = norm.weight
    # diffusers' RMSNorm rounds to a half-precision weight's dtype before the weight (llama);
    # with a float32 weight it keeps float32 and the result promotes.
    mode = "llama" if (w is not None and w.dtype in (torch.float16, torch.bfloat16) and w.dtype == x.dtype) else "none"
    y = _fused_site(x, w, scale_msa[:, None], None, norm.eps, 0.0, 1.0, mode, True)
    return y, gate_msa, scale_mlp, gate_mlp


def _can_swap_lumina(module):
    return getattr(module.norm, "bias", None) is None


NORM_MODULES = {
    "MochiRMSNormZero": (_mochi_rms_norm_zero_forward, lambda m: True),
    "MochiModulatedRMSNorm": (_mochi_modulated_rms_norm_forward, lambda m: True),
    "LuminaRMSNormZero": (_lumina_rms_norm_zero_forward, _can_swap_lumina),
}

# ---- blocks with inline sites -----------------------------------------------------------------------


def _capture(cls, report: PatchReport):
    """One compiled forward shared by every instance of a block class (the module is an argument,
    so Dynamo does not recompile per instance); its backend only runs modnorm.fuse."""
    name = cls.__name__

    def backend(gm, example_inputs):
        report.sites.setdefault(name, []).append(fuse(gm, verbose=False).modnorm_report)
        return gm.forward

    return torch.compile(cls.forward, backend=backend)


def patch(model: torch.nn.Module, block_types=(), verbose: bool = True) -> PatchReport:
    """Swaps the RMSNorm + modulation sites of a diffusers transformer (LTX-Video, Mochi, Lumina2,
    Z-Image) for modnorm's fused op, in place. ``block_types`` names further block classes
    with inline ``norm(x) * (1 + scale) + shift`` sites. Returns (and prints) what was swapped."""
    report = PatchReport()
    wanted_blocks = set(KNOWN_BLOCKS) | {t if isinstance(t, str) else t.__name__ for t in block_types}
    compiled = {}
    for name, module in model.named_modules():
        cls = type(module)
        if cls.__name__ in NORM_MODULES:
            forward, can_swap = NORM_MODULES[cls.__name__]
            if can_swap(module) and not getattr(module, "_modnorm_patched", False):
                module.forward = types.MethodType(forward, module)
                module._modnorm_patched = True
                report.modules.append(f"{name}: {cls.__name__}")
        elif cls.__name__ in wanted_blocks and not getattr(module, "_modnorm_patched", False):
            if cls not in compiled:
                compiled[cls] = _capture(cls, report)
            fn = compiled[cls]
            module.forward = types.MethodType(lambda self, *a, _fn=fn, **k: _fn(self, *a, **k), module)
            module._modnorm_patched = True
            report.blocks.setdefault(cls.__name__, []).append(name)
    if verbose:
        print(report)
    return report
