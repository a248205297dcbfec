"""The world's images read together with a message: the samples that pretrain towers whose Q-Former reads it.

With ``model.qformer_text_input`` (InstructBLIP's design) each image of the tiny model is encoded together with
the user message that shows it, and the towers are pretrained on direct targets that depend on that message
(:mod:`.towers`). The query tokens after the slots (one per counted thing and per grid cell,
:class:`~.tags.TagVocabulary`) are **item queries**: item query *i* carries, for
the *i*-th item of a BISON caption in the message, how many of its kind the image holds and the cell of its
single object; for a message that counts one kind (an NLVR2 statement, a count question) the first item query
carries that kind's count. So the decoder finds what the question asks at a fixed token of each image (the
BISON answer's *i*-th check reads item token *i*; an NLVR2 count reads item token 1) — the selection that a
from-scratch decoder does not learn within the CPU budget (docs/research/tinyworld.md). Each item query is also
trained on what its item *names* (colour and shape, a target of the text alone): without it, whether the queries
find an NLVR2 statement's kind within the budget depends on the initialisation; with it they do.

The dataset ``synthetic_instruction_tags`` (registered in :mod:`.datasets`) draws over the world's training
images only, sample by sample:

- with probability ``caption_variants``, a BISON-style caption question about any training image — its own
  caption, or that of a copy with one attribute changed, which the image refutes (:class:`CaptionVariants`;
  text only, no new image);
- with probability ``nlvr2_statements``, one of the dialogues' NLVR2 statements read with any training image
  (:class:`StatementTransfer`);
- otherwise one (image, message) pair of the dialogues' first turns and of the perception questions whose
  message has such a target.

Mixing within each batch matters: batches that alternate between the kinds learn them much more slowly
(docs/research/tinyworld.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..common.io import read_json
from ..common.paths import SparklesLayout
from ..common.tensors import IGNORE_INDEX
from ..data.base import BadRecord, DataError, Record, RecordDataset, RecordSet
from ..eval.benchmarks import bison, nlvr2
from ..processors.image import load_rgb
from .language import describe, parse_items
from .scenes import ALL_COLOURS, ALL_SHAPES, GRID, MAX_OBJECTS, Obj, Scene
from .tags import TagVocabulary
from .tasks import caption_refuted, parse_question, parse_statement
from .writers import load_scenes, scenes_file


def no_place() -> int:
    """The place class "not exactly one object", after the grid's cells."""
    return GRID * GRID


@dataclass(frozen=True)
class InstructionSample:
    """One image seen with one message, and the message's targets (``IGNORE_INDEX`` / empty where it has none)."""

    image: str      # image key (str(image_id))
    message: str    # the user message, as the dialogue or prompt writes it
    asked: int = IGNORE_INDEX  # how many of the message's counted kind the image holds
    fit: int = IGNORE_INDEX    # whether every item of the message's BISON caption holds in the image
    # per item of a BISON caption, or the one counted kind: (how many of its kind the image holds, the cell of
    # the single one or no_place())
    items: tuple[tuple[int, int], ...] = ()
    # per item, what the message names: (colour or None, shape or None) — a target of the text alone
    names: tuple[tuple[Optional[str], Optional[str]], ...] = ()


def place_of(colour, shape, scene) -> int:
    """The grid cell (row-major) of the one object of a (colour?, shape?) kind; ``no_place()`` if not one."""
    objs = [o for o in scene.objects if colour in (None, o.colour) and shape in (None, o.shape)]
    return objs[0].row * GRID + objs[0].col if len(objs) == 1 else no_place()


def targeted_sample(key: str, message: str, scene) -> InstructionSample | None:
    """``message`` about the image ``key`` with its targets: the counted kind's count (NLVR2 statements, count
    questions), the named object's count and place (where / how large it is), or whether a BISON caption holds
    and each caption item's count and place; None without any."""
    task = parse_question(message)
    if task is None:
        return None
    if task.kind in ("nlvr2", "total", "compare", "more2", "total2"):
        qual = parse_statement(task.text).qual if task.kind == "nlvr2" else task.qual
        n = qual.count(scene)
        return InstructionSample(key, message, asked=n, items=((n, place_of(qual.colour, qual.shape, scene)),),
                                 names=((qual.colour, qual.shape),))
    if task.kind in ("where", "size"):  # one object named: its kind's count and the single one's cell
        colour, shape = task.obj
        n = scene.count(colour, shape)
        return InstructionSample(key, message, asked=n, items=((n, place_of(colour, shape, scene)),),
                                 names=((colour, shape),))
    if task.kind == "bison":
        parsed = parse_items(task.text)
        items = tuple((scene.count(it.colour, it.shape), place_of(it.colour, it.shape, scene)) for it in parsed)
        return InstructionSample(key, message, fit=int(not caption_refuted(task.text, scene)), items=items,
                                 names=tuple((it.colour, it.shape) for it in parsed))
    return None


