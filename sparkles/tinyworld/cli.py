"""Command line: ``python -m sparkles.tinyworld --out ROOT --seed S [--preset default|ci] ...``.

Generates the world into ROOT (upstream layout), then trains the tiny tokenizer on its texts into
``ROOT/models/tiny_llm`` (skipped with ``--no-tokenizer``), then writes the world's small I4 split
(``ROOT/evaluation/I4``, :mod:`.i4`; ``--num-i4 0`` skips it, ``--i4-only`` writes it alone into a world already
there).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..common.io import atomic_write_json
from ..common.paths import WORLD_REPORT
from ..models.tokenizer import train_tokenizer
from .build import MIX_KINDS, PRESETS, REASONING_KINDS, WorldConfig, build_world
from .i4 import (PER_DATASET as I4_PER_DATASET, build_i4_for_root, build_i4_for_world, write_baseline_predictions,
                 write_i4)
from .writers import TOKENIZER_DIR, iter_world_texts, record_written, scenes_file, write_world


def _weights_parser(flag: str, kinds: tuple[str, ...]):
    """An argparse type for ``kind=weight,kind=weight`` with ``kinds`` the names allowed."""
    def parse(text: str) -> dict:
        weights = {}
        for part in text.split(","):
            if not part.strip():
                continue
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in kinds:
                raise argparse.ArgumentTypeError(f"{flag} expects kind=weight pairs with kinds {', '.join(kinds)}; "
                                                 f"got {part!r}")
            try:
                weights[name] = float(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{flag}: weight of {name!r} is not a number: {value!r}") from None
        return weights
    return parse


def make_config(args: argparse.Namespace) -> WorldConfig:
    """Preset values, overridden by every option given explicitly."""
    values = dict(PRESETS[args.preset])
    for name in ("num_train", "num_bison", "num_nlvr2", "num_sparkleseval", "num_reasoning", "image_size",
                 "cc_fraction", "max_answer_words", "vocab_size"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    config = WorldConfig(seed=args.seed, **values)
    # Kinds not named keep their default weight; name a kind with weight 0 to drop it.
    if args.mix:
        config.mix.update(args.mix)
    if args.reasoning_mix:
        config.reasoning_mix.update(args.reasoning_mix)
    return config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparkles.tinyworld",
                                description="Generate the synthetic multi-image world in the upstream Sparkles "
                                            "formats (SparklesDialogue, SparklesEval, BISON, NLVR2).")
    p.add_argument("--out", required=True, help="Sparkles root to write into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="default: 4,000 training dialogues, BISON/NLVR2 150, SparklesEval 50; ci: 300 / 20 / 20")
    p.add_argument("--num-train", dest="num_train", type=int, help="training dialogues (CC + VG)")
    p.add_argument("--cc-fraction", dest="cc_fraction", type=float, help="share of training dialogues in CC")
    p.add_argument("--num-bison", dest="num_bison", type=int)
    p.add_argument("--num-nlvr2", dest="num_nlvr2", type=int)
    p.add_argument("--num-sparkleseval", dest="num_sparkleseval", type=int)
    p.add_argument("--num-reasoning", dest="num_reasoning", type=int,
                   help="text-only reasoning drills of all kinds (default 12,000; ci: 600)")
    p.add_argument("--image-size", dest="image_size", type=int, help="rendered image side in pixels (default 96)")
    p.add_argument("--reasoning-mix", dest="reasoning_mix", type=_weights_parser("--reasoning-mix", REASONING_KINDS),
                   help="shares of the drill kinds, e.g. 'caption=1' (kinds: bison, nlvr2 (default 1 each), caption "
                        "(single-image caption checks, default 0))")
    p.add_argument("--mix", type=_weights_parser("--mix", MIX_KINDS),
                   help=f"task mix weights, e.g. 'bison=0.3,nlvr2=0.3' (kinds: {', '.join(MIX_KINDS)})")
    p.add_argument("--max-answer-words", dest="max_answer_words", type=int)
    p.add_argument("--vocab-size", dest="vocab_size", type=int, help="tiny tokenizer vocabulary (default 2048)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image rendering processes")
    p.add_argument("--num-i4", dest="num_i4", type=int,
                   help="instances per dataset of the I4 split (default 20; ci: 6; 0: none)")
    p.add_argument("--i4-baseline", dest="i4_baseline", default=None, metavar="DIR",
                   help="only write the trivial baseline's I4 predictions for the world in --out into "
                        "DIR/<dataset>/pred.json (always the first choice; the commonest answer when open-ended)")
    p.add_argument("--i4-only", dest="i4_only", action="store_true",
                   help="write only the I4 split of the world already in --out (replacing a previous one)")
    p.add_argument("--force", action="store_true", help="replace a world already in --out")
    p.add_argument("--no-tokenizer", action="store_true", help="do not train the tiny tokenizer")
    p.add_argument("--quiet", action="store_true")
    return p


def train_world_tokenizer(root: Path, vocab_size: int) -> Path:
    """Train the tiny model's tokenizer on every text of the world into ``root/models/tiny_llm``."""
    return Path(train_tokenizer(iter_world_texts(root), root / "models" / "tiny_llm", vocab_size=vocab_size))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = make_config(args)
        config.validate()
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    root = Path(args.out)
    num_i4 = I4_PER_DATASET[args.preset] if args.num_i4 is None else args.num_i4
    if num_i4 < 0:
        print(f"error: --num-i4 {num_i4} must be >= 0", file=sys.stderr)
        return 2
    if args.i4_baseline:
        for dataset, path in write_baseline_predictions(root / "evaluation" / "I4", args.i4_baseline).items():
            print(f"[I4 baseline] {dataset}: {path}")
        return 0
    if args.i4_only:
        return _i4_only(root, num_i4, args)
    if scenes_file(root).exists() and not args.force:
        print(f"error: {scenes_file(root)} exists: {root} already holds a world; pass --force to replace it",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        world = build_world(config)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t_build = time.perf_counter() - t0
    # What this command writes after the world is checked with it and listed in its manifest (I4 stays apart:
    # its split has its own replacement rule, and the world's files do not depend on it).
    then = [WORLD_REPORT] if args.no_tokenizer else [TOKENIZER_DIR, WORLD_REPORT]
    try:
        summary = write_world(world, root, workers=args.workers, force=args.force, progress=not args.quiet,
                              then=then)
    except (FileExistsError, ValueError) as exc:  # a folder that is not the generator's; an unreadable manifest
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t_write = time.perf_counter() - t0 - t_build
    tok_dir = None if args.no_tokenizer else train_world_tokenizer(root, config.vocab_size)
    if tok_dir:
        record_written(root, [TOKENIZER_DIR])
    # Last, and apart from the world's files: no I4 text reaches the tokenizer or training data, and the files
    # written above (generation_report.json below included) are what they were before the split existed.
    i4_summary = write_i4(build_i4_for_world(world, num_i4), root, config.image_size, workers=args.workers)
    t_total = time.perf_counter() - t0
    if not args.quiet:
        for name, n in [*summary.items(), *i4_summary.items()]:
            print(f"{n:7d}  {name}")
        if tok_dir:
            print(f"tokenizer: {tok_dir}")
        print(f"world written to {root} in {t_total:.1f}s (build {t_build:.1f}s, write+render {t_write:.1f}s)")
    report = {"config": config.to_json(), "files": summary,
              "tokenizer": TOKENIZER_DIR if tok_dir else None}
    # Timings vary run to run, so they stay out of the (byte-deterministic) world files.
    atomic_write_json(root / WORLD_REPORT, report)
    record_written(root, [WORLD_REPORT])
    return 0


def _i4_only(root: Path, num_i4: int, args: argparse.Namespace) -> int:
    """``--i4-only``: the I4 split of the world in ``root`` (rebuilt from ``world/scenes.json``), nothing else."""
    try:
        split, image_size = build_i4_for_root(root, num_i4)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = write_i4(split, root, image_size, workers=args.workers)
    if not args.quiet:
        for name, n in summary.items():
            print(f"{n:7d}  {name}")
        print(f"I4 split written to {root / 'evaluation' / 'I4'}")
    return 0
