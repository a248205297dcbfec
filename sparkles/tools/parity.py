"""Parity check against outputs of the original implementation.

``python -m sparkles.tools.parity [--fixture DIR]`` loads DIR's files in the original formats
(``eva_vit_g.pth``, ``blip2_pretrained.pth``, ``sparkleschat.pth``, ``llama/``) through our loaders and
compares with ``DIR/expected.pt``: image embeddings, training loss and logits, greedy tokens. It prints each
difference and exits 0 only within tolerance (max abs diff ≤ 1e-4, loss ≤ 1e-5, tokens identical). The default
fixture is the repository's ``tests/fixtures/upstream_parity_tiny`` (its README says how it was made).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..common.io import atomic_write_json

# the repository's fixture, when this package runs from a checkout
REPO_FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "upstream_parity_tiny"
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
        llama_model=str(fixture / "llama"), image_size=c["img"], vit_patch_size=eva["patch_embed.proj.weight"].shape[-1],
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", default=str(REPO_FIXTURE),
                        help=f"directory with the original-format files + expected.pt (default {REPO_FIXTURE})")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if not (Path(args.fixture) / "expected.pt").is_file():
        parser.error(f"--fixture {args.fixture}: no expected.pt there")
    res = run_parity(args.fixture)
    print(f"image embeds   max|diff| = {res['image_embeds_max_abs_diff']:.3e}  (tol {TOL_EMBEDS:g})")
    print(f"train loss     |diff|    = {res['train_loss_abs_diff']:.3e}  (tol {TOL_LOSS:g}; loss {res['train_loss']:.6f})")
    print(f"train logits   max|diff| = {res['train_logits_max_abs_diff']:.3e}  (tol {TOL_LOGITS:g})")
    print(f"greedy tokens  identical = {res['greedy_identical']}  ours {res['greedy_tokens']} "
          f"expected {res['greedy_expected']}")
    print("PARITY OK" if res["ok"] else "PARITY FAILED")
    if args.json:
        atomic_write_json(args.json, res)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