class CaptionVariants:
    """BISON questions about any training image, from its own caption or a one-attribute variant it refutes.

    The world's dialogues hold ~1,100 BISON pairs; this writes as many as wanted about the training images, in
    the world's BISON style (``describe`` of the image, or of a copy with one object recoloured, reshaped,
    added, removed or moved, whose caption the image refutes).
    """

    def __init__(self, scenes: dict, keys: Sequence[str], seed: int = 0) -> None:
        self.scenes = {k: Scene.from_record(scenes[k]) for k in keys}
        self.keys = list(keys)
        self.colours = sorted({o.colour for sc in self.scenes.values() for o in sc.objects} or ALL_COLOURS)
        self.shapes = sorted({o.shape for sc in self.scenes.values() for o in sc.objects} or ALL_SHAPES)
        self.rng = random.Random(seed)

    def variant(self, scene, rng: random.Random):
        """``(scene', position_of)``: one attribute changed (None when this scene allows no such change)."""
        objs = list(scene.objects)
        free = scene.free_cells()
        attribute = rng.choice(("colour", "shape", "count", "position"))
        i = rng.randrange(len(objs))
        if attribute == "colour":
            objs[i] = replace(objs[i], colour=rng.choice([c for c in self.colours if c != objs[i].colour]))
        elif attribute == "shape":
            objs[i] = replace(objs[i], shape=rng.choice([s for s in self.shapes if s != objs[i].shape]))
        elif attribute == "count":
            if free and (len(objs) == 1 or (len(objs) < MAX_OBJECTS and rng.random() < 0.5)):
                row, col = rng.choice(free)
                objs.append(Obj(objs[i].shape, objs[i].colour, objs[i].size, row, col))
            elif len(objs) > 1:
                del objs[i]
            else:
                return None
        else:
            unique = scene.unique_kinds()
            if not unique or not free:
                return None
            kind = rng.choice(unique)
            j = next(k for k, o in enumerate(objs) if (o.colour, o.shape) == kind)
            row, col = rng.choice(free)
            objs[j] = replace(objs[j], row=row, col=col)
            return Scene(tuple(objs), scene.background), kind
        return Scene(tuple(objs), scene.background), None

    def about(self, key: str, rng: random.Random) -> InstructionSample:
        """A BISON question about the image ``key``: half the time its own caption, else a refuted variant."""
        scene = self.scenes[key]
        while True:
            if rng.random() < 0.5:
                unique = scene.unique_kinds()
                position_of = rng.choice(unique) if unique and rng.random() < 0.25 else None
                return targeted_sample(key, bison.prompt(describe(scene, position_of)), scene)
            changed = self.variant(scene, rng)
            if changed is None:
                continue
            other, position_of = changed
            text = describe(other, position_of)
            if caption_refuted(text, scene):
                return targeted_sample(key, bison.prompt(text), scene)

    def __call__(self) -> InstructionSample:
        """A question about a training image drawn from this object's own generator."""
        return self.about(self.rng.choice(self.keys), self.rng)


class StatementTransfer:
    """NLVR2 statements of the training dialogues read with any training image.

    A statement names the kind it counts, so its count target holds for every image: pairing the dialogues'
    ~1,100 statements with all training images multiplies the samples that teach the towers to parse a
    statement, the rarest message of the world (text only, no new image).
    """

    def __init__(self, scenes: dict, keys: Sequence[str], statements: Sequence[str]) -> None:
        if not statements:
            raise ValueError("no NLVR2 statements to transfer")
        self.scenes, self.keys, self.statements = scenes, list(keys), list(statements)

    def about(self, key: str, rng: random.Random) -> InstructionSample:
        return targeted_sample(key, rng.choice(self.statements), self.scenes[key])


