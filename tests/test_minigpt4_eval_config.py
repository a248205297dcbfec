"""The MiniGPT-4 baseline config: it loads with the project's loader and names its runs as the original's result
files (``<dataset>_models_pretrained_minigpt4_7b...``)."""

from __future__ import annotations

from pathlib import Path

import sparkles.models  # noqa: F401  (registers the sparkleschat model)
from sparkles.common.config import load_config
from sparkles.eval.cli import model_name_from_ckpt

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "eval_configs" / "minigpt4_eval.yaml"


def test_minigpt4_eval_config_loads_and_names_runs_like_the_released_results(tmp_path):
    cfg = load_config(CONFIG)
    assert cfg.model.arch == "sparkleschat" and cfg.model.model_type == "pretrain_vicuna"
    assert cfg.model.ckpt == "models/pretrained/minigpt4_7b.pth"
    assert cfg.run.chat_mode == "minigpt4"
    assert cfg.run.eval_vis_processor.name == "blip2_image_eval" and cfg.run.eval_vis_processor.image_size == 224
    # The evaluation resolves a relative ckpt against the root, then names the run after its last three parts.
    root = tmp_path / "Sparkles"
    assert model_name_from_ckpt(root / cfg.model.ckpt) == "models_pretrained_minigpt4_7b"


def test_minigpt4_eval_config_differs_from_sparkles_eval_only_in_the_checkpoint_and_chat_mode():
    ours, sparkles = load_config(CONFIG), load_config(REPO / "eval_configs" / "sparkles_eval.yaml")
    assert Path(ours.model.ckpt).parent == Path(sparkles.model.ckpt).parent  # the same released layout
    for key in ("vit_weights", "q_former_model", "llama_model", "low_resource", "freeze_vit", "freeze_qformer"):
        assert ours.model.get(key) == sparkles.model.get(key), key
    assert ours.run.eval_vis_processor == sparkles.run.eval_vis_processor
