"""What the learning-curve probes share: their training flags, and one optimiser step of the probe recipe.

The probes (``decision_probe``, ``lookup_probe``) train a small model from scratch for a few hundred steps and
report a held-out curve; they use one recipe (AdamW, weight decay 0.05, one-cycle schedule with 5 % warm-up,
gradients clipped at 1.0) so that their figures in docs/notes/tiny_world.md compare.
"""

from __future__ import annotations

import argparse


def add_training_args(parser: argparse.ArgumentParser, *, steps: int, eval_every: int, held_out: int) -> None:
    """The flags every probe takes, with the probe's own defaults for the run length and the held-out set."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=eval_every)
    parser.add_argument("--held-out", type=int, default=held_out)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", help="write the curve as JSON here")


def set_threads_and_seed(args: argparse.Namespace) -> None:
    """``--threads`` (before any work, so that it applies to all of it) and ``--seed`` for torch."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


class ProbeOptimiser:
    """AdamW on ``params`` with the one-cycle schedule over ``args.steps``; ``step(loss)`` is one update."""

    def __init__(self, params, args: argparse.Namespace) -> None:
        import torch

        self.params = list(params)
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=0.05)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=args.lr, total_steps=args.steps,
                                                         pct_start=0.05)

    def step(self, loss) -> None:
        import torch

        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
