"""``visualize_data_in_html.py --visualize_eval_results`` on what the evaluation writes and on released files.

A results folder is produced by the real merge (``sparkles.eval.merge.merge_run``) from hand-written annotations
and shard items: result files, their ``_metrics.json`` and run directories with ``manifest.json`` and shards.
Released files are hand-written in the original's schema (invented content, absolute image paths of another
machine). Every result file must get its page, metrics must land in the page header, manifests and run
directories must be skipped knowingly, and a broken file must be named without costing the others their pages.
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sparkles.common.io import atomic_write, atomic_write_json
from sparkles.eval.data import EvalSet
from sparkles.eval.merge import merge_run
from sparkles.eval.store import RunDir, ShardFile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "dataset"))
import visualize_data_in_html as cli  # noqa: E402

SLOT = "<Img><ImageHere></Img>"
MODEL = "models_pretrained_tiny_7b"
AUTHORS = "/mnt/authors_machine/Sparkles/evaluation"  # where released files say their images were


class Page(HTMLParser):
    """Tags with attributes and the visible text of a page."""

    def __init__(self, path: Path):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self._script = False
        self.raw = path.read_text(encoding="utf-8")
        self.feed(self.raw)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._script = tag == "script"

    def handle_endtag(self, tag):
        self._script = False if tag == "script" else self._script

    def handle_data(self, data):
        if not self._script:
            self.text.append(data)

    @property
    def all_text(self) -> str:
        return "".join(self.text)

    def srcs(self, cls: str) -> list[str]:
        return [a["src"] for t, a in self.tags if t == "img" and cls in (a.get("class") or "").split()]


@pytest.fixture(autouse=True)
def _no_root_from_environment(monkeypatch):
    monkeypatch.delenv("SPARKLES_ROOT", raising=False)


# ------------------------------------------------------------------------------------------ our merge's outputs
def _dialogue(eid: int, a1: str, a2: str) -> list[dict]:
    return [
        {"role": "user", "content": f"What links IMAGE#{eid}01{SLOT} and IMAGE#{eid}02{SLOT}?",
         "images": [{"image_id": int(f"{eid}01"), "caption": "a red kite"},
                    {"image_id": int(f"{eid}02"), "caption": "a windy beach"}]},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": f"And IMAGE#{eid}03{SLOT}?", "images": [{"image_id": int(f"{eid}03"),
                                                                          "caption": "a dog"}]},
        {"role": "assistant", "content": a2},
    ]


def _merge(root: Path, dataset: str, annotations: list, shards: dict[tuple[int, int], list]) -> Path:
    """Annotations under the root, shard items registered in a run's manifest, then the real merge."""
    evalset = EvalSet(root, dataset)
    atomic_write_json(evalset.annotation_path, annotations)
    run = RunDir(evalset.results_dir, dataset, MODEL)
    for (lo, hi), items in shards.items():
        run.register_shard(start=lo, stop=hi, settings={"protocol": "default"},
                           annotation_file=evalset.relpath(evalset.annotation_path), num_annotations=len(annotations))
        shard = ShardFile(run.shard_path(lo, hi))
        for item in items:
            shard.put(item)
        run.update_shard(lo, hi, status="done")
    result = merge_run(run, evalset)
    for page in result.html_paths:  # the pages below must come from the visualiser, not from the merge
        page.unlink()
    return result.result_path


