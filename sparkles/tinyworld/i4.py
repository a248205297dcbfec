"""The world's small I4 split: four DEMON "core" datasets drawn from the world's scenes and written in its language,
and the predictions of a trivial baseline to score beside the tiny model.

Layout (the DEMON core split): ``<root>/evaluation/I4/<dataset>/core/core.json`` with the images in
``core/images/<sample_id>_<k>.png``; ``core.json`` holds ``metadata`` (``task_instruction``: the dataset's
instructions, ``question_type``) and ``data``: one record per instance with ``sample_id``,
``task_instruction_id``, ``task_instance`` (``context`` with one ``{image#k}`` per image, ``images_path``
relative to ``core/``, ``choice_list`` for multi-choice datasets) and ``response``.

The datasets borrow the names of real DEMON datasets so that the benchmark's per-category averaging applies:

- ``Spot-the-Diff`` (open-ended; visual relation inference): two pictures of one scene that differ in one object's
  colour, shape, count or place; the response names the objects that differ, per image (``IMAGE#1 shows a red
  circle and no green circles. IMAGE#2 shows no red circles and a green circle.``).
- ``MIT-States_PropertyCoherence`` (multi-choice; multi-image reasoning): 2–5 pictures that share exactly one kind
  of object; four kinds to choose from (``a red circle``).
- ``nuscenes`` (multi-choice; multi-image reasoning): the world's own counting question over 2–6 pictures
  (``How many red circles are there in IMAGE#1, IMAGE#2 and IMAGE#3 in total?``); four consecutive counts to
  choose from (``two red circles``).
- ``RecipeQA_ImageCoherence`` (image-choice; multi-image reasoning): 3–4 pictures and a caption in the world's
  description language that fits exactly one of them (the others differ from it in one attribute, as BISON
  decoys do); the choices and the response are ``image A`` … ``image D``, the form the benchmark's image-choice
  rule compares (the first 7 normalised characters).

Each context names its pictures ``IMAGE#1`` … as the world's BISON/NLVR2 prompts do, with the ``{image#k}`` slot
right after the name, so that the prompt the model reads has the world's ``IMAGE#1<Img><ImageHere></Img>`` form.
The correct choice's place in the list is balanced, so the "always the first choice" baseline scores chance.

Nothing here touches the rest of the world: the scenes come from streams of their own
(``random.Random(f"{seed}:i4-<dataset>")``) drawn after the world is built, never repeat a world scene (nor
each other), are not in ``world/scenes.json``, and no I4 text enters the tokenizer's corpus
(``writers.iter_world_texts``) or any training file. The split is a function of the world's seed, vocabulary
and scenes, so it can be rebuilt from a written world alone (``build_i4_for_root``).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from ..common.io import atomic_write_json, read_json
from ..conversation.template import IMAGE_MARKER as SLOT
from .build import World, _balanced
from .language import Qual, count_phrase, describe, item_phrase, join_items
from .scenes import ALL_COLOURS, ALL_SHAPES, MAX_OBJECTS, Scene, SceneSampler
from .tasks import Task, caption_matches, caption_refuted, question
from .writers import load_world_file

I4_DIR = Path("evaluation") / "I4"
OPEN, CHOICE = "open-ended", "multi-choice"
# dataset -> question_type; the order is the order of drawing (the datasets share the set of used scenes).
DATASETS: dict[str, str] = {"Spot-the-Diff": OPEN, "MIT-States_PropertyCoherence": CHOICE, "nuscenes": CHOICE,
                            "RecipeQA_ImageCoherence": CHOICE}
# Multi-choice datasets whose choices name images; scored by the benchmark's image-choice rule.
IMAGE_CHOICE_DATASETS = ("RecipeQA_ImageCoherence",)
# Instances per dataset for each world preset (``--num-i4`` overrides; 0 writes no split).
PER_DATASET = {"default": 20, "ci": 6}
LETTERS = "ABCD"   # the image-choice rule knows "image a" .. "image d"
MAX_COUNT = 12     # the world's number words end at twelve
MAX_TRIES = 2000

INSTRUCTIONS: dict[str, list[str]] = {
    "Spot-the-Diff": [
        "The two pictures show the same scene with one change. Say what is different between them, naming the "
        "objects that differ in each picture.",
        "Compare the two pictures and tell which objects are different in each of them.",
    ],
    "MIT-States_PropertyCoherence": [
        "Exactly one kind of object is in every picture. Choose it from the options.",
        "Find the object that all the pictures have in common and answer with one of the options.",
    ],
    "nuscenes": [
        "Count the objects across all the pictures and answer with one of the options.",
        "Answer the question about the pictures with one of the options.",
    ],
    "RecipeQA_ImageCoherence": [
        "The caption describes exactly one of the pictures. Answer with that picture's name, such as image A.",
        "Which picture does the caption describe? Reply with its name (image A, image B, ...).",
    ],
}


@dataclass
class I4Instance:
    scenes: list[Scene]         # in {image#k} order
    context: str                # with one {image#k} per image
    response: str
    choices: list[str] | None   # multi-choice datasets only
    instruction: int            # index into INSTRUCTIONS[dataset]


def _name(k: int) -> str:
    return f"IMAGE#{k}"


def _slot(k: int) -> str:
    return "{image#" + str(k) + "}"


def _with_slots(text: str, n: int) -> str:
    """A world question (slots after the first mention of each image) with DEMON's ``{image#k}`` slots instead."""
    for k in range(1, n + 1):
        text = text.replace(_name(k) + SLOT, _name(k) + _slot(k), 1)
    if SLOT in text:
        raise ValueError(f"a slot of the world is left in {text!r}")
    return text


