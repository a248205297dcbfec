"""The reference judge of SparklesEval on the CPU world (registered as ``reference``; it needs the scene records).

The GPT judge of upstream rates each answer on three criteria from 1 to 10. On the synthetic world the truth is
known, so this judge computes the three criteria instead of asking a model, and returns the upstream judge entry
shape with a response in the upstream judge layout, so the same score parser and merge code read it:

- C1 image understanding = share of the answer's checkable object facts (count of a colour/shape, position,
  size, per mentioned image; a caption item checked "yes" or "no" against an image) that are true of that
  image's scene;
- C2 coherence = share of passed consistency checks: every image the question is about is mentioned, only
  images of this dialogue are mentioned, no fact contradicts another fact of this answer or of an earlier
  answer, and stated totals add up;
- C3 completeness = share of the reference answer's key facts and conclusion that the answer contains (the
  reference answer is re-derived from the question with the world's own templates).

Each criterion is ``1 + 9 * share`` (one decimal); the overall rating is their mean. It only understands the
world's templated language: it is meaningless on real images or free-form answers. :class:`ReferenceJudge` is the
judge ``evaluate.py --judge_models reference`` runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ..common.registry import JUDGES
from ..eval.benchmarks.sparkleseval import SCORE_KEYS, has_scores
from ..eval.judges import JudgeOutcome, JudgeSetupError
from .language import PHRASE_POSITIONS, COLOUR_RE, SHAPE_RE, Item, parse_items, sentences
from .scenes import SIZES, Scene, as_scene
from .tasks import (CHECK_SECTION_RE, NEEDS_SUFFIX_RE, InvalidTask, Task, answer, item_holds, parse_check_section,
                    parse_question, ref_names)
from .writers import load_scenes

SLOT_RE = re.compile(r"IMAGE#([0-9A-Za-z_-]+)<Img><ImageHere></Img>")
_SHOWS = re.compile(rf"(?:The (?:left|right) image, )?IMAGE#([0-9A-Za-z_-]+),? shows (.+?){NEEDS_SUFFIX_RE}\.")
_ATTR = re.compile(rf"In IMAGE#([0-9A-Za-z_-]+) the ({COLOUR_RE}) ({SHAPE_RE}) is (.+)\.")
_TOTAL = re.compile(rf"That makes (.+) in total{NEEDS_SUFFIX_RE}\.")

METHOD = ("Reference judge of the synthetic world (synthetic-only; no language model). "
          "C1 = 1 + 9 x share of the answer's object facts (counts, colours, shapes, positions, sizes per image) "
          "true of the scene records; C2 = 1 + 9 x share of passed consistency checks (the question's IMAGE#ids "
          "mentioned, only this dialogue's ids, no contradiction within or across turns, totals add up); "
          "C3 = 1 + 9 x share of the reference answer's key facts and conclusion present. Overall = mean.")


@dataclass
class Claims:
    facts: list = field(default_factory=list)        # (kind, key, colour, shape, value)
    totals: list = field(default_factory=list)       # (colour, shape, n)
    conclusions: list = field(default_factory=list)  # normalised sentences
    unparsed: int = 0                                # sentences about images that are not world language
    mentions: set = field(default_factory=set)       # keys mentioned
    unknown_mentions: set = field(default_factory=set)

    def key_set(self) -> set:
        return set(self.facts) | {("total",) + t for t in self.totals} | {("so", c) for c in self.conclusions}


def _norm(sentence: str) -> str:
    return " ".join(sentence.lower().split())


def extract_claims(text: str, name_to_key: Mapping[str, str]) -> Claims:
    """Read the world's sentences back into facts; image names are resolved with ``name_to_key``."""
    out = Claims()
    for name in ref_names(text):
        if name in name_to_key:
            out.mentions.add(name_to_key[name])
        else:
            out.unknown_mentions.add(name)
    for s in sentences(text):
        m = _SHOWS.fullmatch(s)
        if m:
            key = name_to_key.get(m[1], "?" + m[1])
            try:
                items = parse_items(m[2])
            except ValueError:
                out.unparsed += 1
                continue
            for it in items:
                out.facts.append(("count", key, it.colour, it.shape, it.count))
                if it.position:
                    out.facts.append(("position", key, it.colour, it.shape, it.position))
            continue
        m = CHECK_SECTION_RE.fullmatch(s)
        if m:
            key = name_to_key.get(m[1], "?" + m[1])
            for it, verdict in parse_check_section(m[2]):
                if it is None or verdict is None:
                    out.unparsed += 1
                elif verdict == "yes":  # the item holds: its count (and position) are facts of the image
                    out.facts.append(("count", key, it.colour, it.shape, it.count))
                    if it.position:
                        out.facts.append(("position", key, it.colour, it.shape, it.position))
                else:
                    out.facts.append(("not", key, it.colour, it.shape, (it.count, it.position)))
            continue
        m = _ATTR.fullmatch(s)
        if m:
            key = name_to_key.get(m[1], "?" + m[1])
            value = m[4]
            if value in SIZES:
                out.facts.append(("size", key, m[2], m[3], value))
            elif value in PHRASE_POSITIONS:
                out.facts.append(("position", key, m[2], m[3], PHRASE_POSITIONS[value]))
            else:
                out.unparsed += 1
            continue
        m = _TOTAL.fullmatch(s)
        if m:
            try:
                (it,) = parse_items(m[1])
                out.totals.append((it.colour, it.shape, it.count))
            except ValueError:
                out.unparsed += 1
            continue
        if s.startswith(("So ", "Therefore")):
            out.conclusions.append(_norm(s))
        elif "IMAGE#" in s:
            out.unparsed += 1
    return out


