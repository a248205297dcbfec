"""Render SparklesDialogue files and evaluation results as browsable, self-contained HTML pages.

Examples (from the repository root)::

    python dataset/visualize_data_in_html.py --sparkles_root ROOT --visualize_SparklesDialogue
    python dataset/visualize_data_in_html.py --sparkles_root ROOT --visualize_eval_results
    python dataset/visualize_data_in_html.py --visualize_eval_results downloads/results/ BISON_x_acc0.567.json
    python dataset/visualize_data_in_html.py --input results/BISON_mymodel_acc0.567.json --output bison.html

Each result or dialogue file becomes ``<same name>.html`` beside it (plus ``_page<k>.html`` files past
``--page-size`` items). What a JSON file is comes from its content, not its name:

- a list of dialogue records (SparklesDialogue, SparklesEval annotations and results) or of BISON/NLVR2
  result records is rendered;
- a metrics object (``<dataset>_<model>_metrics.json``, written by the evaluation merge) is not rendered on its
  own: its headline numbers go into the header of its result file's page;
- a run manifest (``manifest.json``) is skipped with a note;
- anything else is reported by name as an error, after the other files are rendered.

``--visualize_eval_results`` without paths renders every JSON file in ``<root>/evaluation/<dataset>/results/``;
with paths, the given files and the JSON files directly inside the given directories. Subdirectories are not
scanned, each is named in a note: a run directory (``<dataset>_<model>/``, a shard file per slice and
``manifest.json``) holds the items that the merged result file beside it holds; name a run directory itself to
render its shard files (its manifest is then skipped with a note).

The exit status is 0 when every input was rendered or knowingly skipped, 2 when an input could not be read,
has an unknown layout or malformed records (the other inputs are rendered all the same).

Images are referenced by relative URL. Dialogue pages link ``<relative_dir>/<image_id>.jpg``. BISON/NLVR2
records name image paths (root-relative in our results, absolute paths of the authors' machine in the released
ones); the page links the first of these that exists: the recorded path (resolved against the root when
relative), ``<root>/evaluation/<dataset>/images/<file name>``, ``<relative_dir>/<file name>`` next to the page.
When none exists the recorded path is shown as text, unless ``--relative_dir`` was given, which is then linked
as asked (the images may be copied there later). The root is ``--sparkles_root``, else ``$SPARKLES_ROOT``,
else read off a file's location (``<root>/evaluation/<dataset>/results/...``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # run as `python dataset/X.py` from a checkout without installing
    sys.path.insert(0, str(_REPO_ROOT))

from sparkles.common.io import read_json  # noqa: E402
from sparkles.common.paths import (  # noqa: E402
    DIALOGUE_SUBSETS, ENV_VAR, EVAL_DATASETS, MissingPathError, SparklesLayout, image_by_id,
)

DEFAULT_RELATIVE_DIR = "../images"


class UnknownLayoutError(ValueError):
    """A JSON file that is neither a result list, a metrics file nor a run manifest."""


# ----------------------------------------------------------------------------------------------- what a file is
def _is_failed(record: Any) -> bool:
    """A failed item: its fields may be incomplete, so it does not decide the page kind."""
    from sparkles.viz.html import failure_of

    return isinstance(record, dict) and failure_of(record) is not None


def detect_kind(records: list, path: Path, dataset: Optional[str] = None) -> str:
    """'dialogue' for SparklesDialogue/SparklesEval records, 'choice' for BISON/NLVR2 result records.

    Failed items (``error`` or a non-ok ``status``) fit either kind; ``dataset`` decides when nothing else does.
    """
    if not records:
        return "choice" if dataset in ("BISON", "NLVR2") else "dialogue"
    if not all(isinstance(r, dict) for r in records):
        raise UnknownLayoutError(f"{path}: a list whose elements are not all JSON objects")
    settled = [r for r in records if not _is_failed(r)]
    if all("dialogue" in r for r in settled) and (settled or dataset not in ("BISON", "NLVR2")):
        return "dialogue"
    if all("predict" in r and "label" in r for r in settled):
        return "choice"
    raise UnknownLayoutError(f"{path}: records are neither dialogues (with 'dialogue') nor two-choice results "
                             "(with 'predict' and 'label'); pass --kind to force one")


def file_role(data: Any, path: Path) -> str:
    """'records', 'metrics' or 'manifest', from the content (see the module docstring)."""
    if isinstance(data, list):
        return "records"
    if isinstance(data, dict) and "dataset" in data and "model_name" in data:
        # The merge's metrics name their result file and count items; a manifest lists shards and settings.
        if isinstance(data.get("files"), dict) or isinstance(data.get("items"), int):
            return "metrics"
        if isinstance(data.get("shards"), list):
            return "manifest"
    kind = type(data).__name__ if not isinstance(data, dict) else "object with keys " + ", ".join(list(data)[:8])
    raise UnknownLayoutError(f"{path}: unknown layout (a JSON {kind}); expected a list of dialogue or BISON/NLVR2 "
                             "result records, an evaluation metrics object or a run manifest")


_SUFFIXES = re.compile(r"(?:_acc\d+(?:\.\d+)?|_\d+to\d+|_metrics)$")


def dataset_from_path(path: Path) -> Optional[str]:
    """The evaluation dataset a file belongs to: its name prefix, else an ``evaluation/<dataset>/`` parent."""
    for dataset in EVAL_DATASETS:
        if path.name.startswith(dataset + "_"):
            return dataset
    for parent in path.parents:
        if parent.name in EVAL_DATASETS and parent.parent.name == "evaluation":
            return parent.name
    return None


def model_name_from_path(path: Path, kind: str = "") -> str | None:
    """Model name from result names: ``<dataset>_<model>[_acc0.567 | _<from>to<to>].json``; for dialogue data
    the author of its reference dialogues (GPT-4, or the templates of the synthetic world that wrote the file)."""
    from sparkles.viz.html import reference_dialogues_label

    stem = path.stem
    if stem.startswith("SparklesDialogue") or stem.startswith("sparkles_evaluation_"):
        return reference_dialogues_label(path)
    for dataset in EVAL_DATASETS:
        if stem.startswith(dataset + "_"):
            return _SUFFIXES.sub("", stem[len(dataset) + 1:]) or None
    return None


def root_for(path: Path, explicit: Optional[Path]) -> Optional[Path]:
    """The Sparkles root for a file's images: the one given, else one read off ``<root>/evaluation/<dataset>/``."""
    if explicit is not None:
        return explicit
    for parent in path.resolve().parents:
        if parent.name in EVAL_DATASETS and parent.parent.name == "evaluation":
            return parent.parent.parent
    return None


