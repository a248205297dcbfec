"""The world teaches and measures chats labelled as the demo labels them: IMAGE#1, IMAGE#2, … in upload order.

Training dialogues of the describe, count and attribute kinds are named either by image id (the upstream
convention, which SparklesEval keeps) or by order of appearance; the held-out demo chats are named by order and
drawn from scenes no other image of the world has. The score replays them through a chat session as the demo
does and rates the answers with the reference judge.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from sparkles.conversation.template import IMAGE_MARKER as SLOT
from sparkles.processors.image import open_image
from sparkles.tinyworld import judge_reference, load_scenes, main
from sparkles.tinyworld.build import PRESETS, WorldConfig, build_world
from sparkles.tinyworld.demo_chat import as_typed, evaluate, replay

SLOT_NAME = re.compile(r"IMAGE#([0-9A-Za-z_-]+)<Img><ImageHere></Img>")
NAME = re.compile(r"IMAGE#([0-9A-Za-z_-]+)")


def _slot_names(dialogue) -> list[str]:
    return [n for m in dialogue[0::2] for n in SLOT_NAME.findall(m["content"])]


def _by_order(dialogue) -> bool:
    names = _slot_names(dialogue)
    return names == [str(k) for k in range(1, len(names) + 1)]


def _ci(**overrides) -> WorldConfig:
    return replace(WorldConfig(seed=3, **PRESETS["ci"]), **overrides)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo_world")
    assert main(["--out", str(out), "--seed", "5", "--preset", "ci", "--no-tokenizer", "--quiet",
                 "--workers", "1"]) == 0
    return out


def _demo_chats(root: Path) -> list:
    return json.loads((root / "evaluation/DemoChat/annotations/demo_chats.json").read_text())


def test_a_share_of_training_dialogues_is_labelled_in_order_and_only_the_names_differ():
    half, none = build_world(_ci()), build_world(_ci(order_label_share=0.0))
    for subset in ("CC", "VG"):
        dialogues = half.dialogues[subset]
        plain = [d for d in dialogues if not re.search(r"turn 1 task '(bison|nlvr2)'", d["raw"][0]["prompt"])]
        share = sum(_by_order(d["dialogue"]) for d in plain) / len(plain)
        assert 0.3 <= share <= 0.7, (subset, share)
        # the BISON/NLVR2 dialogues keep the names their evaluation prompts use, IMAGE#1/IMAGE#2 and an id
        assert not any(_by_order(d["dialogue"]) for d in dialogues if d not in plain)
        assert not any(_by_order(d["dialogue"]) and _slot_names(d["dialogue"])[0] != "1" for d in dialogues)
        # The same scenes and questions: renaming the by-order dialogues' images gives the id-named world back.
        for a, b in zip(dialogues, none.dialogues[subset]):
            images = [img for m in b["dialogue"][0::2] for img in m["images"]]
            assert [img for m in a["dialogue"][0::2] for img in m["images"]] == images
            names_a, names_b = _slot_names(a["dialogue"]), _slot_names(b["dialogue"])
            rename = dict(zip(names_a, names_b))
            for ma, mb in zip(a["dialogue"], b["dialogue"]):
                assert NAME.sub(lambda m: "IMAGE#" + rename.get(m[1], m[1]), ma["content"]) == mb["content"]
    assert {k: e.scene for k, e in half.scenes.items()} == {k: e.scene for k, e in none.scenes.items()}
    assert half.bison == none.bison and half.nlvr2 == none.nlvr2 and half.sparkleseval == none.sparkleseval
    assert all(not _by_order(d["dialogue"]) for s in ("CC", "VG") for d in none.dialogues[s])


def test_demo_chats_are_held_out_and_labelled_in_upload_order(root):
    chats = _demo_chats(root)
    assert len(chats) == PRESETS["ci"]["num_demo_chats"]
    scenes = load_scenes(root)
    others = {json.dumps(r["objects"], sort_keys=True) for r in scenes.values() if r["dataset"] != "DemoChat"}
    counts = set()
    for chat in chats:
        dialogue = chat["dialogue"]
        assert _by_order(dialogue), dialogue
        counts.add(len(dialogue[0]["images"]))
        assert len(dialogue[2]["images"]) == 1
        for image in [img for m in dialogue[0::2] for img in m["images"]]:
            record = scenes[str(image["image_id"])]
            assert record["dataset"] == "DemoChat"
            assert (root / record["file"]).is_file()
            assert json.dumps(record["objects"], sort_keys=True) not in others
        # the answers name the images as the questions do, never by id
        assert set(NAME.findall(dialogue[1]["content"] + dialogue[3]["content"])) <= set(_slot_names(dialogue))
    assert counts == {1, 2, 3}


def test_the_reference_judge_reads_labels_in_order(root):
    scenes = load_scenes(root)
    chats = _demo_chats(root)
    own = [judge_reference(c["dialogue"], scenes) for c in chats]
    assert min(e["A1_C123_scores"][0] for e in own) >= 9.0 and min(e["A2_C123_scores"][0] for e in own) >= 9.0
    # The same answers with the images called by id, as a model trained only on upstream names writes them, lose.
    relabelled = []
    for chat in chats:
        d = copy.deepcopy(chat["dialogue"])
        ids = [str(img["image_id"]) for m in d[0::2] for img in m["images"]]
        for m in d[1::2]:
            m["content"] = NAME.sub(lambda x: "IMAGE#" + ids[int(x[1]) - 1], m["content"])
        relabelled.append(judge_reference(d, scenes))
    def mean(entries):
        return sum(e["A1_C123_scores"][0] + e["A2_C123_scores"][0] for e in entries) / 2 / len(entries)

    assert mean(relabelled) < mean(own) - 1.0


def test_questions_are_typed_with_the_demo_glyph():
    assert as_typed(f"Is IMAGE#1{SLOT} bigger than IMAGE#2{SLOT}?") == "Is IMAGE#1✨ bigger than IMAGE#2✨?"


def test_score_replays_each_chat_through_a_session_and_judges_it(root, tmp_path):
    from sparkles.serve.loading import make_chat
    from sparkles.testing.tiny import build_tiny_model

    chat = make_chat(build_tiny_model(tmp_path / "model", seed=0, init_std=0.3))
    result = evaluate(chat, root, model_name="tiny_random", max_new_tokens=6, progress=False)
    written = json.loads((root / "evaluation/DemoChat/results/demo_chat_tiny_random.json").read_text())
    assert written["score"] == result["score"] and written["chats"] == len(_demo_chats(root))
    for item, chat_record in zip(written["items"], _demo_chats(root)):
        assert [m["content"] for m in item["dialogue"][0::2]] == [m["content"] for m in chat_record["dialogue"][0::2]]
        assert item["reference_answers"] == [m["content"] for m in chat_record["dialogue"][1::2]]
        assert set(item["reference"]) >= {"A1_C123_scores", "A2_C123_scores"}
    rated = [(s["A1_C123_scores"][1:], s["A2_C123_scores"][1:]) for s in (i["reference"] for i in written["items"])]
    a1 = sum(sum(r[0]) / 3 for r in rated) / len(rated)
    a2 = sum(sum(r[1]) / 3 for r in rated) / len(rated)
    assert result["score"] == pytest.approx((a1 + a2) / 2)
    # the session is the demo's: the same chat asked again by hand gives the same greedy answers
    again = replay(chat, root, _demo_chats(root)[0], max_new_tokens=6)
    session = chat.session()
    first = _demo_chats(root)[0]["dialogue"]
    for img in first[0]["images"]:
        session.add_image(open_image(root / f"evaluation/DemoChat/images/{img['image_id']}.jpg"))
    session.ask(as_typed(first[0]["content"]))
    assert session.answer(max_new_tokens=6) == again[1]["content"] == written["items"][0]["dialogue"][1]["content"]
