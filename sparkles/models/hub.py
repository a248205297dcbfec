"""A trained SparklesChat as one folder in the Hugging Face Hub's conventions, and back.

:func:`save_pretrained` writes into one folder:

- ``model.safetensors``: the weights the folder carries. ``weights="all"``: every tensor of the model;
  ``"trained"``: only what the base weight files named by the config do not already hold (the projection, plus
  every part whose freeze flag is off, plus any tower no file fills); ``"auto"`` (the default) is ``all`` for a
  decoder trained from scratch (a small model, every part of it this project's work) and ``trained`` for a
  pretrained decoder (a 7B Vicuna is not copied into every fine-tune: the projection alone is a few MB).
- ``config.json``: every field of the model config, with the weight files whose tensors the folder holds set to
  ``""`` and those it still needs kept as written (URLs, or paths relative to a Sparkles root; an absolute path
  under ``root`` is made relative to it); its ``hub`` entry says which weights the folder holds.
- ``tokenizer/`` (``tokenizer.json``, ``tokenizer_config.json``) when the decoder was trained from scratch: no
  base directory holds the tokenizer then. A folder of its own, because AutoTokenizer reads a ``config.json``
  beside the tokenizer files, and ours is no transformers config.
- ``README.md``: the model card: YAML front matter (license, tags, datasets, model-index) and a body listing the
  files, the base weights the folder needs, the training data and the benchmark figures.

:func:`from_pretrained` builds the model from that config (base files loaded as configured) and loads
``model.safetensors`` over it; a Hub repo id is fetched with ``huggingface_hub.snapshot_download`` first.
:func:`push_to_hub` uploads a folder with ``HfApi.upload_folder``.

``huggingface_hub.PyTorchModelHubMixin`` is not used: it rebuilds a model from its constructor arguments (ours
are a config and an already built decoder module) and saves the whole state dict, where a fine-tune of a 7B
model should carry only its own tensors. The folder uses the mixin's file names all the same.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..common.io import atomic_write, atomic_write_json, read_json
from ..common.paths import MissingPathError
from .loaders import CheckpointError, CheckpointMissing
from .weights import is_url

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
# The tokenizer sits in a folder of its own: AutoTokenizer reads a config.json beside its files, and ours is not a
# transformers config
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
WEIGHT_MODES = ("auto", "all", "trained")
DEFAULT_TAGS = ("sparkles", "sparkleschat", "multimodal", "multi-image", "image-text-to-text")
# a Hub repo id: "name" or "owner/name"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")

# Which base file fills which tensors, and the freeze flag under which they stay as that file gave them:
# (config key, tensor name prefixes, freeze flag). ln_vision comes in the Q-Former's file but freezes with the ViT.
_BASE_PARTS = (
    ("vit_weights", ("visual_encoder.",), "freeze_vit"),
    ("q_former_model", ("ln_vision.",), "freeze_vit"),
    ("q_former_model", ("Qformer.", "query_tokens", "qformer_text."), "freeze_qformer"),
    ("llama_model", ("llama_model.",), "freeze_llm"),
)
_BASE_KEYS = ("vit_weights", "q_former_model", "llama_model")


def base_file_of(name: str, cfg) -> Optional[str]:
    """The config key of the base file whose values tensor ``name`` still has (``vit_weights``, ``q_former_model``
    or ``llama_model``): the file is configured and the part frozen, so training left them as it gave them. None
    when no base file holds the tensor's trained value."""
    for key, prefixes, freeze in _BASE_PARTS:
        if not name.startswith(prefixes):
            continue
        if not getattr(cfg, key) or (key == "llama_model" and cfg.llm_from_scratch):
            return None  # a decoder built from sizes only borrows its tokenizer from that directory
        return key if getattr(cfg, freeze) else None
    return None


def weights_mode(cfg, weights: str = "auto") -> str:
    """``all`` or ``trained`` for a ``weights`` choice (see the module docstring)."""
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}; got {weights!r}")
    if weights == "auto":
        return "all" if cfg.llm_from_scratch else "trained"
    return weights


def select_weights(model, weights: str = "auto") -> tuple[dict, str, set[str]]:
    """``(tensors to save, mode, config keys of the base files the folder still needs)``."""
    cfg = model.cfg
    mode = weights_mode(cfg, weights)
    state = model.state_dict()
    # a pretrained decoder's directory stays referenced in every mode: it holds the decoder's architecture
    kept = set() if cfg.llm_from_scratch or not cfg.llama_model else {"llama_model"}
    if mode == "all":
        return dict(state), mode, kept
    tensors = {}
    for name, value in state.items():
        key = base_file_of(name, cfg)
        if key is None:
            tensors[name] = value
        else:
            kept.add(key)
    return tensors, mode, kept


