"""I4 (DEMON core): normalisation, the three scoring rules under both protocols, the category table, building a
sample from core.json, and calculate_I4 + i4_score end to end on a tiny benchmark tree.

Every expected number below was worked out by hand. ROUGE-L here is the ``rouge`` package's: one LCS over the
words (the normalised text has no sentence periods left) and distinct words counted, F = 2PR / (P + R + 1e-8).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import calculate_I4
import i4_score
from sparkles.conversation.template import IMAGE_MARKER
from sparkles.eval.benchmarks import i4

REPO = Path(__file__).resolve().parents[1]
EPS = 1e-8  # the package's guard in F's denominator


def test_the_tables_hold_29_datasets_in_7_categories_and_two_image_choice_lists():
    assert len(i4.CATEGORIES) == 7
    assert len(i4.DATASETS) == len(set(i4.DATASETS)) == 29
    assert i4.CATEGORIES["multi_modal_dialogue"] == ("MMCoQA", "ALFRED")
    assert i4.IMAGE_CHOICE_UPSTREAM[0] == "recipeqa-RecipeQA_VisualCloze"
    assert set(i4.IMAGE_CHOICE) == {"RecipeQA_VisualCloze", "RecipeQA_ImageCoherence", "COMICS_Panel"}
    assert set(i4.IMAGE_CHOICE) <= set(i4.DATASETS)
    assert i4.METRIC_KEYS == ("Rouge-L f", "Accuracy")


@pytest.mark.parametrize("text, expected", [
    ("Hello, World!", "hello world"),  # ", " touches a space: dropped; "!" touches none: a space, then stripped
    ("It costs 1,000 dollars, ok?", "it costs 1000 dollars ok"),  # a digit,digit comma: every mark dropped
    ("The answer is (B).", "the answer is b"),
    ("3.5 apples. end.", "3.5 apples end"),  # a period before a digit stays
    ("Answer: 5. next", "answer: 5 next"),  # ":" is not in the list; "5." loses its period (not before a digit)
    ("a-b c - d", "ab c  d"),  # " -" occurs, so every "-" is dropped, gluing "a-b" together
    ('"Image B"', "image b"),
    ("  don't\tstop\n", "don't stop"),
    ("x/y; z", "x y z"),  # "/" touches no space: a space; "; " does: dropped
    ("", ""),
])
def test_normalisation(text, expected):
    assert i4.normalize(text) == expected


@pytest.mark.parametrize("pred, gt, expected", [
    # ref words {the, cat, is, on, mat} (5), hyp {a, cat, sits, on, the, mat} (6), LCS "cat on the mat" (4):
    # R = 4/5, P = 4/6, F = 8/11
    ("A cat sits on the mat.", "The cat is on the mat.", 2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6 + EPS)),
    # ref {a, dog, runs, fast} (4), hyp {the, dog, runs} (3), LCS "dog runs": R = 1/2, P = 2/3, F = 4/7
    ("the dog runs", "a dog runs fast", 2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3 + EPS)),
    # distinct words: "go go go" counts one word, so P = R = 1
    ("go go go", "go", 2 * 1 * 1 / (2 + EPS)),
    ("", "go", 0.0),  # an empty prediction scores 0
    ("?!", "go", 0.0),  # empty once normalised
    ("go", "", 0.0),  # so does an empty reference
])
def test_rouge_l_values(pred, gt, expected):
    metric, per_item = i4.score_dataset([{"sample_id": 1, "pred_response": pred, "gt_response": gt}],
                                        "open-ended", "MMCoQA")
    assert metric == {"Rouge-L f": pytest.approx(expected, abs=1e-12)}
    assert per_item == [{"id": "1", "score": str(metric["Rouge-L f"])}]
    assert 8 / 11 == pytest.approx(2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6), abs=1e-12)


def test_rouge_l_survives_answers_longer_than_the_recursion_limit():
    text = " ".join(f"w{i % 40}" for i in range(sys.getrecursionlimit() + 200))
    limit = sys.getrecursionlimit()
    assert i4.rouge_l_f(text, text) == pytest.approx(1.0, abs=1e-7)
    assert sys.getrecursionlimit() == limit


CHOICES = ["Boil the pasta", "Chop the onions", "Bake the cake"]


@pytest.mark.parametrize("pred, gt, rule, correct", [
    ("You should chop the onions first.", "Chop the onions", "sparkles", True),
    ("You should chop the onions first.", "Chop the onions", "upstream", True),
    ("Boil the pasta now", "Bake the cake", "sparkles", False),  # "boil"/"pasta" pick choice 0
    ("I would bake it", "Bake the cake", "sparkles", True),  # "bake" alone decides
    # nothing in common with any choice: the original's arg-max lands on the first choice
    ("", "Boil the pasta", "upstream", True),
    ("", "Boil the pasta", "sparkles", False),
    ("no idea", "Boil the pasta", "sparkles", False),
])
def test_multi_choice_tfidf_picks(pred, gt, rule, correct):
    metric, _ = i4.score_dataset([{"sample_id": "s", "pred_response": pred, "gt_response": gt, "choices": CHOICES}],
                                 "multi-choice", "RecipeQA_TextCloze", rule)
    assert metric == {"Accuracy": float(correct)}


def test_tfidf_choice_indices():
    norm = [i4.normalize(c) for c in CHOICES]
    assert i4.pick_choice(i4.normalize("You should chop the onions first."), norm) == 1
    assert i4.pick_choice("", norm, "upstream") == 0
    assert i4.pick_choice("", norm, "sparkles") is None


def test_multi_choice_falls_back_to_exact_match_without_a_vocabulary_or_choices():
    # TF-IDF keeps words of two or more characters: "a"/"b" leave it empty, so the texts themselves are compared
    item = {"sample_id": 0, "pred_response": "B.", "gt_response": "b", "choices": ["A", "B"]}
    assert i4.score_dataset([item], "multi-choice", "TQA")[0] == {"Accuracy": 1.0}
    item = {"sample_id": 0, "pred_response": "(a)", "gt_response": "b", "choices": ["A", "B"]}
    assert i4.score_dataset([item], "multi-choice", "TQA")[0] == {"Accuracy": 0.0}
    item = {"sample_id": 0, "pred_response": "Yes.", "gt_response": "yes"}
    assert i4.score_dataset([item], "multi-choice", "TQA")[0] == {"Accuracy": 1.0}


@pytest.mark.parametrize("pred, gt, rule, correct", [
    ("Image B", "Image B", "sparkles", True),
    ("Image B, because the dough is rolled.", "image b", "sparkles", True),  # first 7 characters decide
    ("The answer is image B", "Image B", "sparkles", False),  # "the ans" != "image b"
    ("Image B or image C", "Image B", "sparkles", False),  # names two images
    ("Image B or image C", "Image B", "upstream", False),
    ("", "Image B", "sparkles", False),
    ("", "Image B", "upstream", False),
    # "image a" inside "image and": the original counts two images, whole words count one
    ("Image B: the image and its caption match", "Image B", "upstream", False),
    ("Image B: the image and its caption match", "Image B", "sparkles", True),
])
def test_image_choice_rule(pred, gt, rule, correct):
    metric, per_item = i4.score_dataset([{"sample_id": 7, "pred_response": pred, "gt_response": gt}],
                                        "multi-choice", "COMICS_Panel", rule)
    assert metric == {"Accuracy": float(correct)}
    assert per_item == [{"id": "7", "score": str(int(correct))}]


def test_recipeqa_visualcloze_differs_between_the_protocols():
    choices = ["Image A", "Image B", "Image C", "Image D"]
    preds = [{"sample_id": 0, "pred_response": "Image B", "gt_response": "Image B", "choices": choices},
             {"sample_id": 1, "pred_response": "Image C.", "gt_response": "Image C", "choices": choices},
             {"sample_id": 2, "pred_response": "Image D", "gt_response": "Image A", "choices": choices}]
    assert i4.scoring_rule("RecipeQA_VisualCloze", "multi-choice", "sparkles") == "image-choice"
    assert i4.scoring_rule("RecipeQA_VisualCloze", "multi-choice", "upstream") == "multi-choice"
    assert i4.score_dataset(preds, "multi-choice", "RecipeQA_VisualCloze")[0] == {"Accuracy": pytest.approx(2 / 3)}
    # TF-IDF drops the one-letter "b"/"c"/"d": every choice reads "image", the first one ("Image A") wins
    up, per_item = i4.score_dataset(preds, "multi-choice", "RecipeQA_VisualCloze", "upstream")
    assert up == {"Accuracy": pytest.approx(1 / 3)}
    assert [p["score"] for p in per_item] == ["0", "0", "1"]
    # the other two image-choice datasets are scored alike under both protocols
    for name in ("COMICS_Panel", "RecipeQA_ImageCoherence"):
        assert i4.scoring_rule(name, "multi-choice", "upstream") == "image-choice"


def test_an_item_that_could_not_be_asked_scores_zero_and_counts():
    preds = [{"sample_id": "a", "pred_response": "go", "gt_response": "go"},
             {"sample_id": "b", "gt_response": "go", "error": "placeholders and images differ"}]
    metric, per_item = i4.score_dataset(preds, "open-ended", "ALFRED")
    assert metric["Rouge-L f"] == pytest.approx((2 / (2 + EPS)) / 2)
    assert per_item[1] == {"id": "b", "score": "0.0"}


def test_malformed_predictions_are_named():
    with pytest.raises(i4.I4FormatError, match="item 1.*pred_response"):
        i4.score_dataset([{"sample_id": 0, "pred_response": "x", "gt_response": "x"},
                          {"sample_id": 1, "gt_response": "x"}], "open-ended", "VIST")
    with pytest.raises(i4.I4FormatError, match="non-empty list"):
        i4.score_dataset([], "open-ended", "VIST")
    with pytest.raises(ValueError, match="unknown I4 scoring rule"):
        i4.score_dataset([{"sample_id": 0, "pred_response": "x", "gt_response": "x"}], "open-ended", "VIST", "x")


# ------------------------------------------------------------------------------------------------------ categories

def _all_results(value: float = 0.5) -> dict:
    return {d: {"Accuracy": value} for d in i4.DATASETS}


def test_category_averaging_rounds_each_dataset_to_5_decimals_first():
    results = _all_results()
    results["MMCoQA"] = {"Rouge-L f": 0.123456}  # → 0.12346
    results["ALFRED"] = {"Rouge-L f": 0.2}
    for rule in i4.RULES:
        out = i4.category_scores(results, rule)
        cat = out["categories"]["multi_modal_dialogue"]
        assert cat["score"] == pytest.approx((0.12346 + 0.2) / 2 * 100)  # 16.173
        assert (cat["present"], cat["total"], cat["missing"]) == (2, 2, [])
        assert out["categories"]["visual_storytelling"]["score"] == pytest.approx(50.0)
        assert out["mean"] == pytest.approx((16.173 + 6 * 50) / 7)
        assert out["categories_scored"] == 7


def test_a_missing_member_skips_the_category_upstream_and_is_counted_by_default():
    results = _all_results(0.4)
    del results["ALFRED"]
    results["MMCoQA"] = {"Rouge-L f": 0.3}
    results["COMICS_Dialogue"] = {"Rouge-L f": 0.2}  # a category mixing ROUGE-L F and accuracy
    up = i4.category_scores(results, "upstream")
    assert up["categories"]["multi_modal_dialogue"]["score"] is None
    assert up["categories_scored"] == 6
    cloze = (0.2 + 0.4 * 3) / 4 * 100  # 35.0
    assert up["categories"]["multi_modal_cloze"]["score"] == pytest.approx(cloze)
    assert up["categories"]["multi_modal_cloze"]["metrics"] == ["Accuracy", "Rouge-L f"]
    assert up["mean"] == pytest.approx((cloze + 5 * 40) / 6)
    default = i4.category_scores(results, "sparkles")
    dialogue = default["categories"]["multi_modal_dialogue"]
    assert dialogue["score"] == pytest.approx(30.0)
    assert (dialogue["present"], dialogue["total"], dialogue["missing"]) == (1, 2, ["ALFRED"])
    assert default["mean"] == pytest.approx((30 + cloze + 5 * 40) / 7)
    assert default["categories_scored"] == 7


def test_category_inputs_are_checked():
    with pytest.raises(i4.I4FormatError, match="NLVR2 eval.json.*exactly one"):
        i4.category_scores({"NLVR2": {"Accuracy": 0.5, "Rouge-L f": 0.5}})
    out = i4.category_scores({"NLVR2": {"Accuracy": 0.5}, "MyOwnSet": {"Accuracy": 1.0}})
    assert out["unknown_datasets"] == ["MyOwnSet"]
    assert out["mean"] == pytest.approx(50.0)


# --------------------------------------------------------------------------------------------------- core.json

def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n")  # scoring and sample building never decode images


def write_core(i4_dir: Path, dataset: str, question_type: str, instructions: list[str], records: list[dict]) -> None:
    core = i4_dir / dataset / "core"
    core.mkdir(parents=True, exist_ok=True)
    for record in records:
        for rel in record["task_instance"]["images_path"]:
            _image(core / "images" / Path(rel).name)
    (core / "core.json").write_text(json.dumps({
        "metadata": {"task_instruction": instructions, "question_type": question_type}, "data": records}))


def _record(sid, context, images, response, choices=None, tid=0):
    instance = {"context": context, "images_path": images}
    if choices is not None:
        instance["choice_list"] = choices
    return {"sample_id": sid, "task_instruction_id": tid, "task_instance": instance, "response": response}


def test_build_sample_writes_the_prompt_and_finds_the_images(tmp_path):
    records = [_record("s1", "{image#1} first, {table#1} then.", ["images/a.png", "b.png"], "Chop the onions",
                       choices=["Boil it", "Chop the onions"], tid=1)]
    write_core(tmp_path, "MultiModalQA", "multi-choice", ["Look.", "Read the table and answer."], records)
    metadata, data = i4.load_core(tmp_path, "MultiModalQA")
    sample = i4.build_sample(tmp_path, "MultiModalQA", metadata, data[0])
    assert sample.sample_id == "s1" and sample.question_type == "multi-choice"
    assert sample.prompt == ("Read the table and answer." + i4.INSTRUCTION_JOIN + IMAGE_MARKER + " first, "
                             + IMAGE_MARKER + " then." + i4.CHOICES_SUFFIX.replace(
                                 "{choices}", "['Boil it', 'Chop the onions']"))
    core = tmp_path / "MultiModalQA" / "core"
    # "b.png" is not under core/, so core/images/b.png is used
    assert sample.images == [Path(os.path.abspath(core / "images" / "a.png")),
                             Path(os.path.abspath(core / "images" / "b.png"))]
    assert all(p.is_absolute() for p in sample.images)
    assert sample.gt_response == "Chop the onions" and sample.choices == ["Boil it", "Chop the onions"]


def test_build_sample_refuses_placeholders_that_do_not_match_the_images(tmp_path):
    records = [_record("ok", "{image#1} and {image#2}", ["x.png", "y.png"], "r"),
               _record("too-few", "only {image#1}", ["x.png", "y.png"], "r"),
               _record("too-many", "{image#1} {image#2} {table#1}", ["x.png", "y.png"], "r"),
               _record("no-file", "{image#1}", ["images/gone.png"], "r")]
    write_core(tmp_path, "IEdit", "open-ended", ["Describe."], records)
    (tmp_path / "IEdit" / "core" / "images" / "gone.png").unlink()
    metadata, data = i4.load_core(tmp_path, "IEdit")
    assert len(i4.build_sample(tmp_path, "IEdit", metadata, data[0]).images) == 2
    with pytest.raises(i4.I4ItemError, match="sample too-few .*1 .*placeholder.* 2 image"):
        i4.build_sample(tmp_path, "IEdit", metadata, data[1])
    with pytest.raises(i4.I4ItemError, match="sample too-many .*3 .*placeholder.* 2 image"):
        i4.build_sample(tmp_path, "IEdit", metadata, data[2])
    with pytest.raises(i4.I4ItemError, match="sample no-file: image not found: .*gone.png"):
        i4.build_sample(tmp_path, "IEdit", metadata, data[3])


def test_load_core_names_file_record_and_field(tmp_path):
    write_core(tmp_path, "TQA", "multi-choice", ["Answer."],
               [_record(0, "{image#1}", ["a.png"], "x"), _record(1, "{image#1}", ["a.png"], "x", tid=3)])
    with pytest.raises(i4.I4FormatError, match=r"TQA/core/core.json: record 1: field 'task_instruction_id'"):
        i4.load_core(tmp_path, "TQA")
    write_core(tmp_path, "TQA", "yes-no", ["Answer."], [])
    with pytest.raises(i4.I4FormatError, match="metadata.question_type"):
        i4.load_core(tmp_path, "TQA")
    (tmp_path / "TQA" / "core" / "core.json").write_text("{")
    with pytest.raises(i4.I4FormatError, match="malformed JSON"):
        i4.load_core(tmp_path, "TQA")
    with pytest.raises(FileNotFoundError, match="core.json not found"):
        i4.load_core(tmp_path, "VIST")


# --------------------------------------------------------------------------------------------------- end to end

PASTA = ["Boil the pasta", "Chop the onions", "Bake the cake"]


@pytest.fixture
def tree(tmp_path):
    """A two-dataset benchmark (one open-ended, one multi-choice) and predictions for it."""
    i4_dir, results = tmp_path / "I4", tmp_path / "results"
    write_core(i4_dir, "MMCoQA", "open-ended", ["Answer the question about the images."], [
        _record("m1", "{image#1} What is on the mat?", ["images/a.png"], "The cat is on the mat."),
        _record("m2", "{image#1} {image#2} What changed?", ["images/b.png", "images/c.png"], "Nothing.")])
    write_core(i4_dir, "RecipeQA_TextCloze", "multi-choice", ["Fill in the missing step."], [
        _record(f"t{i}", "{image#1} Step: ___", ["images/s.png"], gt, choices=PASTA)
        for i, gt in enumerate(["Chop the onions", "Bake the cake", "Boil the pasta", "Bake the cake"], 1)])
    preds = {
        "MMCoQA": [{"sample_id": "m1", "pred_response": "A cat sits on the mat.",
                    "gt_response": "The cat is on the mat."},
                   {"sample_id": "m2", "pred_response": "", "gt_response": "Nothing.", "error": "image unreadable"}],
        "RecipeQA_TextCloze": [
            {"sample_id": "t1", "pred_response": "You should chop the onions first.", "gt_response": "Chop the onions"},
            {"sample_id": "t2", "pred_response": "Boil the pasta now", "gt_response": "Bake the cake"},
            {"sample_id": "t3", "pred_response": "", "gt_response": "Boil the pasta"}],  # t4 was not run
    }
    for name, items in preds.items():
        (results / name).mkdir(parents=True)
        (results / name / "pred.json").write_text(json.dumps(items))
    return i4_dir, results


ROUGE_M1 = 2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6 + EPS)  # 8/11, see test_rouge_l_values


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_calculate_and_score_end_to_end(tree, capsys):
    i4_dir, results = tree
    assert calculate_I4.main(["--result-dir", str(results), "--i4-dir", str(i4_dir)]) == 0
    out = capsys.readouterr().out
    assert _load(results / "MMCoQA" / "eval.json") == {"Rouge-L f": pytest.approx(ROUGE_M1 / 2)}  # 0.36364
    assert _load(results / "MMCoQA" / "eval_score.json") == [{"id": "m1", "score": str(ROUGE_M1)},
                                                              {"id": "m2", "score": "0.0"}]
    assert _load(results / "RecipeQA_TextCloze" / "eval.json") == {"Accuracy": pytest.approx(1 / 3)}
    assert _load(results / "RecipeQA_TextCloze" / "eval_score.json") == [
        {"id": "t1", "score": "1"}, {"id": "t2", "score": "0"}, {"id": "t3", "score": "0"}]
    assert "MMCoQA" in out and "Rouge-L f = 0.36364" in out and "1 not asked" in out
    assert "Accuracy = 0.33333" in out and "1 core samples without a prediction" in out
    assert "note:" not in out

    assert i4_score.main(["--result-dir", str(results)]) == 0
    table = capsys.readouterr().out
    summary = _load(results / "i4-score.json")
    assert summary["protocol"] == "default"
    dialogue, cloze = 0.36364 * 100, 0.33333 * 100
    assert summary["categories"]["multi_modal_dialogue"]["score"] == pytest.approx(dialogue)
    assert summary["categories"]["multi_modal_dialogue"]["missing"] == ["ALFRED"]
    assert summary["categories"]["multi_modal_cloze"]["score"] == pytest.approx(cloze)
    assert summary["categories"]["visual_storytelling"]["score"] is None
    assert summary["mean"] == pytest.approx((dialogue + cloze) / 2)  # 34.8485
    assert (summary["categories_scored"], summary["categories_total"]) == (2, 7)
    text = (results / "i4-score.txt").read_text(encoding="utf-8")
    assert text == table
    assert "multi_modal_dialogue" in text and "36.36400" in text and "1/2 (missing: ALFRED)" in text
    assert "34.84850" in text and "2/7 categories" in text


def test_the_upstream_protocol_end_to_end(tree, capsys):
    i4_dir, results = tree
    args = ["--result-dir", str(results), "--i4-dir", str(i4_dir), "--protocol", "upstream"]
    assert calculate_I4.main(args + ["--dataset", "RecipeQA_TextCloze"]) == 0
    assert _load(results / "RecipeQA_TextCloze" / "eval.json") == {"Accuracy": pytest.approx(2 / 3)}
    assert not (results / "MMCoQA" / "eval.json").exists()
    assert calculate_I4.main(args + ["--dataset", "MMCoQA"]) == 0
    capsys.readouterr()
    assert i4_score.main(["--result-dir", str(results), "--protocol", "upstream"]) == 0
    summary = _load(results / "i4-score.json")
    assert summary["mean"] is None and summary["categories_scored"] == 0  # every category lacks a member
    assert "(skipped, missing: ALFRED)" in (results / "i4-score.txt").read_text(encoding="utf-8")


def test_visualcloze_gets_a_note_under_the_default_protocol(tmp_path, capsys):
    i4_dir, results = tmp_path / "I4", tmp_path / "results"
    choices = ["Image A", "Image B", "Image C", "Image D"]
    write_core(i4_dir, "RecipeQA_VisualCloze", "multi-choice", ["Pick the image."],
               [_record("v1", "{image#1} {image#2}", ["p.png", "q.png"], "Image B", choices=choices)])
    (results / "RecipeQA_VisualCloze").mkdir(parents=True)
    (results / "RecipeQA_VisualCloze" / "pred.json").write_text(json.dumps(
        [{"sample_id": "v1", "pred_response": "Image B", "gt_response": "Image B"}]))
    base = ["--result-dir", str(results), "--i4-dir", str(i4_dir)]
    assert calculate_I4.main(base) == 0
    out = capsys.readouterr().out
    assert "image-choice" in out and "note: RecipeQA_VisualCloze" in out and "misspells" in out
    assert _load(results / "RecipeQA_VisualCloze" / "eval.json") == {"Accuracy": 1.0}
    assert calculate_I4.main(base + ["--protocol", "upstream"]) == 0
    assert "note:" not in capsys.readouterr().out
    assert _load(results / "RecipeQA_VisualCloze" / "eval.json") == {"Accuracy": 0.0}  # TF-IDF picked "Image A"


def test_bad_inputs_fail_with_a_message(tree, capsys):
    i4_dir, results = tree
    (results / "MMCoQA" / "pred.json").write_text(json.dumps(
        [{"sample_id": "zz", "pred_response": "x", "gt_response": "x"}]))
    assert calculate_I4.main(["--result-dir", str(results), "--i4-dir", str(i4_dir)]) == 1
    captured = capsys.readouterr()
    assert "MMCoQA" in captured.err and "sample_id 'zz' is not in core.json" in captured.err
    assert (results / "RecipeQA_TextCloze" / "eval.json").exists()  # the other dataset was still scored
    assert calculate_I4.main(["--result-dir", str(results), "--i4-dir", str(i4_dir), "--dataset", "VIST"]) == 1
    assert "VIST" in capsys.readouterr().err
    assert i4_score.main(["--result-dir", str(i4_dir)]) == 1
    assert "run calculate_I4.py first" in capsys.readouterr().err


def test_the_shell_wrapper_runs_with_bash_and_passes_arguments(tree):
    i4_dir, results = tree
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "calculate_I4.sh"), "--result-dir", str(results),
                           "--i4-dir", str(i4_dir), "--protocol", "upstream"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _load(results / "RecipeQA_TextCloze" / "eval.json") == {"Accuracy": pytest.approx(2 / 3)}
    assert _load(results / "i4-score.json")["protocol"] == "upstream"
    assert "protocol upstream" in done.stdout