def merged_root(tmp: Path) -> tuple[Path, dict[str, Path]]:
    root = tmp / "Sparkles"
    annotations = [{"evaluation_id": i, "dialogue": _dialogue(i, "ref A1", "ref A2")} for i in (1, 2, 3)]
    scored = {"evaluation_id": 1, "dialogue": _dialogue(1, "Both show <b>wind</b> & \"fun\".", "The dog runs."),
              "prompt": ["Q1", "Q2"], "model_input": ["<s>###Human: ...", "<s>..."], "generations": 2,
              "gpt-4": {"A1_C123_scores": [8.0, 8.0, 9.0, 7.0], "A2_C123_scores": [6.0, 6.0, 6.0, 6.0],
                        "prompt": "judge prompt", "response": "* Evaluating A1 ... [[8]] <script>x</script>"}}
    unparsed = {"evaluation_id": 2, "dialogue": _dialogue(2, "Kites fly.", "Dogs bark."),
                "gpt-4": {"error": "no 'Evaluating A2' section", "prompt": "judge prompt", "response": "I refuse."}}
    failed = {"evaluation_id": 3, "dialogue": _dialogue(3, "ref A1", "ref A2"),
              "warnings": ["context shortened"], "error": "the context does not fit: 1100 > 1024 tokens"}
    sp = _merge(root, "SparklesEval", annotations, {(0, 2): [scored, unparsed], (2, 3): [failed]})

    bison_ann = [{"evaluation_id": i, "caption": f"caption {i}", "true_image_id": 1,
                  "image_candidates": [{"image_id": 1, "image_filename": "a.jpg"},
                                       {"image_id": 2, "image_filename": "b.jpg"}]} for i in (1, 2, 3)]
    paths = ["evaluation/BISON/images/a.jpg", "evaluation/BISON/images/b.jpg"]
    base = {"prompt": f"Which one? IMAGE#1{SLOT} IMAGE#2{SLOT}", "img_paths": paths, "sentence": "a kite <i>high</i>"}
    bison_items = [
        {**base, "evaluation_id": 1, "label": "IMAGE#1", "predict": "image#1", "generations": 1,
         "response": "Therefore, the answer (IMAGE#1 or IMAGE#2) is IMAGE#1.", "model_input": "<s>..."},
        {**base, "evaluation_id": 2, "label": "IMAGE#1", "predict": "image#2", "generations": 3,
         "response": "Therefore, the answer (IMAGE#1 or IMAGE#2) is IMAGE#2."},
        {**base, "evaluation_id": 3, "label": "IMAGE#2", "predict": None, "response": "", "generations": 1,
         "error": "image file unreadable: b.jpg"},
    ]
    bison = _merge(root, "BISON", bison_ann, {(0, 3): bison_items})
    for name in ("a.jpg", "b.jpg"):
        atomic_write(root / "evaluation/BISON/images" / name, b"not really a jpeg")
    return root, {"SparklesEval": sp, "BISON": bison}


def test_merge_outputs_render_with_metrics_in_the_header_and_run_dirs_skipped(tmp_path, capsys):
    root, results = merged_root(tmp_path)
    assert results["BISON"].name == f"BISON_{MODEL}_acc0.333.json"
    assert (results["BISON"].parent / f"BISON_{MODEL}_metrics.json").is_file()
    assert (results["BISON"].parent / f"BISON_{MODEL}" / "manifest.json").is_file()

    assert cli.main(["--sparkles_root", str(root), "--visualize_eval_results"]) == 0
    out, err = capsys.readouterr()
    pages = sorted(p.name for p in (root / "evaluation").rglob("*.html"))
    assert pages == [f"BISON_{MODEL}_acc0.333.html", f"SparklesEval_{MODEL}.html"]  # one per result file
    assert f"used BISON_{MODEL}_metrics.json for the header" in err
    assert f"skipped run directory {root / 'evaluation/BISON/results' / f'BISON_{MODEL}'}" in err
    assert "not found, skipped" in err and "NLVR2" in err  # no NLVR2 results: a note, not a failure
    assert "error" not in err

    sp = Page(results["SparklesEval"].with_suffix(".html"))
    text = sp.all_text
    assert "evaluation_id 1" in text and "evaluation_id 2" in text and "evaluation_id 3" in text
    assert "Both show <b>wind</b> & \"fun\"." in text and "<b>" not in sp.raw  # escaped, shown as written
    assert "Turn 1 A1: 8, C1: 8, C2: 9, C3: 7" in text and "Turn 2 A2: 6, C1: 6, C2: 6, C3: 6" in text
    assert "judgement failed: no 'Evaluating A2' section" in text
    assert "failed: the context does not fit: 1100 > 1024 tokens" in text
    assert "context shortened" in text and "generations" in text  # extra keys are shown, not dropped
    assert "metrics file" in text and f"SparklesEval_{MODEL}_metrics.json" in text
    assert "headline (judge gpt-4)" in text and "overall 7.00 (A1 8.00, A2 6.00; 1 rated)" in text
    assert f"ASSISTANT MODEL: {MODEL}" in text
    assert sp.srcs("thumb")[0] == "../images/101.jpg"

    bison = Page(results["BISON"].with_suffix(".html"))
    text = bison.all_text
    assert "Accuracy: 0.333 (1 / 3 correct)" in text
    assert "accuracy over parsed answers" in text and "items that could not be answered" in text
    assert "a kite <i>high</i>" in text and "<i>" not in bison.raw
    assert "failed: image file unreadable: b.jpg" in text
    # Root-relative img_paths of our results resolve to the root's images, linked relative to the page.
    assert bison.srcs("pair-img") == ["../images/a.jpg", "../images/b.jpg"] * 3


