"""Training runners (``run.runner``): the iteration-based loop, lr schedules, optimizer and checkpoints."""

from .runner_base import RUNNERS, RunnerBase, get_runner, validate_run_config  # noqa: F401