def _portable(value: str, root: Optional[str | os.PathLike]) -> str:
    """A weight reference another machine can follow: URLs and relative paths as they are, an absolute path
    under ``root`` relative to it (an absolute path elsewhere stays: the card names it, ``overrides`` repoint it)."""
    if not value or is_url(value):
        return value
    path = Path(value).expanduser()
    if path.is_absolute() and root is not None:
        try:
            return path.resolve().relative_to(Path(root).expanduser().resolve()).as_posix()
        except ValueError:
            pass
    return value


def hub_config(model, mode: str, kept: set[str], *, tokenizer_saved: bool,
               root: Optional[str | os.PathLike] = None) -> dict:
    """The ``config.json`` content: the model config with portable weight references, plus its ``hub`` entry."""
    data = dataclasses.asdict(model.cfg)
    for key in _BASE_KEYS:
        data[key] = _portable(data[key], root) if key in kept else ""
    data["tokenizer_path"] = "" if tokenizer_saved else _portable(data["tokenizer_path"], root)
    data["ckpt"] = ""  # whatever it held is in model.safetensors now
    # a recipe that draws towers at construction: every tower tensor comes from the folder or a base file, and
    # the module registering the recipe need not exist where the folder is loaded
    data["towers_init"] = ""
    data["hub"] = {"format": FORMAT_VERSION, "weights": mode, "tokenizer": tokenizer_saved}
    return data


def _write_safetensors(path: Path, tensors: Mapping[str, Any], metadata: dict[str, str]) -> Path:
    """``tensors`` as one safetensors file, written through the atomic writer."""
    from safetensors.torch import save

    plain, storages = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        # safetensors refuses tensors that share memory (tied weights) or view part of a larger buffer: copy those
        if storage.data_ptr() in storages or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        plain[name] = tensor
    # serialised in memory, then written by the project's atomic writer: safetensors' own save_file writes a file
    # of its own (its own permissions, no sync), which the writer could neither sync nor rename safely
    return atomic_write(path, save(plain, metadata=metadata))


# ------------------------------------------------------------------------------------------------ model card
@dataclass
class Figure:
    """One benchmark figure of the card: ``benchmark`` (BISON), ``metric`` (accuracy), ``value``, a ``note``."""

    benchmark: str
    metric: str
    value: float
    note: str = ""


@dataclass
class CardInfo:
    """What the model card says beyond what the model itself tells."""

    model_name: str = "SparklesChat"
    license: str = "bsd-3-clause"
    datasets: Sequence[str] = ()  # Hub dataset ids, the front matter's ``datasets:``
    training_data: Sequence[str] = ()  # what the model was trained on, one line each (default: ``datasets``)
    figures: Sequence[Figure] = ()
    tags: Sequence[str] = DEFAULT_TAGS
    description: str = ""
    repo_id: str = ""  # where the folder is published, for the card's usage example
    extra_front_matter: dict = field(default_factory=dict)


def figures_from_summary(summary: Mapping[str, Any]) -> list[Figure]:
    """The figures of a run's ``summary.json`` (``python -m sparkles.tools.summary``)."""
    figures = []
    for dataset in ("BISON", "NLVR2"):
        key = dataset.lower()
        if summary.get(f"{key}_acc") is not None:
            items = summary.get(f"{key}_items")
            figures.append(Figure(dataset, "accuracy", float(summary[f"{key}_acc"]),
                                  f"{items} items" if items is not None else ""))
    if summary.get("sparkleseval_score") is not None:
        judge = summary.get("sparkleseval_judge")
        figures.append(Figure("SparklesEval", "score (/10)", float(summary["sparkleseval_score"]),
                              f"judge: {judge}" if judge else ""))
    i4 = summary.get("i4_score") or {}
    if i4.get("mean") is not None:
        base = (summary.get("i4_baseline") or {}).get("mean")
        figures.append(Figure("I4", "mean score (x100)", float(i4["mean"]),
                              f"baseline {base:.1f}" if base is not None else ""))
    return figures


def figures_from_metrics(metrics: Mapping[str, Any]) -> list[Figure]:
    """The figure of one ``<dataset>_<model>_metrics.json`` (``evaluate.py --merge-results``)."""
    dataset = metrics.get("dataset")
    if dataset == "SparklesEval":
        head = metrics.get("headline") or {}
        if head.get("overall") is None:
            return []
        return [Figure(dataset, "score (/10)", float(head["overall"]),
                       f"judge: {head['judge']}" if head.get("judge") else "")]
    if metrics.get("accuracy") is None:
        return []
    total = metrics.get("total")
    return [Figure(str(dataset), "accuracy", float(metrics["accuracy"]), f"{total} items" if total else "")]


