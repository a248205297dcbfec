"""Shared fixtures for the training tests: a tiny SparklesDialogue-format world and tiny run configs.

Images are colour squares with a white corner patch; every answer names the colours of the images asked about, so a model that
looks at the images can lower its loss. Files follow the upstream layout under a Sparkles root:
``data/SparklesDialogue{CC,VG}/annotations/<split>.json`` and ``images/<image_id>.jpg``.
"""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import yaml

COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 90, 225), "yellow": (240, 195, 0)}
SLOT = "<Img><ImageHere></Img>"
SPLITS = {  # name -> (turn, number of images)
    "SparklesDialogueCC_turn1_1img": (1, 1),
    "SparklesDialogueCC_turn1_2img": (1, 2),
    "SparklesDialogueCC_turn2_3img": (2, 3),
    "SparklesDialogueVG_turn1_2img": (1, 2),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _question(ids: list[str]) -> str:
    refs = " and ".join(f"IMAGE#{i}{SLOT}" for i in ids)
    return f"What colour is {refs}?"


def _answer(ids: list[str], colour_of: dict[str, str]) -> str:
    return " ".join(f"IMAGE#{i} is {colour_of[i]}." for i in ids)


def make_world(root: Path, *, n_per_split: int = 12, image_size: int = 32, seed: int = 0,
               splits: dict | None = None) -> dict:
    """Write images + split files under ``root``; returns {split name: list of records}."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    splits = splits or SPLITS
    out = {}
    for subset in ("CC", "VG"):
        names = [n for n in splits if n.startswith(f"SparklesDialogue{subset}_")]
        if not names:
            continue
        base = root / "data" / f"SparklesDialogue{subset}"
        (base / "images").mkdir(parents=True, exist_ok=True)
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        ids = [str(100 + k) if subset == "CC" else 500 + k for k in range(16)]  # VG ids are ints upstream
        colour_of = {}
        for k, image_id in enumerate(ids):
            colour = list(COLOURS)[k % len(COLOURS)]
            colour_of[str(image_id)] = colour
            image = Image.new("RGB", (image_size, image_size), COLOURS[colour])
            # A white corner patch: random crops of the image must differ (augmentation tests rely on it).
            ImageDraw.Draw(image).rectangle([0, 0, image_size // 3 + k % 5, image_size // 4], fill=(255, 255, 255))
            image.save(base / "images" / f"{image_id}.jpg", quality=95)
        for name in names:
            turn, n = splits[name]
            records = []
            for _ in range(n_per_split):
                chosen = rng.sample(ids, n)
                sids = [str(i) for i in chosen]
                if turn == 1:
                    instruction = f"###Human: {_question(sids)}###Assistant: "
                    answer = _answer(sids, colour_of)
                else:
                    first, second = sids[:-1], sids[-1:]
                    instruction = (f"###Human: {_question(first)}###Assistant: {_answer(first, colour_of)}"
                                   f"###Human: {_question(second)}###Assistant: ")
                    answer = _answer(second, colour_of)
                records.append({"instruction": instruction, "uniform_question": "unused", "answer": answer,
                                "tgt_imgs": [{"image_id": i, "caption": colour_of[str(i)]} for i in chosen]})
            (base / "annotations" / f"{name}.json").write_text(json.dumps(records, indent=1))
            out[name] = records
    return out


def tokenizer_texts() -> list[str]:
    words = " ".join(COLOURS)
    return [f"###Human: What colour is IMAGE#{i}{SLOT} and IMAGE#{i + 1}{SLOT}?###Assistant: IMAGE#{i} is {c}.###"
            for i in range(100, 116) for c in COLOURS] * 3 + [words] * 5


_TRAINED_TOKENIZER: list[Path] = []  # trained once per test session, copied afterwards (training takes seconds)


def make_tokenizer(path: Path) -> Path:
    import shutil

    from sparkles.testing.tiny import write_tiny_tokenizer

    if (path / "tokenizer.json").is_file():
        return path
    if _TRAINED_TOKENIZER and (_TRAINED_TOKENIZER[0] / "tokenizer.json").is_file():
        shutil.copytree(_TRAINED_TOKENIZER[0], path, dirs_exist_ok=True)
    else:
        write_tiny_tokenizer(path, tokenizer_texts(), vocab_size=200)
        _TRAINED_TOKENIZER[:] = [path]
    return path


# every value given (no preset): a small SparklesChat trained end to end from scratch
TINY_MODEL = dict(arch="sparkleschat", model_type="", image_size=32, vit_patch_size=8, vit_width=32,
                  vit_depth=1, vit_heads=2, vit_mlp_dim=64, vit_precision="fp32", freeze_vit=False,
                  num_query_token=4, qformer_hidden=32, qformer_layers=1, qformer_heads=2, qformer_intermediate=64,
                  qformer_dropout=0.0, freeze_qformer=False, llm_from_scratch=True, llm_hidden=48, llm_layers=2,
                  llm_heads=2, llm_intermediate=96, llm_max_positions=512, freeze_llm=False, dtype="float32",
                  system_text="")


def training_world(base: Path) -> dict:
    """A small dialogue world with its tokenizer under ``base`` (the module fixture of the training tests)."""
    make_world(base / "root", n_per_split=12)
    return {"root": base / "root", "tok_dir": make_tokenizer(base / "tok"), "base": base}


def write_config(path: Path, *, root: Path, tok_dir: Path, datasets: dict | None = None, run: dict | None = None,
                 model: dict | None = None) -> Path:
    """A tiny run config (YAML) for the fixture world."""
    ds = datasets if datasets is not None else {n: {"sample_ratio": 2 if "turn1" in n else 1} for n in SPLITS}
    for entry in ds.values():
        entry.setdefault("vis_processor", {"train": {"name": "blip2_image_eval"}})
    run_cfg = dict(sparkles_root=str(root), lr_sched="linear_warmup_cosine_lr", init_lr=3e-3, min_lr=3e-4,
                   warmup_lr=1e-4, warmup_steps=4, max_epoch=2, iters_per_epoch=6, batch_size_train=4, seed=7,
                   output_dir="out", log_freq=3, progress_bar=False, tensorboard=False, max_length=256,
                   device="cpu", num_threads=1)  # one thread: tiny ops gain nothing from more, and shared CI
                                                 # cores make multi-threaded OpenMP stall
    run_cfg.update(run or {})
    cfg = {"model": {**TINY_MODEL, "llama_model": str(tok_dir), **(model or {})}, "datasets": ds, "run": run_cfg}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def trainable_weights(ckpt_path: Path) -> dict:
    import torch

    return torch.load(ckpt_path, map_location="cpu", weights_only=True)["model"]
