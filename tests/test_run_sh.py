"""`bash run.sh` end to end on the small (ci) world: world → three-stage training → evaluation → summary."""

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
    assert summary["processes"] == min(2, os.cpu_count())
    # I4: the world's split answered and scored per category, beside the trivial baseline
    for key in ("i4_score", "i4_baseline"):
        assert summary[key]["mean"] is not None and 0.0 <= summary[key]["mean"] <= 100.0, key
        assert set(summary[key]["datasets"]) == {"Spot-the-Diff", "MIT-States_PropertyCoherence", "nuscenes",
                                                 "RecipeQA_ImageCoherence"}, key
    assert (out / "evaluation/I4/results/sparkleschat_tiny/i4-score.txt").is_file()
    # the three training steps wrote their outputs, and every evaluation has its HTML page
    import torch

    towers = torch.load(out / "models" / "sparkleschat_tiny_towers" / "blip2_towers.pth", weights_only=True)
    assert "Qformer.bert.embeddings.word_embeddings.weight" in towers["model"]  # the Q-Former's text side
    assert towers["model"]["query_tokens"].shape[1] == 36
    warm_up = torch.load(out / "models" / "sparkleschat_tiny_reasoning" / "checkpoint_last.pth", weights_only=True)
    assert any(k.startswith("llama_model.") for k in warm_up["model"])
    assert (out / "models" / "sparkleschat_tiny" / "checkpoint_last.pth").is_file()
    for ds in ("BISON", "NLVR2", "SparklesEval"):
        assert list((out / "evaluation" / ds / "results").glob("*.html")), ds
    assert "BISON accuracy" in proc.stdout
    assert f"chat with it: python demo.py --sparkles_root {out}\n" in proc.stdout  # the demo loads what it trained
