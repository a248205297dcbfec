"""webdataset shards: the converter CLI, and streaming gives the same samples as the JSON path."""

from __future__ import annotations

import json

import pytest
import torch

import sparkles.data.builders as builders
import sparkles.models  # noqa: F401
from sparkles.common.config import load_config
from sparkles.data import wds
from sparkles.data.base import DataError
from sparkles.data.mixture import build_mixture
from test_train_helpers import make_tokenizer, make_world, write_config

NAMES = ["SparklesDialogueCC_turn1_2img", "SparklesDialogueCC_turn2_3img", "cc_sbu_align"]


def make_captions(root, n=11):
    from PIL import Image, ImageDraw

    cap_dir = root / "data" / "cc_sbu_align"
    (cap_dir / "image").mkdir(parents=True)
    anns = []
    for k in range(n):
        image = Image.new("RGB", (48, 40), (20 * k, 90, 200))
        ImageDraw.Draw(image).ellipse([k, 2, 20 + k, 30], fill=(255, 255, 0))
        image.save(cap_dir / "image" / f"{k}.jpg")
        anns.append({"image_id": str(k), "caption": f"A yellow ellipse number {k} on blue."})
    (cap_dir / "filter_cap.json").write_text(json.dumps({"annotations": anns}))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("wds")
    root = base / "root"
    make_world(root, n_per_split=11)
    make_captions(root)
    tok_dir = make_tokenizer(base / "tok")
    augment = {"vis_processor": {"train": {"name": "blip2_image_train", "min_scale": 0.3}}}
    cfg_path = write_config(base / "cfg.yaml", root=root, tok_dir=tok_dir, datasets={n: dict(augment) for n in NAMES})
    rc = wds.main(["--cfg-path", str(cfg_path), "--out", str(root / "shards"), "--shard-size", "4"])
    assert rc == 0
    from sparkles.models.tokenizer import load_tokenizer

    return {"root": root, "cfg_path": cfg_path, "tok_dir": tok_dir, "tok": load_tokenizer(tok_dir), "base": base}


def build(setup, *, shards: bool, batch_size=1):
    opts = [f"datasets.{n}.shards=shards/{n}" for n in NAMES] if shards else []
    cfg = load_config(setup["cfg_path"], opts)
    return cfg, builders.build_datasets(cfg, root=setup["root"], tokenizer=setup["tok"])


def one_pass(ds, *, seed, world=1, num_workers=0, batch_size=1, with_images=False):
    """Every sample the ranks see in their first pass, by id."""
    out = {}
    slots = world * max(1, num_workers)
    for rank in range(world):
        mix = build_mixture({ds.name: ds}, batch_size=batch_size, rank=rank, world=world, seed=seed,
                            num_workers=num_workers)
        sub = mix.loaders[ds.name]
        if hasattr(sub, "index_stream"):
            per_pass = sub.index_stream.batches_per_pass
        else:  # fewer shards than rank×worker slots: each slot keeps len // slots samples per pass
            per_pass = (len(ds) // slots) * max(1, num_workers) // batch_size
        for _ in range(per_pass):
            batch = sub.next()
            for k, sid in enumerate(batch["ids"]):
                assert sid not in out, f"{sid} seen twice in one pass"
                n = int(batch["attention_mask"][k].sum())
                out[sid] = (batch["input_ids"][k, :n].tolist(), batch["labels"][k, :n].tolist())
                if with_images:  # batch_size 1: the batch's images are this sample's
                    out[sid] += (batch["images"],)
        mix.close()
    return out


def test_converter_writes_shards_and_manifest(setup, capsys):
    for name in NAMES:
        manifest = json.loads((setup["root"] / "shards" / name / "manifest.json").read_text())
        assert manifest["dataset"] == name and manifest["num_samples"] == 11
        assert [s["num_samples"] for s in manifest["shards"]] == [4, 4, 3]
        assert manifest["kind"] == ("caption" if name == "cc_sbu_align" else "dialogue")
        assert all((setup["root"] / "shards" / name / s["file"]).is_file() for s in manifest["shards"])
    wds.main(["--cfg-path", str(setup["cfg_path"]), "--out", str(setup["base"] / "again"), "--datasets", NAMES[0]])
    assert f"--options datasets.{NAMES[0]}.shards=" in capsys.readouterr().out


def test_shards_give_the_same_samples_as_json(setup):
    _, from_json = build(setup, shards=False)
    _, from_shards = build(setup, shards=True)
    for name in NAMES:
        a = one_pass(from_json[name], seed=3, with_images=True)
        b = one_pass(from_shards[name], seed=3, with_images=True)
        assert len(a) == 11 and a.keys() == b.keys()
        for sid in a:  # same tokens, same labels, and (random crop included) the same pixels
            assert a[sid][:2] == b[sid][:2]
            assert torch.equal(a[sid][2], b[sid][2])


def test_stream_splits_over_ranks_and_workers_and_resumes(setup):
    _, ds = build(setup, shards=True)
    ds = ds[NAMES[0]]
    whole = one_pass(ds, seed=5)
    split = one_pass(ds, seed=5, world=2, num_workers=2)  # 4 slots > 3 shards: sample-level split
    assert set(split) <= set(whole) and len(split) == (11 // 4) * 4
    assert all(split[k] == whole[k] for k in split)

    def ids(start, workers, n):
        mix = build_mixture({ds.name: ds}, batch_size=2, rank=0, world=1, seed=5, num_workers=workers)
        sub = mix.loaders[ds.name]
        sub.load_state_dict({"position": start})
        got = [sub.next()["ids"] for _ in range(n)]
        mix.close()
        return got

    full = ids(0, 0, 9)  # crosses into the second pass (5 batches per pass)
    assert ids(3, 0, 6) == full[3:]
    assert ids(3, 2, 4) == ids(0, 2, 7)[3:]


def test_shards_of_another_dataset_are_refused(setup):
    opts = [f"datasets.{NAMES[0]}.shards=shards/{NAMES[1]}"]
    cfg = load_config(setup["cfg_path"], opts)
    with pytest.raises(DataError, match="shards of dataset"):
        builders.build_datasets(cfg, root=setup["root"], tokenizer=setup["tok"])
