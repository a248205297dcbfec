"""The text-only decision probe: its items, their two reasoning forms, and one short run end to end."""

from __future__ import annotations

import json
import re

import pytest

from sparkles.tools.decision_probe import ItemMaker, main
from test_train_helpers import make_tokenizer


def test_items_vary_and_both_forms_agree_on_the_verdict():
    checks = ItemMaker(("bison", "nlvr2"), "checks", seed=3)
    described = ItemMaker(("bison", "nlvr2"), "descriptions", seed=3)
    pairs = [(checks(), described()) for _ in range(40)]
    assert len({a["prompt"] for a, _ in pairs}) > 30  # a stream of different items, not one item repeated
    assert {a["kind"] for a, _ in pairs} == {"bison", "nlvr2"}
    for a, b in pairs:
        assert a["prompt"] == b["prompt"] and a["label"] == b["label"] and a["label"] in a["options"]
        assert a["answer"].endswith(f" {a['label']}.") and b["answer"].endswith(f" {a['label']}.")
        if a["kind"] == "bison":
            assert "In IMAGE#1: " in a["answer"] and "IMAGE#1 shows " in b["answer"]
    labels = [a["label"] for a, _ in pairs if a["kind"] == "nlvr2"]
    assert "TRUE" in labels and "FALSE" in labels


def test_probe_runs_and_reports_a_curve(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    out = tmp_path / "curve.json"
    assert main(["--tokenizer", str(tok), "--steps", "2", "--eval-every", "1", "--batch-size", "4",
                 "--held-out", "12", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["step"] for row in result["curve"]] == [1, 2]
    for row in result["curve"]:
        assert set(row["accuracy"]) <= {"bison", "nlvr2"} and row["accuracy"]
        assert all(0.0 <= v <= 1.0 for v in row["accuracy"].values())


def test_caption_items_are_scored_at_the_positioned_check():
    maker = ItemMaker(("caption",), "checks", seed=5)
    items = [maker() for _ in range(40)]
    assert {it["label"] for it in items} == {"yes", "no"}
    for it in items:
        assert it["options"] == ("yes", "no")
        # the positioned item comes last in the caption and in the checks; its yes/no decides TRUE or FALSE
        last = re.search(r"([^:;]+): [^:;,]+, (yes|no)\. So the caption is (TRUE|FALSE)\.$", it["answer"])
        assert last[2] == it["label"] and last[3] == ("TRUE" if it["label"] == "yes" else "FALSE")
        assert re.search(r" (at the|on the|in the centre)", last[1])


def test_caption_probe_needs_the_checks_format(tmp_path):
    with pytest.raises(SystemExit):
        main(["--tokenizer", str(tmp_path), "--kind", "caption", "--format", "descriptions"])
