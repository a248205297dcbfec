"""Frozen towers that no weight file fills are refused, unless model.allow_random_towers says a random one is meant.

What provides a tower: its own file (model.vit_weights / model.q_former_model), a BLIP-2 file holding
``visual_encoder.*`` (the vision tower), or a checkpoint holding every parameter of the tower.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sparkles.data.builders  # noqa: F401  (registers the datasets the paper config names)
from sparkles.common.config import load_config
from sparkles.common.io import atomic_write
from sparkles.models.loaders import read_state_dict, save_blip2
from sparkles.models.sparkleschat import SparklesChat, SparklesChatConfig, check_frozen_towers
from sparkles.testing.tiny import TINY_SIZES, build_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny model with distinct weights, its tokenizer folder and its towers as a BLIP-2 file."""
    work = tmp_path_factory.mktemp("towers")
    model = build_tiny_model(work, seed=3, init_std=0.3)
    return model, work / "tokenizer", save_blip2(model, work / "blip2_towers.pth")


def _cfg(tokenizer, **kw) -> SparklesChatConfig:
    return SparklesChatConfig(llama_model=str(tokenizer), **{**TINY_SIZES, **kw})


def _save(path: Path, state: dict) -> Path:
    return atomic_write(path, lambda f: torch.save({"model": state}, f))


def _equal_towers(model, source) -> bool:
    want = source.state_dict()
    return all(torch.equal(v, want[k]) for k, v in model.state_dict().items()
               if k.startswith(("visual_encoder.", "Qformer.", "query_tokens")))


def test_frozen_towers_without_files_are_refused_before_the_decoder_loads():
    cfg = SparklesChatConfig(llama_model="no/such/decoder", **TINY_SIZES)  # never read: refused first
    with pytest.raises(ValueError, match=r"model\.vit_weights is empty and freeze_vit is true: the vision tower "
                                         r"would stay random .*model\.allow_random_towers: true for tests/toy runs"):
        SparklesChat.from_config(cfg, device="cpu")


def test_a_frozen_qformer_without_a_file_is_refused():
    cfg = SparklesChatConfig(llama_model="no/such/decoder", **TINY_SIZES, freeze_vit=False)
    with pytest.raises(ValueError, match=r"model\.q_former_model is empty and freeze_qformer is true: the Q-Former"):
        SparklesChat.from_config(cfg, device="cpu")


def test_trainable_towers_or_allow_random_towers_need_no_file(source):
    _, tokenizer, _ = source
    SparklesChat.from_config(_cfg(tokenizer, freeze_vit=False, freeze_qformer=False), verbose=False)
    model = SparklesChat.from_config(_cfg(tokenizer, allow_random_towers=True), verbose=False)
    assert not any(p.requires_grad for p in model.visual_encoder.parameters())


def test_a_blip2_file_with_the_vision_tower_provides_both_towers(source):
    model, tokenizer, blip2 = source
    built = SparklesChat.from_config(_cfg(tokenizer, q_former_model=str(blip2)), verbose=False)
    assert _equal_towers(built, model)


def test_a_blip2_file_without_the_vision_tower_leaves_it_random_and_is_refused(source, tmp_path):
    _, tokenizer, blip2 = source
    state = {k: v for k, v in read_state_dict(blip2, wrapper_key="model").items()
             if not k.startswith("visual_encoder.")}
    path = _save(tmp_path / "blip2_no_vit.pth", state)
    with pytest.raises(ValueError, match=r"the vision tower would stay random \(model\.q_former_model holds "
                                         r"none of its weights\)"):
        SparklesChat.from_config(_cfg(tokenizer, q_former_model=str(path)), verbose=False)


def test_a_checkpoint_holding_the_towers_provides_them(source, tmp_path):
    """A checkpoint of a run whose towers trained (every trainable part saved) fills frozen towers alone."""
    model, tokenizer, _ = source
    path = _save(tmp_path / "checkpoint_last.pth", {k: v for k, v in model.state_dict().items()
                                                    if not k.startswith("llama_model.")})
    built = SparklesChat.from_config(_cfg(tokenizer, ckpt=str(path)), verbose=False)
    assert _equal_towers(built, model)


def test_a_checkpoint_holding_part_of_a_tower_is_refused(source, tmp_path):
    model, tokenizer, blip2 = source
    state = {k: v for k, v in model.state_dict().items() if k.startswith("llama_proj.")}
    state["visual_encoder.vit.cls_token"] = model.visual_encoder.vit.cls_token.detach()
    path = _save(tmp_path / "partial.pth", state)
    with pytest.raises(ValueError, match=r"the vision tower would stay random \(\d+ of its \d+ parameters are in "
                                         r"no weight file, e\.g\. visual_encoder\.vit\."):
        SparklesChat.from_config(_cfg(tokenizer, ckpt=str(path), freeze_qformer=False), verbose=False)


def test_a_projection_checkpoint_does_not_provide_the_towers(source, tmp_path):
    model, tokenizer, _ = source
    path = _save(tmp_path / "sparkleschat_7b.pth", {k: v for k, v in model.state_dict().items()
                                                    if k.startswith("llama_proj.")})
    with pytest.raises(ValueError, match=r"model\.vit_weights is empty .*model\.ckpt holds none of its weights"):
        SparklesChat.from_config(_cfg(tokenizer, ckpt=str(path)), verbose=False)


def test_the_fresh_world_command_of_the_dialogue_config_needs_allow_random_towers(tmp_path):
    """train_configs/sparkleschat_tiny.yaml's comment trains on a fresh world with random frozen towers: without
    model.allow_random_towers=true that is refused (before any file of the world is read)."""
    config = REPO / "train_configs" / "sparkleschat_tiny.yaml"
    assert "model.q_former_model= model.ckpt= model.allow_random_towers=true" in config.read_text()
    cfg = load_config(config, ["model.q_former_model=", "model.ckpt="])
    with pytest.raises(ValueError, match="model.allow_random_towers: true"):
        SparklesChat.from_config(cfg.model, root=tmp_path)
    cfg = load_config(config, ["model.q_former_model=", "model.ckpt=", "model.allow_random_towers=true"])
    check_frozen_towers(cfg.model)


@pytest.mark.parametrize("config", sorted(p.relative_to(REPO).as_posix() for p in
                                           [*REPO.glob("train_configs/*.yaml"), *REPO.glob("eval_configs/*.yaml")]))
def test_the_shipped_configs_name_a_file_for_every_frozen_tower(config):
    check_frozen_towers(load_config(REPO / config).model)
