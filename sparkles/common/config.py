"""Run configuration: OmegaConf YAML with ``model`` / ``datasets`` / ``run`` roots, strictly typed.

Each registered model or dataset builder names a dataclass schema (``config_class``) that holds every
default exactly once, plus an optional preset YAML (``default_config_path``) with the values of a named
variant (``model_type``; a preset may build on another through ``_base_: <model_type>``, and
``--options model.model_type=X`` picks X's preset). Loading first imports the modules that ``run.imports``
names (they register further datasets, tasks, judges and presets), then merges, in the upstream order: the run
section, then for the model its schema → preset → the run file's ``model`` section, then for every dataset its
schema → preset → the run file's entry, then ``--options key=value`` overrides. An unknown key, a wrong type or
a missing required value is a :class:`ConfigError` naming the key and the file it came from. Keys that only the
original implementation reads are listed in :data:`UPSTREAM_ONLY_KEYS`: configs written for it still load.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .paths import ENV_VAR, MissingPathError, project_path
from .registry import DATASETS, MODELS

log = logging.getLogger(__name__)

ROOT_SECTIONS = ("model", "datasets", "run", "demo")  # demo: optional, only a config that has one carries it


class ConfigError(ValueError):
    """A configuration problem; the message names the key and where it came from."""


@dataclass
class EvalProcessorConfig:
    """The image transform used at inference (upstream: ``datasets.cc_sbu_align.vis_processor.train``)."""

    name: str = "blip2_image_eval"
    image_size: Optional[int] = None  # None = the model's image_size


@dataclass
class RunConfig:
    """The ``run`` section: optimisation, schedule, distributed and output settings (see docs/training.md)."""

    # Python modules imported before the rest of the config is built, so that the datasets, tasks, judges and
    # model presets they register can be named here.
    imports: List[str] = field(default_factory=list)
    # Default Sparkles root for this config (relative to the working directory, else to the repository);
    # --sparkles_root and $SPARKLES_ROOT take precedence. Lets the tiny configs work without any flag.
    sparkles_root: Optional[str] = None
    # The command that writes the weights this config names, given when they are missing (e.g. "bash run.sh").
    made_by: Optional[str] = None
    # How the demo and the API place images: "sparkles" (the user marks each with ✨/⭐) or "minigpt4" (the
    # original single-image chat: the one image goes before the first question). Evaluation prompts carry slots.
    chat_mode: str = "sparkles"
    # How answers are decoded at inference (demo, API, evaluation): "plain" (a growing KV cache), "static" (one
    # pre-allocated cache, no per-token host syncs) or "compiled" (static + torch.compile / CUDA graphs on a GPU).
    decode_mode: str = "plain"
    task: str = "image_text_pretrain"
    runner: str = "runner_base"
    # --- learning rate: linear_warmup_cosine_lr | linear_warmup_step_lr | constant_lr (sparkles.runners.lr_sched)
    lr_sched: str = "linear_warmup_cosine_lr"
    init_lr: float = 3e-5
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 0
    # Upstream measures the cosine from step 0, so the lr jumps down at the end of warmup.
    cosine_after_warmup: bool = False
    lr_decay_rate: Optional[float] = None  # linear_warmup_step_lr: init_lr * rate ** epoch
    # --- optimizer: AdamW, betas (0.9, beta2), decay on >=2-D weights without bias/ln/bn in the name
    weight_decay: float = 0.05
    beta2: float = 0.999
    grad_clip: Optional[float] = None  # max global grad norm; None = no clipping (upstream)
    # learning-rate multipliers by parameter-name prefix ({"llama_proj": 5.0}): a fresh part of a model whose
    # rest is already trained can learn faster than that rest; unnamed parameters keep the schedule's rate
    lr_scale: Dict[str, float] = field(default_factory=dict)
    # --- schedule of the loop: an epoch is iters_per_epoch steps, whatever the dataset sizes
    max_epoch: int = 1
    iters_per_epoch: int = 100
    batch_size_train: int = 1  # per process
    accum_grad_iters: int = 1  # loss / k, optimizer step every k iterations; must divide iters_per_epoch
    num_workers: int = 0  # loader workers per dataset (one sub-loader per dataset)
    seed: int = 42  # model init uses seed; per-rank RNGs seed + rank; data order and the mixture derive from it
    output_dir: str = "outputs/run"  # relative paths resolve against the Sparkles root
    # --- precision: on CUDA, autocast in amp_dtype (GradScaler for float16); CPU always trains in float32
    amp: bool = False
    amp_dtype: str = "bfloat16"
    resume_ckpt_path: Optional[str] = None  # a checkpoint_<epoch>.pth / checkpoint_last.pth to continue exactly
    auto_resume: bool = False  # without resume_ckpt_path: continue from the newest complete checkpoint in output_dir
    # --- devices and processes (their number comes from the torchrun environment)
    device: str = "auto"  # auto | cpu | cuda
    dist_backend: str = "auto"  # auto = nccl on GPU, gloo on CPU
    find_unused_parameters: bool = False  # DDP option, for models with trainable parts that some batches skip
    num_threads: Optional[int] = None  # CPU threads per process; None = the cores divided among local processes
    # --- logging
    log_freq: int = 50  # steps between log lines
    progress_bar: bool = True  # tqdm bar on rank 0
    tensorboard: bool = True  # scalars in <output_dir>/tensorboard
    # --- data
    max_length: int = 1024  # tokens per sample (datasets.<name>.max_length overrides)
    skip_bad_records: bool = False  # count and skip bad records instead of stopping with an error
    vision_feature_cache: bool = False  # frozen ViT+Q-Former: compute each image's features once
    # Which dataset each step draws from: every process its own draw (upstream), or one draw shared by all
    # processes, so that a step of short samples (captions, drills) is short on every process instead of
    # waiting for another process's long batch; each process still reads its own shard of that dataset.
    mixture_per_rank: bool = True
    # --- evaluation / demo: the inference image transform (no dataset builder needed to evaluate)
    eval_vis_processor: EvalProcessorConfig = field(default_factory=EvalProcessorConfig)


@dataclass
class DemoConfig:
    """The optional ``demo`` section: what the chat demo offers for this model (docs/serving.md)."""

    examples: List[str] = field(default_factory=list)  # example prompts; empty = the demo's own
    note: Optional[str] = None  # what the model does well and what not; None = the demo's own
    temperature: Optional[float] = None  # where the temperature slider starts (0 = greedy); None = the demo's own


# Keys that configs written for the original implementation carry but Sparkles does not read, in one place:
# key → (the values that ask for nothing Sparkles does differently, or None for any value; what Sparkles does).
# Such a key loads with a warning; any other value is refused, since the config would expect something else.
UPSTREAM_ONLY_KEYS: dict[str, tuple[Optional[tuple], str]] = {
    "model.vit_model": (("eva_clip_g",), "the vision tower is EVA-ViT-g, sized by model.vit_*"),
    "model.max_txt_len": (None, "captions go through the dialogue renderer, limited by run.max_length"),
    "model.end_sym": (("###",), "every answer ends with the template's '###'"),
    "model.prompt": (None, "caption prompts come from datasets.cc_sbu_align.prompt_path"),
    "model.prompt_path": (None, "caption prompts come from datasets.cc_sbu_align.prompt_path"),
    "model.prompt_template": (None, "the template is sparkles/conversation/template.py"),
    "model.preprocess": (None, "image transforms are set by datasets.<name>.vis_processor and run.eval_vis_processor"),
    "run.evaluate": ((False,), "training runs no evaluation; evaluate with evaluate.py"),
    "run.train_splits": ((["train"],), "every dataset trains on its one annotation file"),
    "run.valid_splits": (([],), "training runs no evaluation; evaluate with evaluate.py"),
    "run.test_splits": (([],), "training runs no evaluation; evaluate with evaluate.py"),
    "run.batch_size_eval": (None, "evaluate.py --batch-size sets the evaluation batch"),
    "run.dist_url": (("env://",), "processes join through torchrun's environment"),
    "run.use_dist_eval_sampler": (None, "evaluate.py shards by --shard or the torchrun rank"),
    "run.world_size": (None, "the number of processes comes from torchrun's environment"),
    "run.distributed": (None, "the number of processes comes from torchrun's environment"),
}

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _drop_upstream_only(section: Any, prefix: str, *, source: str) -> Any:
    """``section`` without the keys of :data:`UPSTREAM_ONLY_KEYS` under ``prefix`` (warned about, or refused)."""
    if not isinstance(section, (DictConfig, dict)):
        return section
    kept = OmegaConf.create(OmegaConf.to_container(section, resolve=False)) if isinstance(section, DictConfig) \
        else OmegaConf.create(dict(section))
    for name, (accepted, why) in UPSTREAM_ONLY_KEYS.items():
        head, key = name.split(".", 1)
        if head != prefix or key not in kept:
            continue
        value = kept.pop(key)
        plain = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
        if accepted is not None and plain not in accepted:
            raise ConfigError(f"{source}: {name}={plain!r} is a key of the original implementation that Sparkles "
                              f"does not act on ({why}); remove it, or set it to {accepted[0]!r}")
        log.warning("%s: %s is a key of the original implementation and has no effect here (%s)", source, name, why)
    return kept


def import_modules(names: Any, *, source: str = "run.imports") -> list[str]:
    """Import the modules a config's ``run.imports`` names (each registers its datasets, tasks, judges, presets)."""
    if names is None:
        return []
    names = OmegaConf.to_container(names) if isinstance(names, ListConfig) else names
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ConfigError(f"{source}: run.imports must be a list of module names, e.g. [mypackage.datasets]")
    for name in names:
        if not isinstance(name, str) or not _MODULE_NAME.match(name):
            raise ConfigError(f"{source}: run.imports: {name!r} is not a Python module name")
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                raise ConfigError(f"{source}: run.imports: no module named {name!r}") from None
            raise
    return list(names)


