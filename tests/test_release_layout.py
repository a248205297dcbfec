"""The paper configs' default weight paths follow the released Sparkles layout, which names evaluation runs as the
original's result files are named."""

from __future__ import annotations

from pathlib import Path

import sparkles.data.builders  # noqa: F401  (registers the datasets the paper config names)
import sparkles.models  # noqa: F401  (registers the sparkleschat arch)
from sparkles.common.config import load_config
from sparkles.eval.cli import model_name_from_ckpt

REPO = Path(__file__).resolve().parents[1]


def test_the_paper_preset_reads_the_released_layout():
    model = load_config(REPO / "eval_configs" / "sparkles_eval.yaml").model
    assert model.vit_weights == "models/pretrained/eva_vit_g.pth"
    assert model.q_former_model == "models/pretrained/blip2_pretrained_flant5xxl.pth"
    assert model.llama_model == "models/vicuna/vicuna-7b-v0"
    assert model.ckpt == "models/pretrained/sparkleschat_7b.pth"
    assert load_config(REPO / "train_configs" / "sparkleschat.yaml").model.ckpt == \
        "models/pretrained/minigpt4_7b_stage1.pth"


def test_the_evaluation_run_is_named_as_the_original_result_files(tmp_path):
    ckpt = load_config(REPO / "eval_configs" / "sparkles_eval.yaml").model.ckpt
    name = model_name_from_ckpt(tmp_path / ckpt)
    assert name == "models_pretrained_sparkleschat_7b"
    assert f"BISON_{name}_acc0.567.json" == "BISON_models_pretrained_sparkleschat_7b_acc0.567.json"
