"""Image probe: how fast does a fresh tiny decoder learn to read a count from the frozen towers?

Every BISON check and NLVR2 count needs the decoder to find, among an image's query tokens, the one that holds
the asked kind and read its count. This probe isolates that look-up: short count questions about one image
(``--images 1``) or about one of two images in the context (``--images 2``), asked of a decoder trained from
scratch on the world's training images while the towers stay frozen (their features are computed once), and
reports how often the count word is right, teacher-forced, on held-out NLVR2 images — next to the prior (always
the most common count word).

- ``--ask kind`` asks for one colour × shape / colour / shape (the look-up); ``--ask total`` for all objects,
  which needs no look-up (it tells "which image" apart from "which token").
- ``--kinds K`` (K > 1, two images) asks for K kinds in each image in one answer
  (``IMAGE#1: red circles one, green squares no. IMAGE#2: ...``): 2K count words per sample.
- ``--init CKPT`` starts from a trained decoder (e.g. one that learnt the single-image look-up).
- ``--present P`` asks, in training, about a kind the image holds with probability P (the held-out
  questions stay uniform over the kinds, so the prior is the same).
- ``--slot-embedding S`` / ``--order-embedding S`` add learned vectors (init std S) to the image tokens: one per
  query slot, one per image position in the prompt; ``--pair-embedding S`` one per (image position, slot).

    python -m sparkles.tools.lookup_probe --root outputs/tiny --images 2 --ask kind --steps 700

Measured figures are in docs/notes/tiny_world.md (session 5).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .probe_training import ProbeOptimiser, add_training_args, set_threads_and_seed

TOWERS = "models/sparkleschat_tiny_towers/blip2_towers.pth"


class Questions:
    """Count questions and answers about scenes, in the prompt layout of the BISON/NLVR2 items (IMAGE#1, IMAGE#2)."""

    def __init__(self, images: int, ask: str, kinds: int, seed: int, present: float = 0.0) -> None:
        from sparkles.data.scene_tags import TagVocabulary
        from sparkles.data.synthetic.language import Qual

        if kinds > 1 and images != 2:
            raise ValueError("--kinds > 1 counts several kinds in each of two images: use --images 2")
        if kinds > 1 and ask != "kind":
            raise ValueError("--kinds > 1 needs --ask kind")
        self.images, self.ask, self.kinds, self.present = images, ask, kinds, present
        self.quals = [Qual(c, s) for c, s in TagVocabulary.of_world().quals if c or s]  # "objects" is --ask total
        self.rng = random.Random(seed)

    def __call__(self, scenes: Sequence) -> tuple[str, str]:
        """``(question, answer)`` about ``scenes`` (one or two :class:`Scene`)."""
        from sparkles.data.synthetic.language import Qual, count_phrase, number_word

        rng, slots = self.rng, [f"IMAGE#{k + 1}<Img><ImageHere></Img>" for k in range(len(scenes))]
        if self.kinds > 1:
            asked: list = []
            held = [Qual(c, s) for scene in scenes for c, s, _n in scene.groups()]
            while len(asked) < self.kinds:
                q = rng.choice(held) if held and rng.random() < self.present else rng.choice(self.quals)
                if q not in asked:
                    asked.append(q)
            names = ", ".join(q.plural for q in asked)
            question = f"Look at {slots[0]} and {slots[1]}. Count the {names} in each."
            answer = " ".join(f"IMAGE#{k + 1}: " + ", ".join(f"{q.plural} {number_word(q.count(s))}" for q in asked)
                              + "." for k, s in enumerate(scenes))
            return question, answer
        target = rng.randrange(len(scenes))
        q = rng.choice(self.quals) if self.ask == "kind" else Qual(None, None)
        kinds_there = scenes[target].groups()
        if self.ask == "kind" and kinds_there and rng.random() < self.present:
            colour, shape, _n = rng.choice(kinds_there)  # a kind the asked image holds: the count is not "no"
            q = Qual(colour, shape)
        if len(scenes) == 1:
            question = f"How many {q.plural} are there in {slots[0]}?"
        else:
            question = f"Look at {slots[0]} and {slots[1]}. How many {q.plural} are there in IMAGE#{target + 1}?"
        return question, f"IMAGE#{target + 1} shows {count_phrase(q.count(scenes[target]), q)}."  # the world's words


def world_features(model, chat, root: Path, datasets: set, limit: int):
    """Scenes and frozen-tower features ``[N, nq, D]`` of the first ``limit`` images of ``datasets``."""
    import torch
    from PIL import Image

    from sparkles.data.synthetic.scenes import Scene
    from sparkles.data.synthetic.writers import load_world_file

    records = [r for r in load_world_file(root)["scenes"] if r["dataset"] in datasets][:limit]
    if not records:
        raise SystemExit(f"{root}: the world has no {'/'.join(sorted(datasets))} images")
    feats = []
    with torch.no_grad():
        for i in range(0, len(records), 128):
            pixels = torch.stack([chat.image_processor(Image.open(root / r["file"]).convert("RGB"))
                                  for r in records[i:i + 128]])
            feats.append(model.image_features(pixels))
    return [Scene.from_record(r) for r in records], torch.cat(feats)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="the world (with its tokenizer and stage-0 towers)")
    p.add_argument("--towers", default=TOWERS, help=f"towers file, relative to --root (default {TOWERS})")
    p.add_argument("--cfg-path", default="eval_configs/sparkles_tiny.yaml", help="the tiny model's config")
    p.add_argument("--init", default="", help="start the decoder and projection from this checkpoint (relative "
                                             "to --root), e.g. a stage-1 checkpoint; default: fresh weights")
    p.add_argument("--images", type=int, choices=(1, 2), default=1)
    p.add_argument("--ask", choices=("kind", "total"), default="kind")
    p.add_argument("--kinds", type=int, default=1, help="kinds counted per image in one answer (two images)")
    p.add_argument("--present", type=float, default=0.0,
                   help="share of training questions about a kind the asked image holds (else any kind)")
    p.add_argument("--slot-embedding", type=float, default=0.0)
    p.add_argument("--order-embedding", type=float, default=0.0)
    p.add_argument("--pair-embedding", type=float, default=0.0)
    p.add_argument("--train-images", type=int, default=4000)
    add_training_args(p, steps=700, eval_every=50, held_out=300)
    args = p.parse_args(argv)

    import torch

    from sparkles.conversation.render import Message, collate
    from sparkles.conversation.template import USER
    from sparkles.data.synthetic.language import number_word
    from sparkles.serve.loading import load_model, make_chat

    set_threads_and_seed(args)
    root = Path(args.root)
    if not (root / args.towers).is_file():
        raise SystemExit(f"{root / args.towers} not found: train the towers first (train_configs/"
                         "sparkleschat_tiny_stage0.yaml) or pass --towers")
    # a fresh (or --init) decoder and projection on the frozen towers (image-only ones: the probe reads the
    # image tokens without a message)
    model, _ = load_model(args.cfg_path, sparkles_root=str(root), options=[
        "model.model_type=tiny", f"model.ckpt={args.init}", f"model.q_former_model={args.towers}"])
    chat = make_chat(model)
    renderer = chat.renderer
    train_scenes, train_feats = world_features(model, chat, root, {"CC", "VG"}, args.train_images)
    test_scenes, test_feats = world_features(model, chat, root, {"NLVR2"}, args.held_out)
    number_ids = torch.tensor(sorted({renderer.encode(" " + number_word(n))[-1] for n in range(10)}))

    hidden, nq = model.llama_model.config.hidden_size, train_feats.shape[1]
    extra = torch.nn.ParameterDict()
    if args.slot_embedding:
        extra["slot"] = torch.nn.Parameter(torch.randn(nq, hidden) * args.slot_embedding)
    if args.order_embedding:
        extra["order"] = torch.nn.Parameter(torch.randn(args.images, hidden) * args.order_embedding)
    if args.pair_embedding:
        extra["pair"] = torch.nn.Parameter(torch.randn(args.images, nq, hidden) * args.pair_embedding)

    def image_embeds(feats):  # [n, images, nq, D] -> [n * images, nq, hidden] in reading order
        e = model.project(feats)
        if "slot" in extra:
            e = e + extra["slot"]
        if "order" in extra:
            e = e + extra["order"][None, :, None, :]
        if "pair" in extra:
            e = e + extra["pair"]
        return e.reshape(-1, nq, hidden)

    def batch(scenes, feats, groups, questions):
        samples = [questions([scenes[i] for i in g]) for g in groups]
        rendered = [renderer.render([Message(USER, q)], chat.layout, target=a) for q, a in samples]
        b = collate(rendered, pad_id=renderer.pad_id, padding_side="right")
        return b, torch.stack([feats[list(g)] for g in groups])

    def groups_of(rng, n, count):
        return [tuple(rng.randrange(n) for _ in range(args.images)) for _ in range(count)]

    held_out = batch(test_scenes, test_feats, [tuple((k + j) % len(test_scenes) for j in range(args.images))
                                               for k in range(len(test_scenes))],
                     Questions(args.images, args.ask, args.kinds, seed=args.seed + 999))
    held_labels = held_out[0]["labels"][:, 1:]
    counted = (held_labels != -100) & torch.isin(held_labels, number_ids)
    prior = torch.bincount(held_labels[counted]).max().item() / int(counted.sum())

    @torch.no_grad()
    def accuracy() -> float:
        b, f = held_out
        model.eval()
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], image_slot_mask=b["image_slot_mask"],
                    image_embeds=image_embeds(f), full_logits=True)
        model.train()
        pred = out["logits"][:, :-1].argmax(-1)
        return ((pred == held_labels) & counted).sum().item() / int(counted.sum())

    for param in model.parameters():
        param.requires_grad_(False)
    params = [q for n, q in model.named_parameters() if n.startswith(("llama_model.", "llama_proj."))]
    params += list(extra.values())
    for param in params:
        param.requires_grad_(True)
    optimiser = ProbeOptimiser(params, args)
    rng = random.Random(args.seed)
    questions = Questions(args.images, args.ask, args.kinds, seed=args.seed + 1, present=args.present)
    model.train()
    curve, t0 = [], time.time()
    start = accuracy()  # what a fresh decoder gets by chance, or what --init already knows
    print(json.dumps(dict(step=0, prior=round(prior, 3), held_out_count_words=int(counted.sum()),
                          count_word_accuracy=round(start, 3))), flush=True)
    for step in range(1, args.steps + 1):
        b, f = batch(train_scenes, train_feats, groups_of(rng, len(train_scenes), args.batch_size), questions)
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                     image_slot_mask=b["image_slot_mask"], image_embeds=image_embeds(f), labels=b["labels"])["loss"]
        optimiser.step(loss)
        if step % args.eval_every == 0 or step == args.steps:
            row = dict(step=step, loss=round(loss.item(), 4), count_word_accuracy=round(accuracy(), 3),
                       seconds=round(time.time() - t0, 1))
            curve.append(row)
            print(json.dumps(row), flush=True)
    result = dict(vars(args), prior=prior, held_out_count_words=int(counted.sum()), start_accuracy=start,
                  curve=curve)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
