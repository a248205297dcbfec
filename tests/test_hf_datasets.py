"""SparklesDialogue, SparklesEval, BISON and NLVR2 roots as Hugging Face datasets and back: the records equal the
files', the images are the files' bytes (and pixels), and a set written back under a new root reads the same."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparkles.common.io import atomic_write_json, read_json
from sparkles.common.paths import SparklesLayout
from sparkles.data import hf_datasets as hfd
from sparkles.tools import hub as hub_cli

IMG = "<Img><ImageHere></Img>"


def _image(path: Path, seed: int, size=(24, 20)) -> None:
    rng = random.Random(seed)
    im = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(30):
        im.putpixel((rng.randrange(size[0]), rng.randrange(size[1])), tuple(rng.randrange(256) for _ in range(3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _ref(image_id, caption=None):
    return {"image_id": image_id, **({"caption": caption} if caption is not None else {})}


def _dialogue(a, b, c, k):
    return [{"role": "user", "content": f"Could IMAGE#{a}{IMG} inspire IMAGE#{b}{IMG}? ({k})",
             "images": [_ref(a, f"caption of {a}"), _ref(b, f"caption of {b}")]},
            {"role": "assistant", "content": f"Yes, IMAGE#{a} could ({k})."},
            {"role": "user", "content": f"Now add IMAGE#{c}{IMG} to IMAGE#{b}.", "images": [_ref(c, f"caption {c}")]},
            {"role": "assistant", "content": "Done."}]


def build_root(root: Path) -> dict[str, Path]:
    """Every kind of set, small, with the odd cases the formats allow. Returns name → annotation file."""
    layout = SparklesLayout(root)
    files = {}
    # SparklesDialogueCC: string ids, .jpg; a demo-seed dialogue without "raw"
    for i in ("12", "7", "3", "40"):
        _image(layout.dialogue_images("CC") / f"{i}.jpg", int(i))
    cc = [{"dialogue": _dialogue("12", "7", "3", 0), "raw": [{"prompt": "the prompt", "response": "the reply"}]},
          {"dialogue": _dialogue("40", "12", "7", 1)}]
    files["SparklesDialogueCC"] = atomic_write_json(layout.dialogue_file("CC"), cc)
    split = [{"uniform_question": f"Could IMAGE#12{IMG} inspire IMAGE#7{IMG}?", "instruction": "###Human: ...",
              "answer": "Yes.", "tgt_imgs": [_ref("12", "c12"), _ref("7", "c7")]},
             {"question": f"What about IMAGE#40{IMG} and IMAGE#3{IMG}?", "instruction": "###Human: ...",
              "answer": "No.", "fix_answer": "Perhaps.", "tgt_imgs": [_ref("40"), _ref("3", "c3")]}]
    files["SparklesDialogueCC_turn1_2img"] = atomic_write_json(layout.dialogue_split_file("CC", 1, 2), split)
    # SparklesDialogueVG: integer ids, one image stored as .png
    for i in (1207, 88, 3021):
        _image(layout.dialogue_images("VG") / f"{i}.{'png' if i == 88 else 'jpg'}", i)
    files["SparklesDialogueVG"] = atomic_write_json(layout.dialogue_file("VG"), [
        {"dialogue": _dialogue(1207, 88, 3021, 2), "raw": [{"prompt": "p", "response": "r"}]}])
    # SparklesEval: ids of both types at the top level, a result file's judge entry, an explicit null
    for i in (300, 301, 302, 303):
        _image(layout.eval_images("SparklesEval") / f"{i}.jpg", i)
    evals = [{"evaluation_id": 10, "dialogue": _dialogue(300, 301, 302, 3)},
             {"evaluation_id": "11", "dialogue": _dialogue(303, 300, 301, 4), "note": None,
              "gpt-4": {"A1_C123_scores": [8.0, 8.0, 9.0, 8.0], "prompt": "judge prompt", "response": "ok"}}]
    files["SparklesEval"] = atomic_write_json(layout.eval_annotations("SparklesEval"), evals)
    # BISON: candidates by file name
    bison = []
    for k in range(3):
        a, b = 1000 + 2 * k, 1001 + 2 * k
        for i in (a, b):
            _image(layout.eval_images("BISON") / f"COCO_{i}.jpg", i)
        bison.append({"evaluation_id": k, "caption": f"picture {k}", "true_image_id": a if k % 2 == 0 else b,
                      "image_candidates": [{"image_id": a, "image_filename": f"COCO_{a}.jpg"},
                                           {"image_id": b, "image_filename": f"COCO_{b}.jpg"}]})
    files["BISON"] = atomic_write_json(layout.eval_annotations("BISON"), bison)
    # NLVR2: two sentences share one image pair
    for k in range(2):
        _image(layout.eval_images("NLVR2") / f"dev-{k}-0-img0.png", 50 + k)
        _image(layout.eval_images("NLVR2") / f"dev-{k}-0-img1.png", 80 + k)
    nlvr2 = [{"evaluation_id": 40, "identifier": "dev-0-0-0", "sentence": "Two dogs.", "label": "True"},
             {"evaluation_id": 41, "identifier": "dev-0-0-1", "sentence": "No dog.", "label": "False"},
             {"evaluation_id": 42, "identifier": "dev-1-0-0", "sentence": "A cat.", "label": "True"}]
    files["NLVR2"] = atomic_write_json(layout.eval_annotations("NLVR2"), nlvr2)
    return files


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    files = build_root(root)
    out = tmp_path_factory.mktemp("exported")
    written = hfd.export_root(root, out)
    return {"root": root, "files": files, "out": out, "written": written}


def _stored_rows(dataset):
    """Rows as stored: images as {"bytes", "path"}, not decoded."""
    return dataset.with_format("arrow")[:].to_pylist()


def test_every_set_of_the_root_is_found_and_saved(world):
    assert sorted(world["written"]) == sorted(world["files"])
    assert hfd.available(world["root"]) == ["SparklesDialogueCC", "SparklesDialogueCC_turn1_2img",
                                            "SparklesDialogueVG", "SparklesEval", "BISON", "NLVR2"]
    for name, path in world["written"].items():
        assert (path / "dataset_dict.json").is_file(), name


@pytest.mark.parametrize("name", ["SparklesDialogueCC", "SparklesDialogueCC_turn1_2img", "SparklesDialogueVG",
                                  "SparklesEval", "BISON", "NLVR2"])
def test_loaded_sets_give_back_the_records_of_their_file(world, name):
    loaded = hfd.load_dataset_dir(world["out"] / name)
    split = "train" if name.startswith("SparklesDialogue") else "test"
    assert list(loaded) == [split]
    assert hfd.to_records(loaded) == read_json(world["files"][name])
    assert hfd.to_records(loaded[split]) == read_json(world["files"][name])


def test_the_dialogue_structure_is_kept_with_typed_ids(world):
    cc = hfd.load_dataset_dir(world["out"] / "SparklesDialogueCC")["train"]
    vg = hfd.load_dataset_dir(world["out"] / "SparklesDialogueVG")["train"]
    ev = hfd.load_dataset_dir(world["out"] / "SparklesEval")["test"]
    message = cc.features["dialogue"].feature
    assert set(message) == {"role", "content", "images"}
    assert set(message["images"].feature) == {"image_id", "caption", "image"}
    assert message["images"].feature["image_id"].dtype == "string"
    assert vg.features["dialogue"].feature["images"].feature["image_id"].dtype == "int64"
    assert ev.features["evaluation_id"].dtype == "int64"  # the file's first id is a number
    row = cc[0]
    assert [m["role"] for m in row["dialogue"]] == ["user", "assistant", "user", "assistant"]
    assert [i["image_id"] for i in row["dialogue"][0]["images"]] == ["12", "7"]
    assert row["dialogue"][1]["images"] is None  # assistant messages have no images, not an empty list
    assert cc[1]["raw"] is None and row["raw"] == [{"prompt": "the prompt", "response": "the reply"}]
    # the second record's string id and its unknown fields wait in "extra"
    assert ev[1]["evaluation_id"] is None
    assert json.loads(ev[1]["extra"]) == {"evaluation_id": "11", "note": None, "gpt-4": {
        "A1_C123_scores": [8.0, 8.0, 9.0, 8.0], "prompt": "judge prompt", "response": "ok"}}


def test_images_are_the_files_bytes_and_pixels(world):
    layout = SparklesLayout(world["root"])
    ev = hfd.load_dataset_dir(world["out"] / "SparklesEval")["test"]
    stored = _stored_rows(ev)[0]["dialogue"][0]["images"][1]["image"]
    assert stored["path"] == "301.jpg"
    assert stored["bytes"] == (layout.eval_images("SparklesEval") / "301.jpg").read_bytes()
    decoded = ev[0]["dialogue"][0]["images"][1]["image"]  # a PIL image through datasets.Image
    with Image.open(layout.eval_images("SparklesEval") / "301.jpg") as original:
        assert np.array_equal(np.asarray(decoded), np.asarray(original))

    vg = _stored_rows(hfd.load_dataset_dir(world["out"] / "SparklesDialogueVG")["train"])[0]
    png = vg["dialogue"][0]["images"][1]["image"]
    assert png["path"] == "88.png" and png["bytes"] == (layout.dialogue_images("VG") / "88.png").read_bytes()

    bison = hfd.load_dataset_dir(world["out"] / "BISON")["test"]
    candidate = _stored_rows(bison)[2]["image_candidates"][1]["image"]
    assert candidate["path"] == "COCO_1005.jpg"
    assert candidate["bytes"] == (layout.eval_images("BISON") / "COCO_1005.jpg").read_bytes()

    nlvr2 = hfd.load_dataset_dir(world["out"] / "NLVR2")["test"]
    pair = _stored_rows(nlvr2)[2]["images"]
    assert [p["path"] for p in pair] == ["dev-1-0-img0.png", "dev-1-0-img1.png"]
    assert [p["bytes"] for p in pair] == [(layout.eval_images("NLVR2") / p["path"]).read_bytes() for p in pair]
    with Image.open(layout.eval_images("NLVR2") / "dev-1-0-img1.png") as original:
        assert np.array_equal(np.asarray(nlvr2[2]["images"][1]), np.asarray(original))


def test_sets_written_back_under_a_new_root_are_the_same(world, tmp_path):
    old, new = SparklesLayout(world["root"]), SparklesLayout(tmp_path)
    for name, file in world["files"].items():
        written = hfd.import_dataset(hfd.load_dataset_dir(world["out"] / name), tmp_path, name)
        assert written == tmp_path / file.relative_to(world["root"])
        assert read_json(written) == read_json(file)
    image_dirs = [(old.dialogue_images(s), new.dialogue_images(s)) for s in ("CC", "VG")]
    image_dirs += [(old.eval_images(d), new.eval_images(d)) for d in ("SparklesEval", "BISON", "NLVR2")]
    for before, after in image_dirs:
        files = sorted(p.name for p in before.iterdir())
        assert sorted(p.name for p in after.iterdir()) == files  # every image of these roots is referenced
        assert all((after / f).read_bytes() == (before / f).read_bytes() for f in files)
    # the new root exports to the same rows
    again = hfd.export_dataset(tmp_path, "SparklesEval")["test"]
    first = hfd.load_dataset_dir(world["out"] / "SparklesEval")["test"]
    assert _stored_rows(again) == _stored_rows(first)
    with pytest.raises(hfd.DatasetExportError, match="exists"):
        hfd.import_dataset(first, tmp_path, "SparklesEval")
    with pytest.raises(hfd.DatasetExportError, match="bison records"):
        hfd.import_dataset(first, tmp_path, "BISON", overwrite=True)


def test_records_that_cannot_become_rows_are_named(tmp_path):
    layout = SparklesLayout(tmp_path)
    _image(layout.eval_images("SparklesEval") / "1.jpg", 1)
    path = layout.eval_annotations("SparklesEval")

    def fails(records, match):
        atomic_write_json(path, records)
        with pytest.raises(hfd.DatasetExportError, match=match):
            hfd.export_dataset(tmp_path, "SparklesEval")

    user = {"role": "user", "content": f"IMAGE#1{IMG}", "images": [_ref(1, "c")]}
    fails([{"evaluation_id": 0, "dialogue": [{**user, "images": [_ref(2, "c")]}]}],
          r"record 0 dialogue\[0\]\.images\[0\]: image not found: .*2\.jpg")
    fails([{"evaluation_id": 0, "dialogue": [{**user, "mood": "happy"}]}], r"record 0 .*unknown field\(s\) \['mood'\]")
    fails([{"evaluation_id": 0, "dialogue": [user]}, {"evaluation_id": 1, "dialogue": [
        {**user, "images": [_ref("1", "c")]}]}], "a file's ids must share one type")
    fails([{"evaluation_id": 0, "dialogue": "not a list"}], "must be a list")


def test_a_dataset_of_other_columns_is_refused():
    import datasets

    with pytest.raises(hfd.DatasetExportError, match="not those of an exported Sparkles set"):
        hfd.to_records(datasets.Dataset.from_dict({"text": ["a"]}))
    with pytest.raises(ValueError, match="unknown set"):
        hfd.source("/r", "COCO")


def test_the_cli_exports_and_imports(world, tmp_path):
    out = tmp_path / "out"
    assert hub_cli.main(["dataset", "--sparkles_root", str(world["root"]), "--out", str(out),
                         "--name", "BISON", "NLVR2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["BISON", "NLVR2"]
    assert hub_cli.main(["import-dataset", str(out / "BISON"), "--sparkles_root", str(tmp_path / "new")]) == 0
    assert read_json(SparklesLayout(tmp_path / "new").eval_annotations("BISON")) == read_json(world["files"]["BISON"])
    assert hub_cli.main(["dataset", "--sparkles_root", str(tmp_path / "empty"), "--out", str(out)]) == 1


def test_an_empty_set_round_trips(tmp_path):
    atomic_write_json(SparklesLayout(tmp_path).eval_annotations("BISON"), [])
    hfd.export_root(tmp_path, tmp_path / "out", ["BISON"])
    loaded = hfd.load_dataset_dir(tmp_path / "out" / "BISON")
    assert loaded["test"].num_rows == 0 and hfd.to_records(loaded) == []
