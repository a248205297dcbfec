"""The world's I4 split: the DEMON core format of every dataset, answers that hold on the scenes (re-checked with
small parsers of their own), determinism, the world's other files and tokenizer unchanged by the split, the
replacement of a previous split, and the trivial baseline's predictions."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from sparkles.common.io import read_json
from sparkles.tinyworld import iter_world_texts, main
from sparkles.tinyworld.i4 import (DATASETS, IMAGE_CHOICE_DATASETS, INSTRUCTIONS, PER_DATASET, build_i4,
                                   build_i4_for_root, core_record, write_baseline_predictions)

SEED = 7
N = PER_DATASET["ci"]
WORDS = {"no": 0, "a": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
         "nine": 9, "ten": 10, "eleven": 11, "twelve": 12}
PLACES = {"at the top left": "top left", "at the top": "top", "at the top right": "top right", "on the left": "left",
          "in the centre": "centre", "on the right": "right", "at the bottom left": "bottom left",
          "at the bottom": "bottom", "at the bottom right": "bottom right"}
ITEM = re.compile(r"(\w+) (?:(red|green|blue|yellow|purple) )?(circle|square|triangle|object)s?(?: (.+))?")


def _generate(root: Path, *extra: str) -> int:
    return main(["--out", str(root), "--seed", str(SEED), "--preset", "ci", "--quiet", "--workers", "1", *extra])


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> tuple[Path, Path]:
    """The same world with its I4 split and without it (both with their tokenizer)."""
    with_i4, without = tmp_path_factory.mktemp("with_i4"), tmp_path_factory.mktemp("without_i4")
    assert _generate(with_i4) == 0
    assert _generate(without, "--num-i4", "0") == 0
    return with_i4, without


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _i4_files(root: Path) -> dict[str, bytes]:
    return {k: v for k, v in _files(root).items() if k.startswith("evaluation/I4/")}


def _items(text: str) -> list[tuple[int, str | None, str | None, str | None]]:
    """(count, colour, shape, place) per item of a phrase like ``two red circles and a blue square on the left``."""
    out = []
    for part in re.split(r", | and ", text):
        m = ITEM.fullmatch(part)
        assert m and m[1] in WORDS and (m[4] is None or m[4] in PLACES), part
        out.append((WORDS[m[1]], m[2], None if m[3] == "object" else m[3], PLACES.get(m[4])))
    return out


def _count(scene, colour, shape) -> int:
    return sum(1 for o in scene.objects if colour in (None, o.colour) and shape in (None, o.shape))


def _holds(item, scene) -> bool:
    n, colour, shape, place = item
    found = [o for o in scene.objects if o.colour == colour and o.shape == shape]
    return len(found) == n and (place is None or (n == 1 and found[0].position == place))


def _place(scene, colour, shape) -> str:
    (obj,) = [o for o in scene.objects if o.colour == colour and o.shape == shape]
    return obj.position


def _kinds(scene) -> set:
    return {(o.colour, o.shape) for o in scene.objects}


def test_every_dataset_is_written_in_the_core_format(worlds):
    root = worlds[0]
    size = read_json(root / "world" / "scenes.json")["config"]["image_size"]
    from PIL import Image

    for dataset, question_type in DATASETS.items():
        core = root / "evaluation" / "I4" / dataset / "core"
        data = read_json(core / "core.json")
        assert set(data) == {"metadata", "data"}
        meta = data["metadata"]
        assert set(meta) == {"task_instruction", "question_type"} and meta["question_type"] == question_type
        assert meta["task_instruction"] and all(isinstance(t, str) and t for t in meta["task_instruction"])
        assert len(data["data"]) == N
        assert len({rec["sample_id"] for rec in data["data"]}) == N
        for rec in data["data"]:
            assert set(rec) == {"sample_id", "task_instruction_id", "task_instance", "response"}
            assert isinstance(rec["sample_id"], str) and rec["sample_id"]
            assert type(rec["task_instruction_id"]) is int
            assert 0 <= rec["task_instruction_id"] < len(meta["task_instruction"])
            task = rec["task_instance"]
            assert set(task) == ({"context", "images_path", "choice_list"} if question_type == "multi-choice"
                                 else {"context", "images_path"})
            paths = task["images_path"]
            assert 2 <= len(paths) <= 6
            for rel in paths:
                assert re.fullmatch(r"images/[\w-]+\.png", rel), rel
                with Image.open(core / rel) as img:
                    assert img.format == "PNG" and img.size == (size, size)
            # Every {image#k} of the images once, and no other placeholder.
            slots = re.findall(r"\{[^{}]*\}", task["context"])
            assert sorted(slots) == sorted(f"{{image#{k}}}" for k in range(1, len(paths) + 1)), task["context"]
            assert "{" not in re.sub(r"\{image#\d+\}", "", task["context"]) and "<Img>" not in task["context"]
            assert isinstance(rec["response"], str) and rec["response"]
            if question_type == "multi-choice":
                choices = task["choice_list"]
                assert 3 <= len(choices) <= 4 and len(set(choices)) == len(choices)
                assert all(isinstance(c, str) and c for c in choices) and rec["response"] in choices
            if dataset in IMAGE_CHOICE_DATASETS:
                assert task["choice_list"] == [f"image {x}" for x in "ABCD"[:len(paths)]]
                assert re.fullmatch(r"image [abcd]", rec["response"].lower()[:7])


def test_the_split_is_rebuilt_from_the_written_world_alone(worlds):
    root = worlds[0]
    split, _size = build_i4_for_root(root, N)
    for dataset, instances in split.items():
        assert read_json(root / "evaluation" / "I4" / dataset / "core" / "core.json") == \
            core_record(dataset, instances)


def test_the_answers_hold_on_the_scenes(worlds):
    split, _size = build_i4_for_root(worlds[0], N)
    for inst in split["Spot-the-Diff"]:
        m = re.fullmatch(r"IMAGE#1 shows (.+)\. IMAGE#2 shows (.+)\.", inst.response)
        assert m, inst.response
        first, second = _items(m[1]), _items(m[2])
        named = {(c, s) for _n, c, s, _p in first}
        assert named == {(c, s) for _n, c, s, _p in second}
        for items, scene in ((first, inst.scenes[0]), (second, inst.scenes[1])):
            for n, colour, shape, place in items:
                assert _count(scene, colour, shape) == n
                if place:
                    assert _place(scene, colour, shape) == place
        assert first != second
        # Every kind the answer leaves out is the same in both pictures.
        for colour, shape in (_kinds(inst.scenes[0]) | _kinds(inst.scenes[1])) - named:
            assert _count(inst.scenes[0], colour, shape) == _count(inst.scenes[1], colour, shape)
    for inst in split["MIT-States_PropertyCoherence"]:
        (n, colour, shape, _p), = _items(inst.response)
        assert n == 1 and all((colour, shape) in _kinds(s) for s in inst.scenes)
        for choice in inst.choices:
            if choice != inst.response:
                (_n, c, s, _p), = _items(choice)
                assert not all((c, s) in _kinds(scene) for scene in inst.scenes)
    for inst in split["nuscenes"]:
        (n, colour, shape, _p), = _items(inst.response)
        assert n == sum(_count(s, colour, shape) for s in inst.scenes)
        assert inst.context.startswith("How many ") and inst.context.endswith("in total?")
    for inst in split["RecipeQA_ImageCoherence"]:
        caption = re.search(r"the caption '(.+)' describe\?", inst.context)[1]
        items = _items(caption)
        fits = [all(_holds(it, s) for it in items) and _kinds(s) == {(c, sh) for _n, c, sh, _p in items}
                for s in inst.scenes]
        assert fits.count(True) == 1 and inst.response == f"image {'ABCD'[fits.index(True)]}"


def test_the_right_choice_is_balanced_and_instructions_are_valid(worlds):
    split, _size = build_i4_for_root(worlds[0], N)
    for dataset, instances in split.items():
        assert all(0 <= inst.instruction < len(INSTRUCTIONS[dataset]) for inst in instances)
        if DATASETS[dataset] == "multi-choice":
            places = Counter(inst.choices.index(inst.response) for inst in instances)
            assert max(places.values()) - min(places.get(k, 0) for k in range(4)) <= 1, (dataset, places)


def test_the_world_files_and_tokenizer_are_unchanged_by_the_split(worlds):
    with_i4, without = worlds
    before, after = _files(without), _files(with_i4)
    assert not _i4_files(without)
    assert {k: v for k, v in after.items() if not k.startswith("evaluation/I4/")} == before
    assert "models/tiny_llm/tokenizer.json" in before and "world/scenes.json" in before
    # The tokenizer's corpus holds no I4 text.
    corpus = list(iter_world_texts(with_i4))
    assert corpus == list(iter_world_texts(without))
    assert not any("{image#" in t for t in corpus)
    instructions = {t for texts in INSTRUCTIONS.values() for t in texts}
    assert not instructions & set(corpus)


def test_same_seed_same_split_other_seed_other_split(worlds, tmp_path):
    with_i4, without = worlds
    copy = tmp_path / "world"
    shutil.copytree(without, copy)
    assert _generate(copy, "--i4-only") == 0
    assert _i4_files(copy) == _i4_files(with_i4)
    cfg = read_json(with_i4 / "world" / "scenes.json")["config"]
    other = build_i4(SEED + 1, cfg["colours"], cfg["shapes"], set(), N)
    for dataset, instances in other.items():
        assert core_record(dataset, instances) != read_json(with_i4 / "evaluation/I4" / dataset / "core/core.json")


def test_a_new_split_replaces_the_previous_one(worlds, tmp_path):
    root = tmp_path / "world"
    shutil.copytree(worlds[0], root)
    assert _generate(root) == 2  # a world is there: nothing is written without --force
    assert _i4_files(root) == _i4_files(worlds[0])
    assert _generate(root, "--i4-only", "--num-i4", "2") == 0
    for dataset in DATASETS:
        core = root / "evaluation" / "I4" / dataset / "core"
        listed = {rel for rec in read_json(core / "core.json")["data"] for rel in rec["task_instance"]["images_path"]}
        assert len(read_json(core / "core.json")["data"]) == 2
        assert {f"images/{p.name}" for p in (core / "images").iterdir()} == listed
    assert _generate(root, "--i4-only", "--num-i4", "0") == 0
    assert not [p for p in (root / "evaluation" / "I4").rglob("*") if p.is_file()]
    assert _generate(tmp_path / "empty", "--i4-only") == 2  # no world to draw the split for


def test_the_baseline_predictions(worlds, tmp_path):
    i4_dir = worlds[0] / "evaluation" / "I4"
    written = write_baseline_predictions(i4_dir, tmp_path / "results")
    assert sorted(written) == sorted(DATASETS)
    for dataset, path in written.items():
        assert path == tmp_path / "results" / dataset / "pred.json"
        preds = read_json(path)
        records = read_json(i4_dir / dataset / "core" / "core.json")["data"]
        assert [p["sample_id"] for p in preds] == [r["sample_id"] for r in records]
        assert all(set(p) == {"sample_id", "pred_response", "gt_response"} for p in preds)
        assert [p["gt_response"] for p in preds] == [r["response"] for r in records]
        if DATASETS[dataset] == "multi-choice":
            assert [p["pred_response"] for p in preds] == [r["task_instance"]["choice_list"][0] for r in records]
        else:
            counts = Counter(r["response"] for r in records)
            assert {p["pred_response"] for p in preds} == {max(counts, key=counts.get)}
