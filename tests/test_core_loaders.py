"""Original-format checkpoint loaders: parity with upstream outputs and strict key accounting."""

from __future__ import annotations

import shutil

import pytest
import torch

from sparkles.models.loaders import CheckpointError, load_blip2, load_eva_vit, load_sparkles_checkpoint, qformer_key
from sparkles.tools import parity


def test_parity_command_passes_on_the_fixture(parity_dir, capsys):
    assert parity.main(["--fixture", str(parity_dir)]) == 0
    out = capsys.readouterr().out
    assert "PARITY OK" in out


def test_parity_figures_within_tolerance(parity_dir):
    res = parity.run_parity(parity_dir)
    assert res["image_embeds_max_abs_diff"] <= 1e-4
    assert res["train_logits_max_abs_diff"] <= 1e-4
    assert res["train_loss_abs_diff"] <= 1e-5
    assert res["greedy_tokens"] == res["greedy_expected"]


def test_parity_detects_a_wrong_projection(parity_dir, tmp_path):
    bad = tmp_path / "fixture"
    shutil.copytree(parity_dir, bad)
    ckpt = torch.load(bad / "sparkleschat.pth", weights_only=True)
    ckpt["model"]["llama_proj.bias"] = ckpt["model"]["llama_proj.bias"] + 1e-2
    torch.save(ckpt, bad / "sparkleschat.pth")
    assert parity.main(["--fixture", str(bad)]) == 1


@pytest.fixture()
def fixture_model(parity_dir):
    model, _ = parity.build_fixture_model(parity_dir)
    return model


def test_extra_eva_block_is_ignored_and_reported(fixture_model, parity_dir):
    report = load_eva_vit(fixture_model, parity_dir / "eva_vit_g.pth")
    depth = len(fixture_model.visual_encoder.vit.blocks)
    ignored_blocks = {k.split(".")[1] for k in report.ignored}
    assert ignored_blocks == {str(depth)}  # exactly the one block past vit_depth
    assert all(not k.startswith(f"blocks.{depth}.") for k in report.loaded)


def test_missing_eva_key_is_an_error_naming_it(fixture_model, parity_dir, tmp_path):
    sd = torch.load(parity_dir / "eva_vit_g.pth", weights_only=True)
    del sd["blocks.1.attn.v_bias"]
    torch.save(sd, tmp_path / "eva.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.v_bias"):
        load_eva_vit(fixture_model, tmp_path / "eva.pth")


def test_wrong_shape_is_an_error_naming_key_and_file(fixture_model, parity_dir, tmp_path):
    ckpt = torch.load(parity_dir / "blip2_pretrained.pth", weights_only=True)
    key = "Qformer.bert.encoder.layer.0.crossattention.self.key.weight"
    ckpt["model"][key] = torch.zeros(3, 3)
    torch.save(ckpt, tmp_path / "blip2.pth")
    with pytest.raises(CheckpointError, match=r"crossattention\.self\.key\.weight.*shape") as info:
        load_blip2(fixture_model, tmp_path / "blip2.pth")
    assert "blip2.pth" in str(info.value)


def test_blip2_unused_heads_are_ignored_on_purpose(fixture_model, parity_dir):
    report = load_blip2(fixture_model, parity_dir / "blip2_pretrained.pth")
    reasons = set(report.ignored.values())
    assert any("contrastive" in r for r in reasons) and any("matching" in r for r in reasons)
    assert "query_tokens" in report.loaded and "ln_vision.weight" in report.loaded
    assert qformer_key("Qformer.bert.encoder.layer.3.attention.self.query.weight") == \
        "encoder.layer.3.attention.attention.query.weight"
    assert isinstance(qformer_key("Qformer.bert.encoder.layer.0.intermediate.dense.weight"), tuple)


def test_visual_encoder_block_in_blip2_file_overrides_eva(fixture_model, parity_dir, tmp_path):
    ckpt = torch.load(parity_dir / "blip2_pretrained.pth", weights_only=True)
    eva = torch.load(parity_dir / "eva_vit_g.pth", weights_only=True)
    for k, v in eva.items():
        ckpt["model"][f"visual_encoder.{k}"] = torch.full_like(v, 0.5) if k == "cls_token" else v
    torch.save(ckpt, tmp_path / "blip2_vis.pth")
    load_blip2(fixture_model, tmp_path / "blip2_vis.pth")
    assert torch.all(fixture_model.visual_encoder.vit.cls_token == 0.5)


def test_projection_checkpoint_ignores_upstream_buffers_and_rejects_strangers(fixture_model, parity_dir, tmp_path):
    ckpt = torch.load(parity_dir / "sparkleschat.pth", weights_only=True)
    ckpt["model"]["llama_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    torch.save(ckpt, tmp_path / "with_buffers.pth")
    report = load_sparkles_checkpoint(fixture_model, tmp_path / "with_buffers.pth")
    assert sorted(report.loaded) == ["llama_proj.bias", "llama_proj.weight"]
    assert len(report.ignored) == 1
    ckpt["model"]["not_a_module.weight"] = torch.ones(1)
    torch.save(ckpt, tmp_path / "stranger.pth")
    with pytest.raises(CheckpointError, match="not_a_module.weight"):
        load_sparkles_checkpoint(fixture_model, tmp_path / "stranger.pth")


def test_position_embedding_is_resampled_for_another_image_size(parity_dir):
    from sparkles.models.loaders import read_state_dict

    model, _ = parity.build_fixture_model(parity_dir)
    from dataclasses import replace

    from sparkles.models.sparkleschat import SparklesChat

    cfg = replace(model.cfg, image_size=28, ckpt="", q_former_model="", allow_random_towers=True)  # the ViT only
    bigger = SparklesChat.from_config(cfg, load_tokenizer=False, verbose=False)
    assert bigger.visual_encoder.vit.pos_embed.shape[1] == 1 + 4  # 2x2 patches + CLS
    src = read_state_dict(parity_dir / "eva_vit_g.pth")["pos_embed"]
    # The CLS position is carried over unchanged; the grid is interpolated.
    assert torch.allclose(bigger.visual_encoder.vit.pos_embed[0, 0], src[0, 0])