def _fact_true(fact, scenes: Mapping[str, Scene]) -> bool:
    kind, key, colour, shape, value = fact
    scene = scenes.get(key)
    if scene is None:
        return False
    if kind == "count":
        return scene.count(colour, shape) == value
    if kind == "not":
        count, position = value
        return not item_holds(Item(count, colour, shape, position), scene)
    objs = scene.find(colour, shape) if colour and shape else []
    if len(objs) != 1:
        return False
    return objs[0].position == value if kind == "position" else objs[0].size == value


def _score(share: float) -> float:
    return round(1.0 + 9.0 * share, 1)


def _dialogue_names(dialogue: list) -> tuple[dict, list[list[str]]]:
    """name -> key for every image slot (k-th slot = k-th image) and the keys introduced per user turn.

    Only the names the questions give count: in a chat that labels its images IMAGE#1, IMAGE#2, … an answer that
    calls one by its image id names an image the user has never heard of."""
    name_to_key: dict[str, str] = {}
    per_turn: list[list[str]] = []
    for idx in (0, 2):
        msg = dialogue[idx]
        names = SLOT_RE.findall(msg.get("content", ""))
        images = msg.get("images", [])
        if len(names) != len(images):
            raise ValueError(f"dialogue[{idx}]: {len(names)} image slots in 'content' but {len(images)} "
                             f"entries in 'images'")
        keys = []
        for name, img in zip(names, images):
            key = str(img["image_id"])
            name_to_key[name] = key
            keys.append(key)
        per_turn.append(keys)
    return name_to_key, per_turn


def _judge_turn(question: str, reply: str, visible: list[str], name_to_key: dict, scenes: dict,
                earlier: list[Claims]) -> tuple[list[float], list[str], Claims]:
    claims = extract_claims(reply, name_to_key)

    # C1: checkable facts.
    n_facts = len(claims.facts) + claims.unparsed
    n_true = sum(_fact_true(f, scenes) for f in claims.facts if f[1] in visible)
    c1 = _score(n_true / n_facts) if n_facts else 1.0
    e1 = (f"{n_true} of {n_facts} checkable object facts are true of the images" if n_facts
          else "the answer states no checkable fact about the images")

    # The reference answer, re-derived from the question.
    ref = None
    task = parse_question(question)
    if task is not None:
        try:
            keys = tuple(name_to_key[n] for n in task.ids)
            mapped = Task(task.kind, keys, task.qual, name_to_key.get(task.target) if task.target else None,
                          task.obj, task.text)
            inv = {key: "IMAGE#" + name for name, key in name_to_key.items()}
            ref_text = answer(mapped, scenes, inv)
            ref = extract_claims(ref_text, name_to_key)
        except (KeyError, InvalidTask, ValueError):
            ref = None

    # C2: consistency checks.
    checks: list[bool] = []
    expected = ref.mentions if ref else {name_to_key[n] for n in ref_names(question) if n in name_to_key}
    checks += [k in claims.mentions for k in sorted(expected)]
    checks += [k in visible for k in sorted(claims.mentions)]
    checks += [False for _ in claims.unknown_mentions]
    said: dict[tuple, set] = {}
    for source in earlier + [claims]:
        for kind, key, colour, shape, value in source.facts:
            said.setdefault((kind, key, colour, shape), set()).add(value)
    for kind, key, colour, shape, _value in dict.fromkeys(claims.facts):
        if kind == "not":  # "not exactly two" is compatible with other negations and with most counts
            continue
        values = said[(kind, key, colour, shape)]
        checks.append(len(values) == 1)
    for colour, shape, n in claims.totals:
        parts = {key: value for kind, key, c, s, value in claims.facts if kind == "count" and (c, s) == (colour, shape)}
        if parts:
            checks.append(sum(parts.values()) == n)
    passed = sum(checks)
    c2 = _score(passed / len(checks)) if checks else 1.0
    e2 = f"{passed} of {len(checks)} consistency checks pass (image ids mentioned, no contradictions, totals)"

    # C3: key facts of the reference answer.
    if ref is not None:
        wanted = ref.key_set()
        got = wanted & claims.key_set()
        c3 = _score(len(got) / len(wanted)) if wanted else 1.0
        e3 = f"{len(got)} of {len(wanted)} key facts of the reference answer are present"
    else:
        share = len(expected & claims.mentions) / len(expected) if expected else 0.0
        c3 = _score(share)
        e3 = "question outside the world's templates; scored by the images it addresses"
    return [c1, c2, c3], [e1, e2, e3], claims