def test_a_named_run_directory_renders_its_shards_and_skips_its_manifest(tmp_path, capsys):
    root, results = merged_root(tmp_path)
    run_dir = results["BISON"].parent / f"BISON_{MODEL}"
    assert cli.main(["--visualize_eval_results", str(run_dir)]) == 0
    err = capsys.readouterr().err
    assert f"skipped {run_dir / 'manifest.json'}: run manifest" in err
    page = Page(run_dir / f"BISON_{MODEL}_0to3.html")
    assert f"model: {MODEL}" in page.all_text  # the slice suffix is not part of the model name
    # The root is read off the file's location, so the images resolve from inside the run directory too.
    assert page.srcs("pair-img")[:2] == ["../../images/a.jpg", "../../images/b.jpg"]


# ---------------------------------------------------------------------------------------------- released files
def released_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    sp = [{"evaluation_id": "7", "dialogue": _dialogue(7, "A <kite> & a beach.", "A dog too."),
           "gpt-4": {"A1_C123_scores": [9.0, 9.0, 8.0, 9.0], "A2_C123_scores": [7.0, 8.0, 7.0, 6.0],
                     "prompt": "judge prompt", "response": "* Evaluating A1 ..."}}]

    def choice(eid, label, predict, files, dataset):
        return {"label": label, "prompt": f"Pick one. IMAGE#1{SLOT} IMAGE#2{SLOT}", "predict": predict,
                "img_paths": [f"{AUTHORS}/{dataset}/images/{f}" for f in files],
                "response": f"Let's think step by step. Therefore, the answer is {predict}.",
                "sentence": f"sentence {eid} <u>under</u>", "evaluation_id": eid}
    bison = [choice(11, "IMAGE#2", "image#2", ["COCO_val2014_000000000011.jpg", "COCO_val2014_000000000012.jpg"],
                    "BISON")]
    nlvr2 = [choice(21, "True", "false", ["dev-1-0-img0.png", "dev-1-0-img1.png"], "NLVR2")]
    files = {"SparklesEval": folder / "SparklesEval_models_pretrained_sparkleschat_7b.json",
             "BISON": folder / "BISON_models_pretrained_sparkleschat_7b_acc0.567.json",
             "NLVR2": folder / "NLVR2_models_pretrained_sparkleschat_7b_acc0.580.json"}
    for dataset, data in (("SparklesEval", sp), ("BISON", bison), ("NLVR2", nlvr2)):
        atomic_write_json(files[dataset], data)
    return files


def test_released_files_render_and_missing_images_fall_back_to_the_root_or_show_their_path(tmp_path, capsys):
    root = tmp_path / "Sparkles"
    atomic_write(root / "evaluation/BISON/images/COCO_val2014_000000000011.jpg", b"x")  # one image of two
    files = released_files(tmp_path / "downloads")
    assert cli.main(["--sparkles_root", str(root), "--visualize_eval_results", str(tmp_path / "downloads")]) == 0
    assert "error" not in capsys.readouterr().err

    sp = Page(files["SparklesEval"].with_suffix(".html"))
    assert "evaluation_id 7" in sp.all_text and "A <kite> & a beach." in sp.all_text
    assert "Turn 2 A2: 7, C1: 8, C2: 7, C3: 6" in sp.all_text
    assert "ASSISTANT MODEL: models_pretrained_sparkleschat_7b" in sp.all_text

    bison = Page(files["BISON"].with_suffix(".html"))
    assert "evaluation_id 11" in bison.all_text and "sentence 11 <u>under</u>" in bison.all_text
    # The authors' path does not exist here: the root's copy is linked (relative to the page) when present,
    # otherwise the recorded path is shown as text; no URL points at the authors' machine.
    assert bison.srcs("pair-img") == ["../Sparkles/evaluation/BISON/images/COCO_val2014_000000000011.jpg"]
    assert f"{AUTHORS}/BISON/images/COCO_val2014_000000000012.jpg" in bison.all_text
    assert "/mnt/authors_machine" not in " ".join(a.get("src", "") for _, a in bison.tags)

    nlvr2 = Page(files["NLVR2"].with_suffix(".html"))
    assert "Wrong" in nlvr2.all_text and "Accuracy: 0.000 (0 / 1 correct)" in nlvr2.all_text
    assert nlvr2.srcs("pair-img") == [] and nlvr2.srcs("slot-thumb") == []
    assert f"{AUTHORS}/NLVR2/images/dev-1-0-img0.png" in nlvr2.all_text

    # Without a root nothing can be found: every image is shown as its path, and nothing fails.
    assert cli.main(["--visualize_eval_results", str(files["BISON"])]) == 0
    bison = Page(files["BISON"].with_suffix(".html"))
    assert bison.srcs("pair-img") == [] and f"{AUTHORS}/BISON/images/COCO_val2014_000000000011.jpg" in bison.all_text