def _named_list(n: int) -> str:
    return join_items([_name(k) + _slot(k) for k in range(1, n + 1)])


def _kind_order(kind: tuple[str, str]) -> tuple[int, int]:
    return ALL_COLOURS.index(kind[0]), ALL_SHAPES.index(kind[1])


def _count_item(n: int, colour: str, shape: str, position: str | None = None) -> str:
    """``no red circles`` / ``a red circle`` / ``two red circles`` (/ ``a red circle on the left``)."""
    return count_phrase(0, Qual(colour, shape)) if n == 0 else item_phrase(n, colour, shape, position)


def difference(first: Scene, second: Scene) -> str:
    """What differs between two scenes, in the world's phrases: the kinds whose counts differ, per image, or
    (counts equal) the single objects that moved, with their places."""
    a = {(c, s): n for c, s, n in first.groups()}
    b = {(c, s): n for c, s, n in second.groups()}
    kinds = sorted(set(a) | set(b), key=_kind_order)
    changed = [k for k in kinds if a.get(k, 0) != b.get(k, 0)]
    if changed:
        parts = [join_items([_count_item(counts.get(k, 0), *k) for k in changed]) for counts in (a, b)]
    else:
        moved = [k for k in kinds if a[k] == 1 and b[k] == 1
                 and first.find(*k)[0].position != second.find(*k)[0].position]
        if not moved:
            raise ValueError("the two scenes hold the same objects in the same places")
        parts = [join_items([item_phrase(1, *k, scene.find(*k)[0].position) for k in moved])
                 for scene in (first, second)]
    return f"{_name(1)} shows {parts[0]}. {_name(2)} shows {parts[1]}."


class _Draw:
    """One dataset's random stream and scene sampler; every accepted scene joins ``taken``."""

    def __init__(self, seed: int, dataset: str, colours: tuple, shapes: tuple, taken: set):
        self.rng = random.Random(f"{seed}:i4-{dataset}")
        self.colours, self.shapes = tuple(colours), tuple(shapes)
        self.taken = taken
        self.sampler = SceneSampler(self.rng, colours=self.colours, shapes=self.shapes, forbidden=taken)

    def fresh(self, scenes: list[Scene]) -> bool:
        """No scene repeats a world scene, an earlier I4 scene or another scene of the instance."""
        sigs = [s.signature() for s in scenes]
        return len(set(sigs)) == len(sigs) and not any(sig in self.taken for sig in sigs)

    def accept(self, scenes: list[Scene]) -> list[Scene]:
        self.taken.update(s.signature() for s in scenes)
        return scenes

    def variant(self, scene: Scene, attribute: str, position_of: tuple[str, str] | None = None,
                background=None) -> Scene | None:
        """``scene`` with one object's colour, shape, count or place changed (None where that is impossible)."""
        rng, objects = self.rng, list(scene.objects)
        i = rng.randrange(len(objects))
        if attribute == "colour":
            objects[i] = replace(objects[i], colour=rng.choice([c for c in self.colours if c != objects[i].colour]))
        elif attribute == "shape":
            objects[i] = replace(objects[i], shape=rng.choice([s for s in self.shapes if s != objects[i].shape]))
        elif attribute == "count":
            if len(objects) == 1 or (len(objects) < MAX_OBJECTS and rng.random() < 0.5):
                c, s, _n = rng.choice(scene.groups())
                objects.append(self.sampler.new_object(c, s, rng.choice(scene.free_cells())))
            else:
                del objects[i]
        elif attribute == "position":
            if position_of is None or not scene.free_cells():
                return None
            obj = scene.find(*position_of)[0]
            row, col = rng.choice(scene.free_cells())
            moved = replace(obj, row=row, col=col, jitter=(rng.uniform(-1, 1), rng.uniform(-1, 1)))
            objects = [moved if o is obj else o for o in objects]
        else:
            raise ValueError(f"unknown attribute {attribute!r}")
        return Scene(tuple(objects), background or scene.background)