# ------------------------------------------------------------------------------------------------ image URLs
def _url_to(target: Path, page_dir: Path) -> str:
    """A URL for ``target`` relative to the page (so a moved tree keeps working), else a file URI."""
    try:
        rel = os.path.relpath(target.resolve(), page_dir.resolve())
    except ValueError:  # another drive on Windows: no relative path exists
        return target.resolve().as_uri()
    return "/".join(urllib.parse.quote(part) for part in PurePosixPath(Path(rel).as_posix()).parts)


def choice_image_url(page_dir: Path, root: Optional[Path], dataset: Optional[str], relative_dir: str,
                     link_anyway: bool) -> Callable[[str], Optional[str]]:
    """URL maker for BISON/NLVR2 ``img_paths`` (order of candidates in the module docstring)."""
    from sparkles.viz.html import relative_path_url

    as_asked = relative_path_url(relative_dir)

    def url(img_path: str) -> Optional[str]:
        recorded = Path(str(img_path).replace("\\", "/")).expanduser()
        name = recorded.name
        candidates = [recorded] if recorded.is_absolute() else ([root / recorded] if root else [])
        if root is not None and dataset is not None:
            candidates.append(SparklesLayout(root).eval_images(dataset) / name)
        candidates.append(page_dir / relative_dir / name)
        for candidate in candidates:
            if candidate.is_file():
                return _url_to(candidate, page_dir)
        return as_asked(img_path) if link_anyway else None

    return url