def judge_reference(dialogue: list, scenes: Mapping) -> dict:
    """Score a two-turn dialogue (4 messages, model answers in messages 1 and 3) against the scene records.

    ``scenes`` maps ``str(image_id)`` to a ``Scene`` or a scene record (``load_scenes``). Returns
    ``{"A1_C123_scores": [overall, C1, C2, C3], "A2_C123_scores": [...], "prompt": ..., "response": ...}``.
    """
    if not isinstance(dialogue, list) or len(dialogue) != 4:
        raise ValueError(f"dialogue: expected a list of 4 messages, got {type(dialogue).__name__} "
                         f"of length {len(dialogue) if isinstance(dialogue, list) else '?'}")
    for i, role in enumerate(("user", "assistant", "user", "assistant")):
        if not isinstance(dialogue[i], dict) or dialogue[i].get("role") != role or "content" not in dialogue[i]:
            raise ValueError(f"dialogue[{i}]: expected a {role!r} message with a 'content' field")
    name_to_key, per_turn = _dialogue_names(dialogue)
    needed = {k for keys in per_turn for k in keys}
    local: dict[str, Scene] = {}
    for key in needed:
        value = scenes.get(key)
        if value is None:
            try:
                value = scenes.get(int(key))
            except ValueError:
                pass
        if value is None:
            raise KeyError(f"no scene record for image_id {key!r} (is this a synthetic-world dialogue?)")
        local[key] = as_scene(value, where=f"scene of image {key}")

    scores, blocks, earlier = {}, [], []
    for turn, (qi, ai) in enumerate(((0, 1), (2, 3)), start=1):
        visible = [k for keys in per_turn[:turn] for k in keys]
        reply = dialogue[ai].get("content") or ""
        crit, expl, claims = _judge_turn(dialogue[qi]["content"], reply, visible, name_to_key, local, earlier)
        earlier.append(claims)
        overall = round(sum(crit) / 3.0, 1)
        scores[f"A{turn}_C123_scores"] = [overall] + crit
        lines = [f"* Evaluating A{turn}"]
        lines += [f'- (C{j}) Explanation: "{e}." Rating: [[{c}]]' for j, (c, e) in enumerate(zip(crit, expl), 1)]
        lines.append(f"Therefore, the overall rating of A{turn} is [[{overall}]]")
        blocks.append("\n".join(lines))
    images = ", ".join(f"IMAGE#{k}" for k in sorted(needed, key=lambda k: (len(k), k)))
    return {"A1_C123_scores": scores["A1_C123_scores"], "A2_C123_scores": scores["A2_C123_scores"],
            "prompt": f"{METHOD} Images: {images}.", "response": "\n\n".join(blocks)}


@JUDGES.register("reference")
class ReferenceJudge:
    """``--judge_models reference``: :func:`judge_reference` against the world's scene records (no network, no
    cost); on a Sparkles root without them (real SparklesEval data) it refuses to run."""

    kind = "reference"
    model = "reference"

    def __init__(self, root) -> None:
        try:
            self.scenes = load_scenes(root)
        except (FileNotFoundError, ValueError) as exc:
            raise JudgeSetupError(f"--judge_models reference works only on the synthetic world (sparkles.tinyworld), "
                                  f"whose scene records it reads: {exc}") from None

    def settings(self) -> dict:
        return {"kind": self.kind, "model": self.model}

    def judge(self, dialogue: Sequence[Mapping]) -> JudgeOutcome:
        try:
            out = dict(judge_reference([dict(m) for m in dialogue], self.scenes))
        except (KeyError, ValueError) as exc:  # e.g. an image without a scene: not a dialogue of the world
            raise JudgeSetupError(f"reference judge: {exc}") from None
        ok = has_scores(out)
        if ok:
            out = {k: [float(v) for v in out[k]] if k in SCORE_KEYS else out[k] for k in out}
        else:
            out.setdefault("error", "reference judge returned no scores")
        return JudgeOutcome(out, ok, 0, 0)
