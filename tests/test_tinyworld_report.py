"""The BISON/NLVR2 error report on a small world, with answers whose correctness is known."""

from __future__ import annotations

import json
import re

from sparkles.tinyworld import load_scenes, main as world_main
from sparkles.tinyworld.scenes import as_scene
from sparkles.tinyworld.tasks import Task, answer
from sparkles.tinyworld.report import main


def _bison_results(root, flip_checks: bool) -> list[dict]:
    scenes = load_scenes(root)
    annotations = json.loads((root / "evaluation/BISON/annotations/sparkles_evaluation_bison_annotations.json")
                             .read_text())
    out = []
    for a in annotations:
        ids = [str(c["image_id"]) for c in a["image_candidates"]]
        pair = {"a": as_scene(scenes[ids[0]]), "b": as_scene(scenes[ids[1]])}
        text = answer(Task("bison", ("a", "b"), text=a["caption"]), pair, {"a": "IMAGE#1", "b": "IMAGE#2"})
        if flip_checks:
            text = re.sub(r", (yes|no)\b", lambda m: ", no" if m[1] == "yes" else ", yes", text)
        label = f"IMAGE#{ids.index(str(a['true_image_id'])) + 1}"
        out.append({"evaluation_id": a["evaluation_id"], "label": label, "predict": label.lower(),
                    "response": text, "sentence": a["caption"]})
    return out


def _nlvr2_results(root, flip_steps: bool) -> list[dict]:
    """The world's reference answers to the NLVR2 items (verdict right); ``flip_steps`` turns every step's
    yes/no over and keeps the verdict."""
    scenes = load_scenes(root)
    annotations = json.loads((root / "evaluation/NLVR2/annotations/sparkles_evaluation_nlvr2_annotations.json")
                             .read_text())
    out = []
    for a in annotations:
        keys = [f"{a['identifier'][:-2]}-img{side}" for side in (0, 1)]
        pair = {"l": as_scene(scenes[keys[0]]), "r": as_scene(scenes[keys[1]])}
        text = answer(Task("nlvr2", ("l", "r"), text=a["sentence"]), pair, {"l": "IMAGE#1", "r": "IMAGE#2"})
        if flip_steps:
            text = re.sub(r": (yes|no)\.", lambda m: ": no." if m[1] == "yes" else ": yes.", text)
        out.append({"evaluation_id": a["evaluation_id"], "label": a["label"], "predict": a["label"].lower(),
                    "sentence": a["sentence"], "response": text,
                    "img_paths": [f"evaluation/NLVR2/images/{k}.png" for k in keys]})
    return out