def _load_yaml(path: str | os.PathLike) -> DictConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        cfg = OmegaConf.load(p)
    except Exception as exc:  # yaml syntax errors carry line numbers; keep them
        raise ConfigError(f"{p}: cannot parse YAML: {exc}") from exc
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return cfg


def _merge(base: DictConfig, other: Any, *, source: str, section: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"{source}: {section}.{key}: {msg}") from None


def _structured(schema: type) -> DictConfig:
    """The schema's defaults, closed to unknown keys (typos fail), except its free mappings (``Dict`` fields such
    as ``run.lr_scale``, whose keys are the user's)."""
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    for name, hint in typing.get_type_hints(schema).items():
        if typing.get_origin(hint) is dict:
            OmegaConf.set_struct(cfg[name], False)
    return cfg


def build_model_config(section: Any, *, source: str = "<model section>") -> DictConfig:
    """Merge a model section over its schema and the preset of its ``model_type``."""
    section = _drop_upstream_only(section, "model", source=source)
    arch = section.get("arch") if section is not None else None
    if not arch:
        raise ConfigError(f"{source}: model.arch is required (known: {', '.join(MODELS.names())})")
    try:
        model_cls = MODELS.get(arch)
    except KeyError as exc:
        raise ConfigError(f"{source}: model.arch: {exc}") from None
    cfg = _structured(model_cls.config_class)
    # An explicit empty model_type means "no preset": every value comes from the schema and the file.
    model_type = section.get("model_type") if "model_type" in section else cfg.get("model_type")
    try:
        preset = model_cls.default_config_path(model_type)
    except KeyError as exc:
        raise ConfigError(f"{source}: model.model_type: {exc.args[0]}") from None
    if preset is not None:
        for path in _preset_chain(model_cls, preset):
            values = _load_yaml(path)
            values.pop("_base_", None)
            cfg = _merge(cfg, values, source=str(path), section="model")
    return _merge(cfg, section, source=source, section="model")


