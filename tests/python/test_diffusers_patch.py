"""modnorm.patch on diffusers' own transformer classes, built from tiny random configs: outputs
and gradients match the unpatched model, and every RMSNorm + modulation site is swapped."""

import copy

import pytest
import torch

import modnorm

diffusers = pytest.importorskip("diffusers")


def _perturb(model):
    # random weights everywhere, norm weights included (they start as ones)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _ltx():
    m = diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=16,
    )  # fmt: skip
    B, F, H, W = 2, 2, 4, 4
    kwargs = dict(
        hidden_states=torch.randn(B, F * H * W, 8), encoder_hidden_states=torch.randn(B, 5, 16),
        timestep=torch.randint(0, 1000, (B,)), encoder_attention_mask=torch.ones(B, 5),
        num_frames=F, height=H, width=W, return_dict=False,
    )  # fmt: skip
    return m, kwargs


def _mochi():
    m = diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=8,
    )  # fmt: skip
    B = 2
    kwargs = dict(
        hidden_states=torch.randn(B, 4, 2, 4, 4), encoder_hidden_states=torch.randn(B, 8, 16),
        timestep=torch.randint(0, 1000, (B,)), encoder_attention_mask=torch.ones(B, 8, dtype=torch.bool),
        return_dict=False,
    )  # fmt: skip
    return m, kwargs


def _lumina2():
    m = diffusers.Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=2, multiple_of=16, norm_eps=1e-5, scaling_factor=1.0,
        axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32), cap_feat_dim=16,
    )  # fmt: skip
    B = 2
    kwargs = dict(
        hidden_states=torch.randn(B, 4, 8, 8), timestep=torch.rand(B),
        encoder_hidden_states=torch.randn(B, 6, 16), encoder_attention_mask=torch.ones(B, 6, dtype=torch.bool),
        return_dict=False,
    )  # fmt: skip
    return m, kwargs


MODELS = {"ltx-video": _ltx, "mochi": _mochi, "lumina2": _lumina2}
NORM_MODULES = ("MochiRMSNormZero", "MochiModulatedRMSNorm", "LuminaRMSNormZero")


def _run(model, kwargs, dy=None):
    params = [p for p in model.parameters() if p.requires_grad]
    x = kwargs["hidden_states"].detach().clone().requires_grad_()
    out = model(**{**kwargs, "hidden_states": x})[0]
    if dy is None:
        dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x] + params, dy, allow_unused=True)
    return out, grads, dy


@pytest.mark.parametrize("name", list(MODELS))
def test_patch_matches_unpatched_and_swaps_every_site(name, capsys):
    torch._dynamo.reset()
    model, kwargs = MODELS[name]()
    model = _perturb(model).train()
    patched = copy.deepcopy(model)
    expected_modules = [n for n, m in model.named_modules() if type(m).__name__ in NORM_MODULES]
    expected_blocks = [n for n, m in model.named_modules() if type(m).__name__ in modnorm.patching.KNOWN_BLOCKS]

    report = modnorm.patch(patched)
    assert sorted(m.split(":")[0] for m in report.modules) == sorted(expected_modules)
    assert sorted(n for names in report.blocks.values() for n in names) == sorted(expected_blocks)
    assert expected_modules or expected_blocks

    out, grads, dy = _run(model, kwargs)
    out_p, grads_p, _ = _run(patched, kwargs, dy)
    torch.testing.assert_close(out_p, out, atol=2e-5, rtol=1e-4)
    for a, b in zip(grads_p, grads):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # every captured block class fused its inline sites
    for cls in report.blocks:
        graphs = report.sites.get(cls)
        assert graphs and all(len(r) >= 2 for r in graphs), (cls, graphs)
    assert state_keys(model) == state_keys(patched)
    text = str(report)
    assert "norm module(s) swapped" in text and "modnorm.patch" in capsys.readouterr().out


def state_keys(m):
    return list(m.state_dict().keys())


def test_ltx_blocks_fuse_both_sites():
    torch._dynamo.reset()
    model, kwargs = _ltx()
    report = modnorm.patch(model, verbose=False)
    model(**kwargs)
    (sites,) = report.sites["LTXVideoTransformerBlock"]  # one graph serves every block
    assert sites[-1] == "modnorm.fuse: 2 site(s) fused"
    assert all("rms_norm + scale(scale_offset 1) + shift" in s for s in sites[:-1])


def test_lumina2_report():
    torch._dynamo.reset()
    model, kwargs = _lumina2()
    report = modnorm.patch(model, verbose=False)
    model(**kwargs)
    text = str(report)
    # the modulated blocks fuse ffn_norm1 * (1 + scale_mlp) with its gamma; norm1 is a swapped module
    assert "LuminaRMSNormZero" in text
    assert any("gamma + scale(scale_offset 1)" in line for r in report.sites["Lumina2TransformerBlock"] for line in r), text


def test_z_image_block():
    # Z-Image's model takes lists of variable-size images; its block is tested directly.
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    torch._dynamo.reset()
    block = _perturb(ZImageTransformerBlock(0, 32, 2, 2, 1e-5, True))
    patched = copy.deepcopy(block)
    holder = torch.nn.ModuleList([patched])
    report = modnorm.patch(holder, verbose=False)
    assert report.blocks == {"ZImageTransformerBlock": ["0"]}
    B, T = 2, 6
    x = torch.randn(B, T, 32, requires_grad=True)
    args = (torch.ones(B, T, dtype=torch.bool), None, torch.randn(B, 32))
    dy = torch.randn(B, T, 32)
    ref = block(x, *args)
    g_ref = torch.autograd.grad(ref, [x] + list(block.parameters()), dy)
    out = patched(x, *args)
    g = torch.autograd.grad(out, [x] + list(patched.parameters()), dy)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    (sites,) = report.sites["ZImageTransformerBlock"]
    # attention_norm1 * scale_msa and ffn_norm1 * scale_mlp (1 + scale precomputed in the graph),
    # the gated residual norms, and the per-head QK norms
    assert sites[-1] == "modnorm.fuse: 6 site(s) fused", sites