def dialogue_image_url(page_dir: Path, root: Optional[Path], dataset: Optional[str],
                       relative_dir: str) -> Callable[[str], str]:
    """URL maker for dialogue images: the root's SparklesEval image when it exists, else ``<relative_dir>/<id>.jpg``."""
    from sparkles.viz.html import relative_image_url

    default = relative_image_url(relative_dir)
    if root is None or dataset != "SparklesEval":
        return default
    image_dir = SparklesLayout(root).eval_images(dataset)

    def url(image_id: str) -> str:
        candidate = image_by_id(image_dir, image_id)
        return _url_to(candidate, page_dir) if candidate.is_file() else default(image_id)

    return url


# ---------------------------------------------------------------------------------------------- metrics header
def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def metrics_summary(metrics: dict, name: str) -> dict[str, str]:
    """Header rows for a result page from its merge metrics (the reported numbers, not recomputed ones)."""
    rows: dict[str, str] = {"metrics file": name}
    headline = metrics.get("headline")
    if isinstance(headline, dict):
        rows[f"headline (judge {headline.get('judge')})"] = (
            f"overall {_num(headline.get('overall'), 2)} (A1 {_num(headline.get('A1'), 2)}, "
            f"A2 {_num(headline.get('A2'), 2)}; {headline.get('rated')} rated)")
    for judge, s in (metrics.get("judges") or {}).items():
        if isinstance(s, dict):
            rows[f"judge {judge}"] = (f"overall {_num(s.get('overall'), 2)}; {s.get('rated')} rated, "
                                      f"{s.get('failed')} unparseable, {s.get('unjudged')} unjudged"
                                      + (f", {s['unanswered']} unanswered" if "unanswered" in s else ""))
    if "accuracy" in metrics:
        rows["accuracy"] = f"{_num(metrics.get('accuracy'))} ({metrics.get('correct')} / {metrics.get('total')})"
        rows["unparseable answers"] = str(metrics.get("unparseable"))
        rows["accuracy over parsed answers"] = _num(metrics.get("accuracy_parsed"))
        rows["generations"] = str(metrics.get("generations"))
    rows["items"] = str(metrics.get("items"))
    if "failed_items" in metrics:
        rows["items that could not be answered"] = str(metrics.get("failed_items"))
    if "shortened_items" in metrics:
        rows["items answered from a shortened context"] = str(metrics.get("shortened_items"))
    if "complete" in metrics:
        part = metrics.get("slice")
        scope = (f" (the slice [{part[0]}, {part[1]}) asked for; {metrics.get('outside_slice')} other items not "
                 "asked for)") if isinstance(part, list) and len(part) == 2 else ""
        rows["complete"] = ("yes" + scope) if metrics.get("complete") else (
            f"no: {metrics.get('missing')} missing, {metrics.get('not_covered')} outside every shard{scope}")
    return rows


def reference_run_label(metrics: dict, result_path: Path, root: Optional[Path]) -> Optional[str]:
    """For the result of a run that judged the reference dialogues themselves (its metrics' settings say so, and
    upstream names such a run ``gpt-4``): who wrote those dialogues, read off the root's SparklesEval annotations."""
    from sparkles.viz.html import reference_dialogues_label

    if (metrics.get("settings") or {}).get("mode") != "reference_dialogues":
        return None
    root = root_for(result_path, root)
    annotations = SparklesLayout(root).eval_annotations("SparklesEval") if root is not None else result_path
    return reference_dialogues_label(annotations)


def metrics_base(path: Path) -> str:
    """``<dataset>_<model>`` of a merged result or metrics file name."""
    return re.sub(r"(?:_acc\d+(?:\.\d+)?|_metrics)$", "", path.stem)