def _spot_the_diff(draw: _Draw, attribute: str) -> I4Instance:
    rng = draw.rng
    instruction = rng.randrange(len(INSTRUCTIONS["Spot-the-Diff"]))
    for _ in range(MAX_TRIES):
        base = draw.sampler.sample(1, MAX_OBJECTS if attribute == "position" else 3)
        position_of = None
        if attribute == "position":
            if not base.unique_kinds():
                continue
            position_of = rng.choice(base.unique_kinds())
        # The same background: the one change is the answer.
        other = draw.variant(base, attribute, position_of)
        if other is None or not draw.fresh([base, other]):
            continue
        pair = [base, other] if rng.random() < 0.5 else [other, base]
        context = f"Look at {_named_list(2)}. What is different between {_name(1)} and {_name(2)}?"
        return I4Instance(draw.accept(pair), context, difference(*pair), None, instruction)
    raise RuntimeError(f"could not draw a Spot-the-Diff pair differing in {attribute}")


def _property_coherence(draw: _Draw, answer_at: int) -> I4Instance:
    rng = draw.rng
    instruction = rng.randrange(len(INSTRUCTIONS["MIT-States_PropertyCoherence"]))
    n = rng.randint(2, 5)
    every = [(c, s) for c in draw.colours for s in draw.shapes]
    for _ in range(MAX_TRIES):
        kind = rng.choice(every)
        scenes = []
        for _k in range(n):
            scene = draw.sampler.sample(1, 3)
            if not scene.find(*kind):
                extra = draw.sampler.new_object(*kind, rng.choice(scene.free_cells()))
                scene = Scene(scene.objects + (extra,), scene.background)
            scenes.append(scene)
        held = [{(o.colour, o.shape) for o in s.objects} for s in scenes]
        if set.intersection(*held) != {kind} or not draw.fresh(scenes):
            continue
        # Decoys the pictures hold in part come first: they are the ones a reader of one picture could pick.
        partial = sorted(set.union(*held) - {kind}, key=_kind_order)
        absent = [k for k in every if k not in set.union(*held)]
        decoys = rng.sample(partial, min(3, len(partial)))
        decoys += rng.sample(absent, 3 - len(decoys))
        rng.shuffle(decoys)
        decoys.insert(answer_at, kind)
        choices = [item_phrase(1, *k) for k in decoys]
        context = f"Look at {_named_list(n)}. Which object is in every one of these pictures?"
        return I4Instance(draw.accept(scenes), context, item_phrase(1, *kind), choices, instruction)
    raise RuntimeError("could not draw pictures sharing exactly one kind of object")


def _counting(draw: _Draw, answer_at: int) -> I4Instance:
    rng = draw.rng
    instruction = rng.randrange(len(INSTRUCTIONS["nuscenes"]))
    n = rng.randint(2, 6)
    for _ in range(MAX_TRIES):
        scenes = [draw.sampler.sample(1, 3) for _k in range(n)]
        o = rng.choice([o for s in scenes for o in s.objects])
        r = rng.random()
        qual = Qual(o.colour, o.shape) if r < 0.5 else Qual(o.colour, None) if r < 0.75 else Qual(None, o.shape)
        total = sum(qual.count(s) for s in scenes)
        low = total - answer_at   # four consecutive counts, the right one at ``answer_at``
        if low < 0 or low + 3 > MAX_COUNT or not draw.fresh(scenes):
            continue
        keys = tuple(str(k) for k in range(1, n + 1))
        text = question(Task("total", keys, qual=qual), {k: _name(int(k)) for k in keys}, set(keys))
        choices = [count_phrase(v, qual) for v in range(low, low + 4)]
        return I4Instance(draw.accept(scenes), _with_slots(text, n), count_phrase(total, qual), choices, instruction)
    raise RuntimeError(f"could not draw {n} pictures with a countable total")


