"""Text-only probe: can the tiny decoder learn the BISON/NLVR2 decision from the reasoning written before it?

Builds BISON and NLVR2 items with the world generator (fresh scenes, any seed), renders the question with the
evaluation template (image slots removed: no images, so only the step from reasoning to verdict can be learnt)
and the reference answer, trains a decoder of the tiny preset's sizes on them (loss on the answer, as in
training), and reports how often the verdict token is the more likely option on held-out items.

``--format checks`` uses the world's answers (BISON: each caption item checked against each image; NLVR2: the
counts the statement needs and one short step); ``--format descriptions`` writes the earlier reasoning (both
images described in full, then the verdict) for comparison. ``--init CKPT`` starts the decoder from a trained
SparklesChat checkpoint instead of random weights.

``--kind caption`` probes the single-image caption checks (``Is the caption '…' true of IMAGE#1?``, made from
BISON position pairs) at the positioned item's yes/no, which turns on whether the stated place is the caption's:
the place comparison that BISON's position pairs need, alone.

    python -m sparkles.tools.decision_probe --tokenizer outputs/tiny/models/tiny_llm --kind bison --steps 200

Measured figures are in docs/notes/tiny_world.md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from typing import Optional, Sequence

from .probe_training import ProbeOptimiser, add_training_args, set_threads_and_seed

FORMATS = ("checks", "descriptions")


def _descriptions_answer(task, scenes: dict) -> str:
    """The earlier reasoning form: every image described in full (BISON) or its count stated (NLVR2)."""
    from sparkles.data.synthetic.language import count_phrase, describe
    from sparkles.data.synthetic.tasks import caption_matches, caption_position_of, parse_statement
    from sparkles.eval.prompts import BISON_ANSWER_PHRASE, NLVR2_ANSWER_PHRASE, REASONING_OPENER

    s1, s2 = scenes["1"], scenes["2"]
    if task.kind == "bison":
        pos = caption_position_of(task.text)
        descs = []
        for s in (s1, s2):
            try:
                descs.append(describe(s, pos))
            except ValueError:
                descs.append(describe(s))
        choice = "IMAGE#1" if caption_matches(task.text, s1) else "IMAGE#2"
        return f"{REASONING_OPENER} IMAGE#1 shows {descs[0]}. IMAGE#2 shows {descs[1]}. {BISON_ANSWER_PHRASE} {choice}."
    st = parse_statement(task.text)
    q = st.qual
    parts = [REASONING_OPENER, f"IMAGE#1 shows {count_phrase(q.count(s1), q)}.",
             f"IMAGE#2 shows {count_phrase(q.count(s2), q)}."]
    if st.template == "total":
        parts.append(f"That makes {count_phrase(q.count(s1) + q.count(s2), q)} in total.")
    parts.append(f"{NLVR2_ANSWER_PHRASE} {'TRUE' if st.truth(s1, s2) else 'FALSE'}.")
    return " ".join(parts)


class ItemMaker:
    """Random BISON/NLVR2 items (prompt without image slots, answer, options, label) from the world generator."""

    def __init__(self, kinds: Sequence[str], fmt: str, seed: int):
        from sparkles.data.synthetic.build import Builder, WorldConfig

        self.builder = Builder(WorldConfig())
        self.rng = random.Random(seed)
        self.sampler = self.builder._sampler(self.rng, None)
        self.kinds, self.fmt = tuple(kinds), fmt

    def __call__(self) -> dict:
        write_answer = None if self.fmt == "checks" else _descriptions_answer
        item = self.builder.reasoning_item(self.rng, self.sampler, self.rng.choice(self.kinds), write_answer)
        if item["kind"] == "caption":
            # Scored at the positioned check's yes/no (the caption's last item, so the answer's last yes/no), not
            # at TRUE/FALSE: that verdict only repeats whether a "no" came before it.
            item = dict(item, options=("yes", "no"), label=re.findall(r", (yes|no)[;.]", item["answer"])[-1])
        return item


def encode(items: list[dict], renderer):
    """Token ids and labels of the items rendered exactly as training renders a one-turn sample."""
    from sparkles.conversation.render import Message, collate
    from sparkles.conversation.template import TRAIN_LAYOUT, USER

    rendered = [renderer.render([Message(USER, it["prompt"])], TRAIN_LAYOUT, target=it["answer"]) for it in items]
    batch = collate(rendered, pad_id=renderer.pad_id)
    return batch["input_ids"], batch["labels"]


def decision_accuracy(model, items: list[dict], renderer, batch: int = 50) -> dict:
    """Per kind: how often the label's last token outscores the other option's at the verdict position."""
    import torch

    hits: dict[str, list[int]] = {}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            ids, labels = encode(chunk, renderer)
            logits = model(input_ids=ids).logits
            for row, it in enumerate(chunk):
                option_ids = [renderer.encode(" " + o)[-1] for o in it["options"]]
                # The verdict is the answer's last option token (the answer ends "... is IMAGE#2.###").
                verdict = max(i for i, t in enumerate(labels[row].tolist()) if t in option_ids)
                scores = logits[row, verdict - 1, option_ids]
                picked = it["options"][int(scores.argmax())]
                h = hits.setdefault(it["kind"], [0, 0])
                h[0] += picked == it["label"]
                h[1] += 1
    model.train()
    return {k: round(c / n, 3) for k, (c, n) in hits.items()}


def tiny_preset():
    """The tiny model preset (sparkles/configs/models/sparkleschat_tiny.yaml) over the model defaults."""
    from omegaconf import OmegaConf

    from sparkles.models.sparkleschat import SparklesChat, SparklesChatConfig

    preset = OmegaConf.load(SparklesChat.default_config_path("tiny"))
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SparklesChatConfig), preset))


def build_decoder(tokenizer, init: Optional[str]):
    import torch

    from sparkles.models.loaders import build_llama_from_sizes

    model = build_llama_from_sizes(tiny_preset(), vocab_size=len(tokenizer))
    if init:
        state = torch.load(init, map_location="cpu", weights_only=False)
        state = state.get("model", state)
        decoder = {k[len("llama_model."):]: v for k, v in state.items() if k.startswith("llama_model.")}
        if not decoder:
            raise SystemExit(f"{init}: no llama_model.* weights (not a SparklesChat checkpoint?)")
        model.load_state_dict(decoder)
    return model


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="the world's tokenizer folder (<root>/models/tiny_llm)")
    p.add_argument("--kind", choices=("bison", "nlvr2", "caption", "both"), default="both",
                   help="both: BISON and NLVR2 (default); caption: single-image caption checks")
    p.add_argument("--format", choices=FORMATS, default="checks")
    p.add_argument("--init", help="start from this SparklesChat checkpoint's decoder")
    add_training_args(p, steps=200, eval_every=100, held_out=200)
    args = p.parse_args(argv)
    if args.kind == "caption" and args.format != "checks":
        p.error("--kind caption has only the checks format")

    import torch.nn.functional as F

    from sparkles.conversation.render import Renderer
    from sparkles.models.tokenizer import load_tokenizer

    set_threads_and_seed(args)
    tokenizer = load_tokenizer(args.tokenizer)
    renderer = Renderer(tokenizer, tiny_preset().num_query_token)
    kinds = ("bison", "nlvr2") if args.kind == "both" else (args.kind,)
    train_items = ItemMaker(kinds, args.format, seed=args.seed + 1)
    held_out_items = ItemMaker(kinds, args.format, seed=args.seed + 999)
    held_out = [held_out_items() for _ in range(args.held_out)]
    model = build_decoder(tokenizer, args.init)
    optimiser = ProbeOptimiser(model.parameters(), args)
    curve, t0 = [], time.time()
    for step in range(1, args.steps + 1):
        ids, labels = encode([train_items() for _ in range(args.batch_size)], renderer)
        logits = model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        optimiser.step(loss)
        if step % args.eval_every == 0 or step == args.steps:
            row = dict(step=step, loss=round(loss.item(), 4), seconds=round(time.time() - t0, 1),
                       accuracy=decision_accuracy(model, held_out, renderer))
            curve.append(row)
            print(json.dumps(row), flush=True)
    result = dict(kind=args.kind, format=args.format, init=args.init, batch_size=args.batch_size, lr=args.lr,
                  held_out=args.held_out, curve=curve)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
