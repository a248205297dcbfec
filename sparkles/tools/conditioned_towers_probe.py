r"""Towers probe: can vision towers that read the question (InstructBLIP-style) extract what it asks, fast?

The tiny decoder does not learn, within the CPU budget, to find the asked kind's token among an image's query
tokens when two images are in its context (``lookup_probe``; docs/notes/tiny_world.md, session 5). This probe
asks whether that selection can move into the towers, where a direct target trains it: the user message (image
markup removed) enters the Q-Former's self-attention (:func:`sparkles.models.qformer.run_qformer` with
``text_input``), and two extra query tokens get read-outs of their own:

- **asked**: how many of the message's counted kind this image holds (an NLVR2 statement's kind, or the kind of
  a count question), read from one query token — a fixed place the decoder could read like a total;
- **fit**: whether every item of a BISON caption in the message holds in this image.

The other query tokens keep the stage-0 targets (:class:`sparkles.tasks.tower_pretrain.TowerTagger`). Training
messages are the first turns of the world's dialogues and its perception questions, each paired with every image
it shows; the held-out figures are on the world's BISON and NLVR2 evaluation items, with their prompts:

- ``nlvr2_asked``: the asked count right, per image;
- ``nlvr2_from_counts``: the item's verdict computed from the two predicted counts (what a decoder that only
  copies those counts into the reasoning would score);
- ``bison_fit``: the fit read-out right, per image; ``bison_pair``: the image with the higher fit probability
  is the caption's image.

``--items K`` replaces the asked and fit targets with K item queries, each trained on one caption item's count
and the cell of its single object (the first also on the asked kind), and adds ``bison_item_counts`` (an item
query's count right) and ``bison_from_items`` (the image whose predicted items all match the caption is the
caption's image). ``--caption-variants`` draws the BISON samples from :class:`CaptionVariants` (captions of any
training image or of a one-attribute variant it refutes) instead of the dialogues' ~1,100 BISON pairs.

    python -m sparkles.tools.conditioned_towers_probe --root outputs/tiny --steps 1500 --fit-share 0
    python -m sparkles.tools.conditioned_towers_probe --root outputs/tiny --steps 2000 --fit-share 0.5 \
        --caption-variants --items 4

Measured figures are in docs/notes/tiny_world.md (session 6).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from sparkles.data.instruction_tags import IGNORE, CaptionVariants, InstructionSample as Sample
from sparkles.data.instruction_tags import no_place, targeted_sample, training_samples
from sparkles.data.synthetic.scenes import GRID

from .probe_training import ProbeOptimiser, add_training_args, set_threads_and_seed

BISON_FILE = "evaluation/BISON/annotations/sparkles_evaluation_bison_annotations.json"
NLVR2_FILE = "evaluation/NLVR2/annotations/sparkles_evaluation_nlvr2_annotations.json"


def held_out_items(root: Path, limit: int) -> tuple[list[Sample], list[Sample], list]:
    """BISON samples (two per item, candidate order), NLVR2 samples (left, right per item) and the statements."""
    from sparkles.data.synthetic.scenes import Scene
    from sparkles.data.synthetic.tasks import parse_statement
    from sparkles.data.synthetic.writers import load_scenes
    from sparkles.eval.prompts import bison_prompt, nlvr2_prompt

    scenes = load_scenes(root)
    bison = []
    for item in json.loads((root / BISON_FILE).read_text(encoding="utf-8"))[:limit]:
        for cand in item["image_candidates"]:
            key = str(cand["image_id"])
            bison.append(targeted_sample(key, bison_prompt(item["caption"]), Scene.from_record(scenes[key])))
    nlvr2, statements = [], []
    for item in json.loads((root / NLVR2_FILE).read_text(encoding="utf-8"))[:limit]:
        stem = item["identifier"].rsplit("-", 1)[0]
        for side in (0, 1):
            key = f"{stem}-img{side}"
            nlvr2.append(targeted_sample(key, nlvr2_prompt(item["sentence"]), Scene.from_record(scenes[key])))
        statements.append((parse_statement(item["sentence"]), item["label"] == "True"))
    return bison, nlvr2, statements


def build_probe_model(cfg, vocabulary, vocab_size: int, max_text: int, cross_attention_freq: int, items: int = 0):
    """A :class:`TowerTagger` whose Q-Former reads the message, with more query tokens and their heads.

    The extra queries: ``max(items, 1)`` item queries (the first is "asked"; with ``items`` > 0 each reads the
    count and single-object place of one caption item), then the fit query.
    """
    import torch
    from torch import nn

    from sparkles.models.qformer import QFormerTextEmbeddings, build_qformer
    from sparkles.tasks.tower_pretrain import TowerTagger

    class ConditionedTagger(TowerTagger):
        def __init__(self) -> None:
            super().__init__(cfg, vocabulary)
            hidden = cfg.qformer_hidden
            self.Qformer = build_qformer(
                hidden=hidden, layers=cfg.qformer_layers, heads=cfg.qformer_heads,
                intermediate=cfg.qformer_intermediate, encoder_width=cfg.vit_width,
                cross_attention_freq=cross_attention_freq, init_std=cfg.qformer_init_std, dropout=cfg.qformer_dropout,
                cross_attention_init=cfg.qformer_cross_attention_init, text_input=True)
            std = cfg.query_token_init_std if cfg.query_token_init_std is not None else cfg.qformer_init_std
            self.probe_items = max(items, 1)
            extra = torch.randn(1, self.probe_items + 1, hidden) * std
            self.query_tokens = nn.Parameter(torch.cat([self.query_tokens.detach(), extra], 1))
            # the same spread as the query tokens, so that text and queries enter the shared LayerNorm alike
            self.text_embeddings = QFormerTextEmbeddings(vocab_size, hidden, max_text, init_std=std)
            self.asked_head = nn.Linear(hidden, vocabulary.max_count_class)
            self.fit_head = nn.Linear(hidden, 2)
            self.item_place_head = nn.Linear(hidden, no_place() + 1)

        def forward(self, images, text_ids, text_mask):
            from sparkles.models.qformer import run_qformer

            vision = self.ln_vision(self.visual_encoder(images))
            out = run_qformer(self.Qformer, self.query_tokens, vision, self.text_embeddings(text_ids), text_mask)
            n_quals, n_slots = len(self.vocabulary.quals), self.vocabulary.num_query_slots
            quals, cells = out[:, :n_quals], out[:, n_quals:n_slots]
            return {"count": self.count_head(quals), "place": self.place_head(quals),
                    "qual_size": self.qual_size_head(quals), "cell_kind": self.cell_kind_head(cells),
                    "cell_size": self.cell_size_head(cells),
                    "asked": self.asked_head(out[:, n_slots]), "fit": self.fit_head(out[:, n_slots + self.probe_items]),
                    "items": self.asked_head(out[:, n_slots:n_slots + self.probe_items]),
                    "item_places": self.item_place_head(out[:, n_slots:n_slots + self.probe_items])}

    return ConditionedTagger()


class Batcher:
    """Pixels, message tokens (the model's :func:`~sparkles.models.qformer.tokenize_instructions`) and targets of
    a list of samples."""

    def __init__(self, root: Path, scenes: dict, tokenizer, vocabulary, image_size: int, items: int = 0,
                 max_text: int = 128) -> None:
        from sparkles.processors.image import Blip2ImageEvalProcessor

        self.root, self.scenes, self.tokenizer, self.vocabulary = root, scenes, tokenizer, vocabulary
        self.process = Blip2ImageEvalProcessor(image_size=image_size)
        self.items, self.max_text = max(items, 1), max_text
        self._pixels: dict = {}

    def pixels(self, key: str):
        if key not in self._pixels:
            self._pixels[key] = self.process(self.root / self.scenes[key]["file"])
        return self._pixels[key]

    def __call__(self, samples: Sequence[Sample]) -> dict:
        import torch

        from sparkles.data.instruction_tags import item_targets
        from sparkles.models.qformer import tokenize_instructions

        text, mask = tokenize_instructions(self.tokenizer, [s.message for s in samples], self.max_text)
        labels = [self.vocabulary.labels(self.scenes[s.image], s.image) for s in samples]
        # for a counted-kind message the first item is the asked kind
        items = item_targets(samples, self.items, self.vocabulary)
        return {"images": torch.stack([self.pixels(s.image) for s in samples]), "text_ids": text, "text_mask": mask,
                "cell_kinds": torch.tensor([k for k, _ in labels]), "cell_sizes": torch.tensor([z for _, z in labels]),
                "asked": torch.tensor([min(s.asked, self.vocabulary.max_count_class - 1) if s.asked != IGNORE
                                       else IGNORE for s in samples]),
                "fit": torch.tensor([s.fit for s in samples]),
                "items": items["item_count"], "item_places": items["item_place"]}


CONDITIONED = ("asked", "fit", "items", "item_places")


def probe_loss(model, batch: dict, *, items: bool = False):
    """Stage-0 tag losses plus the conditioned read-outs' cross-entropy where the batch has targets: the asked
    count and the fit, or (``items``) every item query's count and place."""
    import torch.nn.functional as F

    logits = model(batch["images"], batch["text_ids"], batch["text_mask"])
    loss = model.loss({k: v for k, v in logits.items() if k not in CONDITIONED}, batch["cell_kinds"],
                      batch["cell_sizes"])
    for name in (("items", "item_places") if items else ("asked", "fit")):
        if (batch[name] != IGNORE).any():
            loss = loss + F.cross_entropy(logits[name].flatten(0, -2), batch[name].flatten(), ignore_index=IGNORE)
    return loss


def caption_claims(samples: Sequence[Sample]) -> list:
    """Per BISON sample, the caption's items as ``(count, cell or None)``: what each item query is checked against."""
    from sparkles.data.synthetic.language import parse_items
    from sparkles.data.synthetic.scenes import CELL_OF_POSITION
    from sparkles.data.synthetic.tasks import parse_question

    out = []
    for s in samples:
        items = parse_items(parse_question(s.message).text)
        out.append([(it.count, None if it.position is None else
                     CELL_OF_POSITION[it.position][0] * GRID + CELL_OF_POSITION[it.position][1]) for it in items])
    return out


def held_out_figures(model, bison_batch: dict, nlvr2_batch: dict, statements: list, claims: list, *,
                     items: bool = False) -> dict:
    """The held-out figures (module docstring); with item queries also ``bison_item_counts`` (an item query's
    count right) and ``bison_from_items`` (the image whose predicted items all match the caption's)."""
    import torch

    with torch.no_grad():
        model.eval()
        b = model(bison_batch["images"], bison_batch["text_ids"], bison_batch["text_mask"])
        asked = model(nlvr2_batch["images"], nlvr2_batch["text_ids"], nlvr2_batch["text_mask"])["asked"]
        model.train()
    fit = b["fit"]
    fit_prob = fit.softmax(-1)[:, 1].view(-1, 2)
    truth = bison_batch["fit"].view(-1, 2)
    counts = asked.argmax(-1)
    verdicts = [st.truth_of_counts(int(counts[2 * i]), int(counts[2 * i + 1])) == label
                for i, (st, label) in enumerate(statements)]
    figures = dict(bison_fit=round((fit.argmax(-1) == bison_batch["fit"]).float().mean().item(), 3),
                   bison_pair=round((fit_prob.argmax(1) == truth.argmax(1)).float().mean().item(), 3),
                   nlvr2_asked=round((counts == nlvr2_batch["asked"]).float().mean().item(), 3),
                   nlvr2_from_counts=round(sum(verdicts) / len(verdicts), 3))
    if items:
        item_counts, item_places = b["items"].argmax(-1), b["item_places"].argmax(-1)
        known = bison_batch["items"] != IGNORE
        figures["bison_item_counts"] = round((item_counts == bison_batch["items"])[known].float().mean().item(), 3)
        scores = []  # per image: (all checked items match, how many match)
        for row, claim in enumerate(claims):
            matches = [count == int(item_counts[row, i]) and (cell is None or cell == int(item_places[row, i]))
                       for i, (count, cell) in enumerate(claim[: model.probe_items])]
            scores.append((all(matches), sum(matches)))
        chosen = [0 if scores[2 * i] >= scores[2 * i + 1] else 1 for i in range(len(scores) // 2)]
        figures["bison_from_items"] = round(sum(int(c == int(t)) for c, t in zip(chosen, truth.argmax(1)))
                                            / len(chosen), 3)
    return figures


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="the world (with its tokenizer in models/tiny_llm)")
    p.add_argument("--preset", default="sparkles/configs/models/sparkleschat_tiny.yaml",
                   help="model sizes (the tiny preset)")
    p.add_argument("--cross-attention-freq", type=int, default=1,
                   help="queries cross-attend to the image every N-th layer (the tiny preset: 2)")
    p.add_argument("--fit-share", type=float, default=0.35,
                   help="share of training samples drawn from the BISON messages (they are ~5%% of the pairs)")
    p.add_argument("--caption-variants", action="store_true",
                   help="draw the BISON fit samples from CaptionVariants of every training image instead of the "
                        "dialogues' BISON messages")
    p.add_argument("--items", type=int, default=0,
                   help="K > 0: K item queries, each trained on one caption item's count and place (the first on "
                        "the asked kind), instead of the asked count and the fit")
    p.add_argument("--max-text", type=int, default=128, help="message tokens the Q-Former reads (longer ones are cut, with a warning)")
    add_training_args(p, steps=1500, eval_every=100, held_out=150)
    p.set_defaults(lr=2e-3)  # stage 0's rate
    args = p.parse_args(argv)

    from omegaconf import OmegaConf

    from sparkles.data.scene_tags import TagVocabulary
    from sparkles.data.synthetic.writers import load_scenes
    from sparkles.models.sparkleschat import SparklesChatConfig
    from sparkles.models.tokenizer import load_tokenizer

    set_threads_and_seed(args)
    root = Path(args.root)
    preset = Path(args.preset)
    if not preset.is_absolute():
        preset = Path(__file__).resolve().parents[2] / preset
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SparklesChatConfig), OmegaConf.load(preset)))
    # the probe adds its own message-reading Q-Former and queries to the image-only towers of the preset's sizes
    cfg.qformer_text_input, cfg.num_query_token = False, TagVocabulary.of_world().num_query_slots
    tokenizer = load_tokenizer(root / "models" / "tiny_llm")
    vocabulary = TagVocabulary.of_world()
    scenes = load_scenes(root)
    train = training_samples(root, scenes)
    fit_pool = [s for s in train if s.fit != IGNORE]
    asked_pool = [s for s in train if s.asked != IGNORE]
    if not fit_pool or not asked_pool:
        raise SystemExit(f"{root}: the world's dialogues hold no BISON or no count messages to train on")
    bison, nlvr2, statements = held_out_items(root, args.held_out)
    batcher = Batcher(root, scenes, tokenizer, vocabulary, cfg.image_size, args.items, args.max_text)
    claims = caption_claims(bison)
    bison_batch, nlvr2_batch = batcher(bison), batcher(nlvr2)

    variants = CaptionVariants(scenes, sorted({s.image for s in train}), args.seed + 7) \
        if args.caption_variants else None
    model = build_probe_model(cfg, vocabulary, len(tokenizer), args.max_text, args.cross_attention_freq, args.items)
    model.train()
    optimiser = ProbeOptimiser(model.parameters(), args)
    rng = random.Random(args.seed)
    start = held_out_figures(model, bison_batch, nlvr2_batch, statements, claims, items=args.items > 0)
    print(json.dumps(dict(step=0, train_pairs=len(train), bison_pairs=len(fit_pool), **start)), flush=True)
    curve, t0 = [], time.time()
    for step in range(1, args.steps + 1):
        batch = []
        for _ in range(args.batch_size):
            if rng.random() >= args.fit_share:
                batch.append(asked_pool[rng.randrange(len(asked_pool))])
            else:
                batch.append(variants() if variants else fit_pool[rng.randrange(len(fit_pool))])
        loss = probe_loss(model, batcher(batch), items=args.items > 0)
        optimiser.step(loss)
        if step % args.eval_every == 0 or step == args.steps:
            row = dict(step=step, loss=round(loss.item(), 4), seconds=round(time.time() - t0, 1),
                       **held_out_figures(model, bison_batch, nlvr2_batch, statements, claims, items=args.items > 0))
            curve.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        result = dict({k: v for k, v in vars(args).items()}, train_pairs=len(train), bison_pairs=len(fit_pool),
                      held_out_bison_items=len(bison) // 2, held_out_nlvr2_items=len(statements), start=start,
                      curve=curve)
        Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
