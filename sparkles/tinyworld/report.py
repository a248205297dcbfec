"""Where a model's BISON/NLVR2 answers on the synthetic world go wrong: per kind of item, and check by check.

Reads merged result files (``evaluation/{BISON,NLVR2}/results/*_acc*.json``, the newest unless named) and the
world's scene records, and reports accuracy per BISON difference (colour, shape, count, position) and per NLVR2
statement template, and — since BISON answers check each caption item against each image — how often the
model's own "yes"/"no" agrees with the scene, split by the item's truth and by whether it states a position; and,
for checks that state a fact first (``a red circle at the top: one on the left, no``), how often that fact is the
scene's (the read-out of the towers), how often the verdict follows from it (the comparison; positioned items
also apart) and how often the final choice is the one image whose checks say no "no". For NLVR2, whose answers
state counts and judge each step against the statement (``...shows no red circles; the statement needs at least
one: no``), it reports how often the stated counts are the scene's (and how many wrong ones are the other image's:
a read of the wrong image's tokens), each step's yes/no follows its count, and the verdict follows the steps.

    python -m sparkles.tinyworld.report --root outputs/tiny [--bison FILE] [--nlvr2 FILE] [--out report.json]
"""

from __future__ import annotations

import argparse
import re
import sys
from functools import cache
from pathlib import Path
from typing import Optional, Sequence

from ..common.io import atomic_write_json, read_json
from ..common.paths import SparklesLayout
from .language import WORD_VALUES, count_phrase
from .scenes import as_scene
from .tasks import (CHECK_SECTION_RE, NEEDS_RE, NEEDS_SUFFIX_RE, check_fact, fact_supports, item_holds,
                    parse_check_section, parse_fact, parse_statement)
from .writers import load_scenes

def _newest(results_dir: Path, dataset: str) -> Optional[Path]:
    found = [p for p in results_dir.glob(f"{dataset}_*_acc*.json")] if results_dir.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _ratio(hits: int, total: int) -> Optional[float]:
    return round(hits / total, 3) if total else None


def _correct(rec: dict) -> bool:
    return str(rec.get("predict", "")).strip().lower() == str(rec.get("label", "")).strip().lower()


def bison_report(records: list[dict], annotations: list[dict], scenes: dict) -> dict:
    by_id = {a["evaluation_id"]: a for a in annotations}
    per_kind: dict[str, list[int]] = {}
    checks: dict[str, list[int]] = {}
    unreadable = 0
    facts = {"facts right": [0, 0], "positioned facts right": [0, 0], "verdict follows the fact": [0, 0],
             "positioned verdict follows the fact": [0, 0], "choice follows the checks": [0, 0]}
    for rec in records:
        ann = by_id.get(rec["evaluation_id"])
        if ann is None:
            raise ValueError(f"BISON result with evaluation_id {rec['evaluation_id']!r} has no annotation")
        row = per_kind.setdefault(ann["difference"], [0, 0])
        row[0] += _correct(rec)
        row[1] += 1
        candidates = [as_scene(scenes[str(c["image_id"])]) for c in ann["image_candidates"]]
        sections = [(name, section, parse_check_section(section))
                    for name, section in CHECK_SECTION_RE.findall(rec.get("response", ""))]
        # The choice the answer's own checks imply: the one image whose section says no "no" (when exactly one).
        clean = [name for name, _, parsed in sections if not any(verdict == "no" for _, verdict in parsed)]
        if sorted(name for name, _, _ in sections) == ["1", "2"] and len(clean) == 1:
            facts["choice follows the checks"][0] += str(rec.get("predict", "")).lower() == f"image#{clean[0]}"
            facts["choice follows the checks"][1] += 1
        for name, section, parsed in sections:
            for check, (item, verdict) in zip(section.split("; "), parsed):
                if item is None or verdict is None or name not in ("1", "2"):
                    unreadable += 1
                    continue
                scene = candidates[int(name) - 1]
                truth = item_holds(item, scene)
                stated = check.rpartition(", ")[0].partition(": ")[2]
                fact = parse_fact(stated) if stated else None
                if fact is not None:
                    right = stated == check_fact(item, scene)
                    for key in ("facts right", "positioned facts right") if item.position else ("facts right",):
                        facts[key][0] += right
                        facts[key][1] += 1
                    follows = fact_supports(item, fact) == (verdict == "yes")
                    for key in (("verdict follows the fact", "positioned verdict follows the fact") if item.position
                                else ("verdict follows the fact",)):
                        facts[key][0] += follows
                        facts[key][1] += 1
                key = ("true " if truth else "false ") + ("positioned items" if item.position else "items")
                row = checks.setdefault(key, [0, 0])
                row[0] += (verdict == "yes") == truth
                row[1] += 1
    return dict(items=len(records), accuracy=_ratio(sum(_correct(r) for r in records), len(records)),
                by_difference={k: dict(accuracy=_ratio(*v), items=v[1]) for k, v in sorted(per_kind.items())},
                checks={k: dict(agreement=_ratio(*v), checks=v[1]) for k, v in sorted(checks.items())},
                facts={k: dict(agreement=_ratio(*v), checks=v[1]) for k, v in facts.items() if v[1]},
                unreadable_checks=unreadable)


