"""Checkpoints that cannot be lost or misread, and the dependencies that make reading them safe.

Damaged checkpoints are refused with the file's name (the loaders and the runner's resume), ``checkpoint_last.pth``
is a whole copy of the epoch's checkpoint, ``run.auto_resume`` continues from the newest complete checkpoint,
a fresh run does not overwrite another's checkpoints without ``--overwrite``, and a resume with changed training
settings is refused unless ``--allow-config-change``. Then: the torch floor, weights-only loading everywhere and
the hash-checked spaCy pipeline install.
"""

from __future__ import annotations

import ast
import datetime
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import torch

import train
from sparkles.models.loaders import CheckpointError, read_state_dict
from test_train_helpers import trainable_weights, training_world, write_config

REPO = Path(__file__).resolve().parents[1]
RUN = {"max_epoch": 3, "iters_per_epoch": 4}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return training_world(tmp_path_factory.mktemp("ckpt_safety"))


@pytest.fixture(scope="module")
def full(world):
    """An uninterrupted three-epoch run: the reference for every resume below."""
    summary = train.main(["--cfg-path", str(config(world, "full"))])
    return Path(summary["output_dir"])


def config(world, name, **run) -> Path:
    return write_config(world["base"] / f"{name}.yaml", root=world["root"], tok_dir=world["tok_dir"],
                        run={**RUN, "output_dir": name, **run})


def truncated_copy(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = trainable_weights(a), trainable_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------- damaged files
def test_empty_and_truncated_files_are_refused_naming_the_file(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.arange(1000.0)}}, good)
    assert set(read_state_dict(good, wrapper_key="model")) == {"w"}

    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(empty))}: the file is empty"):
        read_state_dict(empty)
    cut = truncated_copy(good, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(cut))}: cannot be read: truncated"):
        read_state_dict(cut)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "saved": datetime.date(2020, 1, 1)}, pickled)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(pickled))}: .*other than tensors"):
        read_state_dict(pickled)


def test_resume_from_a_truncated_checkpoint_names_the_file(world, full):
    broken = truncated_copy(full / "checkpoint_0.pth", world["root"] / "broken" / "checkpoint_0.pth")
    with pytest.raises(CheckpointError, match=re.escape(str(broken))):
        train.main(["--cfg-path", str(config(world, "broken_resume")), "--options",
                    "run.resume_ckpt_path=broken/checkpoint_0.pth"])
    broken.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(broken))}: the file is empty"):
        train.main(["--cfg-path", str(config(world, "broken_resume")), "--options",
                    "run.resume_ckpt_path=broken/checkpoint_0.pth"])
    assert not (world["root"] / "broken_resume" / "checkpoint_0.pth").exists(), "nothing was trained"


def test_checkpoint_last_is_a_whole_copy_written_atomically(full):
    assert (full / "checkpoint_last.pth").read_bytes() == (full / "checkpoint_2.pth").read_bytes()
    assert not [p for p in full.iterdir() if p.name.startswith(".")], "no temporary files are left behind"


# --------------------------------------------------------------------------------------------- auto_resume
def test_auto_resume_continues_from_the_newest_complete_checkpoint(world, full):
    """Epoch 1's checkpoint and checkpoint_last.pth are damaged: the run continues from epoch 0's and ends with the
    uninterrupted run's weights."""
    out = world["root"] / "auto"
    out.mkdir()
    shutil.copyfile(full / "checkpoint_0.pth", out / "checkpoint_0.pth")
    truncated_copy(full / "checkpoint_1.pth", out / "checkpoint_1.pth")
    truncated_copy(full / "checkpoint_1.pth", out / "checkpoint_last.pth", fraction=0.9)
    summary = train.main(["--cfg-path", str(config(world, "auto", auto_resume=True))])
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2]
    assert_same_weights(full / "checkpoint_last.pth", out / "checkpoint_last.pth")

    # with the run complete, auto_resume has nothing left to do
    again = train.main(["--cfg-path", str(config(world, "auto", auto_resume=True))])
    assert again["epochs"] == [] and again["checkpoint"] is None


