"""Question-conditioned towers: the Q-Former with text input reads the message (and ignores its padding), the
probe's targets are true to the scenes by an independent reading, and a short probe run reports its figures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from sparkles.data.synthetic import main as synthetic_main
from sparkles.data.synthetic.scenes import Scene
from sparkles.data.synthetic.writers import load_scenes
from sparkles.data.synthetic.tasks import parse_question
from sparkles.models.qformer import QFormerTextEmbeddings, build_qformer, run_qformer
from sparkles.tools.conditioned_towers_probe import IGNORE, main, training_samples

POSITIONS = {"at the top left": (0, 0), "at the top": (0, 1), "at the top right": (0, 2), "on the left": (1, 0),
             "in the centre": (1, 1), "on the right": (1, 2), "at the bottom left": (2, 0), "at the bottom": (2, 1),
             "at the bottom right": (2, 2)}
WORDS = {"no": 0, "a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    assert synthetic_main(["--out", str(root), "--seed", "3", "--preset", "ci", "--quiet"]) == 0
    return root


def test_text_input_qformer_reads_the_text_and_ignores_padding():
    torch.manual_seed(0)
    qformer = build_qformer(hidden=32, layers=2, heads=4, intermediate=64, encoder_width=24, cross_attention_freq=1,
                            init_std=0.2, dropout=0.0, text_input=True).eval()
    embed = QFormerTextEmbeddings(50, 32, 16, init_std=1.0)
    queries, vision = torch.randn(1, 5, 32), torch.randn(2, 7, 24)
    ids = torch.tensor([[3, 9, 4, 0, 0], [3, 9, 4, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # row 1 reads the two "padding" tokens too
    with torch.no_grad():
        padded = run_qformer(qformer, queries, vision, embed(ids), mask)
        bare = run_qformer(qformer, queries, vision, embed(ids[:, :3]))
        other = run_qformer(qformer, queries, vision, embed(torch.tensor([[3, 9, 7], [3, 9, 7]])))
    assert padded.shape == (2, 5, 32)
    torch.testing.assert_close(padded[0], bare[0])           # masked padding changes nothing
    assert not torch.allclose(padded[1], bare[1], atol=1e-4)  # unmasked, the same ids are read
    assert (other - bare).abs().amax() > 1e-3                 # another word, other query outputs


def _count(scene: Scene, phrase: str) -> int:
    """Objects of a kind phrase ("red circles", "a blue square", "squares", "red objects"), read independently."""
    words = [w for w in phrase.split() if w not in ("a", "an")]
    shape = None if words[-1].startswith("object") else words[-1].rstrip("s")
    colour = words[0] if len(words) == 2 else None
    return sum(1 for o in scene.objects if colour in (None, o.colour) and shape in (None, o.shape))


def _item_kind(item: str) -> str:
    """The kind phrase of a caption item, its count word and position dropped ("two red circles on the left")."""
    for phrase in sorted(POSITIONS, key=len, reverse=True):
        item = item.removesuffix(" " + phrase)
    return " ".join(item.split()[1:])


def _place(scene: Scene, phrase: str) -> int:
    """Row-major cell of the one object of the kind, 9 if there is not exactly one."""
    words = phrase.split()
    shape = None if words[-1].startswith("object") else words[-1].rstrip("s")
    colour = words[0] if len(words) == 2 else None
    objs = [o for o in scene.objects if colour in (None, o.colour) and shape in (None, o.shape)]
    return objs[0].row * 3 + objs[0].col if len(objs) == 1 else 9


def test_targets_are_true_to_the_scenes(world):
    scenes = load_scenes(world)
    samples = training_samples(world, scenes)
    assert {s.asked != IGNORE for s in samples} == {True, False}  # count targets and BISON fit targets
    dialogues = [d for sub in ("CC", "VG") for d in json.loads(
        (world / f"data/SparklesDialogue{sub}/annotations/SparklesDialogue{sub}.json").read_text())]
    fits: dict = {}  # (message, image) -> whether the dialogue's answer chooses that image
    for d in dialogues:
        first, answer = d["dialogue"][0], d["dialogue"][1]["content"]
        chosen = re.search(r"is IMAGE#(\d)\.$", answer)
        if first["content"].startswith("Look closely") and chosen:
            for k, im in enumerate(first["images"], start=1):
                fits.setdefault((first["content"], str(im["image_id"])), set()).add(int(k == int(chosen.group(1))))
    checked = {"count": 0, "named object": 0, "statement": 0, "bison": 0}
    for s in samples:
        scene = Scene.from_record(scenes[s.image])
        asked = re.search(r"How many (.+?) are there|Which of .+ has (?:more|the most) (.+?)\?$"
                          r"|(?:Where is|Is) the (\w+ \w+) in IMAGE#", s.message)
        statement = re.search(r"'(.+?)'\?", s.message)
        if s.fit != IGNORE:  # the image a BISON answer chooses is the one the caption fits
            assert fits[(s.message, s.image)] == {s.fit}
            caption = re.search(r"describes exactly one of them: '(.+?)'\. ", s.message).group(1)
            kinds = [_item_kind(item) for item in re.split(r", | and ", caption)]
            assert [count for count, _ in s.items] == [_count(scene, k) for k in kinds]
            assert [place for _, place in s.items] == [_place(scene, k) for k in kinds]
            checked["bison"] += 1
        elif asked:
            kind = next(g for g in asked.groups() if g)
            assert s.asked == _count(scene, kind)
            assert s.items == ((s.asked, _place(scene, kind)),)
            checked["named object" if asked.group(3) else "count"] += 1
        else:
            text = statement.group(1)
            phrase = re.search(r"exactly \w+ (.+) in total|contain a (.+)\.|has more (.+) than|contains a (.+)\."
                               r"|contains no (.+)\.", text)
            kind = next(g for g in phrase.groups() if g)
            assert s.asked == _count(scene, kind), text
            assert s.items == ((s.asked, _place(scene, kind)),)
            checked["statement"] += 1
    assert min(checked.values()) > 5, checked


@pytest.mark.parametrize("extra", [[], ["--items", "3", "--caption-variants"]])
def test_probe_runs_and_reports_its_figures(world, tmp_path, extra):
    out = tmp_path / "probe.json"
    assert main(["--root", str(world), "--steps", "3", "--eval-every", "3", "--held-out", "12", "--batch-size", "4",
                 "--max-text", "160", "--threads", "1", "--out", str(out), *extra]) == 0
    result = json.loads(out.read_text())
    assert result["held_out_bison_items"] == 12 and result["held_out_nlvr2_items"] == 12
    assert 0 < result["bison_pairs"] < result["train_pairs"]
    (row,) = result["curve"]
    assert row["step"] == 3
    keys = ["bison_fit", "bison_pair", "nlvr2_asked", "nlvr2_from_counts"]
    if extra:
        keys += ["bison_item_counts", "bison_from_items"]
    else:
        assert "bison_from_items" not in row
    for key in keys:
        assert 0.0 <= row[key] <= 1.0



def _caption_holds(caption: str, scene: Scene) -> bool:
    """Every item of a BISON caption ("two red circles, a blue square and a green triangle on the left") holds."""
    for item in re.split(r", | and ", caption):
        position = next((p for p in sorted(POSITIONS, key=len, reverse=True) if item.endswith(" " + p)), None)
        words = item[: -len(position) - 1].split() if position else item.split()
        count, colour, shape = WORDS[words[0]], words[1], words[2].rstrip("s")
        objs = [o for o in scene.objects if (o.colour, o.shape) == (colour, shape)]
        if len(objs) != count or (position and (count != 1 or (objs[0].row, objs[0].col) != POSITIONS[position])):
            return False
    return True


def test_caption_variants_fit_exactly_when_every_item_holds(world):
    from sparkles.tools.conditioned_towers_probe import CaptionVariants

    scenes = load_scenes(world)
    keys = sorted(k for k, r in scenes.items() if r["dataset"] in ("CC", "VG"))[:60]
    variants = CaptionVariants(scenes, keys, seed=4)
    fits = []
    for _ in range(200):
        sample = variants()
        caption = parse_question(sample.message).text  # the world's own BISON template parser
        assert sample.fit == int(_caption_holds(caption, Scene.from_record(scenes[sample.image]))), caption
        fits.append(sample.fit)
    assert 0.3 < sum(fits) / len(fits) < 0.7
    assert any(" at the " in s or " on the " in s or " in the centre" in s
               for s in (variants().message for _ in range(100)))  # positioned captions occur
