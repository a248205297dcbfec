"""Writes a built world to a Sparkles root in the upstream formats and layout, and reads it back.

Files (paths from ``SparklesLayout``):

- ``data/SparklesDialogue{CC,VG}/annotations/SparklesDialogue{CC,VG}.json`` and the turn-split files
  ``SparklesDialogue{CC,VG}_turn{1,2}_{n}img.json``; images ``data/SparklesDialogue{CC,VG}/images/<id>.jpg``
- ``evaluation/{SparklesEval,BISON,NLVR2}/annotations/sparkles_evaluation_<name>_annotations.json`` + images
- ``evaluation/DemoChat/annotations/demo_chats.json`` + ``images/``: held-out two-turn chats in the SparklesEval
  format whose images are labelled IMAGE#1..k in upload order, as the demo and the API label them
  (``python -m sparkles.tinyworld.demo_chat`` scores a model on them)
- ``world/scenes.json``: every image's scene record (read with ``load_scenes``)
- ``data/cc_sbu_align/filter_cap.json`` + ``image/``: the training images with their descriptions, and
  ``data/cc_sbu_align/perception.json``: short count and place questions about them (``perception_samples``),
  and ``perception_where.json``: its place questions alone
- ``data/reasoning/reasoning.json``: text-only BISON/NLVR2 questions and answers about scene pairs that have
  no images (``Builder.reasoning_item``), the decoder's warm-up on the step from facts to verdict (each with
  ``unsupervised_spans``: its facts, which carry no loss, ``tasks.fact_spans``), and
  ``data/reasoning/caption_checks.json``: single-image caption checks (empty unless the world's reasoning_mix
  asks for them)

JSON is written with sorted-free, fixed formatting so the same seed gives byte-identical files.

``world/manifest.json`` lists every file the generator wrote into the folder (sorted, so it is byte-identical
for a seed too). The generator writes only into an empty folder or over a world it wrote, overwrites or deletes
only the files its manifest lists, and refuses (:class:`WorldFolderError`) when a file it would write is not one
of them — pointed at a real Sparkles root, it changes nothing.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ..common.io import atomic_write_json, read_json
from ..common.logging import progress_bar
from ..common.paths import WORLD_MANIFEST, WORLD_MANIFEST_FORMAT, WORLD_REPORT, SparklesLayout
from ..data.caption import load_prompts
from ..eval.benchmarks import bison, nlvr2

from .build import World
from .language import Qual, caption, describe
from .scenes import (ALL_COLOURS, ALL_SHAPES, BACKGROUND_RGB, POSITION_PHRASES, SIZES, Scene)
from .tasks import Task, answer, fact_spans, image_name, parse_question, question

FORMAT = "sparkles-synthetic-world"
FORMAT_VERSION = 1
# Written by the command line after the world (``cli.py``), as is its report (WORLD_REPORT); a world written before
# the manifest existed owns both.
TOKENIZER_DIR = "models/tiny_llm"
DEMO_CHATS_FILE = "evaluation/DemoChat/annotations/demo_chats.json"
# Split files the upstream training config names; each must be non-empty.
EXPECTED_SPLITS = {"CC": {(1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (2, 4)},
                   "VG": {(1, 2), (1, 3), (2, 3), (2, 4)}}
HUMAN, ASSISTANT, END = "###Human: ", "###Assistant: ", "###"


class WorldFolderError(FileExistsError):
    """The folder holds files the generator did not write, or a world that may only be replaced with force."""


def scenes_file(root: str | os.PathLike) -> Path:
    return Path(root) / "world" / "scenes.json"


def manifest_file(root: str | os.PathLike) -> Path:
    return Path(root) / WORLD_MANIFEST


def turn_instruction(q1: str, a1: str | None = None, q2: str | None = None) -> str:
    """The training split files' instruction: ``###Human: <Q1>###Assistant: `` (+ ``<A1>###Human: <Q2>###Assistant: ``)."""
    if q2 is None:
        return f"{HUMAN}{q1}{ASSISTANT}"
    return f"{HUMAN}{q1}{ASSISTANT}{a1}{HUMAN}{q2}{ASSISTANT}"


