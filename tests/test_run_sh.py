"""`bash run.sh` end to end on the small (ci) world: world → three-step training → evaluation → summary."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_sh_ci_preset_end_to_end(tmp_path):
    """The default: towers that read the question, the verdict warm-up, the dialogues; two training processes."""
    out = tmp_path / "tiny"
    env = dict(os.environ, SPARKLES_OUT=str(out), SPARKLES_PRESET="ci", SKIP_INSTALL="1", CI_ITERS="20",
               PYTHON=os.environ.get("PYTHON", "python"))
    proc = subprocess.run(["bash", "run.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("bison_acc", "nlvr2_acc", "sparkleseval_score", "train_seconds", "eval_seconds"):
        assert summary[key] is not None, key
    assert 0.0 <= summary["bison_acc"] <= 1.0 and 0.0 <= summary["nlvr2_acc"] <= 1.0
    assert 1.0 <= summary["sparkleseval_score"] <= 10.0
    assert summary["towers"] == "instructed" and summary["processes"] == min(2, os.cpu_count())
    # the three training steps wrote their outputs, and every evaluation has its HTML page
    import torch

    towers = torch.load(out / "models" / "sparkleschat_tiny_towers" / "blip2_towers.pth", weights_only=False)
    assert "Qformer.bert.embeddings.word_embeddings.weight" in towers["model"]  # the Q-Former's text side
    assert towers["model"]["query_tokens"].shape[1] == 36
    warm_up = torch.load(out / "models" / "sparkleschat_tiny_reasoning" / "checkpoint_last.pth", weights_only=False)
    assert any(k.startswith("llama_model.") for k in warm_up["model"])
    assert (out / "models" / "sparkleschat_tiny" / "checkpoint_last.pth").is_file()
    for ds in ("BISON", "NLVR2", "SparklesEval"):
        assert list((out / "evaluation" / ds / "results").glob("*.html")), ds
    assert "BISON accuracy" in proc.stdout
    assert "chat with it: python demo.py\n" in proc.stdout  # the demo's defaults load what it trained


@pytest.mark.slow
def test_run_sh_with_image_towers(tmp_path):
    """SPARKLES_TOWERS=image: the earlier pipeline (image-only towers, perception stage, dialogues), one process."""
    out = tmp_path / "image"
    env = dict(os.environ, SPARKLES_OUT=str(out), SPARKLES_PRESET="ci", SPARKLES_TOWERS="image", SPARKLES_PROCS="1",
               SKIP_INSTALL="1", CI_ITERS="10", CI_STAGE0_ITERS="60", PYTHON=os.environ.get("PYTHON", "python"))
    proc = subprocess.run(["bash", "run.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["towers"] == "image" and summary["processes"] == 1 and 0.0 <= summary["bison_acc"] <= 1.0
    import torch

    towers = torch.load(out / "models" / "sparkleschat_tiny_towers" / "blip2_towers.pth", weights_only=False)
    assert towers["model"]["query_tokens"].shape[1] == 33
    assert (out / "models" / "sparkleschat_tiny_stage1" / "checkpoint_last.pth").is_file()
    assert "model.model_type=tiny" in proc.stdout  # the demo command it prints
    bad = subprocess.run(["bash", "run.sh"], cwd=REPO, env=dict(env, SPARKLES_TOWERS="both"), capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "instructed or image" in bad.stderr