def _image_coherence(draw: _Draw, answer_at: int) -> I4Instance:
    rng = draw.rng
    instruction = rng.randrange(len(INSTRUCTIONS["RecipeQA_ImageCoherence"]))
    n = len(LETTERS) if answer_at == len(LETTERS) - 1 else rng.choice((3, 4))
    positioned = rng.random() < 0.25   # as in BISON, some captions place one object
    for _ in range(MAX_TRIES):
        true = draw.sampler.sample(1, 3)
        position_of = None
        if positioned:
            if not true.unique_kinds():
                continue
            position_of = rng.choice(true.unique_kinds())
        caption = describe(true, position_of)
        attributes = ("colour", "shape", "count") + (("position",) if position_of else ())
        scenes = [true]
        for _try in range(50 * n):
            if len(scenes) == n:
                break
            # A background of its own, as a BISON decoy has: the objects alone tell the pictures apart.
            decoy = draw.variant(true, rng.choice(attributes), position_of, draw.sampler.background())
            if decoy is not None and draw.fresh(scenes + [decoy]) and caption_refuted(caption, decoy) \
                    and not caption_matches(caption, decoy):
                scenes.append(decoy)
        if len(scenes) < n or not draw.fresh(scenes):
            continue
        decoys = scenes[1:]
        rng.shuffle(decoys)
        decoys.insert(answer_at, true)
        names = join_items([f"image {LETTERS[k]} is {_name(k + 1)}{_slot(k + 1)}" for k in range(n)])
        context = f"{names[0].upper()}{names[1:]}. Which of them does the caption '{caption}' describe?"
        choices = [f"image {LETTERS[k]}" for k in range(n)]
        return I4Instance(draw.accept(decoys), context, choices[answer_at], choices, instruction)
    raise RuntimeError("could not draw pictures for a caption that fits exactly one of them")


def build_i4(seed: int, colours: Iterable[str], shapes: Iterable[str], taken: Iterable[tuple],
             per_dataset: int) -> dict[str, list[I4Instance]]:
    """The split: ``per_dataset`` instances of every dataset, none of whose scenes has a signature in ``taken``
    (the world's scenes)."""
    if per_dataset < 0:
        raise ValueError(f"per_dataset={per_dataset} must be >= 0")
    used = set(taken)
    colours, shapes = tuple(colours), tuple(shapes)
    out: dict[str, list[I4Instance]] = {}
    for dataset in DATASETS:
        draw = _Draw(seed, dataset, colours, shapes, used)
        if dataset == "Spot-the-Diff":
            plan = _balanced(draw.rng, ["colour", "shape", "count", "position"], per_dataset)
            out[dataset] = [_spot_the_diff(draw, attribute) for attribute in plan]
            continue
        make = {"MIT-States_PropertyCoherence": _property_coherence, "nuscenes": _counting,
                "RecipeQA_ImageCoherence": _image_coherence}[dataset]
        # The right choice's place is balanced, so that always answering the first choice scores chance.
        out[dataset] = [make(draw, at) for at in _balanced(draw.rng, list(range(len(LETTERS))), per_dataset)]
    return out


def build_i4_for_world(world: World, per_dataset: int) -> dict[str, list[I4Instance]]:
    cfg = world.config
    return build_i4(cfg.seed, cfg.colours, cfg.shapes, (e.scene.signature() for e in world.scenes.values()),
                    per_dataset)


def build_i4_for_root(root: str | os.PathLike, per_dataset: int) -> tuple[dict[str, list[I4Instance]], int]:
    """The split of the world written in ``root`` (from ``world/scenes.json`` alone) and its image size: the
    same split ``build_i4_for_world`` gives for the world in memory."""
    data = load_world_file(root)
    cfg = data["config"]
    scenes = (Scene.from_record(rec, where=f"scenes[{i}]") for i, rec in enumerate(data["scenes"]))
    split = build_i4(int(cfg["seed"]), cfg["colours"], cfg["shapes"], (s.signature() for s in scenes), per_dataset)
    return split, int(cfg["image_size"])


def core_file(root: str | os.PathLike, dataset: str) -> Path:
    return Path(root) / I4_DIR / dataset / "core" / "core.json"


