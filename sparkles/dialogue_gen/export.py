"""Export of accepted dialogues: the full dialogue file and the training split files (the released formats).

``<Name>.json`` holds every dialogue with its raw GPT exchange. ``<Name>_turn1_<n>img.json`` holds one
sample per dialogue for the first answer (instruction ``###Human: <Q1>###Assistant: ``, images of Q1);
``<Name>_turn2_<n>img.json`` one per dialogue for the second answer (the instruction carries the whole first
exchange; images of Q1 then Q2). ``n`` is the sample's image count — any count, not only up to four.

These names are the released annotation files' names, so an output directory may hold files the pipeline must
not overwrite. ``<Name>_files.json`` lists what the pipeline wrote into a directory; :func:`claim_outputs`
refuses to write over an existing file it does not list (unless forced) and lists the files about to be
written before they are written.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

from sparkles.common.io import atomic_write_json, read_json

from .schema import ASSISTANT_PREFIX, HUMAN_PREFIX, check_dialogue_record


OUTPUTS_FORMAT = "sparkles-dialogue-outputs"


class ForeignOutputError(FileExistsError):
    """An output file exists that this pipeline did not write (e.g. a released annotation file)."""


def outputs_manifest(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"{name}_files.json"


def _split_pattern(name: str) -> re.Pattern:
    return re.compile(rf"{re.escape(name)}_turn[12]_\d+img\.json")


def written_outputs(out_dir: str | Path, name: str) -> set[str]:
    """Names of the files in ``out_dir`` that this pipeline wrote for ``name``.

    From ``<name>_files.json``; a directory written before that file existed is read from its
    ``<name>_summary.json`` (the exported files it lists, and the run's own bookkeeping files).
    """
    out_dir = Path(out_dir)
    manifest = outputs_manifest(out_dir, name)
    if manifest.exists():
        data = read_json(manifest, what="output list")
        if not isinstance(data, dict) or data.get("format") != OUTPUTS_FORMAT \
                or not isinstance(data.get("files"), list):
            raise ValueError(f"{manifest}: not a {OUTPUTS_FORMAT} file; remove it only if you know which files "
                             "in that folder generation wrote")
        return set(data["files"])
    summary = out_dir / f"{name}_summary.json"
    if not summary.exists():
        return set()
    data = read_json(summary, what="generation summary")
    listed = data.get("files", []) if isinstance(data, dict) else []
    own = {f"{name}_summary.json", f"{name}_cost.json", f"{name}_rejects.json"}
    own |= {p.name for p in out_dir.glob(f"{name}_raw*.json") if p.with_suffix(".jsonl").exists()}
    return own | {Path(f).name for f in listed}


def claim_outputs(out_dir: str | Path, name: str, names: list[str], *, force: bool = False,
                  splits: bool = False) -> None:
    """Check that the pipeline may write ``names`` into ``out_dir`` and list them as its own.

    An existing file among ``names`` (and with ``splits``, any existing ``<name>_turn*_*img.json``, which an
    export may rewrite) that the pipeline did not write is a :class:`ForeignOutputError` naming it, unless
    ``force``. Nothing is written before the check passes.
    """
    out_dir = Path(out_dir)
    owned = written_outputs(out_dir, name)
    candidates = set(names)
    if splits:
        pattern = _split_pattern(name)
        candidates |= {p.name for p in out_dir.glob(f"{name}_turn*img.json") if pattern.fullmatch(p.name)}
    foreign = sorted(n for n in candidates if (out_dir / n).exists() and n not in owned)
    if foreign and not force:
        raise ForeignOutputError(
            f"{out_dir} holds {', '.join(foreign)}, which generation did not write there (released annotation "
            f"files have these names; {outputs_manifest(out_dir, name).name} lists what generation wrote). "
            "Nothing was overwritten; use another --output_dir, or pass --force to overwrite them")
    if not candidates <= owned:
        atomic_write_json(outputs_manifest(out_dir, name), {"format": OUTPUTS_FORMAT,
                                                            "files": sorted(owned | candidates)})


def turn_samples(record: dict, turn: int) -> dict:
    """The training sample for answer ``turn`` (1 or 2) of one dialogue record."""
    q1, a1, q2, a2 = record["dialogue"]
    if turn == 1:
        return {"uniform_question": q1["content"],
                "instruction": f"{HUMAN_PREFIX}{q1['content']}{ASSISTANT_PREFIX}",
                "answer": a1["content"],
                "tgt_imgs": [dict(img) for img in q1["images"]]}
    if turn == 2:
        return {"uniform_question": q2["content"],
                "instruction": (f"{HUMAN_PREFIX}{q1['content']}{ASSISTANT_PREFIX}{a1['content']}"
                                f"{HUMAN_PREFIX}{q2['content']}{ASSISTANT_PREFIX}"),
                "answer": a2["content"],
                "tgt_imgs": [dict(img) for img in q1["images"] + q2["images"]]}
    raise ValueError(f"turn must be 1 or 2, got {turn}")


def split_by_image_count(records: list[dict], turn: int) -> dict[int, list[dict]]:
    groups: dict[int, list[dict]] = defaultdict(list)
    for record in records:
        sample = turn_samples(record, turn)
        groups[len(sample["tgt_imgs"])].append(sample)
    return dict(sorted(groups.items()))


def export_dialogues(records: list[dict], out_dir: str | Path, name: str, *, force: bool = False) -> list[Path]:
    """Write ``<name>.json`` and every non-empty ``<name>_turn{1,2}_{n}img.json``; returns the paths.

    Every record is checked first (an error names the record and field), so a bad record never produces
    samples whose images and slots disagree. An existing file of these names that the pipeline did not write
    is refused unless ``force`` (:func:`claim_outputs`). Split files of this name left from an earlier export
    that this one does not rewrite are reported in a warning, not deleted.
    """
    out_dir = Path(out_dir)
    for i, record in enumerate(records):
        check_dialogue_record(record, f"{name}: record {i}")
    splits = {(turn, n): samples for turn in (1, 2) for n, samples in split_by_image_count(records, turn).items()}
    names = [f"{name}.json", *(f"{name}_turn{turn}_{n}img.json" for turn, n in splits)]
    claim_outputs(out_dir, name, names, force=force)
    written = [atomic_write_json(out_dir / f"{name}.json", records)]
    for (turn, n), samples in splits.items():
        written.append(atomic_write_json(out_dir / f"{name}_turn{turn}_{n}img.json", samples))
    pattern = _split_pattern(name)
    stale = sorted(p for p in out_dir.glob(f"{name}_turn*img.json") if pattern.fullmatch(p.name) and p not in written)
    if stale:
        print(f"warning: split files from an earlier export were not rewritten: {', '.join(p.name for p in stale)}",
              file=sys.stderr)
    return written
