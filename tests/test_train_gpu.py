"""GPU checks of the runner (skipped without CUDA): AMP in bfloat16 and float16 with GradScaler, the
frozen-tower feature cache, NCCL under torchrun, and resume on the device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from test_train_helpers import free_port, trainable_weights, training_world, write_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return training_world(tmp_path_factory.mktemp("gpu"))


def cfg(world, name, **run):
    base = {"device": "cuda", "output_dir": name, "max_epoch": 2, "iters_per_epoch": 6, "num_workers": 2}
    return write_config(world["base"] / f"{name}.yaml", root=world["root"], tok_dir=world["tok_dir"],
                        run={**base, **run})


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_amp_training_and_exact_resume_on_cuda(world, dtype):
    path = cfg(world, f"amp_{dtype}", amp=True, amp_dtype=dtype, max_epoch=3)
    full = train.main(["--cfg-path", str(path)])
    losses = [e["train_loss"] for e in full["epochs"]]
    assert all(map(lambda x: x == x and x < 100, losses)) and losses[-1] < losses[0]
    out = Path(full["output_dir"])
    ckpt = torch.load(out / "checkpoint_0.pth", weights_only=True)
    assert (ckpt["scaler"] is not None) == (dtype == "float16")
    resumed = train.main(["--cfg-path", str(path), "--options", f"run.output_dir=amp_{dtype}_resumed",
                          f"run.resume_ckpt_path=amp_{dtype}/checkpoint_0.pth"])
    a, b = trainable_weights(Path(full["checkpoint"])), trainable_weights(Path(resumed["checkpoint"]))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"{dtype}: losses {losses}, max |resumed - uninterrupted| = {worst:.3g}")
    assert worst < 1e-3


def test_feature_cache_on_cuda(world):
    model = {"freeze_vit": True, "freeze_qformer": True, "freeze_llm": True}
    path = write_config(world["base"] / "cache.yaml", root=world["root"], tok_dir=world["tok_dir"], model=model,
                        run={"device": "cuda", "output_dir": "cache", "max_epoch": 1, "iters_per_epoch": 6,
                             "vision_feature_cache": True, "amp": True})
    summary = train.main(["--cfg-path", str(path)])
    assert set(trainable_weights(Path(summary["checkpoint"]))) == {"llama_proj.weight", "llama_proj.bias"}


def test_torchrun_nccl_single_gpu(world):
    path = cfg(world, "nccl", amp=True)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
                          "--master-port", str(free_port()), "train.py", "--cfg-path", str(path)],
                         cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "on cuda:0" in res.stderr
    ckpt = torch.load(world["root"] / "nccl" / "checkpoint_last.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and len(ckpt["ranks"]) == 1