def _preset_chain(model_cls, preset: Path) -> list[Path]:
    """``preset`` after the presets it builds on: a preset's ``_base_`` names the ``model_type`` it changes."""
    chain = [preset]
    while "_base_" in (values := _load_yaml(chain[0])):
        try:
            base = model_cls.default_config_path(values["_base_"])
        except KeyError as exc:
            raise ConfigError(f"{chain[0]}: _base_: {exc.args[0]}") from None
        if base in chain:
            raise ConfigError(f"{chain[0]}: _base_ {values['_base_']!r} makes a cycle")
        chain.insert(0, base)
    return chain


def build_dataset_config(name: str, section: Any, *, source: str = "<datasets section>") -> DictConfig:
    try:
        builder = DATASETS.get(name)
    except KeyError as exc:
        raise ConfigError(f"{source}: datasets.{name}: {exc}") from None
    cfg = _structured(builder.config_class)
    preset = builder.default_config_path() if hasattr(builder, "default_config_path") else None
    if preset is not None:
        cfg = _merge(cfg, _load_yaml(preset), source=str(preset), section=f"datasets.{name}")
    return _merge(cfg, section or {}, source=source, section=f"datasets.{name}")


def parse_options(options: Sequence[str] | None) -> DictConfig:
    """``["run.init_lr=1e-4", "model.freeze_vit=False"]`` → a config to merge last."""
    options = list(options or [])
    for opt in options:
        if "=" not in opt:
            raise ConfigError(f"--options: {opt!r} is not of the form key=value")
    # "key=" means the empty string (OmegaConf would read it as null).
    options = [opt + "''" if opt.endswith("=") else opt for opt in options]
    try:
        return OmegaConf.from_dotlist(options)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"--options: {exc}") from None


