"""Render SparklesDialogue files and evaluation results as browsable, self-contained HTML pages.

Examples (from the repository root)::

    python dataset/visualize_data_in_html.py --sparkles_root ROOT --visualize_SparklesDialogue
    python dataset/visualize_data_in_html.py --sparkles_root ROOT --visualize_eval_results
    python dataset/visualize_data_in_html.py --input results/BISON_mymodel_acc0.567.json --output bison.html

Each JSON file becomes ``<same name>.html`` beside it (plus ``_page<k>.html`` files past ``--page-size`` items).
Images are referenced by relative URL, ``<relative_dir>/<image_id>.jpg`` for dialogues and
``<relative_dir>/<file name>`` for BISON/NLVR2 results; the default ``../images`` fits the upstream layout
(annotations/ or results/ next to images/). The page kind (dialogues or two-choice results) is read from the
records unless ``--kind`` says it.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # run as `python dataset/X.py` from a checkout without installing
    sys.path.insert(0, str(_REPO_ROOT))

from sparkles.common.io import read_json  # noqa: E402
from sparkles.common.paths import DIALOGUE_SUBSETS, EVAL_DATASETS, MissingPathError, SparklesLayout  # noqa: E402


def load_records(path: Path) -> list:
    """The JSON list in ``path``; errors name the file."""
    data = read_json(path, what="input file")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def detect_kind(records: list, path: Path) -> str:
    """'dialogue' for SparklesDialogue/SparklesEval records, 'choice' for BISON/NLVR2 result records."""
    if not records:
        return "dialogue"
    if all(isinstance(r, dict) and "dialogue" in r for r in records):
        return "dialogue"
    if all(isinstance(r, dict) and "predict" in r and "label" in r for r in records):
        return "choice"
    raise ValueError(f"{path}: records are neither dialogues (with 'dialogue') nor two-choice results "
                     "(with 'predict' and 'label'); pass --kind to force one")


def model_name_from_path(path: Path, kind: str) -> str | None:
    """Model name from upstream result names: ``<dataset>_<model>[_acc0.567].json``; GPT-4 for dialogue data."""
    stem = path.stem
    if stem.startswith("SparklesDialogue") or stem.startswith("sparkles_evaluation_"):
        return "gpt-4 (reference dialogues)"
    for dataset in EVAL_DATASETS:
        if stem.startswith(dataset + "_"):
            return re.sub(r"_acc\d+(?:\.\d+)?$", "", stem[len(dataset) + 1:]) or None
    return None


def render_file(path: Path, output: Path | None, *, relative_dir: str, page_size: int, kind: str = "auto",
                model_name: str | None = None, title: str | None = None) -> list[Path]:
    """Render one JSON file; returns the HTML files written."""
    from sparkles.viz import html  # lazily: jinja2 only when something is rendered

    records = load_records(path)
    if kind == "auto":
        kind = detect_kind(records, path)
    output = output or path.with_suffix(".html")
    name = model_name or model_name_from_path(path, kind)
    if kind == "dialogue":
        return html.write_dialogue_page(records, output, relative_dir=relative_dir, page_size=page_size,
                                        title=title or path.stem, model_name=name)
    return html.write_choice_results_page(records, output, relative_dir=relative_dir, page_size=page_size,
                                          title=title or path.stem, model_name=name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparkles_root", default=None, help="Sparkles root (default: $SPARKLES_ROOT)")
    p.add_argument("--visualize_SparklesDialogue", action="store_true",
                   help="render data/SparklesDialogue{CC,VG}/annotations/SparklesDialogue{CC,VG}.json")
    p.add_argument("--visualize_eval_results", action="store_true",
                   help="render every .json under evaluation/{SparklesEval,BISON,NLVR2}/results/")
    p.add_argument("--input", type=Path, default=None, help="render this one JSON file")
    p.add_argument("--output", type=Path, default=None, help="HTML file for --input (default: beside it)")
    p.add_argument("--kind", choices=("auto", "dialogue", "choice"), default="auto")
    p.add_argument("--relative_dir", default="../images",
                   help="image directory relative to the HTML file (default: ../images)")
    p.add_argument("--page-size", type=int, default=500, help="records per HTML file (default: 500)")
    p.add_argument("--model-name", default=None, help="assistant/model name shown on the page")
    p.add_argument("--title", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.input or args.visualize_SparklesDialogue or args.visualize_eval_results):
        build_parser().error("nothing to do: pass --input FILE, --visualize_SparklesDialogue or "
                             "--visualize_eval_results")
    if args.output and not args.input:
        build_parser().error("--output needs --input")
    if args.page_size < 1:
        build_parser().error("--page-size must be >= 1")
    common = dict(relative_dir=args.relative_dir, page_size=args.page_size)
    written: list[Path] = []
    try:
        if args.input:
            written += render_file(args.input, args.output, kind=args.kind, model_name=args.model_name,
                                   title=args.title, **common)
        if args.visualize_SparklesDialogue or args.visualize_eval_results:
            layout = SparklesLayout.from_root(args.sparkles_root)
            jobs: list[Path] = []
            missing: list[str] = []
            if args.visualize_SparklesDialogue:
                for subset in DIALOGUE_SUBSETS:
                    f = layout.dialogue_file(subset)
                    (jobs.append(f) if f.is_file() else missing.append(str(f)))
            if args.visualize_eval_results:
                for dataset in EVAL_DATASETS:
                    d = layout.eval_results(dataset)
                    found = sorted(d.glob("*.json")) if d.is_dir() else []
                    jobs += found
                    if not found:
                        missing.append(f"{d}/*.json")
            for m in missing:
                print(f"[visualize] not found, skipped: {m}", file=sys.stderr)
            if not jobs:
                raise MissingPathError(f"no input files under {layout.root} (looked for: {', '.join(missing)})")
            for f in jobs:
                written += render_file(f, None, kind=args.kind, model_name=args.model_name, **common)
    except (MissingPathError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in written:
        print(f"[visualize] wrote {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