def core_record(dataset: str, instances: list[I4Instance]) -> dict:
    """``core.json`` of one dataset."""
    data = []
    for i, inst in enumerate(instances):
        sample_id = f"{dataset}_{i:03d}"
        task = {"context": inst.context,
                "images_path": [f"images/{sample_id}_{k}.png" for k in range(1, len(inst.scenes) + 1)]}
        if inst.choices is not None:
            task["choice_list"] = list(inst.choices)
        data.append({"sample_id": sample_id, "task_instruction_id": inst.instruction, "task_instance": task,
                     "response": inst.response})
    return {"metadata": {"task_instruction": list(INSTRUCTIONS[dataset]), "question_type": DATASETS[dataset]},
            "data": data}


def _written_files(root: Path) -> set[Path]:
    """The files a previous split wrote: each dataset's ``core.json`` and the images it lists."""
    out = set()
    for dataset in DATASETS:
        path = core_file(root, dataset)
        if not path.exists():
            continue
        try:
            for rec in read_json(path, what="I4 core file")["data"]:
                out.update(path.parent / rel for rel in rec["task_instance"]["images_path"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: existing I4 file is unreadable ({exc}); remove it by hand") from exc
        out.add(path)
    return out


def write_i4(split: dict[str, list[I4Instance]], root: str | os.PathLike, image_size: int, *,
             workers: int = 1) -> dict[str, int]:
    """Write every dataset's ``core.json`` and images (replacing a previous split: its files that this one does
    not write are removed); returns the instances per file written."""
    from .render import render_all

    root = Path(root)
    old = _written_files(root)
    new: set[Path] = set()
    jobs = []
    summary: dict[str, int] = {}
    for dataset, instances in split.items():
        if not instances:
            continue
        path = core_file(root, dataset)
        record = core_record(dataset, instances)
        for rec, inst in zip(record["data"], instances):
            for rel, scene in zip(rec["task_instance"]["images_path"], inst.scenes):
                jobs.append((scene, str(path.parent / rel), image_size))
                new.add(path.parent / rel)
        atomic_write_json(path, record)
        new.add(path)
        summary[str(path.relative_to(root))] = len(instances)
    render_all(jobs, workers=workers)
    for stale in sorted(old - new):
        stale.unlink(missing_ok=True)
    summary["I4 images"] = len(jobs)
    return summary


# --- the trivial baseline ------------------------------------------------------------------------------

def baseline_response(record: dict, open_answer: str) -> str:
    """A multi-choice instance's first choice; an open-ended one's ``open_answer``."""
    choices = record["task_instance"].get("choice_list")
    return choices[0] if choices else open_answer


def write_baseline_predictions(i4_dir: str | os.PathLike, result_dir: str | os.PathLike,
                               datasets: Iterable[str] | None = None) -> dict[str, Path]:
    """Write a trivial baseline's ``<result_dir>/<dataset>/pred.json`` (``[{"sample_id", "pred_response",
    "gt_response"}]``, the I4 prediction format) for every dataset of the split in ``i4_dir``
    (``<root>/evaluation/I4``); returns dataset -> file.

    Multi-choice and image-choice datasets answer the first choice (the right choice's place is balanced, so this
    scores chance). Open-ended datasets answer the split's most common ground-truth response (the first of them
    in data order on a tie): a constant answer, scored by ROUGE-L against every instance, that credits only the
    words all answers share (``IMAGE#1 shows ... IMAGE#2 shows ...``) and the objects it happens to name.
    """
    i4_dir, result_dir = Path(i4_dir), Path(result_dir)
    names = list(datasets) if datasets is not None else [d for d in DATASETS if (i4_dir / d / "core").is_dir()]
    written = {}
    for dataset in names:
        core = read_json(i4_dir / dataset / "core" / "core.json", what="I4 core file")
        records = core["data"]
        counts = Counter(rec["response"] for rec in records)
        most = max(counts.values(), default=0)
        common = next((rec["response"] for rec in records if counts[rec["response"]] == most), "")
        preds = [{"sample_id": rec["sample_id"], "pred_response": baseline_response(rec, common),
                  "gt_response": rec["response"]} for rec in records]
        written[dataset] = atomic_write_json(result_dir / dataset / "pred.json", preds)
    return written


__all__ = ["DATASETS", "IMAGE_CHOICE_DATASETS", "I4_DIR", "INSTRUCTIONS", "PER_DATASET", "I4Instance", "build_i4",
           "build_i4_for_world", "build_i4_for_root", "core_file", "core_record", "difference", "write_i4",
           "write_baseline_predictions"]
