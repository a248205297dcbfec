"""Training-step throughput and model FLOP utilisation (MFU) of SparklesChat.

One step = the paper's recipe: frozen EVA-ViT + Q-Former + decoder, trainable ``llama_proj``; a batch of
``batch`` turn-2 samples with 3 images each (rendered by the real renderer, right-padded by the real collate),
the real loss path ``model(..., images=, labels=)["loss"]``, ``backward()``, an AdamW step. That path runs the
LM head only from the position before the batch's first labelled token on
(:func:`sparkles.models.sparkleschat.first_target_position`), so the FLOPs count the LM head over those
``seq_len - first_target_position`` positions.

MFU = analytic step FLOPs (see :mod:`benchmarks.flops`) / step time, divided by the matmul rate of a large
GEMM in the decoder's dtype, timed in the same rounds (alternating order), so a busy or throttled machine
lowers both. The reported figure is the median of the per-round ratios.

    python -m benchmarks.train_step --size small [--profile] [--out train_step.json]
"""

from __future__ import annotations

from typing import Optional

import torch

from sparkles.common.tensors import IGNORE_INDEX

from . import flops
from .common import (benchmark_main, Context, Gemm, Words, median,
                     paired_rounds, print_table, print_targets, random_pixels, target, train_messages)

MFU_TARGET = 0.60


def make_batch(ctx: Context, *, seed_offset: int = 0) -> dict:
    """``batch`` rendered turn-2 samples (3 image slots each) and their pixels."""
    from sparkles.conversation.render import Renderer, collate
    from sparkles.conversation.template import TRAIN_LAYOUT

    size = ctx.size
    renderer = Renderer(ctx.tokenizer, size.nq)
    words = Words(size, ctx.seed + 1000 + seed_offset)
    rendered = []
    for i in range(size.batch):
        msgs, answer = train_messages(size, words, first_image=3 * i + 1)
        rendered.append(renderer.render(msgs, TRAIN_LAYOUT, target=answer))
    batch = collate(rendered, pad_id=renderer.pad_id, padding_side="right")
    n_images = sum(r.num_images for r in rendered)
    dev = ctx.device if ctx.device.type != "meta" else torch.device("cpu")
    batch = {k: v.to(dev) for k, v in batch.items()}
    stats = dict(batch=size.batch, seq_len=int(batch["input_ids"].shape[1]), images=n_images,
                 tokens_per_sample=[len(r) for r in rendered],
                 text_tokens_per_sample=[len(r) - r.num_images * size.nq for r in rendered],
                 target_tokens=int((batch["labels"] != IGNORE_INDEX).sum()))
    return dict(tensors=batch, stats=stats, n_images=n_images)


def logits_positions(labels: torch.Tensor) -> int:
    """Positions per row that ``SparklesChat.forward`` runs the LM head over for these labels."""
    from sparkles.models.sparkleschat import first_target_position

    return labels.shape[1] - first_target_position(labels)


def step_flops(size, stats: dict, labels: torch.Tensor, **kw) -> dict:
    """Analytic FLOPs of one training step on this batch, LM head over the positions the model uses."""
    return flops.train_step(size, batch=stats["batch"], seq_len=stats["seq_len"], n_images=stats["images"],
                            logits_positions=logits_positions(labels), **kw)


class Trainer:
    """Step functions over one fixed batch; restores the trainable weights afterwards."""

    def __init__(self, ctx: Context, batch: dict, pixels: torch.Tensor) -> None:
        self.model = ctx.model
        self.batch = batch["tensors"]
        self.pixels = pixels
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.saved = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5)
        self.model.train()

    def loss(self, *, features: Optional[torch.Tensor] = None) -> torch.Tensor:
        kw = dict(image_features=features) if features is not None else dict(images=self.pixels)
        b = self.batch
        return self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                          image_slot_mask=b["image_slot_mask"], labels=b["labels"], **kw)["loss"]

    def step(self, features_fn=None) -> float:
        loss = self.loss(features=features_fn() if features_fn is not None else None)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def close(self) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, self.saved):
                p.copy_(s)
        self.model.eval()