def test_bad_files_are_named_and_the_others_still_render(tmp_path, capsys):
    folder = tmp_path / "mixed"
    files = released_files(folder)
    atomic_write(folder / "broken.json", "[{\"evaluation_id\": 1,")
    atomic_write_json(folder / "odd.json", {"annotations": [{"image_id": "2", "caption": "x"}]})
    atomic_write_json(folder / "BISON_weird_acc0.100.json", [{"evaluation_id": 1, "text": "no schema"}])
    lone_metrics = folder / "NLVR2_other_metrics.json"
    atomic_write_json(lone_metrics, {"dataset": "NLVR2", "model_name": "other", "items": 3,
                                     "files": {"results": "NLVR2_other_acc0.333.json"}})

    assert cli.main(["--visualize_eval_results", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "broken.json" in err and "malformed JSON" in err
    assert "odd.json" in err and "unknown layout" in err
    assert "BISON_weird_acc0.100.json" in err and "neither dialogues" in err
    assert f"skipped {lone_metrics}: metrics file" in err  # knowingly skipped, not an error
    for f in files.values():
        assert f.with_suffix(".html").is_file(), f
    assert not (folder / "broken.html").exists() and not (folder / "odd.html").exists()

    assert cli.main(["--visualize_eval_results", str(folder / "missing.json"), str(files["NLVR2"])]) == 2
    assert "missing.json: no such file or directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ who wrote what
def _assistant_lines(page: Page) -> set[str]:
    return {line.strip() for line in page.all_text.splitlines() if line.strip().startswith("ASSISTANT MODEL:")}


def test_pages_of_a_generated_world_name_its_templates_not_gpt4(tmp_path, capsys):
    """The synthetic world writes its dialogues in upstream's formats (upstream's GPT-4 data); its pages must say
    that the world's templates wrote them, and pages of the same file outside a world keep upstream's author."""
    import shutil

    import sparkles.tinyworld as world
    from sparkles.eval.cli import run as eval_run

    root = tmp_path / "world"
    world.write_world(world.build_world(world.WorldConfig(seed=5, num_train=10, num_bison=2, num_nlvr2=2,
                                                          num_sparkleseval=2)), root)
    templates = "ASSISTANT MODEL: the synthetic world's templates, no language model (reference dialogues)"
    assert cli.main(["--sparkles_root", str(root), "--visualize_SparklesDialogue"]) == 0
    for subset in ("CC", "VG"):
        page = Page(root / f"data/SparklesDialogue{subset}/annotations/SparklesDialogue{subset}.html")
        assert _assistant_lines(page) == {templates} and "gpt-4" not in page.raw
    elsewhere = tmp_path / "copy" / "SparklesDialogueVG.json"
    elsewhere.parent.mkdir()
    shutil.copyfile(root / "data/SparklesDialogueVG/annotations/SparklesDialogueVG.json", elsewhere)
    assert cli.main(["--input", str(elsewhere)]) == 0
    assert _assistant_lines(Page(elsewhere.with_suffix(".html"))) == {"ASSISTANT MODEL: gpt-4 (reference dialogues)"}

    # Judging the reference dialogues themselves: upstream names that run "gpt-4"; the merge's page and the
    # visualiser's page (from the result file and its metrics) name the world's templates as the assistant.
    report = eval_run(["--sparkles_root", str(root), "--dataset", "SparklesEval", "--inference", "--merge-results",
                       "--imports", "sparkles.tinyworld", "--judge_models", "reference", "--no-progress"])
    assert report.result_path.name == "SparklesEval_gpt-4.json"
    merged_page = report.result_path.with_suffix(".html")
    assert _assistant_lines(Page(merged_page)) == {templates}
    merged_page.unlink()
    assert cli.main(["--visualize_eval_results", str(report.result_path)]) == 0
    page = Page(merged_page)
    assert _assistant_lines(page) == {templates} and "JUDGE MODEL: reference" in page.all_text