def test_report_counts_accuracy_and_check_agreement(tmp_path):
    root = tmp_path / "world"
    assert world_main(["--out", str(root), "--seed", "3", "--preset", "ci", "--no-tokenizer", "--quiet",
                       "--workers", "1"]) == 0
    results = root / "evaluation/BISON/results"
    results.mkdir(parents=True)
    right, flipped = results / "BISON_right_acc1.000.json", results / "BISON_flipped_acc1.000.json"
    right.write_text(json.dumps(_bison_results(root, flip_checks=False)))
    flipped.write_text(json.dumps(_bison_results(root, flip_checks=True)))
    nlvr2_annotations = json.loads((root / "evaluation/NLVR2/annotations/sparkles_evaluation_nlvr2_annotations.json")
                                   .read_text())
    nlvr2 = root / "evaluation/NLVR2/results/NLVR2_false_acc0.500.json"
    nlvr2.parent.mkdir(parents=True)
    nlvr2.write_text(json.dumps([{"evaluation_id": x["evaluation_id"], "label": x["label"], "predict": "false",
                                  "sentence": x["sentence"], "response": ""} for x in nlvr2_annotations]))

    out = tmp_path / "right.json"
    assert main(["--root", str(root), "--bison", str(right), "--nlvr2", str(nlvr2), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["BISON"]["accuracy"] == 1.0 and report["BISON"]["unreadable_checks"] == 0
    assert {"false items", "true items"} <= set(report["BISON"]["checks"])
    assert all(row["agreement"] == 1.0 for row in report["BISON"]["checks"].values())
    facts = report["BISON"]["facts"]  # the reference answers state every fact right and conclude from it
    assert {"facts right", "verdict follows the fact"} <= set(facts)
    assert all(row["agreement"] == 1.0 for row in facts.values())
    assert facts["facts right"]["checks"] == sum(row["checks"] for row in report["BISON"]["checks"].values())
    assert facts["positioned verdict follows the fact"]["checks"] == facts["positioned facts right"]["checks"] > 0
    # every reference answer has exactly one section without a "no" (the decoy's caption is refuted)
    assert facts["choice follows the checks"]["checks"] == report["BISON"]["items"]
    # "FALSE" everywhere is right exactly on the false statements, template by template.
    for template, row in report["NLVR2"]["by_template"].items():
        falses = sum(x["label"] == "False" for x in nlvr2_annotations if _template(x["sentence"]) == template)
        assert row["accuracy"] == round(falses / row["items"], 3), template

    assert "steps" not in report["NLVR2"]  # answers without steps: nothing to read

    nlvr2_right, nlvr2_flipped = (nlvr2.parent / f"NLVR2_{name}_acc1.000.json" for name in ("right", "flipped"))
    right_answers = _nlvr2_results(root, flip_steps=False)
    nlvr2_right.write_text(json.dumps(right_answers))
    nlvr2_flipped.write_text(json.dumps(_nlvr2_results(root, flip_steps=True)))
    assert main(["--root", str(root), "--nlvr2", str(nlvr2_right), "--out", str(out)]) == 0
    steps = json.loads(out.read_text())["NLVR2"]["steps"]
    assert set(steps) == {"counts right", "steps follow their counts", "verdict follows the steps"}
    assert all(row["agreement"] == 1.0 for row in steps.values()), steps
    assert steps["verdict follows the steps"]["checks"] == len(nlvr2_annotations)
    assert steps["counts right"]["checks"] >= len(nlvr2_annotations)  # one count per side statement, two else
    assert main(["--root", str(root), "--nlvr2", str(nlvr2_flipped), "--out", str(out)]) == 0
    steps = json.loads(out.read_text())["NLVR2"]["steps"]
    # every yes/no turned over: the counts are still read right, but no step follows them, and a verdict follows
    # its steps only where turning them over keeps a "no" (a "both" item with one yes and one no)
    mixed = sum(sorted(re.findall(r": (yes|no)\.", r["response"])) == ["no", "yes"] for r in right_answers)
    assert steps["counts right"]["agreement"] == 1.0
    assert steps["steps follow their counts"]["agreement"] == 0.0
    assert steps["verdict follows the steps"]["agreement"] == round(mixed / len(right_answers), 3) < 0.5

    # the same answers with the images' names swapped: every count that is wrong is the other image's
    swapped = nlvr2.parent / "NLVR2_swapped_acc1.000.json"
    swapped.write_text(json.dumps([dict(r, response=r["response"].replace("IMAGE#1", "IMAGE#x")
                                        .replace("IMAGE#2", "IMAGE#1").replace("IMAGE#x", "IMAGE#2"))
                                   for r in right_answers]))
    assert main(["--root", str(root), "--nlvr2", str(swapped), "--out", str(out)]) == 0
    steps = json.loads(out.read_text())["NLVR2"]["steps"]
    assert steps["counts right"]["agreement"] < 1.0
    assert steps["wrong counts that are the other image's"]["agreement"] == 1.0
    assert steps["wrong counts that are the other image's"]["checks"] == round(
        steps["counts right"]["checks"] * (1 - steps["counts right"]["agreement"]))

    # right checks, the other image chosen: the choice never follows the checks
    other_choice = results / "BISON_other_acc0.000.json"
    other_choice.write_text(json.dumps([dict(r, predict="image#2" if r["predict"] == "image#1" else "image#1")
                                        for r in _bison_results(root, flip_checks=False)]))
    assert main(["--root", str(root), "--bison", str(other_choice), "--out", str(out)]) == 0
    facts = json.loads(out.read_text())["BISON"]["facts"]
    assert facts["choice follows the checks"]["agreement"] == 0.0 and facts["facts right"]["agreement"] == 1.0

    out = tmp_path / "flipped.json"
    assert main(["--root", str(root), "--bison", str(flipped), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert all(row["agreement"] == 0.0 for row in report["BISON"]["checks"].values())
    # flipped verdicts after right facts: the read-out is right, the comparison never
    assert report["BISON"]["facts"]["facts right"]["agreement"] == 1.0
    assert report["BISON"]["facts"]["verdict follows the fact"]["agreement"] == 0.0
    assert report["BISON"]["facts"]["positioned verdict follows the fact"]["agreement"] == 0.0


def _template(sentence: str) -> str:
    from sparkles.tinyworld.tasks import parse_statement

    return parse_statement(sentence).template


def test_report_says_what_is_missing(tmp_path, capsys):
    assert main(["--root", str(tmp_path)]) == 2
    assert "no BISON or NLVR2 result file" in capsys.readouterr().err
