"""Strict configuration loading: presets, overrides, and errors that name the key and the file."""

from __future__ import annotations

import re

import pytest

import sparkles.models  # noqa: F401  (registers the sparkleschat model)
from sparkles.common.config import UPSTREAM_ONLY_KEYS, ConfigError, load_config
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
  imports: [sparkles.tinyworld]
  init_lr: 1.0e-3
"""


def test_preset_then_file_then_options(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["model.freeze_vit=True", "run.max_epoch=3"])
    assert cfg.model.vit_width == 128  # from the tiny preset
    assert cfg.model.freeze_vit is True  # --options win over the preset (false)
    assert cfg.run.init_lr == pytest.approx(1e-3) and cfg.run.max_epoch == 3
    assert cfg.model.num_query_token == 36 and cfg.model.towers_init == "tinyworld"


def test_a_preset_builds_on_its_base_and_options_pick_the_preset(tmp_path, monkeypatch):
    (tmp_path / "sparkleschat_small.yaml").write_text("vit_width: 128\nnum_query_token: 33\nllm_layers: 4\n"
                                                      "qformer_text_input: false\nllama_model: llm\n")
    (tmp_path / "sparkleschat_reader.yaml").write_text("_base_: small\nnum_query_token: 36\nqformer_text_input: true\n")
    monkeypatch.setattr("sparkles.models.sparkleschat.PRESET_DIR", tmp_path)
    path = write(tmp_path, "model:\n  arch: sparkleschat\n  model_type: small\n  vit_depth: 3\n")
    small = load_config(path).model
    reader = load_config(path, ["model.model_type=reader"]).model
    # the reader preset changes what it names and keeps every other value of its base, the small preset
    assert (small.num_query_token, small.qformer_text_input) == (33, False)
    assert (reader.num_query_token, reader.qformer_text_input, reader.model_type) == (36, True, "reader")
    assert reader.vit_width == small.vit_width == 128 and reader.llm_layers == small.llm_layers
    assert reader.vit_depth == small.vit_depth == 3  # the file's own values still win over either preset
    # options other than model_type still come last
    assert load_config(path, ["model.model_type=reader", "model.num_query_token=40"]).model.num_query_token == 40


def test_preset_base_errors_name_the_preset(tmp_path, monkeypatch):
    from sparkles.models.sparkleschat import SparklesChat

    (tmp_path / "sparkleschat_a.yaml").write_text("_base_: b\nvit_depth: 1\n")
    (tmp_path / "sparkleschat_b.yaml").write_text("_base_: a\n")
    (tmp_path / "sparkleschat_c.yaml").write_text("_base_: nowhere\n")
    monkeypatch.setattr("sparkles.models.sparkleschat.PRESET_DIR", tmp_path)
    assert SparklesChat.default_config_path("a") == tmp_path / "sparkleschat_a.yaml"
    with pytest.raises(ConfigError, match="cycle"):
        load_config(write(tmp_path, GOOD.replace("model_type: tiny", "model_type: a")))
    with pytest.raises(ConfigError, match=r"sparkleschat_c\.yaml: _base_: .*nowhere"):
        load_config(write(tmp_path, GOOD.replace("model_type: tiny", "model_type: c")))


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
        load_config(write(tmp_path, "model: {arch: sparkleschat, model_type: huge}\n"
                                    "run: {imports: [sparkles.tinyworld]}\n"))


def test_a_module_preset_needs_its_module_in_run_imports(tmp_path):
    """A fresh process knows the tiny preset only once the config imports the module that registers it."""
    import subprocess
    import sys

    bare = write(tmp_path, "model: {arch: sparkleschat, model_type: tiny}\n", "bare.yaml")
    code = ("import sparkles.models\nfrom sparkles.common.config import load_config, ConfigError\n"
            f"try:\n    load_config({str(bare)!r})\nexcept ConfigError as e:\n    print('refused:', e)\n"
            f"print(load_config({str(bare)!r}, ['run.imports=[sparkles.tinyworld]']).model.num_query_token)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    refused, loaded = out.stdout.strip().splitlines()
    assert "unknown model_type 'tiny'" in refused and "run.imports" in refused
    assert loaded == "36"


@pytest.mark.parametrize("imports, message", [
    ("[sparkles.no_such_module]", "run.imports: no module named 'sparkles.no_such_module'"),
    ("['../evil.py']", "run.imports: '../evil.py' is not a Python module name"),
    ("[1]", "run.imports: 1 is not a Python module name"),
    ("sparkles.tinyworld", "run.imports must be a list of module names"),
])
def test_run_imports_is_strict(tmp_path, imports, message):
    text = "model: {arch: sparkleschat, model_type: pretrain_vicuna}\nrun: {imports: " + imports + "}\n"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, text))


def test_keys_of_the_original_configs_load_with_a_warning_or_are_refused(tmp_path, caplog):
    text = ("model:\n  arch: sparkleschat\n  model_type: pretrain_vicuna\n  max_txt_len: 160\n  end_sym: '###'\n"
            "run:\n  evaluate: false\n  world_size: 1\n  dist_url: env://\n  batch_size_eval: 1\n")
    with caplog.at_level("WARNING", logger="sparkles.common.config"):
        cfg = load_config(write(tmp_path, text), ["run.train_splits=[train]"])
    warned = {name for name in UPSTREAM_ONLY_KEYS if name in caplog.text}
    assert warned == {"model.max_txt_len", "model.end_sym", "run.evaluate", "run.world_size", "run.dist_url",
                      "run.batch_size_eval", "run.train_splits"}
    assert "max_txt_len" not in cfg.model and "evaluate" not in cfg.run  # nothing downstream sees them
    for key, value in (("run.evaluate", "true"), ("run.dist_url", "tcp://host:1"), ("model.vit_model", "eva_clip_l"),
                       ("model.end_sym", "x")):
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}=.*does not act on"):
            load_config(write(tmp_path, text), [f"{key}={value}"])


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