def split_samples(dialogues: list[dict]) -> dict[tuple[int, int], list[dict]]:
    """(turn, image count) -> samples of the turn-split files, in dialogue order."""
    out: dict[tuple[int, int], list[dict]] = {}
    for rec in dialogues:
        q1, a1, q2, a2 = rec["dialogue"]
        imgs1, imgs2 = list(q1["images"]), list(q1["images"]) + list(q2["images"])
        out.setdefault((1, len(imgs1)), []).append({
            "uniform_question": q1["content"], "instruction": turn_instruction(q1["content"]),
            "answer": a1["content"], "tgt_imgs": imgs1})
        out.setdefault((2, len(imgs2)), []).append({
            "uniform_question": q2["content"], "instruction": turn_instruction(q1["content"], a1["content"],
                                                                               q2["content"]),
            "answer": a2["content"], "tgt_imgs": imgs2})
    return out


def scene_records(world: World) -> list[dict]:
    records = []
    for entry in world.scenes.values():
        rec = {"image_id": entry.image_id, "dataset": entry.dataset, "file": entry.file,
               "description": describe(entry.scene), "caption": caption(entry.scene)}
        rec.update(entry.scene.to_record())
        records.append(rec)
    return records


def vocabulary(world: World) -> dict:
    return {"colours": list(world.config.colours), "shapes": list(world.config.shapes), "sizes": list(SIZES),
            "positions": list(POSITION_PHRASES), "backgrounds": list(BACKGROUND_RGB),
            "all_colours": list(ALL_COLOURS), "all_shapes": list(ALL_SHAPES)}


def _world_files(scenes: Iterable[tuple[object, str, str]]) -> set[str]:
    """The files :func:`write_world` writes for a world with these ``(image_id, dataset, file)`` scenes."""
    layout = SparklesLayout(Path("."))
    files = {str(scenes_file(".")), REASONING_FILE, CAPTION_CHECKS_FILE, f"{CAPTION_DIR}/filter_cap.json",
             f"{CAPTION_DIR}/{PERCEPTION_FILE}", f"{CAPTION_DIR}/{PERCEPTION_WHERE_FILE}"}
    for subset, splits in EXPECTED_SPLITS.items():
        files.add(str(layout.dialogue_file(subset)))
        files.update(str(layout.dialogue_split_file(subset, turn, n)) for turn, n in splits)
    files.update(str(layout.eval_annotations(name)) for name in ("SparklesEval", "BISON", "NLVR2"))
    files.add(DEMO_CHATS_FILE)
    for image_id, dataset, file in scenes:
        files.add(file)
        if dataset in ("CC", "VG"):
            files.add(f"{CAPTION_DIR}/image/{image_id}.jpg")
    return {Path(f).as_posix() for f in files}


def planned_files(world: World) -> set[str]:
    """Every file :func:`write_world` writes for ``world``, relative to the root."""
    return _world_files((e.image_id, e.dataset, e.file) for e in world.scenes.values())


def _files_under(root: Path, rel: str) -> set[str]:
    """``rel`` itself if it is a file, else the files below it (relative to ``root``)."""
    path = root / rel
    if path.is_dir() and not path.is_symlink():
        return {p.relative_to(root).as_posix() for p in path.rglob("*") if p.is_file() or p.is_symlink()}
    return {rel} if path.is_file() or path.is_symlink() else set()


def _under(file: str, entry: str) -> bool:
    return file == entry or file.startswith(entry.rstrip("/") + "/")