@cache
def _nlvr2_step_patterns() -> tuple[re.Pattern, re.Pattern, re.Pattern]:
    """The sentences of an NLVR2 answer's steps (``sparkles.tinyworld.tasks.nlvr2_reasoning``): a count, judged
    or not; a total judged against the stated number; a comparison of two counts."""
    return (re.compile(rf"(?:The (?:left|right) image, )?IMAGE#([12]),? shows ([a-z ]+?){NEEDS_SUFFIX_RE}\."),
            re.compile(rf"That makes ([a-z ]+?) in total{NEEDS_RE}\."),
            re.compile(r"([A-Z][a-z]+) is more than ([a-z]+): (yes|no)\."))


_VERDICT = re.compile(r"\b(TRUE|FALSE)\.?\s*$")


def _nlvr2_steps(response: str, statement, left, right) -> dict[str, list[int]]:
    """One answer's counts (right or not), its judged steps (following their counts or not) and whether its
    verdict follows its steps (TRUE exactly when no step says no), as [hits, total] each."""
    counts, totals, comparisons = _nlvr2_step_patterns()
    q = statement.qual
    out = {"counts right": [0, 0], "wrong counts that are the other image's": [0, 0],
           "steps follow their counts": [0, 0], "verdict follows the steps": [0, 0]}
    verdicts: list[str] = []

    def value(phrase: str) -> Optional[int]:
        return WORD_VALUES.get(phrase.split(" ", 1)[0].lower())

    def judged(holds: Optional[bool], verdict: str) -> None:
        """A step whose claim is ``holds`` (None: unreadable) and whose yes/no is ``verdict``."""
        out["steps follow their counts"][0] += holds is not None and holds == (verdict == "yes")
        out["steps follow their counts"][1] += 1
        verdicts.append(verdict)

    for name, phrase, need, verdict in counts.findall(response):
        mine, other = (left, right) if name == "1" else (right, left)
        right_count = phrase == count_phrase(q.count(mine), q)
        out["counts right"][0] += right_count
        out["counts right"][1] += 1
        if not right_count:  # read off the other image's tokens? (what image ordinal marks are for)
            out["wrong counts that are the other image's"][0] += phrase == count_phrase(q.count(other), q)
            out["wrong counts that are the other image's"][1] += 1
        if verdict:
            n = value(phrase)
            holds = None if n is None or need not in ("at least one", "none") else \
                (n > 0 if need == "at least one" else n == 0)
            judged(holds, verdict)
    for phrase, need, verdict in totals.findall(response):
        n, wanted = value(phrase), WORD_VALUES.get(need)
        judged(None if n is None or wanted is None else n == wanted, verdict)
    for mine, other, verdict in comparisons.findall(response):
        a, b = value(mine), value(other)
        judged(None if a is None or b is None else a > b, verdict)
    said = _VERDICT.search(response)
    if verdicts and said:
        out["verdict follows the steps"][0] += (said[1] == "TRUE") == ("no" not in verdicts)
        out["verdict follows the steps"][1] += 1
    return out


