"""``python -m sparkles.data.wds``: write the datasets of a train config as webdataset ``.tar`` shards.

    python -m sparkles.data.wds --cfg-path train_configs/sparkleschat.yaml --sparkles_root ROOT --out ROOT/shards

One folder per dataset, with its shards and ``manifest.json`` (:mod:`.shards` writes and reads them); the command
prints the ``--options`` that train from them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import sparkles.models  # noqa: F401  (the model schema is part of every config)

from ..common.config import load_config, resolve_config_root
from ..common.logging import setup_logging
from . import builders
from .shards import write_shards


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparkles.data.wds",
                                     description="Write the datasets of a train config as webdataset .tar shards.")
    parser.add_argument("--cfg-path", required=True, help="train config YAML")
    parser.add_argument("--out", required=True, help="output directory (one sub-directory per dataset)")
    parser.add_argument("--sparkles_root", "--sparkles-root", dest="sparkles_root", default=None)
    parser.add_argument("--datasets", nargs="+", default=None, help="only these datasets (default: all)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--skip-bad-records", action="store_true",
                        help="count and leave out bad records instead of stopping (also run.skip_bad_records)")
    parser.add_argument("--options", nargs="+", default=[], help="config overrides key=value")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (they show only on a terminal)")
    args = parser.parse_args(argv)

    setup_logging(0)
    cfg = load_config(args.cfg_path, args.options)
    root = resolve_config_root(cfg, args.sparkles_root)
    skip_bad = args.skip_bad_records or bool(cfg.run.skip_bad_records)
    names = args.datasets or list(cfg.datasets.keys())
    unknown = [n for n in names if n not in cfg.datasets]
    if unknown:
        parser.error(f"--datasets: not in {args.cfg_path}: {', '.join(unknown)}")
    out = Path(args.out)
    hints = []
    for name in names:
        dcfg = cfg.datasets[name]
        records = builders.load_records(name, dcfg, root=root, skip_bad=skip_bad)
        manifest = write_shards(records, out / name, shard_size=args.shard_size, skip_bad=skip_bad,
                                image_key_prefix=builders.image_key_prefix(dcfg), progress=not args.no_progress)
        n_skip = len(manifest["skipped"])
        line = f"{name}: {manifest['num_samples']} samples in {len(manifest['shards'])} shard(s)"
        print(line + (f", {n_skip} bad record(s) skipped" if n_skip else ""))
        try:
            rel = (out / name).resolve().relative_to(root.resolve())
        except ValueError:
            rel = (out / name).resolve()
        hints.append(f"datasets.{name}.shards={rel}")
    print("train from the shards with:  --options " + " ".join(hints))
    return 0


if __name__ == "__main__":
    sys.exit(main())