def _previous_files(root: Path) -> set[str]:
    """The files of the world already in ``root`` that the generator wrote (and may replace or delete).

    The manifest says (a folder it names — the tokenizer's, while a run is writing it — stands for every file
    below it); a world written before manifests existed owns what the generator writes for its scenes, its
    report and its tokenizer folder.
    """
    manifest = manifest_file(root)
    if manifest.exists():
        try:
            data = read_json(manifest, what="world manifest")
            if data["format"] != WORLD_MANIFEST_FORMAT or not all(isinstance(f, str) for f in data["files"]):
                raise ValueError(f"field 'format' is not {WORLD_MANIFEST_FORMAT!r} or 'files' is not a list of "
                                 "paths")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{manifest}: existing world manifest is unreadable ({exc}); remove the folder's "
                             "world by hand") from exc
        return set().union(*((_files_under(root, f) or {f}) for f in data["files"]))
    path = scenes_file(root)
    if not path.exists():
        return set()
    try:
        data = read_json(path, what="world file")
        owned = _world_files((rec["image_id"], rec["dataset"], rec["file"]) for rec in data["scenes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: existing world file is unreadable ({exc}); remove it by hand") from exc
    return owned | {WORLD_REPORT} | _files_under(root, TOKENIZER_DIR)


def _write_manifest(root: Path, files: Iterable[str]) -> None:
    atomic_write_json(manifest_file(root), {"format": WORLD_MANIFEST_FORMAT, "files": sorted(set(files))})


def record_written(root: str | os.PathLike, paths: Sequence[str]) -> None:
    """List in the manifest the files below ``paths`` (files or folders) that the caller wrote after the world."""
    root = Path(root)
    files = set().union(*(_files_under(root, p) for p in paths))
    _write_manifest(root, (_previous_files(root) - set(paths)) | files)


def _shown(paths: Iterable[str], limit: int = 5) -> str:
    paths = sorted(paths)
    return ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def claim_folder(root: Path, paths: Iterable[str], *, force: bool) -> set[str]:
    """Check that a world may write ``paths`` (files, or folders it fills) under ``root``; returns the files of
    the world already there (:func:`_previous_files`). Raises :class:`WorldFolderError` when ``root`` holds a
    world and ``force`` is off, when it holds files but no world of the generator's, or when one of ``paths``
    exists and the previous world did not write it."""
    owned = _previous_files(root)
    if scenes_file(root).exists() and not force:
        raise WorldFolderError(f"{scenes_file(root)} exists: {root} already holds a world; pass --force to replace it")
    if not owned:
        present = _files_under(root, ".")
        if present:
            raise WorldFolderError(f"{root} holds files the world generator did not write ({_shown(present)}); "
                                   "generate the world into an empty or new folder")
        return owned
    foreign = set().union(*(_files_under(root, p) for p in paths)) - owned
    if foreign:
        raise WorldFolderError(f"{root} holds files the world generator did not write where the world goes "
                               f"({_shown(foreign)}); nothing was written: move them away or use another folder")
    return owned


def write_world(world: World, root: str | os.PathLike, *, workers: int = 1, force: bool = False,
                progress: bool = False, then: Sequence[str] = ()) -> dict:
    """Write annotations, split files, scene records and images; returns a summary (counts per file).

    ``then``: files or folders the caller writes into ``root`` after the world and then lists in the manifest
    with :func:`record_written`; they are checked like the world's own files, and the previous world's files
    there are left for the caller to replace.
    """
    from .render import render_all

    root = Path(root)
    layout = SparklesLayout(root)
    files = planned_files(world)
    old = claim_folder(root, [*sorted(files), *then], force=force)
    kept = {f for f in old if any(_under(f, p) for p in then)}
    # Listed before anything is written: a run killed half-way leaves a folder whose every file is accounted for.
    _write_manifest(root, old | files | set(then))
    summary: dict[str, int] = {}

    for subset in ("CC", "VG"):
        dialogues = world.dialogues[subset]
        atomic_write_json(layout.dialogue_file(subset), dialogues)
        summary[str(layout.dialogue_file(subset).relative_to(root))] = len(dialogues)
        splits = split_samples(dialogues)
        if set(splits) != EXPECTED_SPLITS[subset]:
            raise ValueError(f"SparklesDialogue{subset}: split files {sorted(splits)} differ from the expected "
                             f"{sorted(EXPECTED_SPLITS[subset])}")
        for (turn, n), samples in sorted(splits.items()):
            path = layout.dialogue_split_file(subset, turn, n)
            atomic_write_json(path, samples)
            summary[str(path.relative_to(root))] = len(samples)

    for name, items in (("SparklesEval", world.sparkleseval), ("BISON", world.bison), ("NLVR2", world.nlvr2)):
        path = layout.eval_annotations(name)
        atomic_write_json(path, items)
        summary[str(path.relative_to(root))] = len(items)
    atomic_write_json(root / DEMO_CHATS_FILE, world.demo_chats)
    summary[DEMO_CHATS_FILE] = len(world.demo_chats)

    atomic_write_json(scenes_file(root), {
        "format": FORMAT, "format_version": FORMAT_VERSION, "generator": "sparkles.tinyworld",
        "config": world.config.to_json(), "vocabulary": vocabulary(world), "scenes": scene_records(world)})

    jobs = [(e.scene, str(root / e.file), world.config.image_size) for e in world.scenes.values()]
    with progress_bar(total=len(jobs), desc="rendering images", unit="img", enabled=progress) as bar:
        render_all(jobs, workers=workers, progress=bar.update)
    summary["images"] = len(jobs)
    summary.update(write_caption_set(world, root))
    # The caption checks go to a file of their own: a batch of them is less than half as long as a batch of
    # BISON/NLVR2 drills, so a mixture that draws them apart trains on them at less than half the cost.
    for path, kinds in ((REASONING_FILE, ("bison", "nlvr2")), (CAPTION_CHECKS_FILE, ("caption",))):
        # The drills' facts carry no loss (``fact_spans``): no text determines them.
        drills = [{"uniform_question": it["prompt"], "instruction": turn_instruction(it["prompt"]),
                   "answer": it["answer"], "unsupervised_spans": [list(s) for s in fact_spans(it["answer"])],
                   "tgt_imgs": []} for it in world.reasoning if it["kind"] in kinds]
        atomic_write_json(root / path, drills)
        summary[path] = len(drills)

    # Replacing a world: remove only files the previous world wrote and this one does not.
    stale = old - files - kept
    for rel in sorted(stale):
        if (root / rel).is_file() or (root / rel).is_symlink():
            (root / rel).unlink()
    summary["stale_images_removed"] = sum(Path(rel).suffix in (".jpg", ".png") and not rel.startswith(CAPTION_DIR)
                                          for rel in stale)
    _write_manifest(root, files | set(then) | {f for f in kept if (root / f).exists() or (root / f).is_symlink()})
    return summary


def load_world_file(root: str | os.PathLike) -> dict:
    path = scenes_file(root)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: generate the world with "
                                f"`python -m sparkles.tinyworld --out {root}`")
    data = read_json(path, what="world file")
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("scenes"), list):
        raise ValueError(f"{path}: not a {FORMAT} file (field 'format' or 'scenes' missing)")
    return data


