"""evaluate_I4.py on a small DEMON-format tree with the tiny random model: answers, per-sample errors, resuming
after a crash without repeating finished samples, shards gathered into pred.json, settings that do not mix."""

import json
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image

import calculate_I4
import evaluate_I4
from sparkles.eval.i4_cli import run as i4_run


def _image(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    im = Image.new("RGB", (40, 40), tuple(rng.randrange(256) for _ in range(3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _write_dataset(i4_dir: Path, name: str, question_type: str, n: int, images_per: int) -> None:
    core = i4_dir / name / "core"
    data = []
    for k in range(n):
        files = [f"images/{name}_{k}_{j}.png" for j in range(images_per)]
        for j, rel in enumerate(files):
            _image(core / rel, 100 * k + j)
        slots = " ".join(f"{{image#{j + 1}}}" for j in range(images_per))
        instance = {"context": f"Look at {slots} (sample {k}).", "images_path": files}
        if question_type == "multi-choice":
            instance["choice_list"] = ["one circle", "two circles", "three circles"]
        data.append({"sample_id": f"{name}_{k}", "task_instruction_id": k % 2, "task_instance": instance,
                     "response": "two circles" if question_type == "multi-choice" else f"a red circle {k}"})
    data[1]["task_instance"]["context"] = "Only {image#1} is named here."  # carries more images than it names
    core.mkdir(parents=True, exist_ok=True)
    (core / "core.json").write_text(json.dumps({"metadata": {"task_instruction": ["Answer.", "Describe."],
                                                              "question_type": question_type}, "data": data}))


@pytest.fixture(scope="module")
def i4_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("demon")
    _write_dataset(root, "Spot-the-Diff", "open-ended", 5, 2)
    _write_dataset(root, "VISION", "multi-choice", 4, 3)
    return root


def args(eval_world, i4_dir, result_dir, *extra):
    return ["--cfg-path", str(eval_world["cfg"]), "--sparkles_root", str(eval_world["root"]), "--i4-dir", str(i4_dir),
            "--result-dir", str(result_dir), "--max-new-tokens", "6", "--no-progress", *extra]


def load(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def one_go(eval_world, i4_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("i4_one_go")
    assert evaluate_I4.main(args(eval_world, i4_dir, out, "--dataset", "Spot-the-Diff", "VISION")) == 0
    return out


def test_answers_and_per_sample_errors(one_go, i4_dir):
    preds = load(one_go / "Spot-the-Diff/pred.json")
    assert [p["sample_id"] for p in preds] == [f"Spot-the-Diff_{k}" for k in range(5)]
    bad = preds[1]
    assert bad["pred_response"] == "" and "Spot-the-Diff_1" in bad["error"] and "1 {image#k}" in bad["error"]
    for p in preds[:1] + preds[2:]:
        assert "error" not in p and isinstance(p["pred_response"], str)
        assert p["prompt"].count("<Img><ImageHere></Img>") == 2 and p["model_input"].endswith("###Assistant:")
    vision = load(one_go / "VISION/pred.json")
    assert "Pick your answer from these options:" in vision[0]["prompt"]
    assert calculate_I4.main(["--result-dir", str(one_go), "--i4-dir", str(i4_dir)]) == 0
    assert set(load(one_go / "VISION/eval.json")) == {"Accuracy"}
    assert set(load(one_go / "Spot-the-Diff/eval.json")) == {"Rouge-L f"}


def test_batched_answers_equal_one_by_one(eval_world, i4_dir, one_go, tmp_path):
    assert evaluate_I4.main(args(eval_world, i4_dir, tmp_path, "--dataset", "VISION", "--batch-size", "4",
                                 "--batch-image", "6")) == 0
    assert load(tmp_path / "VISION/pred.json") == load(one_go / "VISION/pred.json")


def test_a_crash_resumes_without_repeating_finished_samples(eval_world, i4_dir, one_go, tmp_path, caplog):
    broken = tmp_path / "demon"
    shutil.copytree(i4_dir, broken)
    (broken / "Spot-the-Diff/core/images/Spot-the-Diff_3_0.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert evaluate_I4.main(args(eval_world, broken, out, "--dataset", "Spot-the-Diff")) == 1
    assert "Spot-the-Diff_3" in caplog.text
    part = load(out / "Spot-the-Diff/pred_0to5.json")
    assert [p["sample_id"] for p in part] == ["Spot-the-Diff_0", "Spot-the-Diff_1", "Spot-the-Diff_2"]
    assert not (out / "Spot-the-Diff/pred.json").exists()
    shutil.copy(i4_dir / "Spot-the-Diff/core/images/Spot-the-Diff_3_0.png",
                broken / "Spot-the-Diff/core/images/Spot-the-Diff_3_0.png")
    [stats] = i4_run(args(eval_world, broken, out, "--dataset", "Spot-the-Diff"))
    assert stats["reused"] == 3 and stats["answered"] == 2 and stats["complete"]
    assert load(out / "Spot-the-Diff/pred.json") == load(one_go / "Spot-the-Diff/pred.json")


def test_shards_are_gathered_and_settings_do_not_mix(eval_world, i4_dir, one_go, tmp_path):
    for shard in ("1/2", "0/2"):
        [stats] = i4_run(args(eval_world, i4_dir, tmp_path, "--dataset", "Spot-the-Diff", "--shard", shard))
    assert stats["complete"] and sorted(p.name for p in (tmp_path / "Spot-the-Diff").glob("pred_*")) == \
        ["pred_0to2.json", "pred_2to5.json"]
    assert load(tmp_path / "Spot-the-Diff/pred.json") == load(one_go / "Spot-the-Diff/pred.json")
    assert evaluate_I4.main(args(eval_world, i4_dir, tmp_path, "--dataset", "Spot-the-Diff", "--seed", "7")) == 1


def test_evaluate_i4_sh_shards_gathers_and_scores(eval_world, i4_dir, one_go, tmp_path):
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON", "python"), SPARKLES_ROOT=str(eval_world["root"]))
    proc = subprocess.run(["bash", str(repo / "evaluate_I4.sh"), str(i4_dir), str(tmp_path), str(eval_world["cfg"]),
                           "Spot-the-Diff", "2", "--", "--max-new-tokens", "6"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert load(tmp_path / "Spot-the-Diff/pred.json") == load(one_go / "Spot-the-Diff/pred.json")
    assert (tmp_path / "i4-score.txt").is_file() and set(load(tmp_path / "Spot-the-Diff/eval.json")) == {"Rouge-L f"}
