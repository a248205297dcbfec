"""``python -m sparkles.lmms.export``: lmms-eval task files for BISON, NLVR2 and SparklesEval of one Sparkles root.

lmms-eval loads a task's documents with ``datasets.load_dataset("json", data_files=...)`` and does not expand
variables in a task file's paths, so the files are written for one root. For each benchmark ``--out`` receives

- ``sparkles_<name>.jsonl``: one document per annotation record, in annotation order: the record itself (JSON
  text), what the benchmark code derives from it (a BISON / NLVR2 question's ``sentence``, ``label`` and
  root-relative ``img_paths``) and every image as an absolute path (``images``; ``turn_images`` per user turn of
  a SparklesEval dialogue); a missing image is an error here, not in the middle of a run;
- ``sparkles_<name>.yaml``: the task file (from the template in ``sparkles/lmms/tasks/``) naming that data file by
  its absolute path, with the answer length and the image layout filled in.

Then ``lmms-eval --include_path OUT --tasks sparkles_bison,sparkles_nlvr2,sparkles_sparkleseval ...`` (or the tag
``sparkles_benchmarks``) runs them; see docs/lmms_eval.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import string
import sys
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

from ..common.io import atomic_write
from ..common.paths import EVAL_DATASETS, MissingPathError, resolve_root
from ..eval.benchmarks import CHOICE_BENCHMARKS
from ..eval.benchmarks.sparkleseval import DialogueFormatError, check_dialogue
from ..eval.data import AnnotationError, EvalSet
from ..eval.protocol import DEFAULT_MAX_NEW_TOKENS
from .messages import LAYOUTS

log = logging.getLogger(__name__)

TASK_NAMES = {"BISON": "sparkles_bison", "NLVR2": "sparkles_nlvr2", "SparklesEval": "sparkles_sparkleseval"}


def _image(path: Path, where: str) -> str:
    if not path.is_file():
        raise MissingPathError(f"{where}: image not found: {path}")
    return str(path.resolve())


def documents(evalset: EvalSet) -> list[dict]:
    """The lmms-eval documents of one evaluation set (see the module docstring)."""
    docs = []
    for index, item in enumerate(evalset.items):
        doc = {"dataset": evalset.dataset, "index": index, "evaluation_id": str(item["evaluation_id"]),
               "record": json.dumps(item, ensure_ascii=False)}
        where = evalset.where(index)
        if evalset.dataset in CHOICE_BENCHMARKS:
            question = CHOICE_BENCHMARKS[evalset.dataset].question(evalset, index)
            doc.update(sentence=question.sentence, label=question.label, img_paths=question.img_paths,
                       images=[_image(evalset.abspath(p), where) for p in question.img_paths])
        else:
            dialogue = check_dialogue(item, where)
            doc["turn_images"] = [[_image(evalset.image_file(img["image_id"]), where) for img in dialogue[j]["images"]]
                                  for j in (0, 2)]
        docs.append(doc)
    return docs


def task_file(dataset: str, data_file: Path, *, max_new_tokens: int, layout: str) -> str:
    """The task file of ``dataset`` pointing at ``data_file`` (its template with the placeholders filled in)."""
    template = resources.files(__package__).joinpath("tasks", f"{TASK_NAMES[dataset]}.yaml").read_text("utf-8")
    # a JSON string is a valid double-quoted YAML scalar: any path survives
    return string.Template(template).substitute(data_file=json.dumps(str(data_file)),
                                                max_new_tokens=int(max_new_tokens), layout=layout)


def export(root: str | Path, out: str | Path, datasets: Sequence[str] = EVAL_DATASETS, *,
           max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, layout: str = "slots") -> dict[str, dict]:
    """Write the data and task files of ``datasets``; returns ``{dataset: {"task", "data", "yaml", "documents"}}``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    out = Path(out).expanduser().resolve()
    written = {}
    for dataset in datasets:
        docs = documents(EvalSet(root, dataset))
        task = TASK_NAMES[dataset]
        data_path, yaml_path = out / f"{task}.jsonl", out / f"{task}.yaml"
        atomic_write(data_path, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
        atomic_write(yaml_path, task_file(dataset, data_path, max_new_tokens=max_new_tokens, layout=layout))
        written[dataset] = {"task": task, "data": data_path, "yaml": yaml_path, "documents": len(docs)}
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparkles.lmms.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparkles_root", "--sparkles-root", dest="sparkles_root", default=None,
                   help="Sparkles root holding evaluation/<dataset>/ (default: $SPARKLES_ROOT)")
    p.add_argument("--out", required=True, help="folder for the data and task files (lmms-eval's --include_path)")
    p.add_argument("--datasets", nargs="+", default=list(EVAL_DATASETS), choices=EVAL_DATASETS)
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help="answer length the tasks ask for (default 1000, the project's protocol; lmms-eval's "
                        "--gen_kwargs max_new_tokens=N overrides it per run)")
    p.add_argument("--layout", default="slots", choices=LAYOUTS,
                   help="where the images go in each question: slots (each after its IMAGE#k name, as "
                        "evaluate.py asks; default), images_first (lmms-eval's stock layout) or text_first")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        written = export(resolve_root(args.sparkles_root), args.out, args.datasets,
                         max_new_tokens=args.max_new_tokens, layout=args.layout)
    except (MissingPathError, AnnotationError, DialogueFormatError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    for dataset, info in written.items():
        print(f"{info['task']}: {info['documents']} documents, {info['yaml']}")
    tasks = ",".join(info["task"] for info in written.values())
    out = Path(args.out).expanduser().resolve()
    print(f"run: lmms-eval --model sparkles_chat --model_args cfg_path=CONFIG --tasks {tasks} --include_path {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