# ---------------------------------------------------------------------------------------------- rendering
def load_records(path: Path) -> list:
    """The JSON list in ``path``; errors name the file."""
    data = read_json(path, what="input file")
    if not isinstance(data, list):
        raise UnknownLayoutError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def render_file(path: Path, output: Path | None, *, relative_dir: Optional[str] = None,
                page_size: int = 500, kind: str = "auto", model_name: str | None = None, title: str | None = None,
                root: Optional[Path] = None, records: Optional[list] = None,
                summary: Optional[dict] = None) -> list[Path]:
    """Render one JSON file of records; returns the HTML files written.

    ``relative_dir`` None means the default ``../images`` with the fallbacks of the module docstring.
    """
    from sparkles.viz import html  # lazily: jinja2 only when something is rendered

    if records is None:
        records = load_records(path)
    dataset = dataset_from_path(path)
    if kind == "auto":
        kind = detect_kind(records, path, dataset)
    output = output or path.with_suffix(".html")
    name = model_name or model_name_from_path(path, kind)
    root = root_for(path, root)
    page_dir = output.parent
    common = dict(page_size=page_size, title=title or path.stem, model_name=name, summary=summary)
    if kind == "dialogue":
        url_fn = dialogue_image_url(page_dir, root, dataset, relative_dir or DEFAULT_RELATIVE_DIR)
        return html.write_dialogue_page(records, output, image_url_fn=url_fn, **common)
    url_fn = choice_image_url(page_dir, root, dataset, relative_dir or DEFAULT_RELATIVE_DIR,
                              link_anyway=relative_dir is not None)
    return html.write_choice_results_page(records, output, image_url_fn=url_fn, **common)


@dataclass
class Report:
    written: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    errors: list = field(default_factory=list)


