"""Hub-ready artefacts: a trained model as one folder, the data of a Sparkles root as ``datasets``, and back.

    python -m sparkles.tools.hub model --cfg-path eval_configs/sparkles_tiny.yaml --out hub/model \\
        --summary outputs/tiny/summary.json [--push-to-hub owner/name]
    python -m sparkles.tools.hub dataset --sparkles_root outputs/tiny --out hub/data [--name BISON ...] \\
        [--push-to-hub owner/name]
    python -m sparkles.tools.hub import-dataset hub/data/BISON --sparkles_root /path/to/root

``model`` loads the model a config names (as the demo does) and writes it with
:func:`sparkles.models.hub.save_pretrained`; ``dataset`` saves sets with :func:`sparkles.data.hf_datasets.export_root`;
``import-dataset`` writes a saved set back under a root. ``--push-to-hub`` uploads what was written (network
access and a write token, e.g. ``$HF_TOKEN``, needed). docs/hub.md describes the folder and the columns.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..common.config import ConfigError, resolve_config_root
from ..common.paths import MissingPathError, resolve_root
from ..data import hf_datasets
from ..models import hub
from ..models.loaders import CheckpointError


def _model(args) -> int:
    from ..serve.loading import LoadError, load_model

    figures = []
    for path in [*([args.summary] if args.summary else []), *(args.metrics or [])]:
        figures += hub.figures_from_file(path)
    card = hub.CardInfo(model_name=args.model_name, license=args.license, datasets=args.datasets or (),
                        training_data=args.training_data or (), figures=figures, repo_id=args.push_to_hub or "")
    try:
        model, cfg = load_model(args.cfg_path, options=args.options, sparkles_root=args.sparkles_root)
    except LoadError as exc:
        print(f"hub: {exc}", file=sys.stderr)
        return 1
    try:
        root = resolve_config_root(cfg, args.sparkles_root)
    except MissingPathError:
        root = None  # no root: absolute base paths stay as they are
    out = hub.save_pretrained(model, args.out, weights=args.weights, root=root, card=card)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    if args.push_to_hub:
        hub.push_to_hub(out, args.push_to_hub, private=args.private or None)
        print(f"uploaded to https://huggingface.co/{args.push_to_hub}")
    return 0


def _dataset(args) -> int:
    root = resolve_root(args.sparkles_root)
    written = hf_datasets.export_root(root, args.out, args.name)
    for name, path in written.items():
        print(f"{name}: {path}")
    if args.push_to_hub:
        hf_datasets.push_to_hub(args.out, args.push_to_hub, list(written), private=args.private or None)
        print(f"uploaded {len(written)} config(s) to https://huggingface.co/datasets/{args.push_to_hub}")
    return 0


def _import(args) -> int:
    root = resolve_root(args.sparkles_root)
    name = args.name or Path(args.saved).name
    path = hf_datasets.import_dataset(hf_datasets.load_dataset_dir(args.saved), root, name, overwrite=args.overwrite)
    print(f"{name}: wrote {path} and its images")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sparkles.tools.hub", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("model", help="write a trained model as one Hub folder")
    m.add_argument("--cfg-path", required=True, help="the model's evaluation config (as evaluate.py / demo.py take)")
    m.add_argument("--sparkles_root", default=None, help="root for the config's relative paths")
    m.add_argument("--options", nargs="+", default=None, metavar="KEY=VALUE", help="override config values")
    m.add_argument("--out", required=True, help="the folder to write")
    m.add_argument("--weights", choices=hub.WEIGHT_MODES, default="auto",
                   help="all tensors, or only those no base file holds (auto: all for a decoder trained from "
                        "scratch, else the trained ones)")
    m.add_argument("--summary", default=None, help="a run's summary.json: its figures go into the model card")
    m.add_argument("--metrics", nargs="+", default=None, metavar="FILE",
                   help="*_metrics.json files of evaluate.py --merge-results: their figures go into the card")
    m.add_argument("--datasets", nargs="+", default=None, metavar="ID", help="Hub dataset ids of the training data")
    m.add_argument("--training-data", nargs="+", default=None, metavar="TEXT",
                   help="the training data as the card lists it, one item each (default: --datasets)")
    m.add_argument("--model-name", default="SparklesChat")
    m.add_argument("--license", default="bsd-3-clause", help="a Hub license id")
    m.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload the folder to this model repo")
    m.add_argument("--private", action="store_true", help="create the Hub repo as private")
    m.set_defaults(run=_model)

    d = sub.add_parser("dataset", help="save a root's annotation sets as Hugging Face datasets")
    d.add_argument("--sparkles_root", default=None, help="the root to read (default: $SPARKLES_ROOT)")
    d.add_argument("--name", nargs="+", default=None,
                   help="sets to export (default: every one present), e.g. SparklesEval BISON NLVR2 "
                        "SparklesDialogueCC SparklesDialogueCC_turn1_2img")
    d.add_argument("--out", required=True, help="folder that receives one saved DatasetDict per set")
    d.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="upload the sets as configs of this dataset repo")
    d.add_argument("--private", action="store_true", help="create the Hub repo as private")
    d.set_defaults(run=_dataset)

    i = sub.add_parser("import-dataset", help="write a saved set back under a root (annotations and images)")
    i.add_argument("saved", help="a folder written by the dataset command (OUT/<name>)")
    i.add_argument("--sparkles_root", default=None, help="the root to write into (default: $SPARKLES_ROOT)")
    i.add_argument("--name", default=None, help="the set's name (default: the folder's name)")
    i.add_argument("--overwrite", action="store_true", help="replace an existing annotation file")
    i.set_defaults(run=_import)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, CheckpointError, MissingPathError, hf_datasets.DatasetExportError) as exc:
        print(f"hub: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
