"""The training runner: iteration-based epochs over the dataset mixture, AdamW, lr schedule, AMP, DDP,
gradient accumulation and clipping, logs, TensorBoard and exact-resume checkpoints.

An "epoch" is ``run.iters_per_epoch`` steps, independent of dataset sizes (upstream). Each step draws one
dataset by ratio and trains on one batch of it; the lr is set before every step from the global step.
With ``accum_grad_iters = k`` the loss is divided by ``k`` and the optimizer steps every ``k`` iterations
(gradients are only all-reduced on those). After every epoch rank 0 writes ``checkpoint_<epoch>.pth`` and
``checkpoint_last.pth`` atomically, with every rank's RNG and data position, so a run killed after epoch ``k``
and resumed from it ends with the same weights as an uninterrupted one.

Outputs in ``run.output_dir`` (relative paths resolve against the Sparkles root): ``log.txt`` (JSON lines:
the merged config first, then one line per epoch), ``train.log`` (the human log), ``tensorboard/``.

Where a run starts: ``run.resume_ckpt_path`` if set; else, with ``run.auto_resume``, the newest complete
checkpoint in the output folder (a fresh start when there is none); else a fresh start, which refuses an output
folder that already holds checkpoints unless ``overwrite`` (``train.py --overwrite``) says to delete them first.
A resumed run whose training-relevant config values (:data:`TRAINING_KEYS`) differ from the checkpoint's is
refused, naming the keys, unless ``allow_config_change`` (``--allow-config-change``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from ..common import dist
from ..common.config import to_container
from ..common.io import atomic_write
from ..common.logging import MeterGroup
from ..common.tensors import DTYPES
from ..data.base import DataError, resolve_under
from ..data.mixture import build_mixture
from .checkpoint import FORMAT, LAST, atomic_save, checkpoint_files, cpu_state, load_checkpoint, newest_checkpoint
from .checkpoint import optimizer_state_to_cpu, rng_state, set_rng_state
from .lr_sched import LRSchedule
from .optim import build_optimizer

log = logging.getLogger(__name__)

MAX_EMPTY_BATCHES = 1000  # with skip_bad_records: give up instead of looping over a dataset of bad records
HALF_DTYPES = (torch.bfloat16, torch.float16)  # what run.amp_dtype may name
# Config values that shape the optimisation: a run resumed with other values is not a continuation of the one
# that wrote the checkpoint.
TRAINING_KEYS = ("datasets", "run.lr_sched", "run.init_lr", "run.min_lr", "run.warmup_lr", "run.warmup_steps",
                 "run.cosine_after_warmup", "run.lr_decay_rate", "run.lr_scale", "run.weight_decay", "run.beta2",
                 "run.max_epoch", "run.iters_per_epoch", "run.batch_size_train", "run.accum_grad_iters")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except ImportError:  # pragma: no cover - not on POSIX
        return float("nan")


def validate_run_config(run) -> None:
    """Checks that need no model or data (train.py runs them before building anything)."""
    if run.iters_per_epoch <= 0 or run.max_epoch <= 0 or run.batch_size_train <= 0:
        raise ValueError("run.iters_per_epoch, run.max_epoch and run.batch_size_train must be positive")
    if run.accum_grad_iters <= 0 or run.iters_per_epoch % run.accum_grad_iters:
        raise ValueError(f"run.accum_grad_iters={run.accum_grad_iters} must divide run.iters_per_epoch="
                         f"{run.iters_per_epoch} (an epoch ends with an optimizer step, so checkpoints never "
                         "hold half-accumulated gradients)")
    if run.amp and DTYPES.get(run.amp_dtype) not in HALF_DTYPES:
        raise ValueError(f"run.amp_dtype: {run.amp_dtype!r}; use bfloat16 or float16")
    LRSchedule.from_run_config(run)  # unknown schedule names, missing decay rate


class CheckpointsExist(FileExistsError):
    """A fresh run would overwrite the checkpoints of an earlier one."""


def check_fresh_start(run, output_dir: Path, *, overwrite: bool) -> None:
    """Refuse a run that neither resumes nor may overwrite when ``output_dir`` already holds checkpoints."""
    if run.resume_ckpt_path or run.auto_resume or overwrite:
        return
    found = checkpoint_files(output_dir)
    if found:
        names = ", ".join(p.name for p in found[:4]) + (" ..." if len(found) > 4 else "")
        raise CheckpointsExist(f"{output_dir} already holds checkpoints of an earlier run ({names}); pass "
                               "--overwrite to train afresh (they are deleted first), set run.auto_resume=true to "
                               "continue from the newest, or choose another run.output_dir")


def _leaves(value, prefix: str):
    """(dotted key, value) for every leaf of nested dicts (lists are leaves; an empty dict has none)."""
    if isinstance(value, dict):
        for key in value:
            yield from _leaves(value[key], f"{prefix}.{key}")
    else:
        yield prefix, value


def config_changes(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every :data:`TRAINING_KEYS` value that differs between two plain configs."""
    absent = "<absent>"
    changes = []
    for key in TRAINING_KEYS:
        section, _, name = key.partition(".")
        old, new = (c.get(section, {}) if not name else c.get(section, {}).get(name, absent) for c in (saved, current))
        if old == new:
            continue
        a, b = dict(_leaves(old, key)), dict(_leaves(new, key))
        leaves = [leaf for leaf in sorted(set(a) | set(b)) if a.get(leaf, absent) != b.get(leaf, absent)]
        changes += [f"{leaf}: {a.get(leaf, absent)!r} -> {b.get(leaf, absent)!r}" for leaf in leaves] \
            or [f"{key}: {old!r} -> {new!r}"]
    return changes