# --------------------------------------------------------------------------------------------- overwriting
def test_a_new_run_does_not_overwrite_checkpoints_without_overwrite(world):
    cfg = config(world, "taken", max_epoch=2, iters_per_epoch=2)
    train.main(["--cfg-path", str(cfg)])
    out = world["root"] / "taken"
    before = {p.name: p.read_bytes() for p in out.glob("checkpoint_*.pth")}
    assert set(before) == {"checkpoint_0.pth", "checkpoint_1.pth", "checkpoint_last.pth"}

    with pytest.raises(FileExistsError, match=rf"{re.escape(str(out))} already holds checkpoints.*--overwrite"):
        train.main(["--cfg-path", str(cfg)])
    assert {p.name: p.read_bytes() for p in out.glob("checkpoint_*.pth")} == before

    # --overwrite trains afresh, and an earlier run's later epochs do not stay beside the new ones
    shorter = config(world, "taken", max_epoch=1, iters_per_epoch=2)
    summary = train.main(["--cfg-path", str(shorter), "--overwrite"])
    assert [e["epoch"] for e in summary["epochs"]] == [0]
    assert sorted(p.name for p in out.glob("checkpoint_*.pth")) == ["checkpoint_0.pth", "checkpoint_last.pth"]


def test_run_sh_trains_every_stage_with_overwrite():
    """run.sh retrains on purpose: every train.py call of its train_stage passes --overwrite."""
    text = (REPO / "run.sh").read_text(encoding="utf-8")
    body = re.search(r"^train_stage\(\) \{\n(.*?)^\}", text, flags=re.S | re.M).group(1)
    calls = [line for line in body.splitlines() if "train.py" in line]
    assert len(calls) == 2 and all("--overwrite" in line for line in calls), calls


# --------------------------------------------------------------------------------------------- changed settings
def test_a_resume_with_changed_training_settings_is_refused_unless_allowed(world, full):
    resume = "run.resume_ckpt_path=full/checkpoint_0.pth"
    cfg = config(world, "changed", init_lr=1e-3)
    with pytest.raises(ValueError, match=r"run\.init_lr: 0\.003 -> 0\.001.*--allow-config-change"):
        train.main(["--cfg-path", str(cfg), "--options", resume])
    ratio = "datasets.SparklesDialogueCC_turn1_1img.sample_ratio"
    with pytest.raises(ValueError, match=rf"{re.escape(ratio)}: 2(\.0)? -> 5(\.0)?"):
        train.main(["--cfg-path", str(config(world, "changed_ratio")), "--options", resume, f"{ratio}=5"])
    assert not (world["root"] / "changed" / "checkpoint_1.pth").exists()

    summary = train.main(["--cfg-path", str(cfg), "--allow-config-change", "--options", resume])
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2]
    lines = (world["root"] / "changed" / "log.txt").read_text().splitlines()
    assert '"init_lr": 0.001' in lines[0]


# --------------------------------------------------------------------------------------------- dependencies
def _project_files(*suffixes: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    return [REPO / f for f in out if f.endswith(suffixes) and (REPO / f).is_file()]


def test_the_torch_floor_has_weights_only_loading_that_cannot_be_bypassed():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"torch\b(?!vision)", d)]
    floor = re.fullmatch(r"torch>=(\d+)\.(\d+)(?:\.\d+)?", spec.replace(" ", ""))
    assert floor and (int(floor[1]), int(floor[2])) >= (2, 6), spec


def test_every_torch_load_is_weights_only():
    unsafe = re.compile("weights_only" + r"\s*=\s*" + "False")  # written apart so this file does not match itself
    text_files = _project_files(".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".txt", ".ipynb")
    assert [str(p.relative_to(REPO)) for p in text_files if unsafe.search(p.read_text(errors="replace"))] == []
    loads = 0
    for path in _project_files(".py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                loads += 1
                flag = [k.value for k in node.keywords if k.arg == "weights_only"]
                assert flag and isinstance(flag[0], ast.Constant) and flag[0].value is True, \
                    f"{path.relative_to(REPO)}:{node.lineno}: torch.load without weights_only=True"
    assert loads > 10


def test_the_spacy_pipeline_is_installed_with_its_hash_checked():
    script = (REPO / "scripts" / "install.sh").read_text(encoding="utf-8")
    sha = re.search(r'SPACY_PIPELINE_SHA256="([0-9a-f]{64})"', script).group(1)
    install = re.search(r'"\$PY" -m pip install[^\n]*\\\n[^\n]*SPACY_PIPELINE[^\n]*', script)
    assert install and "--require-hashes" in install.group(0) and "--hash=sha256:$SPACY_PIPELINE_SHA256" in script
    # no other line installs a spaCy pipeline without the hash
    assert [line for line in script.splitlines() if "en-core-web-sm" in line and "pip install" in line] == []
    # the hash is the one the statistics documentation vouches for
    assert sha in (REPO / "docs" / "visualisation.md").read_text(encoding="utf-8")
