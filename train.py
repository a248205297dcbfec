"""Train SparklesChat.

    torchrun --nproc-per-node 8 train.py --cfg-path train_configs/sparkleschat.yaml \\
        --sparkles_root /data/Sparkles                                                 # the paper recipe
    python train.py --cfg-path train_configs/sparkleschat_tiny.yaml                  # the CPU tiny model's dialogues
    python train.py --cfg-path ... --options run.resume_ckpt_path=models/SparklesChat/checkpoint_last.pth
    python train.py --cfg-path ... --options run.auto_resume=true    # continue from the newest checkpoint, if any

``--options key=value ...`` overrides any config value (``run.init_lr=1e-4``, ``model.freeze_vit=False``,
``datasets.SparklesDialogueCC_turn1_1img.sample_ratio=0``). A run that does not resume refuses an output folder
that already holds checkpoints unless ``--overwrite``; a resumed run refuses changed training settings (data,
learning rate, epochs, batch, iterations) unless ``--allow-config-change``. See docs/training.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Optional, Sequence

# Busy-waiting OpenMP threads (the default) slow CPU training down several-fold as soon as the cores are
# shared with anything else; waiting passively costs next to nothing. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("sparkles.train")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train SparklesChat (single process or under torchrun).")
    parser.add_argument("--cfg-path", "--cfg_path", dest="cfg_path", required=True, help="train config YAML")
    parser.add_argument("--sparkles_root", "--sparkles-root", dest="sparkles_root", default=None,
                        help="root of data/weights/outputs (else $SPARKLES_ROOT, else run.sparkles_root)")
    parser.add_argument("--options", nargs="+", default=[], help="config overrides key=value")
    parser.add_argument("--overwrite", action="store_true",
                        help="train afresh even if run.output_dir holds checkpoints (they are deleted first)")
    parser.add_argument("--allow-config-change", dest="allow_config_change", action="store_true",
                        help="resume although training settings (datasets, lr, epochs, batch, iters) differ from the "
                             "checkpoint's (the differing keys are logged)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Train as configured; returns the runner's summary (output_dir, per-epoch stats, checkpoint)."""
    args = parse_args(argv)
    import torch

    import sparkles.data.builders  # noqa: F401  (registers the datasets)
    import sparkles.models  # noqa: F401  (registers the model)
    import sparkles.tasks  # noqa: F401  (registers the tasks)
    from sparkles.common import dist
    from sparkles.common.config import load_config, resolve_config_root
    from sparkles.common.logging import setup_logging
    from sparkles.common.registry import TASKS
    from sparkles.common.tensors import seed_everything
    from sparkles.data.base import resolve_under
    from sparkles.runners import get_runner, validate_run_config
    from sparkles.runners.runner_base import check_fresh_start

    cfg = load_config(args.cfg_path, args.options)
    validate_run_config(cfg.run)
    # Before anything is built: a run that would overwrite another's checkpoints stops at once.
    check_fresh_start(cfg.run, resolve_under(resolve_config_root(cfg, args.sparkles_root), cfg.run.output_dir),
                      overwrite=args.overwrite)
    if cfg.run.vision_feature_cache:
        from sparkles.tasks.image_text_pretrain import check_feature_cache

        check_feature_cache(cfg)
    info = dist.init_distributed(cfg.run.device, cfg.run.dist_backend)
    try:
        root = resolve_config_root(cfg, args.sparkles_root)
        setup_logging(info.rank)
        if info.device.type == "cpu":
            torch.set_num_threads(cfg.run.num_threads or dist.cpu_threads_per_process(info.local_world_size))
        if info.device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        job_id = time.strftime("%Y%m%d%H%M%S")
        log.info("job %s: %d process(es) on %s, Sparkles root %s", job_id, info.world_size, info.device, root)

        task = TASKS.get(cfg.run.task)(cfg)
        seed = int(cfg.run.seed)
        seed_everything(seed)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
        model = task.build_model(root=root, device=info.device)
        seed_everything(seed + info.rank)  # per-rank streams from here on (upstream)
        datasets = task.build_datasets(root=root, tokenizer=model.tokenizer)
        runner = get_runner(cfg.run.runner)(cfg, task=task, model=model, datasets=datasets, root=root,
                                            dist_info=info, job_id=job_id, overwrite=args.overwrite,
                                            allow_config_change=args.allow_config_change)
        setup_logging(info.rank, runner.output_dir / "train.log")
        summary = runner.train()
        # A task may turn the trained weights into another artefact (tower_pretrain: a BLIP-2 towers file).
        after = getattr(task, "after_training", None)
        if after is not None and info.is_main:
            summary.update(after(model, runner.output_dir))
        dist.barrier()
        return summary
    finally:
        dist.cleanup()


if __name__ == "__main__":
    main()
    sys.exit(0)
