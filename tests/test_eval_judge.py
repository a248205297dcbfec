"""The SparklesEval judge prompt, the parsing of judge replies, the headline formula, and result storage."""

import json
import re
from pathlib import Path

import pytest

from sparkles.eval.cli import model_name_from_ckpt, shard_range
from sparkles.eval.benchmarks.sparkleseval import (DialogueFormatError, JudgeParseError, build_judge_prompt,
                                                   check_dialogue, parse_judge_reply)
from sparkles.eval.benchmarks.sparkleseval import score as sparkleseval_summary
from sparkles.eval.protocol import item_seed, make_protocol
from sparkles.common.io import atomic_write_json
from sparkles.eval.store import ManifestError, RunDir, ShardFile

DIALOGUE = [
    {"role": "user", "content": "How does IMAGE#12<Img><ImageHere></Img> differ from IMAGE#7<Img><ImageHere></Img>?",
     "images": [{"image_id": 12, "caption": "A red \"bus\" on a street."}, {"image_id": 7, "caption": "A blue car."}]},
    {"role": "assistant", "content": "IMAGE#12 shows a bus; IMAGE#7 a car."},
    {"role": "user", "content": "Could the driver of IMAGE#3<Img><ImageHere></Img> use IMAGE#12?",
     "images": [{"image_id": 3, "caption": "A woman holding keys."}]},
    {"role": "assistant", "content": "Yes, she could drive the bus in IMAGE#12."},
]


def reply(a1, a2, overall=(8, 7)):
    def block(name, c, o):
        lines = [f"* Evaluating {name}"]
        lines += [f'- (C{i + 1}) Explanation: "reason {i + 1}" Rating: [[{v}]]' for i, v in enumerate(c)]
        lines.append(f"Therefore, the overall rating of {name} is [[{o}]]")
        return "\n".join(lines)
    return block("A1", a1, overall[0]) + "\n" + block("A2", a2, overall[1])


# ------------------------------------------------------------------------------------------------ prompt
def test_judge_prompt_structure():
    prompt = build_judge_prompt(DIALOGUE)
    images = json.loads(re.search(r"```json\n(.*?)\n```", prompt, re.DOTALL).group(1))  # real JSON, not a repr
    assert images == [{"image_id": 12, "caption": "A red \"bus\" on a street."},
                      {"image_id": 7, "caption": "A blue car."}, {"image_id": 3, "caption": "A woman holding keys."}]
    assert "<Img>" not in prompt and "<ImageHere>" not in prompt
    sections = [prompt.index(h) for h in ("###User Q1: How does IMAGE#12 differ from IMAGE#7?",
                                          "###Assistant A1: IMAGE#12 shows a bus; IMAGE#7 a car.",
                                          "###User Q2: Could the driver of IMAGE#3 use IMAGE#12?",
                                          "###Assistant A2: Yes, she could drive the bus in IMAGE#12.")]
    assert sections == sorted(sections)
    for marker in ("(C1)", "(C2)", "(C3)", "* Evaluating A1", "* Evaluating A2", "overall rating of A2 is [["):
        assert marker in prompt
    # the layout in the prompt, filled in, parses
    filled = prompt[prompt.index("* Evaluating A1"):].replace("<rating>", "6")
    assert parse_judge_reply(filled) == {"A1_C123_scores": [6.0] * 4, "A2_C123_scores": [6.0] * 4}


def test_check_dialogue_names_the_problem():
    bad = [dict(m) for m in DIALOGUE]
    bad[2] = {**bad[2], "images": []}
    with pytest.raises(DialogueFormatError, match=r"dialogue\[2\].content has 1 image slot"):
        check_dialogue({"dialogue": bad}, "rec 5")
    with pytest.raises(DialogueFormatError, match="4 messages"):
        check_dialogue({"dialogue": DIALOGUE[:2]})


# ------------------------------------------------------------------------------------------------ parsing
def test_parse_well_formed_reply():
    scores = parse_judge_reply(reply((9, 8, 7), (6, 5, 4)))
    assert scores == {"A1_C123_scores": [8.0, 9.0, 8.0, 7.0], "A2_C123_scores": [7.0, 6.0, 5.0, 4.0]}