class RunnerBase:
    """Runs ``task`` on ``model`` over ``datasets`` as configured by ``cfg.run``."""

    def __init__(self, cfg, *, task, model, datasets: dict, root: Path, dist_info: dist.DistInfo,
                 job_id: str = "", overwrite: bool = False, allow_config_change: bool = False) -> None:
        self.cfg, self.run = cfg, cfg.run
        self.overwrite, self.allow_config_change = overwrite, allow_config_change
        self.task, self.model, self.datasets = task, model, datasets
        self.root, self.dist, self.job_id = Path(root), dist_info, job_id
        self.device = dist_info.device
        self.output_dir = resolve_under(self.root, self.run.output_dir)
        validate_run_config(self.run)
        self.schedule = LRSchedule.from_run_config(self.run)
        self.accum = int(self.run.accum_grad_iters)
        self.amp_dtype = self._amp_dtype()
        self.optimizer = build_optimizer(model, lr=float(self.run.init_lr), weight_decay=float(self.run.weight_decay),
                                         beta2=float(self.run.beta2), lr_scale=self.run.lr_scale)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.ddp_model = model
        if dist_info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp_model = DDP(model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                 find_unused_parameters=bool(self.run.find_unused_parameters))
        self.mixture = build_mixture(datasets, batch_size=int(self.run.batch_size_train), rank=dist_info.rank,
                                     world=dist_info.world_size, seed=int(self.run.seed),
                                     num_workers=int(self.run.num_workers), pin_memory=self.device.type == "cuda",
                                     per_rank=bool(self.run.mixture_per_rank))
        self.start_epoch = 0
        self.global_step = 0
        self.bad_records: list[tuple[str, str]] = []
        self.writer = None
        self._pending_rng: Optional[dict] = None  # this rank's RNG state from a resumed checkpoint

    # ------------------------------------------------------------------ setup
    def _amp_dtype(self) -> Optional[torch.dtype]:
        if not self.run.amp:
            return None
        dtype = DTYPES[self.run.amp_dtype]
        # CPUs autocast to bfloat16 only (with AVX512-BF16 or AMX its matrix products are ~1.5x faster for the tiny
        # model); float16 needs a GPU and its loss scaling.
        if self.device.type == "cuda" or (self.device.type == "cpu" and dtype == torch.bfloat16):
            return dtype
        log.info("run.amp (%s) is ignored on %s: training in float32", self.run.amp_dtype, self.device.type)
        return None

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ resume / checkpoints
    def resume(self, path: Path, ckpt: Optional[dict] = None) -> None:
        """Continue from the checkpoint at ``path`` (``ckpt``: its content, if already read)."""
        ckpt = ckpt if ckpt is not None else load_checkpoint(path)
        changes = config_changes(ckpt.get("config") or {}, to_container(self.cfg))
        if changes and not self.allow_config_change:
            raise ValueError(f"{path}: this run's training settings differ from the checkpoint's: "
                             f"{'; '.join(changes)}. Resuming would not continue that run; restore them, or pass "
                             "--allow-config-change to resume with the new values")
        if changes:
            log.warning("%s: resuming with changed training settings (--allow-config-change): %s", path,
                        "; ".join(changes))
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        missing = sorted(trainable - set(ckpt["model"]))
        unexpected = sorted(set(ckpt["model"]) - trainable)
        if missing or unexpected:
            raise ValueError(f"{path}: does not match the trainable parameters of this model "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]}); same model.freeze_* settings?")
        self.model.load_state_dict(ckpt["model"], strict=False)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.global_step = int(ckpt.get("global_step", self.start_epoch * self.run.iters_per_epoch))
        ranks = ckpt.get("ranks") or []
        if len(ranks) == self.dist.world_size:
            self.mixture.load_state_dict(ranks[self.dist.rank]["data"])
            self._pending_rng = ranks[self.dist.rank]["rng"]
        else:
            log.warning("%s was written by %d process(es), this run has %d: weights and optimizer resumed, but the "
                        "data order and RNG streams start afresh (not an exact continuation)", path, len(ranks),
                        self.dist.world_size)
        log.info("resumed from %s: epoch %d done, continuing at epoch %d", path, ckpt["epoch"], self.start_epoch)

    def save_checkpoint(self, epoch: int) -> Optional[Path]:
        rank_state = {"rng": rng_state(), "data": self.mixture.state_dict()}
        states = dist.all_gather_object(rank_state)
        path = None
        if self.dist.is_main:
            ckpt = {
                "format": FORMAT,
                "model": cpu_state(self.model.trainable_state_dict()),
                "optimizer": optimizer_state_to_cpu(self.optimizer.state_dict()),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "scheduler": {"name": self.schedule.name, "step": self.global_step},
                "epoch": epoch,
                "global_step": self.global_step,
                "world_size": self.dist.world_size,
                "config": to_container(self.cfg),
                "ranks": states,
            }
            path = self.output_dir / f"checkpoint_{epoch}.pth"
            atomic_save(ckpt, path)
            with open(path, "rb") as src:
                last = atomic_write(self.output_dir / LAST, lambda f: shutil.copyfileobj(src, f))
            log.info("saved %s (and %s)", path, last.name)
        dist.barrier()
        return path

    def _start_point(self) -> Optional[Path]:
        """Resume where the config says (see the module docstring); returns the checkpoint resumed, if any.

        Rank 0 looks at the output folder and decides; every rank follows its decision, so processes that do
        not share that folder cannot disagree.
        """
        if self.run.resume_ckpt_path:
            path = resolve_under(self.root, self.run.resume_ckpt_path)
            self.resume(path)
            return path
        found, problem = None, None
        if self.dist.is_main:
            if self.run.auto_resume:
                found = newest_checkpoint(self.output_dir)
            try:
                check_fresh_start(self.run, self.output_dir, overwrite=self.overwrite)
            except CheckpointsExist as exc:
                problem = str(exc)
        path, problem = dist.all_gather_object((str(found[0]) if found else None, problem))[0]
        if problem:
            raise CheckpointsExist(problem)
        if path:
            self.resume(Path(path), found[1] if found else None)
            return Path(path)
        if self.run.auto_resume and self.dist.is_main:
            log.info("run.auto_resume: no complete checkpoint in %s; starting afresh", self.output_dir)
        if self.overwrite and self.dist.is_main:
            # An earlier run's later epochs must not stay beside this run's, where auto_resume would take them.
            for old in checkpoint_files(self.output_dir):
                log.info("--overwrite: deleting %s of an earlier run", old)
                old.unlink()
        dist.barrier()
        return None

    # ------------------------------------------------------------------ logging
    def _log_json(self, obj: dict) -> None:
        if self.dist.is_main:
            with open(self.output_dir / "log.txt", "a", encoding="utf-8") as f:
                f.write(json.dumps(obj) + "\n")

    def _open_writer(self) -> None:
        if self.dist.is_main and self.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))

    # ------------------------------------------------------------------ training
    def _next_batch(self) -> tuple[str, dict]:
        """The mixture's next batch with at least one good sample (bad ones counted, never resampled)."""
        for _ in range(MAX_EMPTY_BATCHES):
            name, batch = self.mixture.next()
            for sid, reason in batch["bad"]:
                self.bad_records.append((sid, reason))
                log.warning("skipped bad record %s: %s", sid, reason)
            if batch["num_samples"]:
                return name, batch
        raise DataError(f"{MAX_EMPTY_BATCHES} batches in a row held only bad records (last from {name}); "
                        "the data is broken beyond skipping")

    def train_epoch(self, epoch: int) -> dict:
        from tqdm.contrib.logging import logging_redirect_tqdm

        # Log lines go through tqdm.write so they do not tear the progress bar.
        with logging_redirect_tqdm(loggers=[logging.getLogger("sparkles")]):
            return self._train_epoch(epoch)

    def _train_epoch(self, epoch: int) -> dict:
        from tqdm.auto import tqdm

        run, ipe = self.run, int(self.run.iters_per_epoch)
        self.ddp_model.train()
        meters = MeterGroup(window=max(1, int(run.log_freq)))
        loss_sum, loss_count, samples = 0.0, 0, 0
        # disable=None lets tqdm switch itself off when stderr is not a terminal (log files, batch jobs).
        show = self.dist.is_main and run.progress_bar
        bar = tqdm(total=ipe, desc=f"epoch {epoch}", disable=None if show else True,
                   dynamic_ncols=True, mininterval=1.0, leave=False)
        t_epoch = time.perf_counter()
        t_prev = t_epoch
        lr = self.schedule(self.global_step)
        for i in range(ipe):
            lr = self.schedule(self.global_step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            t0 = time.perf_counter()
            name, batch = self._next_batch()
            data_time = time.perf_counter() - t0
            sync = (i + 1) % self.accum == 0
            no_sync = self.ddp_model.no_sync() if (self.dist.distributed and not sync) else contextlib.nullcontext()
            with no_sync:
                with self._autocast():
                    out = self.task.train_step(self.ddp_model, batch, device=self.device)
                loss = out["loss"]
                if self.scaler is None and not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch} step {i} on batch "
                                             f"{batch['ids']} (dataset {name})")
                scaled = loss / self.accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            if sync:
                self._optimizer_step()
            self.global_step += 1
            loss_value = float(loss.detach())
            n = int(batch["num_samples"])
            loss_sum += loss_value
            loss_count += 1
            samples += n
            now = time.perf_counter()
            iter_time, t_prev = now - t_prev, now
            meters.update(loss=loss_value, data=data_time, iter=iter_time)
            bar.update(1)
            bar.set_postfix(loss=f"{meters['loss'].recent:.4f}", lr=f"{lr:.2e}", refresh=False)
            if (i + 1) % max(1, int(run.log_freq)) == 0 or i + 1 == ipe:
                self._log_step(epoch, i, ipe, lr, meters, n)
        bar.close()
        total_loss, total_count, total_samples = dist.all_reduce_sum([loss_sum, loss_count, samples], self._coll_device())
        return {"epoch": epoch, "train_lr": lr, "train_loss": total_loss / max(1, total_count),
                "global_step": self.global_step, "samples": int(total_samples),
                "time_s": round(time.perf_counter() - t_epoch, 3)}

    def _coll_device(self) -> torch.device:
        return self.device if self.dist.backend == "nccl" else torch.device("cpu")

    def _optimizer_step(self) -> None:
        clip = self.run.grad_clip
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.scaler is not None:
            if clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, float(clip))
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if clip:
                torch.nn.utils.clip_grad_norm_(params, float(clip))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _log_step(self, epoch: int, i: int, ipe: int, lr: float, meters: MeterGroup, batch_samples: int) -> None:
        it_time = meters["iter"].recent
        its = 1.0 / it_time if it_time > 0 else float("nan")
        sps = its * batch_samples * self.dist.world_size
        mem = peak_memory_mb(self.device)
        log.info("epoch %d [%*d/%d] lr %.6f loss %.4f (avg %.4f) | %.2f it/s %.1f samples/s data %.3fs | peak mem "
                 "%.0f MB", epoch, len(str(ipe)), i + 1, ipe, lr, meters["loss"].recent,
                 meters["loss"].mean, its, sps, meters["data"].recent, mem)
        if self.writer is not None:
            step = self.global_step
            self.writer.add_scalar("train/loss", meters["loss"].recent, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/samples_per_s", sps, step)
            self.writer.add_scalar("train/data_time_s", meters["data"].recent, step)
            self.writer.add_scalar("train/peak_mem_mb", mem, step)

    def train(self) -> dict:
        """Train from ``start_epoch`` to ``max_epoch``; returns a summary (epochs run, last stats, paths)."""
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        resume = self._start_point()
        self._log_json({"config": to_container(self.cfg), "job_id": self.job_id, "world_size": self.dist.world_size,
                        "resumed_from": str(resume) if resume else None, "start_epoch": self.start_epoch})
        self._open_writer()
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)  # last, so nothing else draws from the restored streams first
            self._pending_rng = None
        history = []
        t0 = time.perf_counter()
        try:
            for epoch in range(self.start_epoch, int(self.run.max_epoch)):
                stats = self.train_epoch(epoch)
                stats["skipped_bad_records"] = len(self.bad_records)
                self.save_checkpoint(epoch)
                self._log_json(stats)
                if self.writer is not None:
                    self.writer.add_scalar("epoch/train_loss", stats["train_loss"], epoch)
                    self.writer.flush()
                log.info("epoch %d done: loss %.4f, lr %.2e, %d samples, %.1fs", epoch, stats["train_loss"],
                         stats["train_lr"], stats["samples"], stats["time_s"])
                history.append(stats)
        finally:
            self.mixture.close()
            if self.writer is not None:
                self.writer.close()
        skipped = self._report_skipped()
        if not history:
            log.info("nothing to train: the checkpoint already covers run.max_epoch=%d epochs", self.run.max_epoch)
        return {"output_dir": str(self.output_dir), "epochs": history, "skipped_bad_records": skipped,
                "time_s": time.perf_counter() - t0,
                "autocast": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else None,
                "checkpoint": str(self.output_dir / LAST) if history else None}

    def _report_skipped(self) -> int:
        at_load = sum(len(ds.skipped) for ds in self.datasets.values())
        at_run = int(dist.all_reduce_sum([len(self.bad_records)], self._coll_device())[0])
        total = at_load + at_run
        if total and self.dist.is_main:
            log.warning("skipped %d bad record(s): %d when loading the annotations, %d while training "
                        "(run.skip_bad_records=True)", total, at_load, at_run)
        return total


RUNNERS = {"runner_base": RunnerBase}


def get_runner(name: str):
    try:
        return RUNNERS[name]
    except KeyError:
        raise KeyError(f"run.runner: unknown runner {name!r}; known: {', '.join(RUNNERS)}") from None