def profile_table(fn, *, steps: int = 2, rows: int = 12) -> list[dict]:
    """Top operators by self time over ``steps`` calls (what limits the step)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
    events = prof.key_averages()
    cuda = torch.cuda.is_available()
    key = (lambda e: getattr(e, "self_device_time_total", 0)) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(key(e) for e in events) or 1
    top = sorted(events, key=key, reverse=True)[:rows]
    return [dict(op=e.key, self_ms=round(key(e) / 1000 / steps, 2), share=round(key(e) / total, 3), calls=e.count // steps)
            for e in top]


def dry_run(ctx: Context) -> dict:
    """Shapes on the meta device, analytic FLOPs and the torch flop counter on the towers and one layer."""
    size = ctx.size
    batch = make_batch(ctx)
    st = batch["stats"]
    model = ctx.model  # built on meta
    pixels = torch.empty(batch["n_images"], 3, size.image_size, size.image_size, device="meta")
    analytic = step_flops(size, st, batch["tensors"]["labels"])
    counter = flops.torch_flop_counter()
    with torch.no_grad(), counter:
        feats = model.image_features(pixels)
    vision_counted = counter.get_total_flops()
    vision_analytic = sum(flops.vision_forward(size, st["images"]).values())
    # One decoder layer forward + backward on meta (the full model's mask helpers need real data).
    layer = model.llama_model.model.layers[0]
    rotary = model.llama_model.model.rotary_emb
    x = torch.empty(st["batch"], st["seq_len"], size.llm_hidden, device="meta", requires_grad=True)
    pos = torch.arange(st["seq_len"], device="meta")[None].expand(st["batch"], -1)
    counter = flops.torch_flop_counter()
    with counter:
        out = layer(x, position_embeddings=rotary(x, pos))
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
    layer_counted = counter.get_total_flops()
    dec = flops.decoder_forward(size, batch=st["batch"], seq_len=st["seq_len"], logits_positions=0, causal=False)
    layer_analytic = (2 * dec["decoder_linear"] + 3 * dec["decoder_attn"]) // size.llm_layers
    return dict(features_shape=list(feats.shape), batch=st, params=flops.parameter_counts(model),
                flops=analytic, logits_positions=logits_positions(batch["tensors"]["labels"]),
                check_vision=dict(analytic=vision_analytic, torch_counter=vision_counted),
                check_decoder_layer_full_attention=dict(analytic=layer_analytic, torch_counter=layer_counted))


def run(ctx: Context) -> dict:
    size = ctx.size
    if ctx.dry_run:
        return dict(benchmark="train_step", dry_run=True, **dry_run(ctx))
    batch = make_batch(ctx)
    st = batch["stats"]
    pixels = random_pixels(st["images"], size, seed=ctx.seed, device=ctx.device)
    labels = batch["tensors"]["labels"]
    fl = step_flops(size, st, labels)
    trainer = Trainer(ctx, batch, pixels)
    try:
        with torch.no_grad():
            loss = float(trainer.loss())
        gemm = Gemm(size.gemm_n, ctx.device, ctx.dtype)
        times = paired_rounds({"gemm": gemm, "model": trainer.step}, repeats=size.train_repeats, warmup=1,
                              device=ctx.device)
        prof = profile_table(trainer.step) if ctx.profile else None
    finally:
        trainer.close()
    peaks = [gemm.flops / t for t in times["gemm"]]
    mfu = [fl["total"] / t / p for t, p in zip(times["model"], peaks)]
    t = median(times["model"])
    result = dict(benchmark="train_step", size=size.name, batch=st, loss=loss,
                  logits_positions=logits_positions(labels), peak_tflops=median(peaks) / 1e12,
                  peak_rounds_tflops=[p / 1e12 for p in peaks],
                  gemm=dict(n=size.gemm_n, dtype=str(ctx.dtype).removeprefix("torch."), iters=gemm.iters),
                  step_s=t, samples_per_s=st["batch"] / t, achieved_tflops=fl["total"] / t / 1e12, mfu=median(mfu),
                  mfu_rounds=[round(m, 4) for m in mfu], times_s=times["model"], flops=fl)
    if prof is not None:
        result["profile_model_path"] = prof
    result["targets"] = [target("train-step MFU (model.forward loss path)", result["mfu"], ">=", MFU_TARGET,
                                ctx.targets_apply)]
    return result


def report(result: dict) -> None:
    if result.get("dry_run"):
        f = result["flops"]
        print_table("train_step (dry run, meta device)", ["part", "GFLOP"],
                    [[k, v / 1e9] for k, v in f.items()])
        print(f"  params: {result['params']}")
        print(f"  vision FLOPs analytic {result['check_vision']['analytic'] / 1e9:.1f} G vs torch counter "
              f"{result['check_vision']['torch_counter'] / 1e9:.1f} G; decoder layer (fwd+bwd, full attention) "
              f"{result['check_decoder_layer_full_attention']['analytic'] / 1e9:.1f} G vs "
              f"{result['check_decoder_layer_full_attention']['torch_counter'] / 1e9:.1f} G")
        return
    r = result
    rows = [[r["step_s"], r["samples_per_s"], r["flops"]["total"] / 1e9, r["achieved_tflops"] * 1e3, r["mfu"] * 100]]
    print_table(f"train_step ({r['size']}, batch {r['batch']['batch']} x {r['batch']['images'] // r['batch']['batch']} images, "
                f"seq {r['batch']['seq_len']}, LM head on the last {r['logits_positions']}; "
                f"matmul peak {r['peak_tflops'] * 1e3:.1f} GFLOP/s)",
                ["step s", "samples/s", "GFLOP/step", "GFLOP/s", "MFU %"], rows)
    for row in result.get("profile_model_path", []):
        print(f"  {row['share'] * 100:5.1f}%  {row['self_ms']:8.2f} ms  {row['op']}")
    print_targets(result)


def main(argv=None) -> int:
    return benchmark_main("benchmarks.train_step", __doc__, run, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