def first_turn_messages(root: Path) -> list[tuple[str, list[str]]]:
    """``(user message, image keys)`` of the dialogues' first turns and of the perception questions."""
    messages: list[tuple[str, list[str]]] = []
    for subset in ("CC", "VG"):
        for record in read_json(SparklesLayout(root).dialogue_file(subset), what="dialogue file"):
            first = record["dialogue"][0]
            messages.append((first["content"], [str(im["image_id"]) for im in first.get("images", [])]))
    perception = root / "data" / "cc_sbu_align" / "perception.json"
    if perception.is_file():
        for record in read_json(perception, what="perception questions"):
            messages.append((record["uniform_question"], [str(im["image_id"]) for im in record["tgt_imgs"]]))
    return messages


def training_samples(root: Path, scenes: dict) -> list[InstructionSample]:
    """Every (image, message) pair of the dialogues' first turns and of the perception questions with a target."""
    out = []
    for message, keys in first_turn_messages(root):
        for key in keys:
            sample = targeted_sample(key, message, Scene.from_record(scenes[key]))
            if sample is not None:
                out.append(sample)
    return out


def item_targets(samples: Sequence[InstructionSample], num_items: int, vocabulary) -> dict[str, torch.Tensor]:
    """``[N, num_items]`` targets of each sample's items, ``IGNORE_INDEX`` where a sample has no such item:
    ``item_count`` (clamped to the top count class), ``item_place``, and what the message names,
    ``item_colour`` / ``item_shape`` (the vocabulary's index, or one past the last for "any")."""
    out = {k: torch.full((len(samples), num_items), IGNORE_INDEX, dtype=torch.long)
           for k in ("item_count", "item_place", "item_colour", "item_shape")}
    for row, s in enumerate(samples):
        for col, (count, place) in enumerate(s.items[:num_items]):
            out["item_count"][row, col] = min(count, vocabulary.max_count_class - 1)
            out["item_place"][row, col] = place
        for col, (colour, shape) in enumerate(s.names[:num_items]):
            colours, shapes = vocabulary.colours, vocabulary.shapes
            out["item_colour"][row, col] = len(colours) if colour is None else colours.index(colour)
            out["item_shape"][row, col] = len(shapes) if shape is None else shapes.index(shape)
    return out


class InstructionTagDataset(RecordDataset):
    """(image, message) samples with the image's scene tags and the message's item targets.

    Records are the fixed (image, message) pairs; a draw is instead, with probability ``variant_share``, a
    caption question about a training image, or with probability ``statement_share`` an NLVR2 statement read with
    a training image — the image and the text chosen by the sample's seed, so a sample depends on its seed only.
    """

    def __init__(self, records: RecordSet, samples: Sequence[InstructionSample], files: dict[str, Path],
                 labels: dict[str, tuple[list[int], list[int]]], image_transform, *, num_items: int,
                 vocabulary, variants: Optional[CaptionVariants] = None, variant_share: float = 0.0,
                 statements: Optional[StatementTransfer] = None, statement_share: float = 0.0,
                 skip_bad: bool = False, sample_ratio: float = 1.0) -> None:
        super().__init__(records, encoder=None, skip_bad=skip_bad, sample_ratio=sample_ratio)
        if (variant_share and variants is None) or (statement_share and statements is None):
            raise ValueError("a caption-variant or statement share needs its generator")
        if variant_share + statement_share >= 1:
            raise ValueError("the caption-variant and statement shares must leave room for the fixed pairs")
        self.samples, self.files, self.labels, self.image_transform = list(samples), files, labels, image_transform
        self.variants, self.variant_share = variants, float(variant_share)
        self.statements, self.statement_share = statements, float(statement_share)
        self.num_items, self.vocabulary = num_items, vocabulary

    def sample(self, position: int, sample_seed: int) -> InstructionSample:
        rng = random.Random(sample_seed)
        draw = rng.random()
        if draw < self.variant_share:
            return self.variants.about(rng.choice(self.variants.keys), rng)
        if draw < self.variant_share + self.statement_share:
            return self.statements.about(rng.choice(self.statements.keys), rng)
        return self.samples[position]

    def get(self, position: int, sample_seed: int):
        sample = self.sample(position, sample_seed)
        record = self.records.records[position]
        try:
            image = load_rgb(self.files[sample.image])
        except Exception as exc:
            raise DataError(f"{self.records.anno_file}: {record.id}: image {self.files[sample.image]}: "
                            f"{exc}") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            pixels = self.image_transform(image)
        kinds, sizes = self.labels[sample.image]
        return f"{self.name}/{sample.image}", pixels, kinds, sizes, sample

    def collate(self, items):
        good = [it for it in items if not isinstance(it, BadRecord)]
        batch = {"ids": [it[0] for it in good], "bad": [(b.id, b.reason) for b in items if isinstance(b, BadRecord)],
                 "num_samples": len(good)}
        if good:
            samples = [it[4] for it in good]
            batch["images"] = torch.stack([it[1] for it in good])
            batch["cell_kinds"] = torch.tensor([it[2] for it in good], dtype=torch.long)
            batch["cell_sizes"] = torch.tensor([it[3] for it in good], dtype=torch.long)
            batch["messages"] = [s.message for s in samples]
            batch.update(item_targets(samples, self.num_items, self.vocabulary))
        return batch