def load_scenes(root: str | os.PathLike) -> dict[str, dict]:
    """Every image's scene record, keyed by ``str(image_id)`` (ids are unique across all datasets).

    Each record holds ``image_id`` (upstream type), ``dataset``, ``file`` (relative to the root),
    ``description``, ``caption``, ``background`` and ``objects`` (shape, colour, size, row, col, position,
    jitter). ``Scene.from_record`` turns a record into the object the tasks and the judge use.
    """
    path = scenes_file(root)
    data = load_world_file(root)
    out: dict[str, dict] = {}
    for i, rec in enumerate(data["scenes"]):
        for field in ("image_id", "dataset", "file", "objects", "background"):
            if field not in rec:
                raise ValueError(f"{path}: scenes[{i}] lacks field {field!r}")
        key = str(rec["image_id"])
        if key in out:
            raise ValueError(f"{path}: scenes[{i}] repeats image_id {key!r}")
        Scene.from_record(rec, where=f"{path}: scenes[{i}] (image_id {key})")
        out[key] = rec
    return out


def _read_list(path: Path) -> list:
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list")
    return data


def write_caption_set(world: World, root: Path) -> dict[str, int]:
    """The single-image caption set in the ``cc_sbu_align`` layout: every training image with its short
    description (``data/cc_sbu_align/filter_cap.json`` + ``image/<id>.jpg``, hard links to the dialogue
    images). The tiny model's first stage learns to read images from it, as MiniGPT-4's did."""
    base = root / CAPTION_DIR
    image_dir = base / "image"
    # A replaced world's links that this world does not write are removed with its other stale files.
    image_dir.mkdir(parents=True, exist_ok=True)
    annotations = []
    for entry in world.scenes.values():
        if entry.dataset not in ("CC", "VG"):
            continue  # evaluation images never enter training data
        target = image_dir / f"{entry.image_id}.jpg"
        if target.exists():
            target.unlink()
        try:
            os.link(root / entry.file, target)
        except OSError:  # file systems without hard links
            import shutil

            shutil.copyfile(root / entry.file, target)
        annotations.append({"image_id": str(entry.image_id), "caption": describe(entry.scene)})
    atomic_write_json(base / "filter_cap.json", {"annotations": annotations})
    perception = perception_samples(world)
    atomic_write_json(base / PERCEPTION_FILE, perception)
    # The place questions again, alone: the mixture weights them apart from the counts, which outnumber them 2:1
    # in perception.json and which the NLVR2 checks need as much (docs/research/tinyworld.md).
    places = [s for s in perception if parse_question(s["uniform_question"]).kind == "where"]
    atomic_write_json(base / PERCEPTION_WHERE_FILE, places)
    return {"data/cc_sbu_align/filter_cap.json": len(annotations),
            f"data/cc_sbu_align/{PERCEPTION_FILE}": len(perception),
            f"data/cc_sbu_align/{PERCEPTION_WHERE_FILE}": len(places)}


