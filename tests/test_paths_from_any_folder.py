"""The project's own paths (its configs, the folder run.sh writes) are found from any working directory, and a
missing model is reported with the path tried and the command that writes it."""

from __future__ import annotations

from pathlib import Path

from sparkles.common.config import load_config, resolve_config_root
from sparkles.common.paths import project_path, repository_root
from sparkles.serve.loading import LoadError, load_model
from sparkles.testing.tiny import write_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_a_config_of_the_project_and_its_root_resolve_against_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPARKLES_ROOT", raising=False)
    assert repository_root() == REPO
    cfg = load_config("eval_configs/sparkles_tiny.yaml")
    assert resolve_config_root(cfg) == REPO / "outputs" / "tiny"
    # what the user names on the command line stays theirs
    assert resolve_config_root(cfg, "elsewhere") == Path("elsewhere")
    assert project_path("/abs/path") == Path("/abs/path")


def test_a_path_that_exists_from_the_current_folder_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "eval_configs").mkdir()
    (tmp_path / "eval_configs" / "sparkles_tiny.yaml").write_text("model:\n  arch: sparkleschat\n")
    assert project_path("eval_configs/sparkles_tiny.yaml") == Path("eval_configs/sparkles_tiny.yaml")


def test_a_missing_model_names_the_path_tried_and_the_command_that_writes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPARKLES_ROOT", raising=False)
    root = tmp_path / "world"
    try:
        load_model(None, sparkles_root=str(root))
    except LoadError as exc:
        message = str(exc)
    else:
        raise AssertionError("an empty root loaded a model")
    assert str(root / "models") in message
    assert f"`bash run.sh` writes them (into outputs/tiny; this run reads {root})" in message
    # every file the config names is there, but the checkpoints are empty: what is wrong is not what writes them
    write_tiny_tokenizer(root / "models" / "tiny_llm")
    for name in ("sparkleschat_tiny_towers/blip2_towers.pth", "sparkleschat_tiny/checkpoint_last.pth"):
        (root / "models" / name).parent.mkdir(parents=True)
        (root / "models" / name).write_bytes(b"")
    try:
        load_model(None, sparkles_root=str(root))
    except LoadError as exc:
        message = str(exc)
    assert "the file is empty" in message and "bash run.sh" not in message
    try:
        load_model(str(REPO / "eval_configs" / "sparkles_eval.yaml"), options=["model.low_resource=False"],
                   sparkles_root=str(root))
    except LoadError as exc:
        message = str(exc)
    assert str(root) in message and "bash run.sh" not in message and "Using the released weights" in message
    try:
        load_model("no_such.yaml")
    except LoadError as exc:
        assert f"config file not found: no_such.yaml (looked for {tmp_path / 'no_such.yaml'} and " in str(exc)
