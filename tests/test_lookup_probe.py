"""The look-up probe: its count questions are true to the scenes, and a short run reports a curve and the prior."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sparkles.data.synthetic import main as synthetic_main
from sparkles.data.synthetic.language import number_word
from sparkles.data.synthetic.scenes import Scene
from sparkles.data.synthetic.writers import load_world_file
from sparkles.tools.lookup_probe import Questions, main

REPO = Path(__file__).resolve().parents[1]
CFG = str(REPO / "eval_configs/sparkles_tiny.yaml")
NUMBERS = {number_word(n): n for n in range(10)}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    assert synthetic_main(["--out", str(root), "--seed", "5", "--preset", "ci", "--quiet"]) == 0
    return root


@pytest.fixture(scope="module")
def scenes(world) -> list[Scene]:
    return [Scene.from_record(r) for r in load_world_file(world)["scenes"][:40]]


def _count(scene: Scene, plural: str) -> int:
    """The count of a plural kind phrase ("red circles", "squares", "blue objects", "objects"), read independently."""
    words = plural.split()
    shape = None if words[-1] == "objects" else words[-1][:-1]
    colour = words[0] if len(words) == 2 else None
    return scene.count(colour, shape)


def test_single_questions_are_true_to_the_asked_image(scenes):
    for images, ask in ((1, "kind"), (2, "kind"), (2, "total")):
        questions = Questions(images, ask, 1, seed=2)
        targets = set()
        for i in range(0, 30, images):
            pair = scenes[i:i + images]
            q, a = questions(pair)
            assert q.count("<ImageHere>") == images
            plural = re.search(r"How many (.+) are there in", q).group(1)
            m = re.fullmatch(r"IMAGE#(\d) shows (\w+) (.+)\.", a)
            assert m, a
            target = int(m.group(1)) - 1
            targets.add(target)
            n = NUMBERS[m.group(2)]
            assert n == _count(pair[target], plural)
            assert m.group(3) == (plural[:-1] if n == 1 else plural)  # the asked kind, in the world's grammar
            assert (plural == "objects") == (ask == "total")
        assert targets == set(range(images))  # with two images, either one is asked about


def test_present_asks_about_kinds_the_asked_image_holds(scenes):
    uniform, held = Questions(2, "kind", 1, seed=6), Questions(2, "kind", 1, seed=6, present=1.0)

    def counts(questions):
        return [NUMBERS[re.fullmatch(r"IMAGE#\d shows (\w+) .+\.", questions(scenes[i:i + 2])[1]).group(1)]
                for i in range(0, 30, 2)]
    assert all(n >= 1 for n in counts(held))  # every scene of the ci world holds at least one object
    assert 0 in counts(uniform)  # without it, most kinds asked are absent


def test_dense_answers_count_every_asked_kind_in_both_images(scenes):
    questions = Questions(2, "kind", 3, seed=4)
    for i in range(0, 20, 2):
        pair = scenes[i:i + 2]
        q, a = questions(pair)
        parts = re.fullmatch(r"IMAGE#1: (.+)\. IMAGE#2: (.+)\.", a)
        assert parts, a
        for k in (0, 1):
            entries = parts.group(k + 1).split(", ")
            assert len(entries) == 3 and len({e.rsplit(" ", 1)[0] for e in entries}) == 3
            for entry in entries:
                plural, word = entry.rsplit(" ", 1)
                assert plural in q and NUMBERS[word] == _count(pair[k], plural)
    with pytest.raises(ValueError, match="--images 2"):
        Questions(1, "kind", 3, seed=0)


def test_probe_runs_on_frozen_towers_and_reports_prior_and_curve(world, tmp_path):
    from sparkles.models import loaders
    from sparkles.serve.loading import load_model

    with pytest.raises(SystemExit, match="train the towers first"):
        main(["--root", str(world), "--cfg-path", CFG, "--steps", "1"])
    # the probe reads image-only towers (model_type tiny), whatever the config's default
    model, _ = load_model(CFG, sparkles_root=str(world),
                          options=["model.model_type=tiny", "model.ckpt=", "model.q_former_model="])
    loaders.save_blip2(model, world / "models" / "towers.pth")
    out = tmp_path / "curve.json"
    assert main(["--root", str(world), "--towers", "models/towers.pth", "--cfg-path", CFG, "--images", "2",
                 "--kinds", "2", "--slot-embedding", "0.5", "--order-embedding", "0.5", "--pair-embedding", "0.5",
                 "--present", "0.5", "--steps", "2",
                 "--eval-every", "1", "--batch-size", "4", "--train-images", "30", "--held-out", "10",
                 "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["step"] for row in result["curve"]] == [1, 2]
    assert result["held_out_count_words"] == 10 * 2 * 2  # ten pairs, two kinds in each of two images
    assert 1 / 10 <= result["prior"] <= 1.0
    assert all(0.0 <= row["count_word_accuracy"] <= 1.0 for row in result["curve"])
