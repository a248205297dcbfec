"""A trained SparklesChat as one Hub folder and back: every tensor equal, the same greedy answers, a folder that
needs nothing of the machine that wrote it (or names the base files it needs), and a card the Hub can read."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sparkles.common.io import atomic_write_json, read_json
from sparkles.engine.chat import Chat
from sparkles.models import SparklesChat, hub
from sparkles.models.loaders import CheckpointError, save_blip2
from sparkles.testing.tiny import build_tiny_model
from sparkles.tools import hub as hub_cli

SUMMARY = {"bison_acc": 0.86, "bison_items": 150, "nlvr2_acc": 0.893, "nlvr2_items": 150,
           "sparkleseval_score": 3.02, "sparkleseval_judge": "reference", "train_seconds": 1000.0}


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 32, 32, generator=g) for _ in range(n)]


def _answers(model) -> list[str]:
    """Greedy answers of a two-turn, three-image dialogue."""
    images = _images(3)
    session = Chat(model).session()
    session.add_image(images[0]), session.add_image(images[1])
    session.ask("Compare IMAGE#1✨ with IMAGE#2⭐.")
    first = session.answer(max_new_tokens=8)
    session.add_image(images[2])
    session.ask("And IMAGE#3✨ next to IMAGE#1?")
    return [first, session.answer(max_new_tokens=8)]


def _assert_same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert different == []


def test_a_tiny_model_round_trips_through_one_folder(tmp_path):
    model = build_tiny_model(tmp_path / "work", seed=0, init_std=0.3).eval()
    expected = _answers(model)
    other = build_tiny_model(tmp_path / "work", seed=1, init_std=0.3).eval()
    assert _answers(other) != expected  # the answers depend on the weights: the comparison below is not vacuous

    atomic_write_json(tmp_path / "summary.json", SUMMARY)
    card = hub.CardInfo(model_name="SparklesChat-tiny", datasets=["owner/sparkles-tiny-world"],
                        training_data=["SparklesDialogue-style dialogues of the CPU world (1,000 dialogues)"],
                        figures=hub.figures_from_file(tmp_path / "summary.json"))
    folder = model.save_pretrained(tmp_path / "saved", card=card)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert {"config.json", "model.safetensors", "README.md", "tokenizer/tokenizer.json",
            "tokenizer/tokenizer_config.json"} <= set(names)

    config = read_json(folder / "config.json")
    assert config["hub"] == {"format": 1, "weights": "all", "tokenizer": True}
    assert config["llama_model"] == config["tokenizer_path"] == config["ckpt"] == ""
    assert str(tmp_path) not in (folder / "config.json").read_text(encoding="utf-8")

    # the folder alone suffices: the tokenizer directory it was built from is gone, the folder has moved
    shutil.rmtree(tmp_path / "work")
    moved = shutil.copytree(folder, tmp_path / "elsewhere" / "model")
    shutil.rmtree(folder)
    loaded = SparklesChat.from_pretrained(moved)
    _assert_same_tensors(model, loaded)
    assert not loaded.training
    assert _answers(loaded) == expected
    assert loaded.cfg.allow_random_towers == model.cfg.allow_random_towers


def test_the_card_has_hub_front_matter_and_lists_data_and_figures(tmp_path):
    from huggingface_hub import ModelCard

    model = build_tiny_model(tmp_path / "work", seed=0)
    figures = hub.figures_from_summary(SUMMARY) + [hub.Figure("I4", "mean score (x100)", 41.5, "baseline 30.0")]
    card = hub.CardInfo(model_name="SparklesChat-tiny", datasets=["owner/dialogues"],
                        training_data=["SparklesDialogueCC (4,452 dialogues)", "SparklesDialogueVG (2,000 dialogues)"],
                        figures=figures, repo_id="owner/sparkleschat-tiny")
    folder = model.save_pretrained(tmp_path / "saved", card=card)
    parsed = ModelCard.load(folder / "README.md")
    assert parsed.data.license == "bsd-3-clause"
    assert "sparkles" in parsed.data.tags and parsed.data.library_name == "sparkles"
    assert parsed.data.datasets == ["owner/dialogues"]
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in parsed.data.eval_results}
    assert results == {("BISON", "accuracy"): 0.86, ("NLVR2", "accuracy"): 0.893, ("SparklesEval", "score"): 3.02,
                       ("I4", "mean"): 41.5}
    body = parsed.text
    assert "- SparklesDialogueCC (4,452 dialogues)" in body and "- SparklesDialogueVG (2,000 dialogues)" in body
    assert "| BISON | accuracy | 0.86 | 150 items |" in body
    assert "| NLVR2 | accuracy | 0.893 | 150 items |" in body
    assert "| SparklesEval | score (/10) | 3.02 | judge: reference |" in body
    assert "| I4 | mean score (x100) | 41.5 | baseline 30.0 |" in body
    assert 'SparklesChat.from_pretrained("owner/sparkleschat-tiny")' in body


def test_figures_come_from_a_metrics_file_too(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"dataset": "NLVR2", "model_name": "x", "items": 6, "total": 6,
                                            "correct": 4, "accuracy": 4 / 6})
    atomic_write_json(tmp_path / "s.json", {"dataset": "SparklesEval", "model_name": "x", "judges": {},
                                            "headline": {"judge": "gpt-4", "overall": 8.56}})
    assert hub.figures_from_file(tmp_path / "m.json") == [hub.Figure("NLVR2", "accuracy", 4 / 6, "6 items")]
    assert hub.figures_from_file(tmp_path / "s.json") == [hub.Figure("SparklesEval", "score (/10)", 8.56,
                                                                     "judge: gpt-4")]


def _model_on_base_towers(tmp_path):
    """A tiny model whose frozen Q-Former comes from a base file under the root ``tmp_path`` and whose other
    parts (decoder, projection) were 'trained' (redrawn with a wide spread)."""
    source = build_tiny_model(tmp_path / "work", seed=3, init_std=0.3)
    save_blip2(source, tmp_path / "models" / "towers.pth")
    model = build_tiny_model(tmp_path / "work", seed=4, q_former_model=str(tmp_path / "models" / "towers.pth"),
                             allow_random_towers=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("llama_model.", "llama_proj.")) and p.ndim >= 2:
                p.normal_(0.0, 0.3)
    assert torch.equal(model.query_tokens, source.query_tokens)
    return model.eval()


def test_trained_weights_only_reference_the_base_files(tmp_path):
    model = _model_on_base_towers(tmp_path)
    folder = model.save_pretrained(tmp_path / "saved", weights="trained", root=tmp_path)
    config = read_json(folder / "config.json")
    assert config["hub"]["weights"] == "trained"
    assert config["q_former_model"] == "models/towers.pth"  # relative to the root: portable
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert {"llama_proj.weight", "llama_proj.bias"} <= saved
    assert any(k.startswith("llama_model.") for k in saved)  # a decoder trained from scratch is no base file's
    assert not any(k.startswith(("Qformer.", "query_tokens", "ln_vision.")) for k in saved)
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "`q_former_model`: `models/towers.pth`" in card

    loaded = SparklesChat.from_pretrained(folder, root=tmp_path)
    _assert_same_tensors(model, loaded)
    assert _answers(loaded) == _answers(model)
    # without its base file the folder cannot give the Q-Former: an error naming a tensor, not random towers
    with pytest.raises(CheckpointError, match="neither in this file nor in a base file"):
        SparklesChat.from_pretrained(folder, root=tmp_path, overrides={"q_former_model": ""})


def test_a_folder_that_is_not_ours_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    atomic_write_json(tmp_path / "x" / "config.json", {"model_type": "llama"})
    with pytest.raises(CheckpointError, match="not a Sparkles model folder"):
        SparklesChat.from_pretrained(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        SparklesChat.from_pretrained(str(tmp_path / "missing" / "dir"))
    with pytest.raises(ValueError, match="weights must be one of"):
        hub.weights_mode(build_tiny_model(tmp_path / "w").cfg, "some")


def test_the_cli_exports_a_configured_model_with_its_card(eval_world, tmp_path):
    root = eval_world["root"]
    atomic_write_json(tmp_path / "summary.json", SUMMARY)
    out = tmp_path / "hub_model"
    code = hub_cli.main(["model", "--cfg-path", str(eval_world["cfg"]), "--sparkles_root", str(root),
                         "--out", str(out), "--summary", str(tmp_path / "summary.json"),
                         "--training-data", "the tiny world's dialogues"])
    assert code == 0
    config = read_json(out / "config.json")
    assert config["ckpt"] == "" and config["llama_model"] == "" and str(root) not in json.dumps(config)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "| BISON | accuracy | 0.86 | 150 items |" in card and "- the tiny world's dialogues" in card

    from sparkles.serve.loading import load_model

    original, _ = load_model(str(eval_world["cfg"]), sparkles_root=str(root))
    _assert_same_tensors(original, SparklesChat.from_pretrained(out))
