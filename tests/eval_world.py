"""The tiny evaluation world the evaluate.py tests share: a random tiny SparklesChat saved as config + checkpoint,
BISON / NLVR2 / SparklesEval annotation files with Pillow images, and a scripted judge reply."""

import json
import random
import re
from pathlib import Path

import torch
from PIL import Image

from sparkles.testing.tiny import TINY_SIZES, build_tiny_model

N = 6  # items per benchmark


def _image(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    im = Image.new("RGB", (40, 40), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(40):
        im.putpixel((rng.randrange(40), rng.randrange(40)), tuple(rng.randrange(256) for _ in range(3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def build_world(root: Path) -> dict:
    """The world under ``root``: ``{"root": root, "cfg": <the model config>}``."""
    ev = root / "evaluation"
    bison = []
    for k in range(N):
        a, b = 1000 + 2 * k, 1001 + 2 * k
        _image(ev / "BISON/images" / f"COCO_{a}.jpg", a)
        _image(ev / "BISON/images" / f"COCO_{b}.jpg", b)
        bison.append({"evaluation_id": k, "caption": f"picture {k} with red circles",
                      "true_image_id": a if k % 2 == 0 else b,
                      "image_candidates": [{"image_id": a, "image_filename": f"COCO_{a}.jpg"},
                                           {"image_id": b, "image_filename": f"COCO_{b}.jpg"}]})
    _write(ev / "BISON/annotations/sparkles_evaluation_bison_annotations.json", bison)
    nlvr2 = []
    for k in range(N):
        _image(ev / "NLVR2/images" / f"dev-{k}-0-img0.png", 50 + k)
        _image(ev / "NLVR2/images" / f"dev-{k}-0-img1.png", 80 + k)
        nlvr2.append({"evaluation_id": 40 + k, "identifier": f"dev-{k}-0-{k % 3}", "sentence": f"There are {k} dogs.",
                      "label": "True" if k % 3 else "False"})
    _write(ev / "NLVR2/annotations/sparkles_evaluation_nlvr2_annotations.json", nlvr2)
    sparkles = []
    for k in range(N):
        a, b, c = 300 + 3 * k, 301 + 3 * k, 302 + 3 * k
        for i in (a, b, c):
            _image(ev / "SparklesEval/images" / f"{i}.jpg", i)
        sparkles.append({"evaluation_id": 10 + k, "dialogue": [
            {"role": "user", "content": f"Compare IMAGE#{a}<Img><ImageHere></Img> with IMAGE#{b}<Img><ImageHere></Img> "
                                        f"(dialogue-{k}).",
             "images": [{"image_id": a, "caption": f"caption {a}"}, {"image_id": b, "caption": f"caption {b}"}]},
            {"role": "assistant", "content": f"Reference answer one of dialogue-{k}."},
            {"role": "user", "content": f"Now add IMAGE#{c}<Img><ImageHere></Img> to IMAGE#{a}.",
             "images": [{"image_id": c, "caption": f"caption {c}"}]},
            {"role": "assistant", "content": f"Reference answer two of dialogue-{k}."}]})
    _write(ev / "SparklesEval/annotations/sparkles_evaluation_sparkleseval_annotations.json", sparkles)

    mdir = root / "models/tiny_test"
    model = build_tiny_model(mdir, seed=0, init_std=0.3)
    (mdir / "ckpt").mkdir(parents=True)
    torch.save({"model": model.state_dict()}, mdir / "ckpt/checkpoint_last.pth")
    lines = ["model:", "  arch: sparkleschat", "  model_type: ''", "  llama_model: models/tiny_test/tokenizer",
             "  ckpt: models/tiny_test/ckpt/checkpoint_last.pth", "  system_text: ''"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in {**TINY_SIZES, "freeze_vit": True, "freeze_qformer": True,
                                                       "freeze_llm": True}.items()]
    cfg = root / "tiny_eval.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    return {"root": root, "cfg": cfg}


def set_api_env(monkeypatch):
    """A dummy key and no distributed / Azure / root variables: the judge talks to the local server only."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-dummy-test-key")
    for var in ("OPENAI_API_BASE", "OPENAI_ORGANIZATION", "RANK", "WORLD_SIZE", "LOCAL_RANK", "SPARKLES_ROOT"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def judge_reply(request: dict) -> str:
    """A well-formed judge reply whose ratings depend on the dialogue number k: A1 (k+1, 5, 6), A2 (7, 8, k+2)."""
    k = int(re.search(r"dialogue-(\d+)", request["messages"][-1]["content"]).group(1))

    def block(name, c):
        body = "".join(f'- (C{i + 1}) Explanation: "ok" Rating: [[{v}]]\n' for i, v in enumerate(c))
        return f"* Evaluating {name}\n{body}Therefore, the overall rating of {name} is [[{round(sum(c) / 3)}]]\n"
    return block("A1", [k + 1, 5, 6]) + block("A2", [7, 8, k + 2])


def expected_overall(ks):
    per = [((k + 1 + 5 + 6) / 3 + (7 + 8 + k + 2) / 3) / 2 for k in ks]
    return sum(per) / len(per)