CAPTION_DIR = "data/cc_sbu_align"
PERCEPTION_FILE = "perception.json"
PERCEPTION_WHERE_FILE = "perception_where.json"   # the ``synthetic_perception_where`` dataset
# Text-only BISON/NLVR2 drills in the dialogue split-file format, no images (the ``synthetic_reasoning`` dataset).
REASONING_FILE = "data/reasoning/reasoning.json"
# Single-image caption checks (``Builder.reasoning_item`` kind ``caption``; the ``synthetic_caption_checks`` dataset).
CAPTION_CHECKS_FILE = "data/reasoning/caption_checks.json"


def perception_samples(world: World) -> list[dict]:
    """Short questions that each need one or two facts of the images: counts and, where a kind occurs once, places.

    Written next to the caption set in the dialogue split-file format (the ``synthetic_perception`` dataset). A
    BISON check or an NLVR2 count is the same look-up (find the tokens of one kind in one image, read the count
    or the cell), but buried in a long answer; a 4-layer decoder learns the look-up only after several hundred
    steps of questions that ask nothing else (docs/research/tinyworld.md). Every training image gets a
    count question about itself alone and one about it together with another image (which image a fact belongs to
    is part of the look-up), and a place question when one of its kinds occurs once. Half of the counted kinds
    are in the image, so "no" is not the usual answer.
    """
    rng = random.Random(f"{world.config.seed}:perception")
    colours, shapes = world.config.colours, world.config.shapes
    pools = [[e for e in world.scenes.values() if e.dataset == d] for d in ("CC", "VG")]
    samples = []
    for pool in pools:
        for entry in pool:
            key, scene = str(entry.image_id), entry.scene
            scenes, pair = {key: scene}, (key,)
            if len(pool) > 1:
                other = rng.choice(pool)
                while other is entry:  # a partner from the same subset, never the image itself
                    other = rng.choice(pool)
                scenes[str(other.image_id)] = other.scene
                pair = (key, str(other.image_id)) if rng.random() < 0.5 else (str(other.image_id), key)
            tasks = [Task("total", (key,), qual=_perception_qual(rng, scene, colours, shapes))]
            if len(pair) == 2:
                tasks.append(Task("total", pair, qual=_perception_qual(rng, scene, colours, shapes)))
            if scene.unique_kinds():
                ids = (key,) if rng.random() < 0.5 else pair
                tasks.append(Task("where", ids, target=key, obj=rng.choice(scene.unique_kinds())))
            names = {k: image_name(k) for k in scenes}
            for task in tasks:
                q = question(task, names, set(task.ids))
                samples.append({"uniform_question": q, "instruction": turn_instruction(q),
                                "answer": answer(task, scenes, names),
                                "tgt_imgs": [{"image_id": k, "caption": caption(scenes[k])} for k in task.ids]})
    return samples


