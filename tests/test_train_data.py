"""Training datasets: what carries loss, how records map to text and images, and how bad input fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import sparkles.data.builders as builders
import sparkles.models  # noqa: F401  (model schema for load_config)
from sparkles.common.config import build_dataset_config, load_config
from sparkles.conversation.render import IGNORE_INDEX
from sparkles.data.base import DataError
from test_train_helpers import make_tokenizer, make_world, write_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    root = base / "root"
    records = make_world(root, n_per_split=6)
    tok_dir = make_tokenizer(base / "tok")
    from sparkles.models.tokenizer import load_tokenizer

    return {"root": root, "records": records, "tok_dir": tok_dir, "tok": load_tokenizer(tok_dir), "base": base}


def dataset(world, name, *, run=None, model=None, section=None, cfg_path=None):
    cfg_path = cfg_path or world["base"] / f"cfg_{name}.yaml"
    ds = {name: {"sample_ratio": 1, **(section or {})}}
    write_config(cfg_path, root=world["root"], tok_dir=world["tok_dir"], datasets=ds, run=run, model=model)
    cfg = load_config(cfg_path)
    return builders.build_dataset(name, cfg.datasets[name], root=world["root"], tokenizer=world["tok"],
                                  model_cfg=cfg.model, run_cfg=cfg.run)


def target_text(tok, sample) -> str:
    ids = [t for t, lab in zip(sample.rendered.input_ids, sample.rendered.labels) if lab != IGNORE_INDEX]
    assert ids == [lab for lab in sample.rendered.labels if lab != IGNORE_INDEX]
    return tok.decode(ids)


@pytest.mark.parametrize("name", ["SparklesDialogueCC_turn1_2img", "SparklesDialogueCC_turn2_3img"])
def test_only_the_target_answer_and_end_symbol_carry_loss(world, name):
    ds = dataset(world, name)
    tok = world["tok"]
    for pos in range(3):
        rec = world["records"][name][pos]
        sample = ds[(pos, 123)]
        assert sample.id == f"{name}/{pos}"
        assert sample.rendered.text == rec["instruction"] + rec["answer"] + "###"  # the upstream text layout
        assert target_text(tok, sample).replace(" ", "") == (rec["answer"] + "###").replace(" ", "")
        labelled = [lab != IGNORE_INDEX for lab in sample.rendered.labels]
        first = labelled.index(True)
        assert all(labelled[first:]) and not any(labelled[:first])  # one contiguous run at the end
        n_img = len(rec["tgt_imgs"])
        assert sum(sample.rendered.image_slot_mask) == n_img * 4
        assert not any(l and m for l, m in zip(labelled, sample.rendered.image_slot_mask))
        assert sample.pixels.shape == (n_img, 3, 32, 32)
        assert sample.image_keys == [f"data/SparklesDialogue{name[16:18]}/images:{i['image_id']}"
                                     for i in rec["tgt_imgs"]]
    batch = ds.collate([ds[(0, 1)], ds[(1, 2)]])
    assert batch["images"].shape[0] == 2 * len(world["records"][name][0]["tgt_imgs"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["image_slot_mask"].shape


def test_augmentation_is_a_function_of_the_sample_seed(world):
    ds = dataset(world, "SparklesDialogueCC_turn1_1img", section={"vis_processor": {"train": {"name": "blip2_image_train"}}})
    before = torch.get_rng_state()
    a, b, c = ds[(0, 1)].pixels, ds[(0, 1)].pixels, ds[(0, 2)].pixels
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), before)  # the training RNG stream is untouched


def test_turn2_history_is_teacher_forced_without_loss(world):
    name = "SparklesDialogueCC_turn2_3img"
    rec = world["records"][name][0]
    sample = dataset(world, name)[(0, 5)]
    first_answer = rec["instruction"].split("###Assistant: ")[1].split("###")[0]
    assert first_answer in sample.rendered.text
    assert first_answer.replace(" ", "") not in target_text(world["tok"], sample).replace(" ", "")


def test_question_template_system_text_and_truncation(world, tmp_path):
    name = "SparklesDialogueCC_turn1_1img"
    recs = [{"uniform_question": "Is IMAGE#100<Img><ImageHere></Img> red?", "question": "ignored",
             "answer": "No.", "fix_answer": "Yes, IMAGE#100 is red.", "tgt_imgs": [{"image_id": "100"}]}]
    anno = tmp_path / "q.json"
    anno.write_text(json.dumps(recs))
    section = {"root_dir": str(world["root"] / "data/SparklesDialogueCC"), "anno_path": str(anno)}
    s = dataset(world, name, section=section)[(0, 0)]
    assert s.rendered.text == "###Human: Is IMAGE#100<Img><ImageHere></Img> red?###Assistant: Yes, IMAGE#100 is red.###"
    s = dataset(world, name, section=section, model={"train_with_system": True, "system_text": "SYS."})[(0, 0)]
    assert s.rendered.text.startswith("SYS.###Human: Is")
    with pytest.raises(DataError, match=r"q\.json: record 0: too long"):
        dataset(world, name, section={**section, "max_length": 8})[(0, 0)]


def test_caption_path_uses_alignment_prompts(world, tmp_path):
    root = world["root"]
    cap_dir = root / "data" / "cc_sbu_align"
    (cap_dir / "image").mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.new("RGB", (40, 30), (1, 2, 3)).save(cap_dir / "image" / "7.jpg")
    (cap_dir / "filter_cap.json").write_text(json.dumps(
        {"annotations": [{"image_id": "7", "caption": "A dark image. Nothing else!"}]}))
    ds = dataset(world, "cc_sbu_align")
    from sparkles.data.caption import load_prompts

    prompts = load_prompts()
    assert len(prompts) == 4
    texts = {ds[(0, seed)].rendered.text for seed in range(40)}
    assert {t.split("###Assistant:")[0] for t in texts} == {f"###Human: {p}" for p in prompts}
    assert ds[(0, 3)].rendered.text == ds[(0, 3)].rendered.text  # the per-sample seed decides
    assert all(t.endswith("Assistant: A dark image. Nothing else!###") for t in texts)
    ds = dataset(world, "cc_sbu_align", section={"text_processor": {"train": {"name": "blip_caption"}}})
    assert ds[(0, 0)].rendered.text.endswith("Assistant: a dark image nothing else###")


# --------------------------------------------------------------------------------------------- bad input
def write_split(root: Path, name: str, records) -> None:
    path = root / "data" / "SparklesDialogueCC" / "annotations" / f"{name}.json"
    path.write_text(records if isinstance(records, str) else json.dumps(records))


def good(i="100"):
    return {"instruction": f"###Human: Colour of IMAGE#{i}<Img><ImageHere></Img>?###Assistant: ", "answer": "red",
            "tgt_imgs": [{"image_id": i}]}


@pytest.mark.parametrize("records,pattern", [
    ([good(), good("999")], r"turn1_1img\.json: record 1: image '999' not found: .*999\.jpg"),
    ([good(), {**good(), "tgt_imgs": [{"image_id": "100"}, {"image_id": "101"}]}],
     r"record 1: 1 image slot\(s\) in the text but 2 image\(s\) in tgt_imgs"),
    ([good(), {"instruction": good()["instruction"], "tgt_imgs": [{"image_id": "100"}]}], r"record 1: field 'answer'"),
    ([good(), {"answer": "x", "tgt_imgs": []}], r"record 1: needs 'instruction'"),
    ([good(), {**good(), "instruction": "Human: hi"}], r"record 1: field 'instruction'"),
    ([good(), {**good(), "unsupervised_spans": [[0, 9]]}], r"record 1: unsupervised_spans\[0\] = \[0, 9\] is not"),
    ([good(), {**good(), "unsupervised_spans": [[0, 3]]}], r"record 1: 'unsupervised_spans' cover the whole answer"),
    ([good(), {**good(), "unsupervised_spans": [0, 1]}], r"record 1: unsupervised_spans\[0\] = 0 is not"),
    ([good(), {**good(), "fix_answer": "blue", "unsupervised_spans": [[0, 1]]}], r"record 1: .*'fix_answer' replaces"),
    ('[{"answer": "x",, }]', r"turn1_1img\.json: malformed JSON at line 1 column"),
    ({"not": "a list"}, r"expected a JSON list"),
])
def test_bad_records_are_errors_naming_file_and_record(world, tmp_path, records, pattern):
    root = tmp_path / "root"
    make_world(root, n_per_split=1, splits={"SparklesDialogueCC_turn1_1img": (1, 1)})
    write_split(root, "SparklesDialogueCC_turn1_1img", records)
    cfg = load_config(write_config(tmp_path / "c.yaml", root=root, tok_dir=world["tok_dir"],
                                   datasets={"SparklesDialogueCC_turn1_1img": {}}))
    with pytest.raises(DataError, match=pattern):
        builders.load_records("SparklesDialogueCC_turn1_1img", cfg.datasets.SparklesDialogueCC_turn1_1img, root=root)


def test_unsupervised_spans_of_a_record_carry_no_loss(world, tmp_path):
    name = "SparklesDialogueCC_turn1_1img"
    root = tmp_path / "root"
    make_world(root, n_per_split=1, splits={name: (1, 1)})
    answer = "it is red, so yes"
    write_split(root, name, [{**good(), "answer": answer, "unsupervised_spans": [[6, 9]]}, {**good(), "answer": answer}])
    ds = dataset({**world, "root": root, "base": tmp_path}, name)
    assert ds.records.records[0].unsupervised == [(6, 9)]
    masked, plain = ds[(0, 0)].rendered, ds[(1, 0)].rendered
    assert masked.input_ids == plain.input_ids
    assert target_text(world["tok"], ds[(1, 0)]).replace(" ", "") == "itisred,soyes###"
    assert world["tok"].decode([t for t in masked.labels if t != IGNORE_INDEX]).replace(" ", "") == "itis,soyes###"
    # the field survives the webdataset record round trip
    from sparkles.data.base import Record

    rec = ds.records.records[0]
    assert Record.from_json(json.loads(json.dumps(rec.to_json()))) == rec


def test_unreadable_image_fails_at_load_or_is_counted(world, tmp_path):
    name = "SparklesDialogueCC_turn1_1img"
    root = tmp_path / "root"
    make_world(root, n_per_split=1, splits={name: (1, 1)})
    (root / "data/SparklesDialogueCC/images/777.jpg").write_bytes(b"not a jpeg")
    write_split(root, name, [good(), good("777")])
    world2 = {**world, "root": root, "base": tmp_path}
    ds = dataset(world2, name)
    with pytest.raises(DataError, match=r"record 1: image '777': cannot read image .*777\.jpg"):
        ds[(1, 0)]
    write_split(root, name, [good(), good("777"), good("888")])
    with pytest.raises(DataError, match="record 2: image '888' not found"):
        dataset(world2, name)
    ds = dataset(world2, name, run={"skip_bad_records": True})
    assert len(ds) == 2 and len(ds.skipped) == 1 and "888" in ds.skipped[0]
    batch = ds.collate([ds[(0, 0)], ds[(1, 0)]])
    assert batch["num_samples"] == 1 and batch["ids"] == [f"{name}/0"]
    assert batch["bad"][0][0] == f"{name}/1" and "777" in batch["bad"][0][1]


def test_default_locations_and_registry():
    from sparkles.common.registry import DATASETS

    for name in builders.DIALOGUE_NAMES + ("cc_sbu_align", "LLaVA_description", "LLaVA_reasoning"):
        assert name in DATASETS
    cfg = build_dataset_config("SparklesDialogueVG_turn2_4img", OmegaConf.create({}))
    assert cfg.root_dir == "data/SparklesDialogueVG"
    assert cfg.anno_path == "annotations/SparklesDialogueVG_turn2_4img.json" and cfg.img_root == "images"
    cfg = build_dataset_config("LLaVA_reasoning", OmegaConf.create({"sample_ratio": 0}))
    assert cfg.anno_path == "LLaVA_complex_reasoning_77k_filtered_for_Sparkles.json"
    cfg = build_dataset_config("cc_sbu_align", OmegaConf.create(
        {"vis_processor": {"train": {"name": "blip2_image_eval", "image_size": 224}}}))
    assert (cfg.img_root, cfg.prompt_path, cfg.vis_processor.train.image_size) == ("image", None, 224)
    with pytest.raises(Exception, match="bogus"):
        build_dataset_config("cc_sbu_align", OmegaConf.create({"bogus": 1}))
