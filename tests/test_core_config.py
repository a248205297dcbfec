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


def test_a_preset_builds_on_its_base_and_options_pick_the_preset(tmp_path):
    path = write(tmp_path, GOOD.replace("model_type: tiny", "model_type: tiny\n  vit_depth: 3"))
    tiny = load_config(path).model
    instructed = load_config(path, ["model.model_type=tiny_instructed"]).model
    # the instructed preset changes what it names and keeps every other value of its base, the tiny preset
    assert (tiny.num_query_token, tiny.qformer_text_input) == (33, False)
    assert (instructed.num_query_token, instructed.qformer_text_input, instructed.model_type) == \
        (36, True, "tiny_instructed")
    assert instructed.vit_width == tiny.vit_width == 128 and instructed.llm_layers == tiny.llm_layers
    assert instructed.vit_depth == tiny.vit_depth == 3  # the file's own values still win over either preset
    # options other than model_type still come last
    assert load_config(path, ["model.model_type=tiny_instructed", "model.num_query_token=40"]).model \
        .num_query_token == 40


def test_preset_base_errors_name_the_preset(tmp_path, monkeypatch):
    from sparkles.models.sparkleschat import SparklesChat

    (tmp_path / "sparkleschat_a.yaml").write_text("_base_: b\nvit_depth: 1\n")
    (tmp_path / "sparkleschat_b.yaml").write_text("_base_: a\n")
    (tmp_path / "sparkleschat_c.yaml").write_text("_base_: nowhere\n")
    monkeypatch.setattr("sparkles.models.sparkleschat.PRESET_DIR", tmp_path)
    assert SparklesChat.default_config_path("a") == tmp_path / "sparkleschat_a.yaml"
    with pytest.raises(ConfigError, match="cycle"):
        load_config(write(tmp_path, GOOD.replace("tiny", "a")))
    with pytest.raises(ConfigError, match=r"sparkleschat_c\.yaml: _base_: .*nowhere"):
        load_config(write(tmp_path, GOOD.replace("tiny", "c")))


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