def _perception_qual(rng, scene: Scene, colours, shapes):
    """A kind of the scene (half the time), a colour or a shape alone, or any kind (likely absent).

    Not the dialogue builder's mix (mostly colours or shapes alone): here the kinds the image holds come first,
    because a count of one kind is what the BISON checks ask.
    """
    draw = rng.random()
    if draw < 0.5:
        colour, shape, _n = rng.choice(scene.groups())
        return Qual(colour, shape)
    if draw < 0.75:
        return rng.choice([Qual(rng.choice(colours), None), Qual(None, rng.choice(shapes))])
    return Qual(rng.choice(colours), rng.choice(shapes))


def iter_world_texts(root: str | os.PathLike) -> Iterator[str]:
    """Every text the model sees in this world, for training its tokenizer.

    Training turns rendered as the model reads them (``###Human: Q###Assistant: A###``), SparklesEval turns,
    BISON/NLVR2 prompts with their captions/statements, and every image caption and description.
    """
    root = Path(root)
    layout = SparklesLayout(root)
    for subset in ("CC", "VG"):
        for rec in _read_list(layout.dialogue_file(subset)):
            q1, a1, q2, a2 = rec["dialogue"]
            yield turn_instruction(q1["content"]) + a1["content"] + END
            yield HUMAN + q2["content"] + ASSISTANT + a2["content"] + END
    for rec in _read_list(layout.eval_annotations("SparklesEval")):
        q1, a1, q2, a2 = rec["dialogue"]
        yield turn_instruction(q1["content"]) + a1["content"] + END
        yield HUMAN + q2["content"] + ASSISTANT + a2["content"] + END
    caption_file = root / "data" / "cc_sbu_align" / "filter_cap.json"
    if caption_file.is_file():
        prompts = load_prompts()
        for k, item in enumerate(read_json(caption_file, what="caption file")["annotations"]):
            yield HUMAN + prompts[k % len(prompts)] + ASSISTANT + item["caption"] + END
    for item in _read_list(layout.eval_annotations("BISON")):
        yield item["caption"]
        yield HUMAN + bison.prompt(item["caption"]) + ASSISTANT
    for item in _read_list(layout.eval_annotations("NLVR2")):
        yield item["sentence"]
        yield HUMAN + nlvr2.prompt(item["sentence"]) + ASSISTANT
    for rec in load_world_file(root)["scenes"]:
        if rec["dataset"] == "DemoChat":  # held out in the world's own words: the tokenizer is the same without them
            continue
        yield rec["description"]
        yield rec["caption"]
