"""How well a model chats the way the demo talks to it: the world's held-out demo chats, scored by its judge.

    python -m sparkles.tinyworld.demo_chat --sparkles_root outputs/tiny

Each chat of ``evaluation/DemoChat/annotations/demo_chats.json`` is replayed through a chat session as a demo
user has it: the turn's images are uploaded (numbered IMAGE#1, IMAGE#2, … in upload order), the question names
each one with a ✨ where it goes, the model answers greedily, then the second turn uploads its image and asks
about it and an earlier one. The world's reference judge rates both answers (C1–C3, each 1–10); the score is
SparklesEval's: the mean over the two turns of the mean criterion. The chats with the model's answers and the
judge entries go to ``evaluation/DemoChat/results/demo_chat_<model name>.json``; ``run.sh`` reports the score in
``summary.json`` as ``demo_chat_score``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..common.io import atomic_write_json, read_json
from ..common.logging import progress_bar
from ..conversation.template import IMAGE_MARKER
from ..eval.benchmarks.sparkleseval import score
from .build import image_file
from .judge import ReferenceJudge
from .writers import DEMO_CHATS_FILE

log = logging.getLogger(__name__)

JUDGE = "reference"
RESULTS_DIR = "evaluation/DemoChat/results"


def as_typed(content: str) -> str:
    """A world question as a demo user types it: ``IMAGE#1✨`` where the world writes the image slot."""
    return content.replace(IMAGE_MARKER, "✨")


def replay(chat, root: Path, record: dict, *, max_new_tokens: int) -> list[dict]:
    """The chat's four messages with the model's answers, asked through one session as the demo asks."""
    from ..processors.image import open_image

    session = chat.session()
    out = []
    for user in record["dialogue"][0::2]:
        for image in user.get("images", []):  # one at a time, as the demo adds each uploaded file
            session.add_image(open_image(root / image_file("DemoChat", image["image_id"])))
        session.ask(as_typed(user["content"]))
        reply = session.answer(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        out += [dict(user), {"role": "assistant", "content": reply}]
    return out


def evaluate(chat, root: Path, *, model_name: str, max_new_tokens: int = 120, progress: bool = True) -> dict:
    """Replay and judge every demo chat of ``root``; returns (and writes) the result with its ``score``."""
    path = root / DEMO_CHATS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the world in {root} has no demo chats; write it again with "
                                f"`python -m sparkles.tinyworld --out {root} --force`")
    records = read_json(path, what="demo chats file")
    judge = ReferenceJudge(root)
    items = []
    for record in progress_bar(records, desc="demo chats", unit="chat", enabled=progress):
        dialogue = replay(chat, root, record, max_new_tokens=max_new_tokens)
        outcome = judge.judge(dialogue)
        items.append({"evaluation_id": record["evaluation_id"], "dialogue": dialogue,
                      "reference_answers": [m["content"] for m in record["dialogue"][1::2]], JUDGE: outcome.entry})
    metrics = score(items, JUDGE)
    result = {"model_name": model_name, "judge": judge.settings(), "max_new_tokens": max_new_tokens,
              "score": metrics["overall"], "A1": metrics["A1"], "A2": metrics["A2"], "chats": len(items),
              "items": items}
    atomic_write_json(root / RESULTS_DIR / f"demo_chat_{model_name}.json", result)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..eval.cli import model_name_from_ckpt
    from ..serve.loading import DEFAULT_CFG_PATH, LoadError, load_model, make_chat

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg-path", default=DEFAULT_CFG_PATH, help=f"the model's config (default: {DEFAULT_CFG_PATH})")
    p.add_argument("--sparkles_root", "--sparkles-root", dest="sparkles_root", default=None,
                   help="the world's folder (default: the config's run.sparkles_root)")
    p.add_argument("--max-new-tokens", type=int, default=120, help="as run.sh evaluates SparklesEval")
    p.add_argument("--options", nargs="+", default=None, help="config overrides key=value")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(levelname)s] %(name)s: %(message)s")
    from ..common.config import resolve_config_root

    try:
        model, cfg = load_model(args.cfg_path, options=args.options, sparkles_root=args.sparkles_root)
    except LoadError as exc:
        print(f"demo_chat: {exc}", file=sys.stderr)
        return 2
    root = Path(resolve_config_root(cfg, args.sparkles_root))
    chat = make_chat(model, cfg)
    ckpt = Path(cfg.model.ckpt).expanduser()
    name = model_name_from_ckpt(ckpt if ckpt.is_absolute() else root / ckpt)  # evaluate.py's name for the run
    try:
        result = evaluate(chat, root, model_name=name, max_new_tokens=args.max_new_tokens,
                          progress=not args.no_progress)
    except FileNotFoundError as exc:
        print(f"demo_chat: {exc}", file=sys.stderr)
        return 2
    print(f"demo chat score ({result['chats']} chats, reference judge): {result['score']:.2f} / 10 "
          f"(A1 {result['A1']:.2f}, A2 {result['A2']:.2f}) -> {root / RESULTS_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