def figures_from_file(path: str | os.PathLike) -> list[Figure]:
    """The figures of a ``summary.json`` or of a ``*_metrics.json`` file (told apart by their keys)."""
    data = read_json(path, what="summary or metrics file")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object (a summary.json or a *_metrics.json)")
    if "dataset" in data and ("accuracy" in data or "headline" in data or "judges" in data):
        return figures_from_metrics(data)
    return figures_from_summary(data)


def _describe_base(key: str, value: str) -> str:
    what = {"vit_weights": "EVA-ViT-g weights", "q_former_model": "BLIP-2 Q-Former weights (and ln_vision)",
            "llama_model": "the decoder's Hugging Face directory (architecture, frozen weights, tokenizer)"}[key]
    where = "a URL, downloaded on first load" if is_url(value) else (
        "an absolute path on the machine that saved it: pass overrides={...} to point elsewhere"
        if Path(value).is_absolute() else "relative to the Sparkles root (root= or $SPARKLES_ROOT)")
    return f"- `{key}`: `{value}`: {what}; {where}"


def render_card(info: CardInfo, config: Mapping[str, Any], *, num_tensors: int, num_values: int,
                files: Sequence[str]) -> str:
    """The model card: the Hub's YAML front matter, then the body."""
    from huggingface_hub import EvalResult, ModelCardData

    results = [EvalResult(task_type="image-text-to-text", dataset_type=f.benchmark, dataset_name=f.benchmark,
                          metric_type=f.metric.split()[0], metric_name=f.metric, metric_value=f.value)
               for f in info.figures]
    data = ModelCardData(license=info.license, tags=list(info.tags), datasets=list(info.datasets) or None,
                         library_name="sparkles", pipeline_tag="image-text-to-text", model_name=info.model_name,
                         eval_results=results or None, **info.extra_front_matter)
    hub = config["hub"]
    held = ("every tensor of the model" if hub["weights"] == "all"
            else "the tensors no base file holds: the projection and the parts training changed")
    lines = ["---", data.to_yaml(), "---", "", f"# {info.model_name}", ""]
    lines += [info.description or (
        "A SparklesChat model: EVA-ViT-g and Q-Former image towers, a linear projection and a LLaMA-family "
        "decoder, for dialogues that refer to several images (IMAGE#<id> references). Decoder: "
        + (f"trained from scratch ({config['llm_layers']} layers of width {config['llm_hidden']})"
           if config["llm_from_scratch"] else "pretrained, referenced below") + "."), ""]
    lines += ["## Files", "", "| file | content |", "|---|---|",
              f"| `{WEIGHTS_NAME}` | {num_tensors} tensors, {num_values:,} values: {held} |",
              f"| `{CONFIG_NAME}` | the model config (`hub.weights`: `{hub['weights']}`) |"]
    if hub["tokenizer"]:
        lines.append(f"| {', '.join(f'`{f}`' for f in files)} | the tokenizer the decoder was trained with |")
    lines.append("")
    base = [_describe_base(k, config[k]) for k in _BASE_KEYS if config.get(k)]
    lines += ["## Base weights", ""] + (base or ["None: the folder holds every tensor."]) + [""]
    training = list(info.training_data) or list(info.datasets)
    lines += ["## Training data", ""] + ([f"- {t}" for t in training] or ["Not recorded."]) + [""]
    lines += ["## Benchmark figures", ""]
    if info.figures:
        lines += ["| benchmark | metric | value | note |", "|---|---|---|---|"]
        lines += [f"| {f.benchmark} | {f.metric} | {f.value:.4g} | {f.note} |" for f in info.figures]
    else:
        lines.append("Not recorded.")
    lines += ["", "## Use", "", "```python", "from sparkles.models import SparklesChat", "",
              f'model = SparklesChat.from_pretrained("{info.repo_id or "<repo id or folder>"}")'
              + ("  # root=... for the relative base paths" if any(config.get(k) for k in _BASE_KEYS) else ""),
              "```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ save / load
def save_pretrained(model, save_directory: str | os.PathLike, *, weights: str = "auto",
                    root: Optional[str | os.PathLike] = None, card: Optional[CardInfo] = None) -> Path:
    """Write ``model`` as one folder (``model.safetensors``, ``config.json``, ``tokenizer/`` when the decoder was
    trained from scratch, ``README.md``); ``root``: the Sparkles root its config's paths were resolved against.
    Returns the folder."""
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors, mode, kept = select_weights(model, weights)
    tokenizer_saved = bool(model.cfg.llm_from_scratch)
    tokenizer_files: list[str] = []
    if tokenizer_saved:
        if model.tokenizer is None:
            raise ValueError("the decoder was trained from scratch, so its tokenizer must travel with it; the model "
                             "has none attached (build it with SparklesChat.from_config)")
        saved = model.tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
        tokenizer_files = sorted(f"{TOKENIZER_DIR}/{Path(p).name}" for p in saved)
    config = hub_config(model, mode, kept, tokenizer_saved=tokenizer_saved, root=root)
    _write_safetensors(out / WEIGHTS_NAME, tensors, {"format": "pt", "sparkles_weights": mode})
    atomic_write_json(out / CONFIG_NAME, config)
    text = render_card(card or CardInfo(), config, num_tensors=len(tensors),
                       num_values=sum(t.numel() for t in tensors.values()), files=tokenizer_files)
    atomic_write(out / CARD_NAME, text)
    return out


def resolve_folder(source: str | os.PathLike, *, revision: Optional[str] = None,
                   token: Optional[str] = None) -> Path:
    """A local folder as it is; a Hub repo id (``owner/name``) downloaded with ``snapshot_download``."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if not _REPO_ID.fullmatch(str(source)):
        raise MissingPathError(f"model folder not found: {path} (nor is it a Hub repo id like owner/name)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=str(source), revision=revision, token=token))


def load_weights(model, path: str | os.PathLike) -> set[str]:
    """Load a folder's ``model.safetensors`` into ``model``. A tensor the model lacks, a shape that differs, or a
    parameter that neither the file nor a base file the model was built with (``model.load_reports``, a
    pretrained decoder) provides is a :class:`CheckpointError`. Returns the names loaded."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointMissing(f"weights not found: {path}")
    tensors = load_file(str(path), device="cpu")
    own = model.state_dict()
    stray = sorted(k for k in tensors if k not in own)
    if stray:
        raise CheckpointError(f"{path}: {len(stray)} tensor(s) the model does not have, e.g. {stray[0]!r}")
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise CheckpointError(f"{path}: {name!r} has shape {tuple(value.shape)} but the model expects "
                                  f"{tuple(own[name].shape)}")
    # what the base files filled, as their loaders report it (a configured file that lacks a tower shows here)
    provided = set().union(*(r.filled for r in getattr(model, "load_reports", None) or []))
    decoder_loaded = bool(model.cfg.llama_model) and not model.cfg.llm_from_scratch
    missing = sorted(n for n, _ in model.named_parameters() if n not in tensors and n not in provided
                     and not (decoder_loaded and n.startswith("llama_model.")))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} parameter(s) are neither in this file nor in a base file of "
                              f"the config, e.g. {missing[0]!r}")
    model.load_state_dict(tensors, strict=False)
    return set(tensors)


