"""Strict configuration loading: presets, overrides, and errors that name the key and the file."""

from __future__ import annotations

import pytest

import sparkles.models  # noqa: F401  (registers the sparkleschat model)
from sparkles.common.config import ConfigError, load_config
from sparkles.common.registry import MODELS, Registry, RegistryError


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = """
model:
  arch: sparkleschat
  model_type: tiny
run:
  init_lr: 1.0e-3
"""


def test_preset_then_file_then_options(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["model.freeze_vit=True", "run.max_epoch=3"])
    assert cfg.model.vit_width == 128  # from the tiny preset
    assert cfg.model.freeze_vit is True  # --options win over the preset (false)
    assert cfg.run.init_lr == pytest.approx(1e-3) and cfg.run.max_epoch == 3
    assert cfg.model.num_query_token == 33


def test_paper_preset_uses_relative_paths(tmp_path):
    cfg = load_config(write(tmp_path, "model: {arch: sparkleschat, model_type: pretrain_vicuna}\n"))
    for key in ("vit_weights", "q_former_model", "llama_model"):
        assert not str(cfg.model[key]).startswith("/")
    assert cfg.model.vit_depth == 39 and cfg.model.num_query_token == 32


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, GOOD + "  warmup_stepz: 10\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml.*run\.warmup_stepz"):
        load_config(path)


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.num_query_token"):
        load_config(write(tmp_path, GOOD), ["model.num_query_token=many"])


def test_unknown_option_key(tmp_path):
    with pytest.raises(ConfigError, match="model.vit_widht"):
        load_config(write(tmp_path, GOOD), ["model.vit_widht=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(write(tmp_path, GOOD), ["model.vit_width"])


def test_unknown_model_type_lists_presets(tmp_path):
    with pytest.raises(ConfigError, match="model_type.*known: pretrain_vicuna, tiny"):
        load_config(write(tmp_path, "model: {arch: sparkleschat, model_type: huge}\n"))


def test_missing_required_value(tmp_path):
    # Without a preset nothing supplies the decoder directory.
    with pytest.raises(ConfigError, match="required value.*model.llama_model"):
        load_config(write(tmp_path, "model: {arch: sparkleschat, model_type: ''}\n"))


def test_unknown_arch_lists_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="known models: .*sparkleschat"):
        load_config(write(tmp_path, "model: {arch: minigpt5}\n"))


def test_unknown_top_level_and_dataset(tmp_path):
    with pytest.raises(ConfigError, match="top-level"):
        load_config(write(tmp_path, GOOD + "trainer: {}\n"))
    with pytest.raises(ConfigError, match="datasets.NoSuchData"):
        load_config(write(tmp_path, GOOD + "datasets:\n  NoSuchData: {}\n"))


def test_registry_lookup_fails_loudly():
    reg = Registry("widget")
    reg.register("a")(object)
    with pytest.raises(RegistryError, match="unknown widget 'b'; known widgets: a"):
        reg.get("b")
    assert "sparkleschat" in MODELS
