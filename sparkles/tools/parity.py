"""Parity check against outputs of the original implementation: numerics and tokenisation.

``python -m sparkles.tools.parity [--fixture DIR] [--tokenization DIR]``

``--fixture DIR`` loads DIR's files in the original formats (``eva_vit_g.pth``, ``blip2_pretrained.pth``,
``sparkleschat.pth``, ``llama/``) through our loaders and compares with ``DIR/expected.pt``: image embeddings,
training loss and logits, greedy tokens. It prints each difference and passes only within tolerance (max abs
diff ≤ 1e-4, loss ≤ 1e-5, tokens identical).

``--tokenization DIR`` loads ``DIR/tokenizer.model`` as a LLaMA tokenizer through our loader and renders every
case of ``DIR/expected.json`` with our renderer: an inference conversation must give the original's ids for
each text piece between image slots, a training sample the original's ids (image slots aside) and labels. It
prints one line per case; any difference fails.

Without options both checks run on the repository's fixtures (``tests/fixtures/upstream_parity_tiny`` and
``tests/fixtures/upstream_tokenization_tiny``; their READMEs say what they hold); naming one option runs only
that check. The exit status is 0 only when every check that ran passed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..common.io import atomic_write_json, read_json

# the repository's fixtures, when this package runs from a checkout
REPO_FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "upstream_parity_tiny"
REPO_TOKENIZATION_FIXTURE = REPO_FIXTURE.parent / "upstream_tokenization_tiny"
TOL_EMBEDS = 1e-4
TOL_LOGITS = 1e-4
TOL_LOSS = 1e-5


def build_fixture_model(fixture: Path):
    from ..models.loaders import read_state_dict
    from ..models.sparkleschat import SparklesChat, SparklesChatConfig

    expected = torch.load(fixture / "expected.pt", map_location="cpu", weights_only=True)
    c = expected["config"]
    eva = read_state_dict(fixture / "eva_vit_g.pth")
    blip2 = read_state_dict(fixture / "blip2_pretrained.pth", wrapper_key="model")
    # Sizes the config does not name are read off the weight shapes.
    cfg = SparklesChatConfig(
        llama_model=str(fixture / "llama"), image_size=c["img"],
        vit_patch_size=eva["patch_embed.proj.weight"].shape[-1],
        vit_width=c["vit_dim"], vit_depth=c["vit_depth"], vit_heads=c["vit_heads"],
        vit_mlp_dim=eva["blocks.0.mlp.fc1.weight"].shape[0], vit_precision="fp32",
        num_query_token=c["nq"], qformer_hidden=c["q_dim"], qformer_layers=c["q_layers"], qformer_heads=c["q_heads"],
        qformer_intermediate=blip2["Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
        vit_weights=str(fixture / "eva_vit_g.pth"), q_former_model=str(fixture / "blip2_pretrained.pth"),
        ckpt=str(fixture / "sparkleschat.pth"), dtype="float32")
    model = SparklesChat.from_config(cfg, device="cpu", load_tokenizer=False, verbose=False)
    return model.eval(), expected


@torch.no_grad()
def run_parity(fixture: str | Path) -> dict:
    from ..engine.decoding import GenerationConfig, decode_tokens

    fixture = Path(fixture).resolve()  # weight paths must not be read relative to a Sparkles root
    model, e = build_fixture_model(fixture)
    media = (e["media_token_id"], e["media_pad_id"])
    results: dict = {}

    embeds = model.encode_images(e["images"])
    results["image_embeds_max_abs_diff"] = float((embeds - e["image_embeds"]).abs().max())

    ids = e["train_input_ids"]
    slots = (ids == media[0]) | (ids == media[1])
    order = [i for row in e["train_images"] for i in row]
    out = model(input_ids=ids.masked_fill(slots, 0), attention_mask=e["train_attention_mask"], image_slot_mask=slots,
                images=e["images"][order], labels=e["train_labels"], full_logits=True)
    results["train_loss"] = float(out["loss"])
    results["train_loss_abs_diff"] = abs(float(out["loss"]) - float(e["train_loss"]))
    results["train_logits_max_abs_diff"] = float((out["logits"] - e["train_logits"]).abs().max())

    pids = e["prompt_input_ids"]
    pslots = (pids == media[0]) | (pids == media[1])
    inputs_embeds = model.embed_inputs(pids.masked_fill(pslots, 0), pslots,
                                       model.encode_images(e["images"][list(e["prompt_images"])]))
    n = int(e["greedy_new_tokens"].numel())
    gen = GenerationConfig(max_new_tokens=n, stop_strings=(), stop_on_eos=False, min_length=0)
    tokens = [int(t[0]) for t in decode_tokens(model.llama_model, inputs_embeds=inputs_embeds,
                                                  attention_mask=torch.ones_like(pids), gen=gen)]
    results["greedy_tokens"] = tokens
    results["greedy_expected"] = e["greedy_new_tokens"].tolist()
    results["greedy_identical"] = tokens == results["greedy_expected"]
    results["ok"] = (results["image_embeds_max_abs_diff"] <= TOL_EMBEDS and results["train_loss_abs_diff"] <= TOL_LOSS
                     and results["train_logits_max_abs_diff"] <= TOL_LOGITS and results["greedy_identical"])
    return results


# ----------------------------------------------------------------------------------------------- tokenisation
SLOT = "image slot"  # what an image position reads as when sequences are compared


def load_fixture_tokenizer(fixture: str | Path):
    """``fixture/tokenizer.model`` as a LLaMA tokenizer, through the loader the model uses.

    A released Vicuna directory names its class (``LlamaTokenizer``) in ``tokenizer_config.json``; the fixture
    ships the SentencePiece model alone, so it is loaded from a scratch directory that adds that one file.
    """
    from ..models.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(Path(fixture) / "tokenizer.model", Path(tmp) / "tokenizer.model")
        atomic_write_json(Path(tmp) / "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer"})
        return load_tokenizer(tmp)


def _first_difference(ours: list, expected: list) -> Optional[int]:
    for i, (a, b) in enumerate(zip(ours, expected)):
        if a != b:
            return i
    return None if len(ours) == len(expected) else min(len(ours), len(expected))


def _describe(tokenizer, seq: list, i: int) -> str:
    if i >= len(seq):
        return "nothing (sequence ends)"
    v = seq[i]
    return v if v == SLOT else f"{v} {tokenizer.convert_ids_to_tokens(int(v))!r}"


def _text_pieces(rendered, tokens_per_image: int) -> list[list[int]]:
    """Our ids cut at the image slots: the text piece before each image and the one after the last (an image
    is ``tokens_per_image`` slot positions, so two adjacent images leave an empty piece between them)."""
    pieces: list[list[int]] = [[]]
    seen = 0
    for tid, slot in zip(rendered.input_ids, rendered.image_slot_mask):
        if slot:
            if seen % tokens_per_image == 0:
                pieces.append([])
            seen += 1
        else:
            pieces[-1].append(tid)
    return pieces


def _inference_case(case: dict, renderer, layout) -> tuple[bool, str]:
    from ..conversation.render import Message
    from ..conversation.template import ASSISTANT, USER, replace_glyphs

    messages = []
    for turn in case["turns"]:
        # as the chat engine takes a user's text: ✨/⭐ become image slots
        messages.append(Message(USER, replace_glyphs(turn["user"])))
        if turn.get("assistant") is not None:
            messages.append(Message(ASSISTANT, turn["assistant"]))
    try:
        rendered = renderer.render(messages, layout)
    except ValueError as exc:
        return False, f"our renderer refuses it: {exc}"
    ours, expected = _text_pieces(rendered, renderer.nq), case["segment_ids"]
    if len(ours) != len(expected):
        return False, f"{len(ours)} text pieces (images + 1), expected {len(expected)}"
    for k, (a, b) in enumerate(zip(ours, expected)):
        j = _first_difference(a, b)
        if j is not None:
            return False, (f"piece {k} token {j}: ours {_describe(renderer.tokenizer, a, j)}, "
                           f"expected {_describe(renderer.tokenizer, b, j)}")
    j = _first_difference(list(rendered.text), list(case["prompt"]))
    if j is not None:  # same ids from different text would be a tokenizer accident; report the text too
        return False, f"prompt text differs at character {j}: ours {rendered.text[j:j + 20]!r}, " \
                      f"expected {case['prompt'][j:j + 20]!r}"
    return True, f"{sum(map(len, ours))} text tokens in {len(ours)} piece{'s' if len(ours) != 1 else ''}"


def _training_case(case: dict, index: int, encoder, media_ids: set) -> tuple[bool, str]:
    from ..common.tensors import IGNORE_INDEX
    from ..conversation.template import count_slots
    from ..data.dialogue import parse_dialogue_record

    where = f"training[{index}]"
    # An upstream split-file item as the dialogue reader takes it; the images are never opened for real.
    item = {"instruction": case["instruction"], "answer": case["answer"],
            "tgt_imgs": [{"image_id": str(k)} for k in range(count_slots(case["instruction"]))]}
    try:
        record = parse_dialogue_record(item, index, where, name="fixture")
        sample = encoder.encode(record, 0, lambda image_id: torch.zeros(3, 1, 1), where)
    except ValueError as exc:  # DataError included
        return False, f"our data path refuses it: {exc}"
    r, tok = sample.rendered, encoder.renderer.tokenizer
    ours = [SLOT if slot else tid for tid, slot in zip(r.input_ids, r.image_slot_mask)]
    # the original expands each slot to <ImageHere> + <ImagePad>s: every such position is an image position
    expected = [SLOT if tid in media_ids else tid for tid in case["input_ids"]]
    j = _first_difference(ours, expected)
    if j is not None:
        return False, f"input position {j}: ours {_describe(tok, ours, j)}, expected {_describe(tok, expected, j)}"
    j = _first_difference(r.labels, case["labels"])
    if j is not None:
        return False, (f"label position {j}: ours {r.labels[j] if j < len(r.labels) else 'nothing'}, "
                       f"expected {case['labels'][j] if j < len(case['labels']) else 'nothing'}")
    supervised = sum(lab != IGNORE_INDEX for lab in r.labels)
    return True, f"{len(ours)} positions, {supervised} supervised"


def run_tokenization(fixture: str | Path) -> list[dict]:
    """Every case of ``fixture/expected.json`` rendered by our code: ``[{"case", "ok", "detail"}, ...]``."""
    from ..conversation.render import Renderer
    from ..conversation.template import END_SYM, INFER_LAYOUT, TRAIN_LAYOUT
    from ..data.base import SampleEncoder
    from ..models.sparkleschat import SparklesChatConfig, image_tokens_per_image

    fixture = Path(fixture)
    expected = read_json(fixture / "expected.json", what="tokenization fixture")
    meta = expected["meta"]
    tokenizer = load_fixture_tokenizer(fixture)
    # the released model's slot width, so training positions line up with the original's expanded slots
    renderer = Renderer(tokenizer, image_tokens_per_image(SparklesChatConfig()), end_sym=END_SYM)
    layout = INFER_LAYOUT.with_system(meta["system"])
    # the default training path: no system text, every sample kept whole
    encoder = SampleEncoder(renderer=renderer, layout=TRAIN_LAYOUT, image_transform=lambda image: image,
                            max_length=1 << 30, image_key_prefix="fixture")
    media_ids = {meta["media_token_id"], meta["media_pad_id"]}
    results = []
    for k, case in enumerate(expected["inference"]):
        ok, detail = _inference_case(case, renderer, layout)
        results.append({"case": f"inference[{k}]", "ok": ok, "detail": detail})
    for k, case in enumerate(expected["training"]):
        ok, detail = _training_case(case, k, encoder, media_ids)
        results.append({"case": f"training[{k}]", "ok": ok, "detail": detail})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", metavar="DIR",
                        help="numerics: directory with the original-format files + expected.pt "
                             f"(default, when no option is given: {REPO_FIXTURE})")
    parser.add_argument("--tokenization", metavar="DIR",
                        help="tokenisation: directory with tokenizer.model + expected.json "
                             f"(default, when no option is given: {REPO_TOKENIZATION_FIXTURE})")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.fixture is None and args.tokenization is None:
        args.fixture, args.tokenization = str(REPO_FIXTURE), str(REPO_TOKENIZATION_FIXTURE)
    if args.fixture is not None and not (Path(args.fixture) / "expected.pt").is_file():
        parser.error(f"--fixture {args.fixture}: no expected.pt there")
    if args.tokenization is not None:
        missing = [f for f in ("expected.json", "tokenizer.model") if not (Path(args.tokenization) / f).is_file()]
        if missing:
            parser.error(f"--tokenization {args.tokenization}: no {' or '.join(missing)} there")

    res: dict = {}
    ok = True
    if args.fixture is not None:
        res = run_parity(args.fixture)
        print(f"image embeds   max|diff| = {res['image_embeds_max_abs_diff']:.3e}  (tol {TOL_EMBEDS:g})")
        print(f"train loss     |diff|    = {res['train_loss_abs_diff']:.3e}  (tol {TOL_LOSS:g}; "
              f"loss {res['train_loss']:.6f})")
        print(f"train logits   max|diff| = {res['train_logits_max_abs_diff']:.3e}  (tol {TOL_LOGITS:g})")
        print(f"greedy tokens  identical = {res['greedy_identical']}  ours {res['greedy_tokens']} "
              f"expected {res['greedy_expected']}")
        print("PARITY OK" if res["ok"] else "PARITY FAILED")
        ok = res["ok"]
    if args.tokenization is not None:
        cases = run_tokenization(args.tokenization)
        for c in cases:
            print(f"{c['case']:<14} {'PASS' if c['ok'] else 'FAIL'}  {c['detail']}")
        failed = sum(not c["ok"] for c in cases)
        print(f"TOKENIZATION OK ({len(cases)} cases)" if not failed
              else f"TOKENIZATION FAILED ({failed} of {len(cases)} cases)")
        res["tokenization"] = {"ok": not failed, "cases": cases}
        ok = ok and not failed
    if args.json:
        atomic_write_json(args.json, res)
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
