"""The training runner end to end on a tiny model: loss falls, checkpoints, exact resume, torchrun, bad data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from sparkles.data.base import DataError
from test_train_helpers import free_port, make_world, trainable_weights, training_world, write_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return training_world(tmp_path_factory.mktemp("runner"))


def config(world, name, **kw) -> Path:
    return write_config(world["base"] / f"{name}.yaml", root=world["root"], tok_dir=world["tok_dir"], **kw)


def log_lines(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.txt").read_text().splitlines()]


def test_tiny_model_loss_falls_and_checkpoints_are_complete(world):
    run = {"output_dir": "falls", "max_epoch": 3, "iters_per_epoch": 10, "tensorboard": True, "init_lr": 5e-3}
    summary = train.main(["--cfg-path", str(config(world, "falls", run=run))])
    out = Path(summary["output_dir"])
    assert out == world["root"] / "falls"  # relative output_dir resolves against the Sparkles root
    losses = [e["train_loss"] for e in summary["epochs"]]
    assert losses[2] < losses[0] - 0.8, losses
    lines = log_lines(out)
    assert lines[0]["config"]["run"]["output_dir"] == "falls" and lines[0]["config"]["datasets"]
    assert [line["epoch"] for line in lines[1:]] == [0, 1, 2]
    assert {"train_lr", "train_loss", "global_step", "samples"} <= set(lines[1])
    assert any((out / "tensorboard").iterdir())
    for name in ("checkpoint_0.pth", "checkpoint_1.pth", "checkpoint_2.pth", "checkpoint_last.pth"):
        assert (out / name).is_file()
    ckpt = torch.load(out / "checkpoint_last.pth", weights_only=True)  # plain containers only
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 30 and len(ckpt["ranks"]) == 1
    assert {"optimizer", "scaler", "scheduler", "config", "ranks"} <= set(ckpt)
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporaries

    # the eval side reads the "model" part through the upstream-format loader
    import sparkles.models  # noqa: F401
    from sparkles.common.config import load_config
    from sparkles.models import SparklesChat

    cfg = load_config(config(world, "falls", run=run))
    model = SparklesChat.from_config(cfg.model, root=world["root"])
    report = sparkles.models.loaders.load_sparkles_checkpoint(model, out / "checkpoint_last.pth")
    assert set(report.loaded) == set(ckpt["model"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    for k, v in ckpt["model"].items():
        assert torch.equal(model.state_dict()[k], v)


def test_lr_scale_gives_a_named_part_its_own_multiple_of_the_schedule(world):
    run = {"output_dir": "lr_scale", "max_epoch": 1, "iters_per_epoch": 4, "init_lr": 1e-3, "warmup_steps": 2,
           "lr_scale": {"llama_proj": 10.0}}
    summary = train.main(["--cfg-path", str(config(world, "lr_scale", run=run))])
    groups = torch.load(Path(summary["checkpoint"]), weights_only=True)["optimizer"]["param_groups"]
    by_scale = {g["lr_scale"]: g for g in groups if g["params"]}
    assert set(by_scale) == {1.0, 10.0}
    assert by_scale[10.0]["lr"] == pytest.approx(10 * by_scale[1.0]["lr"]) and by_scale[1.0]["lr"] > 0
    # the projection's weight and bias (decayed and not), nothing else, at ten times the rate
    assert sum(len(g["params"]) for g in groups if g["lr_scale"] == 10.0) == 2
    # without lr_scale: the two upstream groups (decayed, not decayed) at the schedule's rate
    plain = torch.load(Path(train.main(["--cfg-path", str(config(world, "lr_plain", run={
        **run, "output_dir": "lr_plain", "lr_scale": {}}))])["checkpoint"]), weights_only=True)
    assert [g["lr_scale"] for g in plain["optimizer"]["param_groups"]] == [1.0, 1.0]

    with pytest.raises(ValueError, match="no trainable parameter under llama_projection"):
        train.main(["--cfg-path", str(config(world, "lr_typo", run={**run, "output_dir": "lr_typo",
                                                                      "lr_scale": {"llama_projection": 2.0}}))])


def test_bfloat16_autocast_trains_on_cpu_and_float16_falls_back(world):
    run = {"output_dir": "bf16", "max_epoch": 3, "iters_per_epoch": 10, "init_lr": 5e-3, "amp": True,
           "amp_dtype": "bfloat16", "device": "cpu"}
    summary = train.main(["--cfg-path", str(config(world, "bf16", run=run))])
    assert summary["autocast"] == "bfloat16"
    losses = [e["train_loss"] for e in summary["epochs"]]
    assert losses[2] < losses[0] - 0.8, losses
    # the weights stay float32: autocast changes the products' precision, not what is optimised and saved
    ckpt = torch.load(Path(summary["checkpoint"]), weights_only=True)
    assert {v.dtype for v in ckpt["model"].values()} == {torch.float32}

    run = dict(run, output_dir="fp16", amp_dtype="float16", max_epoch=1, iters_per_epoch=2)
    assert train.main(["--cfg-path", str(config(world, "fp16", run=run))])["autocast"] is None  # needs a GPU


def test_frozen_towers_train_only_the_projection_and_the_feature_cache_matches(world):
    model = {"freeze_vit": True, "freeze_qformer": True, "freeze_llm": True, "allow_random_towers": True}
    run = {"max_epoch": 1, "iters_per_epoch": 4}
    plain = train.main(["--cfg-path", str(config(world, "proj", model=model, run={**run, "output_dir": "proj"}))])
    cached = train.main(["--cfg-path", str(config(world, "cache", model=model, run={
        **run, "output_dir": "cache", "vision_feature_cache": True}))])
    a = trainable_weights(Path(plain["checkpoint"]))
    b = trainable_weights(Path(cached["checkpoint"]))
    assert set(a) == {"llama_proj.weight", "llama_proj.bias"}  # upstream checkpoint layout
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="vision_feature_cache"):
        train.main(["--cfg-path", str(config(world, "bad", run={**run, "vision_feature_cache": True}))])
    with pytest.raises(ValueError, match="accum_grad_iters=3 must divide"):
        train.main(["--cfg-path", str(config(world, "bad", run={**run, "accum_grad_iters": 3}))])


def test_killed_run_resumes_exactly(world):
    run = {"max_epoch": 3, "iters_per_epoch": 6}
    full = train.main(["--cfg-path", str(config(world, "full", run={**run, "output_dir": "full"}))])

    cfg = config(world, "killed", run={**run, "output_dir": "killed"})
    out = world["root"] / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", "--cfg-path", str(cfg)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        # checkpoint_last.pth is written after checkpoint_<epoch>.pth: wait for it, or the kill can fall between
        while not (out / "checkpoint_last.pth").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    reached = torch.load(out / "checkpoint_last.pth", weights_only=True)["epoch"]
    assert reached < 2, "the run finished before it could be killed"

    resumed = train.main(["--cfg-path", str(cfg), "--options", "run.resume_ckpt_path=killed/checkpoint_last.pth"])
    assert [e["epoch"] for e in resumed["epochs"]] == list(range(reached + 1, 3))
    a, b = trainable_weights(Path(full["checkpoint"])), trainable_weights(Path(resumed["checkpoint"]))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert resumed["epochs"][-1]["train_loss"] == pytest.approx(full["epochs"][-1]["train_loss"], abs=1e-6)


@pytest.mark.slow  # two fresh interpreters import torch/transformers: ~10 s idle, ~20 s on a busy machine
def test_two_process_torchrun_on_cpu(world):
    run = {"output_dir": "ddp", "max_epoch": 1, "iters_per_epoch": 4, "accum_grad_iters": 2, "batch_size_train": 2}
    cfg = config(world, "ddp", run=run)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "train.py", "--cfg-path", str(cfg)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = world["root"] / "ddp"
    lines = log_lines(out)
    assert lines[0]["world_size"] == 2  # the process count is the run's, not a config value
    assert lines[1]["samples"] == 4 * 2 * 2  # iterations × batch × processes
    ckpt = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["ranks"]) == 2
    draws = [sum(r["data"]["draws"].values()) for r in ckpt["ranks"]]
    assert draws == [4, 4]
    assert ckpt["ranks"][0]["data"]["rng"] != ckpt["ranks"][1]["data"]["rng"]  # per-rank mixture streams
    steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert steps == {2}  # 4 iterations, an optimizer step every 2


def test_bad_records_stop_training_or_are_counted(world, tmp_path):
    name = "SparklesDialogueCC_turn1_1img"
    root = tmp_path / "root"
    make_world(root, n_per_split=6, splits={name: (1, 1)})
    anno = root / "data/SparklesDialogueCC/annotations" / f"{name}.json"
    records = json.loads(anno.read_text())
    records[2]["tgt_imgs"][0]["image_id"] = "404"  # missing file
    records[3]["tgt_imgs"][0]["image_id"] = "666"  # unreadable file
    records[2]["instruction"] = records[2]["instruction"].replace(records[2]["instruction"][17:20], "404")
    (root / "data/SparklesDialogueCC/images/666.jpg").write_bytes(b"\x00garbage")
    anno.write_text(json.dumps(records))
    cfg = write_config(tmp_path / "c.yaml", root=root, tok_dir=world["tok_dir"], datasets={name: {}},
                       run={"max_epoch": 1, "iters_per_epoch": 3, "batch_size_train": 5})
    with pytest.raises(DataError, match=rf"{name}\.json: record 2: image '404' not found"):
        train.main(["--cfg-path", str(cfg)])
    summary = train.main(["--cfg-path", str(cfg), "--options", "run.skip_bad_records=True"])
    assert summary["skipped_bad_records"] == 1 + 3  # one at load time; the unreadable one once per pass (3 passes)
    assert summary["epochs"][0]["samples"] == 3 * 4