def load_config(cfg_path: str | os.PathLike, options: Sequence[str] | None = None) -> DictConfig:
    """Load and validate a run config (``model``, ``datasets``, ``run``) with ``--options`` applied."""
    cfg_path = project_path(cfg_path)  # a config of the project is found from any folder
    source = str(cfg_path)
    raw = _load_yaml(cfg_path)
    unknown = [k for k in raw.keys() if k not in ROOT_SECTIONS]
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {unknown}; expected {list(ROOT_SECTIONS)}")
    overrides = parse_options(options)
    for section in ("model", "run"):
        if section in overrides:
            overrides[section] = _drop_upstream_only(overrides[section], section, source="--options")
    run_section = _drop_upstream_only(raw.get("run") or {}, "run", source=source)
    overridden = "run" in overrides and "imports" in overrides.run  # before any registry lookup below
    import_modules(overrides.run.imports if overridden else run_section.get("imports"),
                   source="--options" if overridden else source)
    run = _merge(_structured(RunConfig), run_section, source=source, section="run")
    model_section = raw.get("model")
    if model_section is not None and "model" in overrides and "model_type" in overrides.model:
        # --options model.model_type=X picks X's preset, under the file's other model values
        model_section = OmegaConf.merge(model_section, {"model_type": overrides.model.model_type})
    model = build_model_config(model_section, source=source)
    datasets = {}
    for name, section in (raw.get("datasets") or {}).items():
        datasets[name] = build_dataset_config(name, section, source=source)
    cfg = OmegaConf.create({"model": model, "datasets": datasets, "run": run})
    if "demo" in raw or "demo" in overrides:
        cfg.demo = _merge(_structured(DemoConfig), raw.get("demo") or {}, source=source, section="demo")
    for key in overrides.keys():
        if key not in ROOT_SECTIONS:
            raise ConfigError(f"--options: unknown section {key!r}; expected one of {list(ROOT_SECTIONS)}")
        if key == "datasets":
            for name in overrides.datasets.keys():
                if name not in datasets:
                    raise ConfigError(f"--options: datasets.{name} is not a dataset of {source}")
    cfg = _merge(cfg, overrides, source="--options", section="")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{source}: required value(s) missing: {', '.join(missing)}")
    return cfg


def resolve_config_root(cfg: DictConfig, cli_root: str | os.PathLike | None = None) -> Path:
    """The Sparkles root for a loaded config: the CLI value, else ``$SPARKLES_ROOT``, else ``run.sparkles_root``."""
    for value in (cli_root, os.environ.get(ENV_VAR)):
        if value:
            return Path(value).expanduser()
    if cfg.run.get("sparkles_root"):
        return project_path(cfg.run.sparkles_root)  # the config's own folder, e.g. run.sh's outputs/tiny
    raise MissingPathError(f"no Sparkles root: pass --sparkles_root DIR, set {ENV_VAR}, or set run.sparkles_root")


def to_container(cfg: DictConfig | ListConfig) -> Any:
    """Plain dict/list (for JSON logs and checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True)
