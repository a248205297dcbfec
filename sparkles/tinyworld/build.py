"""Builds the synthetic world in memory: configuration, image ids, evaluation sets and training dialogues.

Order matters for train/eval disjointness: the evaluation sets (SparklesEval, BISON, NLVR2) are drawn first and
their scene signatures are forbidden to every training scene; the held-out demo chats are drawn last, from scenes
unlike every other image of the world. Every random choice comes from a named stream
``random.Random(f"{seed}:{name}")``, so the same seed gives the same world on any machine.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable

from ..conversation.template import IMAGE_MARKER as SLOT
from .language import Qual, caption, describe, word_count
from .scenes import DEFAULT_COLOURS, DEFAULT_SHAPES, MAX_OBJECTS, Scene, SceneSampler
from .tasks import (NLVR2_TEMPLATES, TURN2_KINDS, InvalidTask, Statement, Task, answer, caption_matches,
                    caption_refuted, image_name, question)

MIX_KINDS = ("describe", "count", "attribute", "bison", "nlvr2")
# BISON/NLVR2-style dialogues dominate because the evaluation accuracies are the targets; the plain kinds teach
# the descriptions and counts those answers are made of.
DEFAULT_MIX = {"describe": 0.15, "count": 0.2, "attribute": 0.1, "bison": 0.275, "nlvr2": 0.275}
BISON_ATTRIBUTES = ("colour", "shape", "count", "position")
# Training pairs (dialogues and drills) differ in position twice as often as in each other attribute: only a
# position pair's caption positions an item, so the decoder's read-out of places has far fewer examples than that
# of counts (docs/research/tinyworld.md). The evaluation set stays balanced.
TRAIN_BISON_ATTRIBUTES = ("colour", "shape", "count", "position", "position")
# The text-only drills (``Builder.reasoning_item``) and their default shares. The single-image caption checks are
# off by default: they teach the place comparison only after ~500 steps of their own, more than run.sh's time
# allows (docs/research/tinyworld.md).
REASONING_KINDS = ("bison", "nlvr2", "caption")
DEFAULT_REASONING_MIX = {"bison": 1.0, "nlvr2": 1.0, "caption": 0.0}
# Images in the first user message, per subset (CC: 1–3, VG: 2–3, like the upstream split files; the held-out
# demo chats 1–3, as a demo user uploads them).
TURN1_IMAGES = {"CC": (1, 2, 3), "VG": (2, 3), "SparklesEval": (2, 3), "DemoChat": (1, 2, 3)}
MAX_TRIES = 500


@dataclass
class WorldConfig:
    seed: int = 0
    num_train: int = 4000            # two-turn training dialogues, CC and VG together
    cc_fraction: float = 0.5
    num_bison: int = 150
    num_nlvr2: int = 150
    num_sparkleseval: int = 50
    # text-only drills, shared among the kinds by reasoning_mix: BISON/NLVR2 (data/reasoning/reasoning.json, the
    # decoder's verdict warm-up) and single-image caption checks (data/reasoning/caption_checks.json)
    num_reasoning: int = 12000
    reasoning_mix: dict = field(default_factory=lambda: dict(DEFAULT_REASONING_MIX))  # shares of the drill kinds
    image_size: int = 96
    mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    colours: tuple = DEFAULT_COLOURS
    shapes: tuple = DEFAULT_SHAPES
    max_answer_words: int = 56
    vocab_size: int = 2048
    # Share of the describe / count / attribute dialogues whose images are named IMAGE#1, IMAGE#2, … in order of
    # appearance, as the demo and the API number uploads; the rest keep the upstream names (IMAGE#<image id>).
    order_label_share: float = 0.5
    # held-out two-turn chats labelled in order (evaluation/DemoChat), the demo's way of talking to the model
    num_demo_chats: int = 50

    def validate(self) -> None:
        if self.num_train < 10:
            raise ValueError(f"num_train={self.num_train}: need at least 10 dialogues to fill every split file")
        if not 0.0 < self.cc_fraction < 1.0:
            raise ValueError(f"cc_fraction={self.cc_fraction} must be strictly between 0 and 1")
        if self.num_reasoning < 0:
            raise ValueError(f"num_reasoning={self.num_reasoning} must be >= 0")
        if not 0.0 <= self.order_label_share <= 1.0:
            raise ValueError(f"order_label_share={self.order_label_share} must be between 0 and 1")
        if self.num_demo_chats < 0:
            raise ValueError(f"num_demo_chats={self.num_demo_chats} must be >= 0")
        unknown = set(self.reasoning_mix) - set(REASONING_KINDS)
        if unknown:
            raise ValueError(f"unknown drill kinds in reasoning_mix: {sorted(unknown)}; known: "
                             f"{', '.join(REASONING_KINDS)}")
        if any(w < 0 for w in self.reasoning_mix.values()) or sum(self.reasoning_mix.values()) <= 0:
            raise ValueError(f"reasoning_mix weights must be >= 0 with a positive sum: {self.reasoning_mix}")
        for name in ("num_bison", "num_nlvr2", "num_sparkleseval"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 2 (labels are balanced)")
        if self.image_size < 32:
            raise ValueError(f"image_size={self.image_size} is too small for visible objects (min 32)")
        unknown = set(self.mix) - set(MIX_KINDS)
        if unknown:
            raise ValueError(f"unknown task kinds in mix: {sorted(unknown)}; known: {', '.join(MIX_KINDS)}")
        if any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ValueError(f"mix weights must be >= 0 with a positive sum: {self.mix}")
        if not any(self.mix.get(k, 0) > 0 for k in ("describe", "count", "attribute")):
            raise ValueError("mix needs a positive weight on describe, count or attribute "
                             "(the only kinds with 1- and 3-image first turns)")
        if len(self.colours) < 2 or len(self.shapes) < 2:
            raise ValueError("the world needs at least two colours and two shapes (BISON pairs swap them)")

    def to_json(self) -> dict:
        d = asdict(self)
        d["colours"], d["shapes"] = list(self.colours), list(self.shapes)
        return d


PRESETS: dict[str, dict] = {
    "default": {},
    "ci": {"num_train": 300, "num_bison": 20, "num_nlvr2": 20, "num_sparkleseval": 20, "num_reasoning": 600,
           "num_demo_chats": 20},
}


@dataclass
class SceneEntry:
    image_id: object      # str for CC and NLVR2, int for VG, SparklesEval and BISON (upstream types)
    dataset: str          # CC, VG, SparklesEval, BISON, NLVR2
    file: str             # path relative to the Sparkles root
    scene: Scene


@dataclass
class World:
    config: WorldConfig
    scenes: dict = field(default_factory=dict)                 # key (str id) -> SceneEntry
    dialogues: dict = field(default_factory=lambda: {"CC": [], "VG": []})
    sparkleseval: list = field(default_factory=list)
    demo_chats: list = field(default_factory=list)             # SparklesEval-format chats labelled in order
    bison: list = field(default_factory=list)
    nlvr2: list = field(default_factory=list)
    reasoning: list = field(default_factory=list)               # text-only drills (Builder.reasoning_item)


class IdAllocator:
    """Random unique image ids in upstream-like ranges; unique as strings across all datasets.

    Ids start at 100 so that no real id reads like the literal IMAGE#1 / IMAGE#2 of the BISON/NLVR2 prompts.
    """

    # Short ids keep sequences short (the tiny tokenizer splits digits); the range widens for big worlds.
    RANGES = {"CC": 99_999, "VG": 99_999, "SparklesEval": 99_999, "DemoChat": 99_999, "BISON": 581_929}

    def __init__(self, rng: random.Random, expected: int):
        self.rng = rng
        self.used: set[str] = set()
        self.scale = max(1, expected * 25)

    def new(self, dataset: str):
        hi = max(self.RANGES[dataset], self.scale)
        for _ in range(10_000):
            value = self.rng.randint(100, hi)
            if str(value) not in self.used:
                self.used.add(str(value))
                return str(value) if dataset == "CC" else value
        raise RuntimeError(f"image id range of {dataset} exhausted")


def _quotas(weights: dict, total: int, kinds: Iterable[str]) -> dict:
    """Largest-remainder split of ``total`` by weight (deterministic, sums exactly to total)."""
    kinds = [k for k in kinds if weights.get(k, 0) > 0]
    s = sum(weights[k] for k in kinds)
    raw = {k: total * weights[k] / s for k in kinds}
    out = {k: int(raw[k]) for k in kinds}
    for k in sorted(kinds, key=lambda k: (-(raw[k] - out[k]), kinds.index(k)))[: total - sum(out.values())]:
        out[k] += 1
    return out


def _balanced(rng: random.Random, values: list, total: int) -> list:
    out = [values[i % len(values)] for i in range(total)]
    rng.shuffle(out)
    return out


def image_file(dataset: str, image_id) -> str:
    if dataset in ("CC", "VG"):
        return f"data/SparklesDialogue{dataset}/images/{image_id}.jpg"
    if dataset in ("SparklesEval", "DemoChat"):
        return f"evaluation/{dataset}/images/{image_id}.jpg"
    if dataset == "BISON":
        return f"evaluation/BISON/images/{bison_filename(image_id)}"
    if dataset == "NLVR2":
        return f"evaluation/NLVR2/images/{image_id}.png"
    raise ValueError(f"unknown dataset {dataset!r}")


def bison_filename(image_id: int) -> str:
    return f"COCO_val2014_{int(image_id):012d}.jpg"


class Builder:
    def __init__(self, config: WorldConfig):
        config.validate()
        self.cfg = config
        self.world = World(config)
        self.ids = IdAllocator(self._rng("ids"), config.num_train)
        self.reserved: set = set()  # signatures of evaluation scenes

    def _rng(self, name: str) -> random.Random:
        return random.Random(f"{self.cfg.seed}:{name}")

    def _sampler(self, rng: random.Random, forbidden: set | None) -> SceneSampler:
        return SceneSampler(rng, colours=self.cfg.colours, shapes=self.cfg.shapes, forbidden=forbidden)

    def _register(self, key: str, image_id, dataset: str, scene: Scene) -> None:
        if key in self.world.scenes:
            raise RuntimeError(f"image id {key} used twice")
        self.world.scenes[key] = SceneEntry(image_id, dataset, image_file(dataset, image_id), scene)
        if dataset in ("SparklesEval", "BISON", "NLVR2"):
            self.reserved.add(scene.signature())

    # --- random arguments ------------------------------------------------------------------
    def _qual(self, rng: random.Random, scenes: list[Scene]) -> Qual:
        pool = [o for s in scenes for o in s.objects]
        if pool and rng.random() < 0.8:
            o = rng.choice(pool)
            colour, shape = o.colour, o.shape
        else:
            colour, shape = rng.choice(self.cfg.colours), rng.choice(self.cfg.shapes)
        r = rng.random()
        if r < 0.35:
            return Qual(None, shape)
        if r < 0.65:
            return Qual(colour, None)
        if r < 0.85:
            return Qual(colour, shape)
        return Qual(None, None)

    def _turn1_task(self, rng, mix_kind: str, keys: list[str], scenes: list[Scene]) -> Task:
        n = len(keys)
        if mix_kind == "describe":
            return Task("describe", tuple(keys))
        if mix_kind == "count":
            kind = "total" if n == 1 else rng.choice(("total", "compare"))
            return Task(kind, tuple(keys), qual=self._qual(rng, scenes))
        if mix_kind == "attribute":
            candidates = [(k, kind) for k, s in zip(keys, scenes) for kind in s.unique_kinds()]
            if not candidates:
                raise InvalidTask("attribute: no object kind occurs exactly once")
            target, obj = rng.choice(candidates)
            return Task(rng.choice(("where", "size")), tuple(keys), target=target, obj=obj)
        raise ValueError(f"not a plain turn-1 kind: {mix_kind!r}")

    def bison_pair(self, rng, sampler: SceneSampler, attribute: str, true_first: bool):
        """Two scenes differing in one attribute, and a caption that fits exactly one (the true) of them."""
        cfg = self.cfg
        for _ in range(MAX_TRIES):
            position_of = None
            if attribute == "position":
                base = sampler.sample(1, 2)
                kinds = base.unique_kinds()
                if not kinds or not base.free_cells():
                    continue
                position_of = rng.choice(kinds)
                obj = base.find(*position_of)[0]
                row, col = rng.choice(base.free_cells())
                moved = replace(obj, row=row, col=col, jitter=(rng.uniform(-1, 1), rng.uniform(-1, 1)))
                objects = [moved if o is obj else o for o in base.objects]
            else:
                base = sampler.sample(1, 3)
                objects = list(base.objects)
                i = rng.randrange(len(objects))
                if attribute == "colour":
                    objects[i] = replace(objects[i], colour=rng.choice(
                        [c for c in cfg.colours if c != objects[i].colour]))
                elif attribute == "shape":
                    objects[i] = replace(objects[i], shape=rng.choice(
                        [s for s in cfg.shapes if s != objects[i].shape]))
                elif attribute == "count":
                    if len(objects) == 1 or (len(objects) < MAX_OBJECTS and rng.random() < 0.5):
                        c, s, _n = rng.choice(base.groups())
                        objects.append(sampler.new_object(c, s, rng.choice(base.free_cells())))
                    else:
                        del objects[i]
                else:
                    raise ValueError(f"unknown BISON attribute {attribute!r}")
            other = Scene(tuple(objects), sampler.background())
            if not sampler.allowed(other):
                continue
            true, false = (base, other) if rng.random() < 0.5 else (other, base)
            cap = describe(true, position_of)
            # The caption must be false of the decoy, not merely less complete: "a red square" does not tell
            # {red square} from {red square, blue circle}, and real BISON decoys contradict their caption.
            if caption_matches(cap, false) or not caption_refuted(cap, false):
                continue
            return (true, false, cap) if true_first else (false, true, cap)
        raise RuntimeError(f"could not build a BISON pair differing in {attribute}")

    def nlvr2_pair(self, rng, sampler: SceneSampler, template: str, label: bool):
        """A left/right scene pair and a templated statement whose truth on the pair is ``label``."""
        cfg = self.cfg
        for _ in range(MAX_TRIES):
            left, right = sampler.sample(1, MAX_OBJECTS), sampler.sample(1, MAX_OBJECTS)
            side = rng.choice(("left", "right"))
            mine, other = (left, right) if side == "left" else (right, left)
            kinds_l = {(o.colour, o.shape) for o in left.objects}
            kinds_r = {(o.colour, o.shape) for o in right.objects}
            if template == "total":
                q = self._qual(rng, [left, right])
                t = q.count(left) + q.count(right)
                n = t if label else t + rng.choice((-2, -1, 1, 2))
                if n < 1:
                    continue
                st = Statement("total", q, None, n)
            elif template == "both":
                pool = sorted(kinds_l & kinds_r) if label else sorted(kinds_l ^ kinds_r)
                if not pool:
                    continue
                st = Statement("both", Qual(*rng.choice(pool)))
            elif template == "more":
                st = Statement("more", self._qual(rng, [left, right]), side)
            elif template == "contains":
                mine_k = {(o.colour, o.shape) for o in mine.objects}
                pool = sorted(mine_k) if label else sorted((kinds_l | kinds_r) - mine_k)
                if not pool and not label:
                    pool = [(c, s) for c in cfg.colours for s in cfg.shapes if (c, s) not in mine_k]
                if not pool:
                    continue
                st = Statement("contains", Qual(*rng.choice(pool)), side)
            elif template == "none":
                pool = sorted(other.colours() - mine.colours()) if label else sorted(mine.colours())
                if not pool and label:
                    pool = sorted(set(cfg.colours) - mine.colours())
                if not pool:
                    continue
                st = Statement("none", Qual(rng.choice(pool), None), side)
            else:
                raise ValueError(f"unknown NLVR2 template {template!r}")
            if st.truth(left, right) == label:
                return left, right, st.text()
        raise RuntimeError(f"could not build an NLVR2 pair for template {template!r} with label {label}")

    # --- dialogues --------------------------------------------------------------------------
    def dialogue(self, rng, sampler: SceneSampler, dataset: str, mix_kind: str, n: int, *, order_labels: bool = False):
        """One two-turn dialogue: its 4 messages, the (key, image_id, scene) of its images, its two task kinds.

        ``order_labels`` names the images IMAGE#1, IMAGE#2, … in order of appearance (the demo's and the API's
        numbering) instead of by image id; the scenes and tasks drawn are the same either way.
        """
        image_ids = [self.ids.new(dataset) for _ in range(n + 1)]
        keys = [str(i) for i in image_ids]
        for _ in range(MAX_TRIES):
            try:
                if mix_kind == "bison":
                    s1, s2, cap = self.bison_pair(rng, sampler, rng.choice(TRAIN_BISON_ATTRIBUTES), rng.random() < 0.5)
                    scenes1, task1 = [s1, s2], Task("bison", tuple(keys[:2]), text=cap)
                elif mix_kind == "nlvr2":
                    s1, s2, st = self.nlvr2_pair(rng, sampler, rng.choice(NLVR2_TEMPLATES), rng.random() < 0.5)
                    scenes1, task1 = [s1, s2], Task("nlvr2", tuple(keys[:2]), text=st)
                else:
                    # Three full descriptions must fit the answer-length budget: keep those scenes small.
                    most = 3 if (mix_kind == "describe" and n == 3) else MAX_OBJECTS
                    scenes1 = [sampler.sample(1, most) for _ in range(n)]
                    task1 = self._turn1_task(rng, mix_kind, keys[:n], scenes1)
                new_key, new_scene = keys[n], sampler.sample(1, MAX_OBJECTS)
                old_key = rng.choice(keys[:n])
                scenes = dict(zip(keys, scenes1 + [new_scene]))
                kind2 = rng.choice(TURN2_KINDS)
                qual2 = self._qual(rng, [new_scene, scenes[old_key]]) if kind2 != "describe2" else None
                task2 = Task(kind2, (new_key, old_key), qual=qual2)
                names = {k: image_name(k) for k in keys}
                if order_labels:
                    names = {k: image_name(str(i)) for i, k in enumerate(keys, start=1)}
                elif mix_kind in ("bison", "nlvr2"):
                    # The evaluation prompts call the two images IMAGE#1 and IMAGE#2 whatever their ids.
                    names[keys[0]], names[keys[1]] = "IMAGE#1", "IMAGE#2"
                q1, a1 = question(task1, names, set(keys[:n])), answer(task1, scenes, names)
                q2, a2 = question(task2, names, {new_key}), answer(task2, scenes, names)
            except InvalidTask:
                continue
            if max(word_count(a1), word_count(a2)) > self.cfg.max_answer_words:
                continue
            by_key = dict(zip(keys, image_ids))
            inverse = {name: k for k, name in names.items()}
            messages = [
                {"role": "user", "content": q1, "images": self._images(q1, inverse, by_key, scenes)},
                {"role": "assistant", "content": a1},
                {"role": "user", "content": q2, "images": self._images(q2, inverse, by_key, scenes)},
                {"role": "assistant", "content": a2},
            ]
            return messages, [(k, by_key[k], scenes[k]) for k in keys], (task1.kind, task2.kind)
        raise RuntimeError(f"could not build a {mix_kind} dialogue with {n} images in {MAX_TRIES} tries")

    @staticmethod
    def _images(content: str, inverse: dict, by_key: dict, scenes: dict) -> list[dict]:
        """The message's ``images`` list, in order of slot appearance in ``content``."""
        import re

        keys = [inverse["IMAGE#" + name] for name in re.findall(r"IMAGE#([0-9A-Za-z_-]+)<Img><ImageHere></Img>",
                                                                  content)]
        return [{"image_id": by_key[k], "caption": caption(scenes[k])} for k in keys]

    # --- the datasets -----------------------------------------------------------------------
    def build(self) -> World:
        self._sparkleseval()
        self._bison()
        self._nlvr2()
        n_cc = max(5, round(self.cfg.num_train * self.cfg.cc_fraction))
        self._training("CC", n_cc)
        self._training("VG", self.cfg.num_train - n_cc)
        self._reasoning()
        self._demo_chats()
        return self.world

    def reasoning_item(self, rng: random.Random, sampler: SceneSampler, kind: str) -> dict:
        """One text-only drill for a fresh scene pair (never rendered): the question with its image slots removed
        and the world's answer, with ``kind``, ``options`` and ``label``.

        ``kind`` is ``bison`` or ``nlvr2`` (the evaluation question) or ``caption``: a position pair's caption
        checked against one of its two scenes alone (``Is the caption '…' true of IMAGE#2?``). Without images the
        facts in an answer cannot be predicted (the written drills mark them as carrying no loss,
        ``tasks.fact_spans``), but the step from them to the verdict can: a fresh 4-layer decoder
        learns it from these items in a few hundred steps, and one that has learnt it first reads the images far
        better in the dialogue stage than one that must learn both at once (docs/research/tinyworld.md).
        The caption checks are there because a position pair always has one "yes" and one "no" at the positioned
        item: from pairs alone the decoder learns to write the second image's verdict as the opposite of the
        first's instead of comparing the stated place with the caption's.
        """
        names = {"1": "IMAGE#1", "2": "IMAGE#2"}
        options = {"bison": ("IMAGE#1", "IMAGE#2"), "nlvr2": ("TRUE", "FALSE"), "caption": ("TRUE", "FALSE")}
        if kind not in options:
            raise ValueError(f"unknown reasoning drill kind {kind!r}; expected one of {sorted(options)}")
        while True:
            if kind == "nlvr2":
                s1, s2, text = self.nlvr2_pair(rng, sampler, rng.choice(NLVR2_TEMPLATES), rng.random() < 0.5)
                task = Task(kind, ("1", "2"), text=text)
            else:
                attribute = "position" if kind == "caption" else rng.choice(TRAIN_BISON_ATTRIBUTES)
                s1, s2, text = self.bison_pair(rng, sampler, attribute, rng.random() < 0.5)
                task = (Task(kind, ("1", "2"), text=text) if kind == "bison" else
                        Task(kind, ("1", "2"), target=rng.choice(("1", "2")), text=text))
            try:
                scenes = {"1": s1, "2": s2}
                reply = answer(task, scenes, names)
            except InvalidTask:
                continue
            return dict(kind=kind, prompt=question(task, names, {"1", "2"}).replace(SLOT, ""), answer=reply,
                        options=options[kind], label=reply.rsplit(" ", 1)[1].rstrip("."))

    def _reasoning(self) -> None:
        rng = self._rng("reasoning")
        sampler = self._sampler(rng, self.reserved)
        quotas = _quotas(self.cfg.reasoning_mix, self.cfg.num_reasoning, REASONING_KINDS)
        # interleaved before the shuffle, as `_balanced` does (so the default world's drills are what they were)
        kinds = [k for i in range(max(quotas.values(), default=0)) for k in REASONING_KINDS if quotas.get(k, 0) > i]
        rng.shuffle(kinds)
        for kind in kinds:
            self.world.reasoning.append(self.reasoning_item(rng, sampler, kind))

    def _plan(self, rng, subset: str, total: int, kinds: tuple[str, ...]) -> list[tuple[str, int]]:
        """(mix kind, first-turn image count) per dialogue: kinds by quota, image counts cycled per subset."""
        quotas = _quotas(self.cfg.mix, total, kinds)
        allowed = TURN1_IMAGES[subset]
        flexible = [k for k in ("describe", "count", "attribute") if quotas.get(k, 0) or self.cfg.mix.get(k, 0)]
        # Every first-turn image count needs a dialogue (each split file must be non-empty): tiny worlds move
        # BISON/NLVR2 dialogues to the most weighted flexible kind until there are enough.
        while sum(quotas.get(k, 0) for k in flexible) < len(allowed):
            donor = max((k for k in ("bison", "nlvr2") if quotas.get(k, 0)), key=lambda k: quotas[k], default=None)
            if donor is None or not flexible:
                raise ValueError(f"{subset}: {total} dialogues cannot cover {len(allowed)} first-turn image counts")
            quotas[donor] -= 1
            best = max(flexible, key=lambda k: self.cfg.mix.get(k, 0))
            quotas[best] = quotas.get(best, 0) + 1
        order = [k for k in kinds for _ in range(quotas.get(k, 0))]
        rng.shuffle(order)
        plan, cycle = [], 0
        for kind in order:
            if kind in ("bison", "nlvr2"):
                plan.append((kind, 2))
            else:
                plan.append((kind, allowed[cycle % len(allowed)]))
                cycle += 1
        return plan

    def _raw(self, kinds: tuple[str, str]) -> list[dict]:
        return [{"prompt": f"sparkles.tinyworld (seed {self.cfg.seed}): turn 1 task '{kinds[0]}', "
                           f"turn 2 task '{kinds[1]}'",
                 "response": "written from the scene records by the world's templates; no GPT call"}]

    def _training(self, subset: str, total: int) -> None:
        rng = self._rng(f"train-{subset}")
        label_rng = self._rng(f"labels-{subset}")  # a stream of its own: the share leaves the scenes as they are
        sampler = self._sampler(rng, self.reserved)
        for kind, n in self._plan(rng, subset, total, MIX_KINDS):
            # BISON/NLVR2 dialogues keep their names: their pair is IMAGE#1/IMAGE#2 already, as in the evaluation
            # prompts, and relabelling their third image too cost NLVR2 most (docs/research/tinyworld.md, E68)
            order_labels = label_rng.random() < self.cfg.order_label_share and kind not in ("bison", "nlvr2")
            messages, images, kinds = self.dialogue(rng, sampler, subset, kind, n, order_labels=order_labels)
            for key, image_id, scene in images:
                self._register(key, image_id, subset, scene)
            self.world.dialogues[subset].append({"dialogue": messages, "raw": self._raw(kinds)})

    def _sparkleseval(self) -> None:
        rng = self._rng("sparkleseval")
        sampler = self._sampler(rng, None)
        plan = self._plan(rng, "SparklesEval", self.cfg.num_sparkleseval, ("describe", "count", "attribute"))
        for i, (kind, n) in enumerate(plan):
            messages, images, _kinds = self.dialogue(rng, sampler, "SparklesEval", kind, n)
            for key, image_id, scene in images:
                self._register(key, image_id, "SparklesEval", scene)
            self.world.sparkleseval.append({"evaluation_id": i, "dialogue": messages})

    def _demo_chats(self) -> None:
        """Held-out chats as a demo user has them: images labelled IMAGE#1..k in upload order, scenes unlike any
        other image of the world. Drawn last, from streams of their own, so the rest of the world is the same
        with or without them."""
        if not self.cfg.num_demo_chats:
            return
        rng = self._rng("demo-chat")
        sampler = self._sampler(rng, {e.scene.signature() for e in self.world.scenes.values()})
        plan = self._plan(rng, "DemoChat", self.cfg.num_demo_chats, ("describe", "count", "attribute"))
        for i, (kind, n) in enumerate(plan):
            messages, images, _kinds = self.dialogue(rng, sampler, "DemoChat", kind, n, order_labels=True)
            for key, image_id, scene in images:
                self._register(key, image_id, "DemoChat", scene)
            self.world.demo_chats.append({"evaluation_id": i, "dialogue": messages})

    def _bison(self) -> None:
        rng = self._rng("bison")
        sampler = self._sampler(rng, None)
        total = self.cfg.num_bison
        true_first = _balanced(rng, [True, False], total)
        attributes = _balanced(rng, list(BISON_ATTRIBUTES), total)
        for i in range(total):
            s1, s2, cap = self.bison_pair(rng, sampler, attributes[i], true_first[i])
            ids = [self.ids.new("BISON"), self.ids.new("BISON")]
            for image_id, scene in zip(ids, (s1, s2)):
                self._register(str(image_id), image_id, "BISON", scene)
            self.world.bison.append({
                "evaluation_id": i, "caption": cap, "true_image_id": ids[0] if true_first[i] else ids[1],
                "image_candidates": [{"image_id": j, "image_filename": bison_filename(j)} for j in ids],
                "difference": attributes[i],
            })

    def _nlvr2(self) -> None:
        rng = self._rng("nlvr2")
        sampler = self._sampler(rng, None)
        total = self.cfg.num_nlvr2
        labels = _balanced(rng, [True, False], total)
        templates = _balanced(rng, list(NLVR2_TEMPLATES), total)
        for i in range(total):
            left, right, st = self.nlvr2_pair(rng, sampler, templates[i], labels[i])
            identifier = f"dev-{i}-0-0"
            for side, scene in ((0, left), (1, right)):
                image_id = f"{identifier[:-2]}-img{side}"
                self._register(image_id, image_id, "NLVR2", scene)
            self.world.nlvr2.append({"evaluation_id": i, "identifier": identifier, "sentence": st,
                                     "label": "True" if labels[i] else "False"})


def build_world(config: WorldConfig) -> World:
    return Builder(config).build()


__all__ = ["WorldConfig", "PRESETS", "DEFAULT_MIX", "MIX_KINDS", "World", "SceneEntry", "build_world",
           "bison_filename", "image_file"]