def nlvr2_report(records: list[dict], scenes: Optional[dict] = None) -> dict:
    """Accuracy per statement template; with the world's scenes, also how the answers' steps went (counts
    right, each step's yes/no following its count, the verdict following the steps)."""
    per_template: dict[str, list[int]] = {}
    steps: dict[str, list[int]] = {}
    for rec in records:
        statement = parse_statement(rec["sentence"])
        row = per_template.setdefault(statement.template, [0, 0])
        row[0] += _correct(rec)
        row[1] += 1
        keys = [Path(p).stem for p in rec.get("img_paths", [])]
        if scenes is not None and len(keys) == 2 and all(k in scenes for k in keys):
            left, right = (as_scene(scenes[k]) for k in keys)
            for key, (hits, total) in _nlvr2_steps(rec.get("response", ""), statement, left, right).items():
                agg = steps.setdefault(key, [0, 0])
                agg[0] += hits
                agg[1] += total
    report = dict(items=len(records), accuracy=_ratio(sum(_correct(r) for r in records), len(records)),
                  by_template={k: dict(accuracy=_ratio(*v), items=v[1]) for k, v in sorted(per_template.items())})
    if steps:
        report["steps"] = {k: dict(agreement=_ratio(*v), checks=v[1]) for k, v in steps.items() if v[1]}
    return report


def build_report(root: Path, bison: Optional[Path] = None, nlvr2: Optional[Path] = None) -> dict:
    report: dict = {"root": str(root)}
    bison = bison or _newest(root / "evaluation" / "BISON" / "results", "BISON")
    nlvr2 = nlvr2 or _newest(root / "evaluation" / "NLVR2" / "results", "NLVR2")
    if bison is None and nlvr2 is None:
        raise FileNotFoundError(f"{root}: no BISON or NLVR2 result file under evaluation/*/results/")
    scenes = load_scenes(root)
    if bison is not None:
        annotations = read_json(SparklesLayout(root).eval_annotations("BISON"), what="BISON annotations")
        report["BISON"] = dict(file=str(bison), **bison_report(read_json(bison, what="BISON results"), annotations,
                                                               scenes))
    if nlvr2 is not None:
        report["NLVR2"] = dict(file=str(nlvr2), **nlvr2_report(read_json(nlvr2, what="NLVR2 results"), scenes))
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="the synthetic world (run.sh: outputs/tiny)")
    p.add_argument("--bison", type=Path, help="BISON result file (default: the newest)")
    p.add_argument("--nlvr2", type=Path, help="NLVR2 result file (default: the newest)")
    p.add_argument("--out", type=Path, help="also write the report as JSON here")
    args = p.parse_args(argv)
    try:
        report = build_report(Path(args.root), args.bison, args.nlvr2)
    except (FileNotFoundError, ValueError) as exc:
        print(f"sparkles.tinyworld.report: {exc}", file=sys.stderr)
        return 2
    for name in ("BISON", "NLVR2"):
        part = report.get(name)
        if not part:
            continue
        print(f"{name}: accuracy {part['accuracy']} on {part['items']} items ({part['file']})")
        for key, row in part.get("by_difference", part.get("by_template", {})).items():
            print(f"  {key:<10} {row['accuracy']}  ({row['items']} items)")
        for key, row in part.get("checks", {}).items():
            print(f"  checks of {key}: the model's yes/no agrees with the scene {row['agreement']} ({row['checks']})")
        for key, row in {**part.get("facts", {}), **part.get("steps", {})}.items():
            print(f"  {key}: {row['agreement']} ({row['checks']})")
    if args.out:
        atomic_write_json(args.out, report, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