def load_instruction_tags(name: str, root: Path, *, num_items: int, image_transform, caption_variants: float = 0.0,
                          nlvr2_statements: float = 0.0, skip_bad: bool = False, sample_ratio: float = 1.0,
                          seed: int = 0) -> InstructionTagDataset:
    """The world's (image, message) pairs, with a share ``caption_variants`` of caption-variant questions and a
    share ``nlvr2_statements`` of transferred NLVR2 statements."""
    if num_items < 1:
        raise DataError(f"datasets.{name}: the towers have no item queries (model.num_query_token must exceed the "
                        "slot queries)")
    if min(caption_variants, nlvr2_statements) < 0 or caption_variants + nlvr2_statements >= 1:
        raise DataError(f"datasets.{name}: caption_variants ({caption_variants}) and nlvr2_statements "
                        f"({nlvr2_statements}) must be shares that leave room for the world's own pairs")
    vocabulary = TagVocabulary.of_world()
    scenes = load_scenes(root)
    training = training_samples(root, scenes)
    if not training:
        raise DataError(f"datasets.{name}: the world's dialogues and perception questions hold no message with "
                        "a count or caption target")
    keys = sorted({s.image for s in training})
    records = [Record(id=f"{name}/{i}", index=i, messages=[], target="", image_ids=[s.image], kind="scene_tags")
               for i, s in enumerate(training)]
    files = {k: root / scenes[k]["file"] for k in keys}
    labels = {k: vocabulary.labels(scenes[k], f"{scenes_file(root)}: image {k}") for k in keys}
    variants = CaptionVariants(scenes, keys, seed) if caption_variants or nlvr2_statements else None
    statements = None
    if nlvr2_statements:
        texts = sorted({s.message for s in training if getattr(parse_question(s.message), "kind", None) == "nlvr2"})
        if not texts:
            raise DataError(f"datasets.{name}.nlvr2_statements: the world's dialogues hold no NLVR2 statement")
        statements = StatementTransfer(variants.scenes, keys, texts)
    return InstructionTagDataset(RecordSet(name, scenes_file(root), root, records, []), training, files, labels,
                                 image_transform, num_items=num_items, vocabulary=vocabulary,
                                 variants=variants, variant_share=caption_variants, statements=statements,
                                 statement_share=nlvr2_statements, skip_bad=skip_bad, sample_ratio=sample_ratio)


def held_out_items(root: Path, limit: int) -> tuple[list[InstructionSample], list[InstructionSample], list]:
    """The world's evaluation items as tower samples: BISON (two per item, candidate order, read with the item's
    prompt), NLVR2 (left, right per item, read with the statement's prompt) and each statement with its truth."""
    layout, scenes = SparklesLayout(root), load_scenes(root)
    bison_samples = []
    for item in read_json(layout.eval_annotations("BISON"), what="BISON annotations")[:limit]:
        for cand in item["image_candidates"]:
            key = str(cand["image_id"])
            bison_samples.append(targeted_sample(key, bison.prompt(item["caption"]), Scene.from_record(scenes[key])))
    nlvr2_samples, statements = [], []
    for item in read_json(layout.eval_annotations("NLVR2"), what="NLVR2 annotations")[:limit]:
        stem = item["identifier"].rsplit("-", 1)[0]
        for side in (0, 1):
            key = f"{stem}-img{side}"
            nlvr2_samples.append(targeted_sample(key, nlvr2.prompt(item["sentence"]), Scene.from_record(scenes[key])))
        statements.append((parse_statement(item["sentence"]), item["label"] == "True"))
    return bison_samples, nlvr2_samples, statements