def from_pretrained(cls, source: str | os.PathLike, *, root: Optional[str | os.PathLike] = None,
                    device: Any = "cpu", overrides: Optional[Mapping[str, Any]] = None,
                    revision: Optional[str] = None, token: Optional[str] = None, verbose: bool = False):
    """A model saved by :func:`save_pretrained`, from a local folder or a Hub repo id. ``root``: the Sparkles root
    the config's relative base paths resolve against; ``overrides``: model config values to change (e.g.
    ``{"llama_model": "/data/vicuna-7b"}``); ``cls``: the model class (``SparklesChat``)."""
    from omegaconf import OmegaConf

    folder = resolve_folder(source, revision=revision, token=token)
    data = read_json(folder / CONFIG_NAME, what="model config", error=CheckpointError)
    hub = data.pop("hub", None) if isinstance(data, dict) else None
    if not isinstance(hub, dict) or hub.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{folder / CONFIG_NAME}: not a Sparkles model folder of format {FORMAT_VERSION} "
                              "(no matching 'hub' entry)")
    fields = dict(data)
    if hub.get("tokenizer"):
        fields["tokenizer_path"] = str((folder / TOKENIZER_DIR).resolve())
    fields.update(overrides or {})
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.config_class), fields))
    # towers whose tensors the folder holds have no file of their own in the config: allowed while building,
    # then load_weights checks that every tensor came from the folder or a base file
    allow, cfg.allow_random_towers = cfg.allow_random_towers, True
    model = cls.from_config(cfg, root=root, device=device, verbose=verbose)
    cfg.allow_random_towers = allow
    load_weights(model, folder / WEIGHTS_NAME)
    return model.eval()


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, token: Optional[str] = None,
                private: Optional[bool] = None, commit_message: str = "Upload SparklesChat",
                repo_type: str = "model"):
    """Create ``repo_id`` if needed and upload ``folder`` into it (needs network access and a write token)."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if repo_type == "model" and not (folder / CONFIG_NAME).is_file():
        raise MissingPathError(f"{folder}: no {CONFIG_NAME}; write the folder with save_pretrained first")
    api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type=repo_type, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type=repo_type,
                             commit_message=commit_message)
