"""LLaVA / SVIT single-image data re-formatted for SparklesChat, without images used elsewhere.

Exclusions: the Visual Genome images used by SparklesDialogueVG and SparklesEval, and the BISON candidate
images, are mapped to COCO ids through Visual Genome's ``image_data.json`` (``coco_id``); LLaVA items on
those COCO ids and SVIT items on those VG ids are dropped. BISON images already used by Sparkles itself are
reported (as upstream, not removed).

Each kept item becomes ``{"question", "answer", "uniform_question", "tgt_imgs": [{"image_id", "caption"}]}``
where ``uniform_question`` places one image slot in the question and ``caption`` is the answer text.
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path
from typing import Any, Iterable

from .schema import IMAGE_SLOT
from ..common.io import read_json
from .sources import image_ids_of, load_dialogues

# Phrases that lead into the image reference when a question does not mention an image (13, "" included),
# and phrases that attach it at the end (8, "" included).
LEAD_PHRASES = ("", "In", "For", "Based on", "Looking at", "Given", "Considering", "From", "Regarding", "With",
                "Observing", "Judging from", "About")
TRAIL_PHRASES = ("", "in", "for", "based on", "regarding", "about", "shown in", "according to")

_IMAGE_WORD = re.compile(r"\bimage\b", flags=re.IGNORECASE)
_THE_IMAGE = re.compile(r"\bthe image\b", flags=re.IGNORECASE)


def placeholder(image_id: Any, rng: random.Random) -> str:
    """One of four ways to write the image reference, chosen at random."""
    forms = (IMAGE_SLOT, "image" + IMAGE_SLOT, f"IMAGE#{image_id}" + IMAGE_SLOT, f"image of IMAGE#{image_id}" + IMAGE_SLOT)
    return rng.choice(forms)


def uniform_question(question: str, image_id: Any, rng: random.Random) -> str:
    """``question`` with exactly one image slot: replacing the first word "image" if there is one, otherwise
    as a lead-in phrase (half the time) or a phrase before the final punctuation."""
    ph = placeholder(image_id, rng)
    m = _IMAGE_WORD.search(question)
    if m:
        return question[:m.start()] + ph + question[m.end():]
    if not question:
        return ph
    if rng.random() < 0.5:
        lead = rng.choice(LEAD_PHRASES)
        head = f"{lead} {ph}" if lead else ph
        return f"{head}, {question[0].lower()}{question[1:]}"
    trail = rng.choice(TRAIL_PHRASES)
    tail = f" {trail} {ph}" if trail else f" {ph}"
    return question[:-1].rstrip() + tail + question[-1]


def _strip_image_token(text: str) -> str:
    return text.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").strip()


def convert_llava(items: list[dict], excluded_coco: set[int], rng: random.Random, *, source: str = "LLaVA"
                  ) -> tuple[list[dict], dict[str, int]]:
    """LLaVA records (first human/gpt exchange of each) → Sparkles single-image records."""
    out, skipped = [], 0
    for i, item in enumerate(items):
        try:
            image_id = str(item["id"])
            conv = item["conversations"]
            question = next(c["value"] for c in conv if c["from"] == "human")
            answer = next(c["value"] for c in conv if c["from"] == "gpt")
        except (KeyError, TypeError, StopIteration) as exc:
            raise ValueError(f"{source}: record {i} lacks id or a human/gpt exchange ({exc!r})") from exc
        if int(image_id) in excluded_coco:
            skipped += 1
            continue
        q = _strip_image_token(question)
        out.append({"question": q, "answer": answer, "uniform_question": uniform_question(q, image_id, rng),
                    "tgt_imgs": [{"image_id": image_id, "caption": answer}]})
    return out, {"kept": len(out), "excluded": skipped}


def convert_svit(items: list[dict], excluded_vg: set[int], rng: random.Random, *, source: str = "SVIT"
                 ) -> tuple[list[dict], dict[str, int]]:
    """SVIT detailed-description records → Sparkles single-image records ("the image" → "the IMAGE#<id>")."""
    out, skipped = [], 0
    for i, item in enumerate(items):
        try:
            image_id = int(item["image_id"])
            question = item["conversations"][0]["content"][0]["value"]
            answer = item["conversations"][0]["content"][1]["value"]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: record {i} lacks image_id or a question/description pair ({exc!r})") from exc
        if image_id in excluded_vg:
            skipped += 1
            continue
        m = _THE_IMAGE.search(question)
        if m:
            uq = question[:m.start()] + f"the IMAGE#{image_id}{IMAGE_SLOT}" + question[m.end():]
        else:
            uq = uniform_question(question, image_id, rng)
        out.append({"question": question, "answer": answer, "uniform_question": uq,
                    "tgt_imgs": [{"image_id": image_id, "caption": answer}]})
    return out, {"kept": len(out), "excluded": skipped}


def used_vg_ids(dialogue_files: Iterable[Path]) -> set[int]:
    ids: set[int] = set()
    for path in dialogue_files:
        ids |= {int(x) for x in image_ids_of(load_dialogues(path, "Sparkles dialogue file"))}
    return ids


def overlap_exclusions(vg_image_data: list[dict], used_vg: set[int], bison_items: list[dict]
                       ) -> dict[str, Any]:
    """COCO and VG ids to exclude, and the BISON candidates whose images Sparkles already uses."""
    vg_to_coco: dict[int, int] = {}
    for i, rec in enumerate(vg_image_data):
        try:
            if rec.get("coco_id") is not None:
                vg_to_coco[int(rec["image_id"])] = int(rec["coco_id"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"VisualGenome image_data: record {i} has a bad image_id/coco_id ({exc!r})") from exc
    coco_to_vg = {c: v for v, c in vg_to_coco.items()}
    bison_coco = {int(c["image_id"]) for item in bison_items for c in item.get("image_candidates", [])}
    used_coco = {vg_to_coco[v] for v in used_vg if v in vg_to_coco}
    return {
        "excluded_coco": bison_coco | used_coco,
        "excluded_vg": used_vg | {coco_to_vg[c] for c in bison_coco if c in coco_to_vg},
        "bison_images_used_by_sparkles": sorted(bison_coco & used_coco),
    }


def load_bison(path: Path) -> list[dict]:
    data = read_json(path, what="BISON annotations")
    if not isinstance(data, list):
        raise ValueError(f"BISON annotations {path}: expected a JSON list")
    return data


LLAVA_FILES = ("detail_23k.json", "complex_reasoning_77k.json")


def run_conversion(kind: str, layout, *, vg_image_data_path: str | Path | None, seed: int,
                   extra_dialogue_files: Iterable[Path] = ()) -> dict[str, Any]:
    """The ``--step llava`` / ``--step svit`` job: compute the exclusions, convert, write the files.

    The used-VG set comes from the SparklesDialogueVG files (released and generated) and the SparklesEval
    annotations, whichever exist; a missing BISON annotation file is reported, not fatal.
    """
    from sparkles.common.io import atomic_write_json

    candidates = [layout.dialogue_file("VG"), layout.dialogue_dir("VG") / "generated" / "SparklesDialogueVG.json",
                  layout.eval_annotations("SparklesEval"), *extra_dialogue_files]
    dialogue_files = sorted({Path(p) for p in candidates if Path(p).exists()})
    vg_path = Path(vg_image_data_path) if vg_image_data_path else layout.vg_image_data
    vg_data = read_json(vg_path, what="Visual Genome image_data.json")
    if not isinstance(vg_data, list):
        raise ValueError(f"{vg_path}: expected a JSON list")
    bison_path = layout.eval_annotations("BISON")
    bison = load_bison(bison_path) if bison_path.exists() else []
    ex = overlap_exclusions(vg_data, used_vg_ids(dialogue_files), bison)
    summary: dict[str, Any] = {"used_dialogue_files": [str(p) for p in dialogue_files],
                               "bison_annotations": str(bison_path) if bison else None,
                               "excluded_coco_ids": len(ex["excluded_coco"]), "excluded_vg_ids": len(ex["excluded_vg"]),
                               "bison_images_used_by_sparkles": ex["bison_images_used_by_sparkles"], "outputs": {}}
    if not bison:
        print(f"warning: no BISON annotations at {bison_path}; BISON images are not excluded", file=sys.stderr)
    if ex["bison_images_used_by_sparkles"]:
        print(f"note: {len(ex['bison_images_used_by_sparkles'])} BISON image(s) also appear in Sparkles data "
              f"(COCO ids {ex['bison_images_used_by_sparkles'][:10]}...)", file=sys.stderr)
    rng = random.Random(seed)
    if kind == "llava":
        for fname in LLAVA_FILES:
            src = layout.llava_dir / fname
            items = read_json(src, what="LLaVA instruction file")
            records, stats = convert_llava(items, ex["excluded_coco"], rng, source=str(src))
            dst = layout.llava_dir / f"LLaVA_{Path(fname).stem}_filtered_for_Sparkles.json"
            atomic_write_json(dst, records)
            summary["outputs"][str(dst)] = stats
    elif kind == "svit":
        src = layout.svit_descriptions
        records, stats = convert_svit(read_json(src, what="SVIT detailed-description file"), ex["excluded_vg"], rng,
                                      source=str(src))
        dst = src.parent / "SVIT_detail_description_filtered_for_Sparkles.json"
        atomic_write_json(dst, records)
        summary["outputs"][str(dst)] = stats
    else:
        raise ValueError(f"unknown conversion {kind!r}; known: llava, svit")
    return summary