def test_parse_tolerates_markdown_single_brackets_and_decimals():
    text = ("Here is my evaluation.\n**Evaluating A1**\n- **(C1)** Explanation: \"ok\" **Rating:** [8.5]\n"
            "- (C2) Explanation: \"(C2) is fine\" Rating: 7\n- (C3) Explanation: \"x\" Rating: [[ 9 ]]\n"
            "Therefore, the overall rating of A1 is [8]\n\n* evaluating a2\n- (C1) Explanation: \"y\" Rating: [[2]]\n"
            "- (C2) Explanation: \"y\" Rating: [[3]]\n- (C3) Explanation: \"y\" Rating: [[4]]\n"
            "Therefore, the overall rating of A2 is 3")
    scores = parse_judge_reply(text)
    assert scores["A1_C123_scores"] == [8.0, 8.5, 7.0, 9.0]
    assert scores["A2_C123_scores"] == [3.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("text,problem", [
    ("", "empty"),
    ("I think both answers are great. 10/10.", "Evaluating A1"),
    (reply((9, 8, 7), (6, 5, 4)).split("* Evaluating A2")[0], "Evaluating A2"),
    (reply((9, 8, 7), (6, 5, 4)).replace("overall rating of A2 is [[7]]", "overall it is good"), "overall"),
    # C2 without a rating must not take C3's rating
    (reply((9, 8, 7), (6, 5, 4)).replace('"reason 2" Rating: [[8]]', '"reason 2"', 1), "C2"),
    (reply((9, 11, 7), (6, 5, 4)), "outside"),
    (reply((9, 8, 7), (6, 5, 4), overall=(0, 7)), "outside"),
])
def test_parse_malformed_replies(text, problem):
    with pytest.raises(JudgeParseError, match=problem):
        parse_judge_reply(text)


# ------------------------------------------------------------------------------------------------ headline
def test_headline_formula_hand_computed():
    items = [
        # per dialogue: A1 criteria mean 8, A2 criteria mean 6 → 7 (overall ratings 1 and 2 are ignored)
        {"evaluation_id": 1, "gpt-4": {"A1_C123_scores": [1, 9, 8, 7], "A2_C123_scores": [2, 6, 5, 7]}},
        # A1 mean 3, A2 mean 9 → 6
        {"evaluation_id": 2, "gpt-4": {"A1_C123_scores": [10, 2, 3, 4], "A2_C123_scores": [10, 9, 10, 8]}},
        {"evaluation_id": 3, "gpt-4": {"prompt": "p", "response": "garbage", "error": "no parseable reply"}},
        {"evaluation_id": 4},
    ]
    s = sparkleseval_summary(items, "gpt-4")
    assert s["rated"] == 2 and s["failed"] == 1 and s["unjudged"] == 1
    assert s["failed_ids"] == [3] and s["unjudged_ids"] == [4]
    assert s["A1_vector"] == pytest.approx([5.5, 5.5, 5.5, 5.5])
    assert s["A2_vector"] == pytest.approx([6.0, 7.5, 7.5, 7.5])
    assert s["A1"] == pytest.approx(5.5) and s["A2"] == pytest.approx(7.5)
    assert s["overall"] == pytest.approx((7 + 6) / 2)
    assert sparkleseval_summary(items, "gpt-3.5-turbo")["overall"] is None


# ------------------------------------------------------------------------------------------------ helpers
def test_model_name_and_shards():
    assert model_name_from_ckpt(Path("/x/models/pretrained/sparkleschat_7b.pth")) == "models_pretrained_sparkleschat_7b"
    assert model_name_from_ckpt(Path("/x/models/pretrained/sparkleschat_7b.pth"), 2).endswith("_beam2")
    parts = [shard_range(0, 150, i, 4) for i in range(4)]
    assert parts[0][0] == 0 and parts[-1][1] == 150
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert shard_range(10, 12, 2, 3) == (11, 12) and shard_range(10, 12, 0, 3) == (10, 10)


def test_protocols():
    d = make_protocol("default", temperature=0.5)
    assert not d.do_sample and d.temperature is None and d.max_retries == 0 and d.judge_temperature == 0.0
    u = make_protocol("upstream")
    assert (u.do_sample, u.temperature, u.top_p, u.max_new_tokens, u.max_length, u.max_retries) == \
        (True, 1.0, 0.9, 1000, 2000, 10)
    assert u.judge_temperature == 1.0
    assert item_seed(2023, 17, 0) == item_seed(2023, "17", 0) != item_seed(2023, 17, 1)
    with pytest.raises(ValueError):
        make_protocol("default", max_new_tokens=3000)


def test_shard_file_and_manifest(tmp_path):
    run = RunDir(tmp_path / "results", "BISON", "m")
    settings = {"mode": "model", "seed": 1}
    run.register_shard(start=0, stop=2, settings=settings, annotation_file="a.json", num_annotations=4)
    run.register_shard(start=2, stop=4, settings=settings, annotation_file="a.json", num_annotations=4)
    with pytest.raises(ManifestError, match="seed"):
        run.register_shard(start=0, stop=4, settings={"mode": "model", "seed": 2}, annotation_file="a.json",
                           num_annotations=4)
    run.update_shard(0, 2, status="done", done=2)
    manifest = run.read_manifest()
    assert [(s["from"], s["to"], s["status"]) for s in manifest["shards"]] == [(0, 2, "done"), (2, 4, "running")]
    shard = ShardFile(run.shard_path(0, 2))
    shard.put({"evaluation_id": "10", "x": 1})
    shard.put({"evaluation_id": 9, "x": 2})
    again = ShardFile(run.shard_path(0, 2))
    assert 10 in again and "9" in again
    assert [it["evaluation_id"] for it in json.loads(run.shard_path(0, 2).read_text())] == [9, "10"]
    run.record_judges({"gpt-4": {"temperature": 0}})
    with pytest.raises(ManifestError, match="gpt-4"):
        run.record_judges({"gpt-4": {"temperature": 1}})
    atomic_write_json(tmp_path / "x.json", [1])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
