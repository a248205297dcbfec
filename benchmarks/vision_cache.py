"""Frozen towers → compute each image's Q-Former features once, then train (or evaluate) from the cache.

With EVA-ViT and the Q-Former frozen (the paper's recipe), ``image_features(pixels)`` is a pure function of
the image, yet the upstream trainer recomputes it for every image at every step of every epoch. Here the
features of a synthetic image set are computed once (batched), kept in memory and written to a safetensors
file, and training steps read them (``model(image_features=...)``) instead of pixels. The benchmark times, in
alternating rounds, one full training step (forward, backward, AdamW) fed by pixels, by the in-memory cache
and by the on-disk cache (reading the six feature tensors from the file is inside the timed step), for the
``model.forward`` loss path (LM head over the label window, see :mod:`benchmarks.train_step`). The losses
with pixels and with cached features are checked to agree. Decoding/resizing image files, which the cache also
skips, is not counted in the uncached step.

    python -m benchmarks.vision_cache --size small [--out vision_cache.json]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .common import (benchmark_main, Context, median, paired_rounds,
                     print_table, print_targets, random_pixels, target, timed)
from .train_step import Trainer, make_batch, step_flops

RATIO_TARGET = 0.65


class FeatureCache:
    """Q-Former outputs of every image, computed once; in memory and in one safetensors file."""

    def __init__(self, model, pixels: torch.Tensor, path: Path, *, chunk: int = 8) -> None:
        from safetensors.torch import save_file

        feats = []
        with torch.no_grad():
            for i in range(0, pixels.shape[0], chunk):
                feats.append(model.image_features(pixels[i:i + chunk]))
        self.memory = torch.cat(feats).float()  # float32: the cached step must give the uncached loss
        self.path = path
        save_file({f"image_{i}": f.contiguous().cpu() for i, f in enumerate(self.memory)}, str(path))

    def from_memory(self, ids: list[int]) -> torch.Tensor:
        return self.memory[ids]

    def from_disk(self, ids: list[int], device: torch.device) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            feats = torch.stack([f.get_tensor(f"image_{i}") for i in ids])
        return feats.to(device, non_blocking=True)


def run(ctx: Context) -> dict:
    size = ctx.size
    if ctx.dry_run:
        batch = make_batch(ctx)
        st, labels = batch["stats"], batch["tensors"]["labels"]
        f_un = step_flops(size, st, labels)
        f_c = step_flops(size, st, labels, cached_features=True)
        return dict(benchmark="vision_cache", dry_run=True, flops_uncached=f_un["total"], flops_cached=f_c["total"],
                    flop_ratio=f_c["total"] / f_un["total"],
                    feature_bytes_per_image=size.nq * size.q_hidden * 4)
    model = ctx.model
    batch = make_batch(ctx)
    n_img = batch["n_images"]
    all_pixels = random_pixels(size.cache_images, size, seed=ctx.seed + 7, device=ctx.device)
    step_ids = [[(k * n_img + j) % size.cache_images for j in range(n_img)] for k in range(size.cache_images)]
    cursor = {"uncached": 0, "memory": 0, "disk": 0}

    def next_ids(kind: str) -> list[int]:  # every variant walks the dataset like a data loader would
        ids = step_ids[cursor[kind] % len(step_ids)]
        cursor[kind] += 1
        return ids

    with tempfile.TemporaryDirectory(prefix="sparkles_featcache_") as tmp:
        build_s, cache = timed(lambda: FeatureCache(model, all_pixels, Path(tmp) / "features.safetensors"),
                               ctx.device)
        file_bytes = cache.path.stat().st_size
        trainer = Trainer(ctx, batch, all_pixels[step_ids[0]])
        try:
            with torch.no_grad():
                l_pix = float(trainer.loss())
                l_mem = float(trainer.loss(features=cache.from_memory(step_ids[0])))
                l_disk = float(trainer.loss(features=cache.from_disk(step_ids[0], ctx.device)))
            tol = 1e-4 if ctx.dtype == torch.float32 else 2e-2
            for name, value in (("in-memory", l_mem), ("on-disk", l_disk)):
                if abs(value - l_pix) > tol * max(1.0, abs(l_pix)):
                    raise AssertionError(f"loss with {name} cached features {value} != loss with pixels {l_pix}")

            def uncached():
                trainer.pixels = all_pixels[next_ids("uncached")]
                trainer.step()

            fns = {"uncached": uncached,
                   "memory": lambda: trainer.step(lambda: cache.from_memory(next_ids("memory"))),
                   "disk": lambda: trainer.step(lambda: cache.from_disk(next_ids("disk"), ctx.device))}
            times = paired_rounds(fns, repeats=size.train_repeats, warmup=1, device=ctx.device)
        finally:
            trainer.close()
    out = dict(uncached_s=median(times["uncached"]))
    for kind in ("memory", "disk"):
        ratios = [c / u for c, u in zip(times[kind], times["uncached"])]
        out[f"{kind}_s"] = median(times[kind])
        out[f"{kind}_ratio"] = median(ratios)
        out[f"{kind}_ratio_rounds"] = [round(r, 4) for r in ratios]
    per_epoch_saving = (out["uncached_s"] - out["disk_s"]) * len(step_ids)
    result = dict(benchmark="vision_cache", size=size.name, images=size.cache_images,
                  images_per_step=n_img, build_s=build_s, build_s_per_image=build_s / size.cache_images,
                  cache_file_bytes=file_bytes, loss_pixels=l_pix, loss_cached_memory=l_mem, loss_cached_disk=l_disk,
                  epochs_to_break_even=build_s / per_epoch_saving if per_epoch_saving > 0 else None,
                  **out, times_s=times)
    result["targets"] = [target("cached/uncached step time (model.forward, disk cache)", out["disk_ratio"], "<=",
                                RATIO_TARGET, ctx.targets_apply)]
    return result


def report(result: dict) -> None:
    if result.get("dry_run"):
        print(f"\nvision_cache (dry run): step FLOPs uncached {result['flops_uncached'] / 1e9:.1f} G, cached "
              f"{result['flops_cached'] / 1e9:.1f} G (ratio {result['flop_ratio']:.3f}); "
              f"{result['feature_bytes_per_image']} bytes of features per image")
        return
    rows = [[result[k] for k in ("uncached_s", "memory_s", "memory_ratio", "disk_s", "disk_ratio")]]
    print_table(f"vision_cache ({result['size']}; cache of {result['images']} images built in "
                f"{result['build_s']:.2f} s = {result['build_s_per_image'] * 1e3:.1f} ms/image, "
                f"{result['cache_file_bytes'] / 1e6:.1f} MB)",
                ["uncached s", "memory s", "ratio", "disk s", "ratio"], rows)
    print_targets(result)


def main(argv=None) -> int:
    return benchmark_main("benchmarks.vision_cache", __doc__, run, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