def scan(paths: list[Path], report: Report) -> list[Path]:
    """The JSON files to look at: given files, and the files directly inside given directories."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.glob("*.json") if f.is_file())
            for sub in sorted(d for d in p.iterdir() if d.is_dir() and any(d.glob("*.json"))):
                if (sub / "manifest.json").is_file():
                    report.notes.append(f"skipped run directory {sub} (its shards are merged into the result file "
                                        "beside it; name the directory to render them)")
                else:
                    report.notes.append(f"skipped directory {sub} (subdirectories are not scanned; name it to "
                                        "render its files)")
            if not found:  # a folder named on purpose that holds nothing is most likely the wrong folder
                report.errors.append(f"{p}: no JSON files in this directory")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            report.errors.append(f"{p}: no such file or directory")
    seen: set = set()
    return [f for f in out if not (f.resolve() in seen or seen.add(f.resolve()))]


def _metrics_beside(path: Path) -> Optional[tuple[Path, dict]]:
    candidate = path.with_name(f"{metrics_base(path)}_metrics.json")
    if candidate == path or not candidate.is_file():
        return None
    try:
        data = read_json(candidate, what="metrics file")
        return (candidate, data) if file_role(data, candidate) == "metrics" else None
    except ValueError:
        return None  # a broken metrics file beside a result costs the header rows only; scanning reports it


def render_many(files: list[Path], report: Report, *, root: Optional[Path], model_name: Optional[str],
                kind: str, **common: Any) -> None:
    """Classify every file, pair metrics with their result files, render the rest; problems go to ``report``."""
    results: list[tuple[Path, list]] = []
    # (directory, "<dataset>_<model>") → (metrics file, content): the merge names both files after that base
    metrics: dict[tuple[Path, str], tuple[Path, dict]] = {}
    for f in files:
        try:
            data = read_json(f, what="input file")
            role = file_role(data, f)
        except (ValueError, MissingPathError) as exc:
            report.errors.append(str(exc))
            continue
        if role == "records":
            results.append((f, data))
        elif role == "manifest":
            report.notes.append(f"skipped {f}: run manifest (shard list and settings, nothing to render)")
        else:
            named = (data.get("files") or {}).get("results") if isinstance(data.get("files"), dict) else None
            metrics[(f.parent.resolve(), metrics_base(Path(named) if named else f))] = (f, data)
    used: dict[tuple[Path, str], Path] = {}
    for f, records in results:
        key = (f.parent.resolve(), metrics_base(f))
        paired = metrics.get(key) or _metrics_beside(f)
        summary = metrics_summary(paired[1], paired[0].name) if paired else None
        name = model_name
        if name is None and paired:
            name = reference_run_label(paired[1], f, root) or paired[1].get("model_name")
        try:
            report.written += render_file(f, None, kind=kind, model_name=name, root=root, records=records,
                                          summary=summary, **common)
            used[key] = f
        except Exception as exc:  # one bad file must not cost the others their pages; the message names it
            text = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            report.errors.append(text if str(f) in text else f"{f}: {text}")
    for key, (f, data) in metrics.items():
        if key in used:
            report.notes.append(f"used {f.name} for the header of {used[key].with_suffix('.html').name}")
        else:
            report.notes.append(f"skipped {f}: metrics file; its result file ({key[1]}[_acc<x>].json) was not "
                                "among the rendered inputs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparkles_root", default=None, help=f"Sparkles root (default: ${ENV_VAR})")
    p.add_argument("--visualize_SparklesDialogue", action="store_true",
                   help="render data/SparklesDialogue{CC,VG}/annotations/SparklesDialogue{CC,VG}.json")
    p.add_argument("--visualize_eval_results", nargs="*", type=Path, default=None, metavar="PATH",
                   help="render these result files and directories of result files; without PATH every .json "
                        "under evaluation/{SparklesEval,BISON,NLVR2}/results/ of the root")
    p.add_argument("--input", type=Path, default=None, help="render this one JSON file")
    p.add_argument("--output", type=Path, default=None, help="HTML file for --input (default: beside it)")
    p.add_argument("--kind", choices=("auto", "dialogue", "choice"), default="auto")
    p.add_argument("--relative_dir", default=None,
                   help=f"image directory relative to the HTML file (default: {DEFAULT_RELATIVE_DIR}, with the "
                        "fallbacks described above for BISON/NLVR2 images)")
    p.add_argument("--page-size", type=int, default=500, help="records per HTML file (default: 500)")
    p.add_argument("--model-name", default=None, help="assistant/model name shown on the page")
    p.add_argument("--title", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    eval_paths = args.visualize_eval_results
    if not (args.input or args.visualize_SparklesDialogue or eval_paths is not None):
        parser.error("nothing to do: pass --input FILE, --visualize_SparklesDialogue or --visualize_eval_results")
    if args.output and not args.input:
        parser.error("--output needs --input")
    if args.page_size < 1:
        parser.error("--page-size must be >= 1")
    common = dict(relative_dir=args.relative_dir, page_size=args.page_size)
    explicit_root = args.sparkles_root or os.environ.get(ENV_VAR) or None
    root = Path(explicit_root).expanduser() if explicit_root else None
    report = Report()
    try:
        if args.input:
            try:
                report.written += render_file(args.input, args.output, kind=args.kind, model_name=args.model_name,
                                              title=args.title, root=root, **common)
            except (MissingPathError, ValueError) as exc:
                report.errors.append(str(exc))
        files: list[Path] = []
        from_root = args.visualize_SparklesDialogue or eval_paths == []
        if from_root:
            layout = SparklesLayout.from_root(args.sparkles_root)
            missing: list[str] = []
            if args.visualize_SparklesDialogue:
                for subset in DIALOGUE_SUBSETS:
                    f = layout.dialogue_file(subset)
                    (files.append(f) if f.is_file() else missing.append(str(f)))
            if eval_paths == []:
                for dataset in EVAL_DATASETS:
                    d = layout.eval_results(dataset)
                    if d.is_dir() and any(d.glob("*.json")):
                        files += scan([d], report)
                    else:
                        missing.append(f"{d}/*.json")
            for m in missing:
                report.notes.append(f"not found, skipped: {m}")
            if not files:
                for note in report.notes:
                    print(f"[visualize] {note}", file=sys.stderr)
                raise MissingPathError(f"no input files under {layout.root} (looked for: {', '.join(missing)})")
        if eval_paths:
            files += scan(eval_paths, report)
        if files:
            render_many(files, report, root=root, model_name=args.model_name, kind=args.kind, **common)
    except MissingPathError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in report.notes:
        print(f"[visualize] {note}", file=sys.stderr)
    for w in report.written:
        print(f"[visualize] wrote {w}")
    for e in report.errors:
        print(f"error: {e}", file=sys.stderr)
    if report.errors:
        print(f"[visualize] {len(report.errors)} input(s) not rendered, {len(report.written)} page(s) written",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
