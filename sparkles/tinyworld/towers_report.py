"""What the stage-0 towers' item queries read on the world's held-out BISON and NLVR2 items.

The towers that read the question (``train_configs/sparkleschat_tiny_towers.yaml``) train read-out heads
on each item query: the count of the message's *i*-th item and the cell of its single object. Their training
checkpoint keeps those heads (the exported ``blip2_towers.pth`` does not), so this tool runs the tagger on every
BISON candidate image with its evaluation prompt and on every NLVR2 image with its statement, and reports:

- per caption item, whether the heads' count (and, for a positioned item, place) makes the item hold exactly when
  the scene does — split by the item's truth, so a decoy's false item, the one that decides a pair, is apart;
- the BISON pairs in which exactly one image has every item holding by the heads (what a decoder that copies the
  item tokens perfectly could get right without guessing);
- the NLVR2 asked count (the statement's counted kind) right, per image.

This is the ceiling the dialogue stage's read-out works under: the decoder sees these query tokens (projected),
not the heads. ::

    python -m sparkles.tinyworld.towers_report --root outputs/tiny \\
        [--checkpoint models/sparkleschat_tiny_towers/checkpoint_last.pth] \\
        [--config train_configs/sparkleschat_tiny_towers.yaml]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..common.config import load_config
from ..common.io import atomic_write_json
from ..processors.image import Blip2ImageEvalProcessor
from .instruction_tags import held_out_items
from .language import parse_items
from .scenes import GRID, POSITION_NAMES
from .tasks import fact_supports, parse_question
from .towers import TowerPretrainTask, TowerTagger
from .writers import load_scenes

DEFAULT_CHECKPOINT = "models/sparkleschat_tiny_towers/checkpoint_last.pth"
DEFAULT_CONFIG = "train_configs/sparkleschat_tiny_towers.yaml"


def load_tagger(config: Path, checkpoint: Path, root: Path) -> TowerTagger:
    """The :class:`~.towers.TowerTagger` of the tower config with a training checkpoint's towers and heads."""
    cfg = load_config(config)
    tagger = TowerPretrainTask(cfg).build_model(root=root, device=torch.device("cpu"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    result = tagger.load_state_dict(state, strict=False)
    heads = [k for k in result.missing_keys if k.startswith("item_")]
    if heads:
        raise ValueError(f"{checkpoint}: not a stage-0 checkpoint (the towers with their item heads; missing "
                         f"{heads[:3]})")
    return tagger.eval()


def item_holds_by(count: int, cell: int, claim) -> bool:
    """Whether a count and the cell of the single object (or the "not one" class past the grid) make a caption item
    hold: ``tasks.fact_supports`` with the cell named as the world names places."""
    return fact_supports(claim, (count, POSITION_NAMES[divmod(cell, GRID)] if cell < GRID * GRID else None))


def towers_report(tagger: TowerTagger, root: Path, batch_size: int = 32) -> dict:
    scenes = load_scenes(root)
    process = Blip2ImageEvalProcessor(image_size=int(tagger.cfg.image_size))

    def read(samples):
        with torch.no_grad():
            for start in range(0, len(samples), batch_size):
                chunk = samples[start:start + batch_size]
                pixels = torch.stack([process(root / scenes[s.image]["file"]) for s in chunk])
                out = tagger(pixels, [s.message for s in chunk])
                yield from zip(chunk, out["item_count"].argmax(-1).tolist(), out["item_place"].argmax(-1).tolist())

    bison, nlvr2, _ = held_out_items(root, limit=10**9)
    items, fits = Counter(), []
    for sample, counts, places in read(bison):
        claims = parse_items(parse_question(sample.message).text)
        fits_here = True
        for (count, place), claim, got_count, got_place in zip(sample.items, claims, counts, places):
            truth, said = item_holds_by(count, place, claim), item_holds_by(got_count, got_place, claim)
            key = ("true" if truth else "false") + (" positioned" if claim.position else "") + " items"
            items[key, "right"] += said == truth
            items[key, "all"] += 1
            fits_here &= said
        fits.append(fits_here)
    pairs = list(zip(fits[0::2], fits[1::2]))  # held_out_items lists each pair's two candidates in turn
    # count classes run 0 .. the most objects a scene holds, so a scene's count is always a class
    asked = [counts[0] == sample.items[0][0] for sample, counts, _ in read(nlvr2)]
    return {"bison_items": {key: {"agreement": round(items[key, "right"] / items[key, "all"], 3),
                                  "items": items[key, "all"]}
                            for key in sorted({k for k, _ in items})},
            "bison_pairs_with_one_fitting_image": {"share": round(sum(a != b for a, b in pairs) / len(pairs), 3),
                                                   "pairs": len(pairs)},
            "nlvr2_asked_count_right": {"share": round(sum(asked) / len(asked), 3), "images": len(asked)}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, type=Path, help="the synthetic world (run.sh: outputs/tiny)")
    p.add_argument("--checkpoint", help=f"stage-0 training checkpoint, under --root unless absolute "
                                        f"(default {DEFAULT_CHECKPOINT})", default=DEFAULT_CHECKPOINT)
    p.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG), help="the stage-0 config it was trained with")
    p.add_argument("--out", type=Path, help="also write the report as JSON here")
    args = p.parse_args(argv)
    checkpoint = args.root / args.checkpoint
    if not checkpoint.is_file():
        print(f"towers_report: no checkpoint at {checkpoint} (train stage 0 first: run.sh)", file=sys.stderr)
        return 2
    try:
        report = towers_report(load_tagger(args.config, checkpoint, args.root), args.root)
    except (FileNotFoundError, ValueError) as exc:
        print(f"towers_report: {exc}", file=sys.stderr)
        return 2
    for key, row in report["bison_items"].items():
        print(f"BISON {key}: the item heads say whether it holds right for {row['agreement']} ({row['items']})")
    row = report["bison_pairs_with_one_fitting_image"]
    print(f"BISON pairs in which exactly one image fits by the item heads: {row['share']} ({row['pairs']})")
    row = report["nlvr2_asked_count_right"]
    print(f"NLVR2 asked count right: {row['share']} ({row['images']} images)")
    if args.out:
        atomic_write_json(args.out, report, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
