"""Initialisation lives in reset_parameters: a meta-device build materialises to the eager build's statistics."""

from __future__ import annotations

import dataclasses
import math

import torch

from dlcm.model.presets import build_model, tiny_baseline, tiny_dlcm
from dlcm.train.materialize import materialize


def wide_dlcm_config():
    # Wide enough that per-tensor std estimates are tight; d_base < widths so μP scaling is visible.
    cfg = tiny_dlcm(vocab_size=512)
    enc = dataclasses.replace(cfg.encoder, width=128, ffn_hidden=256)
    dec = dataclasses.replace(cfg.decoder, width=128, ffn_hidden=256)
    bb = dataclasses.replace(cfg.backbone, width=256, ffn_hidden=512)
    return dataclasses.replace(cfg, encoder=enc, decoder=dec, backbone=bb, d_base=64)


def test_meta_materialisation_reproduces_eager_init_statistics() -> None:
    cfg = wide_dlcm_config()
    torch.manual_seed(0)
    eager = build_model(cfg)
    with torch.device("meta"):
        lazy = build_model(cfg)
    assert all(p.is_meta for p in lazy.parameters())
    torch.manual_seed(1)
    materialize(lazy, "cpu")
    eager_params = dict(eager.named_parameters())
    for name, p in lazy.named_parameters():
        ref = eager_params[name]
        assert not p.is_meta
        if name.startswith("parser."):
            assert torch.equal(p, ref), name  # identity init is deterministic
        elif name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert not torch.equal(p, ref), name  # different seed, so real random draws
            assert math.isclose(p.std().item(), ref.std().item(), rel_tol=0.1), name
            assert abs(p.mean().item()) < 4 * ref.std().item() / math.sqrt(p.numel()) + 1e-3, name


def test_mup_init_scales_hidden_matrices_by_stream_width() -> None:
    cfg = wide_dlcm_config()
    model = build_model(cfg)
    s_token, s_concept = 128 / 64, 256 / 64
    expected = {
        "encoder.layers.0.attn.wq.weight": 0.02 / math.sqrt(s_token),
        "backbone.layers.0.ffn.w_up.weight": 0.02 / math.sqrt(s_concept),
        "cross.wq.weight": 0.02 / math.sqrt(s_token),  # bridge matrices by fan-in
        "cross.wk.weight": 0.02 / math.sqrt(s_concept),
        "pooling.w_up.weight": 0.02 / math.sqrt(s_token),
        "embed.weight": 0.02,
        "head.proj.weight": 0.02,
    }
    params = dict(model.named_parameters())
    for name, std in expected.items():
        assert math.isclose(params[name].std().item(), std, rel_tol=0.1), name
    assert model.head.logit_scale == 64 / 128
    assert torch.equal(model.parser.wq.weight, torch.eye(128))


def test_baseline_meta_build_materialises() -> None:
    with torch.device("meta"):
        model = build_model(tiny_baseline())
    materialize(model, "cpu")
    out = model(torch.randint(0, 256, (10,)), torch.tensor([0, 10], dtype=torch.int32))
    assert torch.isfinite(out).all()
