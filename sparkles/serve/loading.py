"""Build a ready-to-serve :class:`~sparkles.engine.chat.Chat` from a run config.

Shared by ``demo.py`` and ``python -m sparkles.serve``: config → model on one device (or its decoder split
over several GPUs with an accelerate device map) → the BLIP-2 eval image transform → a chat engine whose
context length never exceeds what the decoder was built for.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)

# The config `bash run.sh` trains and evaluates; used when no --cfg-path is given.
DEFAULT_CFG_PATH = "eval_configs/sparkles_tiny.yaml"


class LoadError(RuntimeError):
    """The model cannot be served as configured; the message says what to do."""


def parse_gpu_ids(value: Optional[str]) -> Optional[list[int]]:
    """``"0"`` → ``[0]``, ``"0,1"`` → ``[0, 1]``, ``None``/``""`` → ``None`` (pick automatically)."""
    if value is None or str(value).strip() == "":
        return None
    ids: list[int] = []
    for part in str(value).split(","):
        part = part.strip()
        if not part.isdigit():
            raise argparse.ArgumentTypeError(f"--gpu-id expects GPU numbers like 0 or 0,1; got {value!r}")
        if int(part) in ids:
            raise argparse.ArgumentTypeError(f"--gpu-id lists GPU {part} twice")
        ids.append(int(part))
    return ids


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every serving entry point shares."""
    parser.add_argument("--cfg-path", default=None,
                        help=f"evaluation config (default: {DEFAULT_CFG_PATH}, the tiny model `bash run.sh` trains)")
    parser.add_argument("--gpu-id", type=parse_gpu_ids, default=None, metavar="N[,M...]",
                        help="GPU to run on; several (e.g. 0,1) split the decoder's layers over them. "
                             "Default: GPU 0 if CUDA is available, else the CPU")
    parser.add_argument("--sparkles_root", default=None,
                        help="root that relative paths in the config resolve against (default: $SPARKLES_ROOT, "
                             "then run.sparkles_root)")
    parser.add_argument("--options", nargs="+", default=None, metavar="KEY=VALUE",
                        help="override config values, e.g. model.ckpt=path/to/checkpoint.pth")
    parser.add_argument("--protocol-file", default=None, metavar="F",
                        help="protocol file whose system_text the chat uses (python -m sparkles.tools.import_protocol "
                             "writes the original's); default: the config's")


def context_length(model) -> int:
    """How many positions the decoder was built for (``max_position_embeddings``), if it says."""
    config = getattr(getattr(model, "llama_model", None), "config", None)
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if n else 0


def context_limit(chat) -> int:
    """The ``max_length`` (prompt + answer) to generate with: the engine's default, capped by the decoder."""
    n = context_length(chat.model)
    return min(chat.generation.max_length, n) if n else chat.generation.max_length


def make_chat(model, cfg=None, *, generation=None, chat_mode: Optional[str] = None, nonblank_answer: bool = True):
    """A chat engine for ``model`` with the eval image transform at the model's image size. With the ``cfg`` the
    model was loaded from (:func:`load_model`), its ``run.chat_mode`` and ``run.decode_mode`` apply; ``generation``
    and ``chat_mode`` given here win. Answers are never blank (``GenerationConfig.nonblank_answer``) unless
    ``nonblank_answer`` is False: a served model asked "Hello" says something."""
    from ..engine.chat import Chat
    from ..processors.image import build_processor

    processor = build_processor({"name": "blip2_image_eval", "image_size": model.cfg.image_size})
    generation = (generation or generation_of(cfg)).updated(nonblank_answer=nonblank_answer)
    n = context_length(model)
    if n and generation.max_length > n:
        generation = generation.updated(max_length=n)
    return Chat(model, processor, generation=generation, chat_mode=chat_mode or chat_mode_of(cfg) or "sparkles")


def chat_mode_of(cfg) -> Optional[str]:
    """The config's ``run.chat_mode`` (None when it has none)."""
    run = cfg.get("run") if cfg is not None else None
    return run.get("chat_mode") if run is not None else None


def generation_of(cfg):
    """The engine's default decoding settings with the config's ``run.decode_mode``."""
    from ..engine.decoding import GenerationConfig

    run = cfg.get("run") if cfg is not None else None
    mode = run.get("decode_mode") if run is not None else None
    return GenerationConfig().updated(decode_mode=mode) if mode else GenerationConfig()


def resolve_devices(gpu_ids: Optional[Sequence[int]]):
    """The primary device for ``gpu_ids`` (None → cuda:0 when available, else CPU); checks the GPUs exist."""
    import torch

    if not gpu_ids:
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if not torch.cuda.is_available():
        raise LoadError(f"--gpu-id {','.join(map(str, gpu_ids))} asks for a GPU but CUDA is not available here; "
                        "leave out --gpu-id to run on the CPU")
    count = torch.cuda.device_count()
    missing = [i for i in gpu_ids if i >= count]
    if missing:
        raise LoadError(f"--gpu-id: GPU {missing[0]} does not exist (this machine has {count})")
    return torch.device("cuda", gpu_ids[0])


def split_decoder(model, gpu_ids: Sequence[int], *, max_memory: Optional[dict] = None,
                  device_map: Optional[dict] = None):
    """Put the vision side on the first GPU and spread the decoder's layers over ``gpu_ids``.

    accelerate's device map keeps each decoder layer whole (``_no_split_modules``) and its hooks move
    activations between GPUs; the top-level hook returns logits on the first GPU, where the chat engine
    keeps its token bookkeeping. The first GPU is listed first so it also holds the input embeddings
    the image tokens are spliced into. An explicit ``device_map`` (module name → device) is used as given.
    """
    import torch
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    from ..common.tensors import resolve_dtype

    if model.cfg.low_resource:
        raise LoadError("model.low_resource=True (8-bit decoder) cannot be split over several GPUs; "
                        "use one --gpu-id or set model.low_resource=False")
    first = torch.device("cuda", gpu_ids[0])
    dtype = resolve_dtype(model.cfg.dtype, first)
    llm = model.llama_model.to(dtype)
    no_split = list(getattr(llm, "_no_split_modules", None) or [])
    if device_map is None:
        if max_memory is None:
            max_memory = {i: torch.cuda.mem_get_info(i)[0] for i in gpu_ids}
            max_memory = get_balanced_memory(llm, max_memory=max_memory, no_split_module_classes=no_split,
                                             dtype=dtype)
        device_map = infer_auto_device_map(llm, max_memory=max_memory, no_split_module_classes=no_split,
                                           dtype=dtype)
        placed_off_gpu = sorted({str(d) for d in device_map.values() if d in ("cpu", "disk")})
        if placed_off_gpu:
            raise LoadError(f"the decoder does not fit on GPUs {list(gpu_ids)} (would spill to {placed_off_gpu})")
    dispatch_model(llm, device_map=device_map, main_device=first)
    model.place_all_but_decoder(first)
    if model.cfg.vit_precision in ("fp16", "bf16"):
        vit_dtype = torch.float16 if model.cfg.vit_precision == "fp16" else torch.bfloat16
        for module in model.visual_encoder.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.to(vit_dtype)
    model.device_map = device_map
    log.info("decoder split over GPUs %s: %s", list(gpu_ids), sorted(set(device_map.values()), key=str))
    return model


def load_model(cfg_path: Optional[str] = None, *, options: Optional[Sequence[str]] = None,
               sparkles_root: Optional[str] = None, gpu_ids: Optional[Sequence[int]] = None,
               protocol_file: Optional[str] = None):
    """Config → SparklesChat (weights loaded, in eval mode) on the requested device(s). Returns ``(model, cfg)``.

    A ``protocol_file`` with a ``system_text`` replaces the config's system text."""
    import sparkles.models  # noqa: F401  (registers the sparkleschat arch)
    from ..common.config import ConfigError, load_config, resolve_config_root
    from ..common.paths import project_path
    from ..conversation.protocol_file import ProtocolFileError, load_protocol_file
    from ..models.loaders import CheckpointError
    from ..models.sparkleschat import SparklesChat

    given = cfg_path or DEFAULT_CFG_PATH
    cfg_path = project_path(given)
    if not cfg_path.is_file():
        # the current folder first, then the repository: the order project_path looks in
        tried = list(dict.fromkeys([str(Path(given).expanduser().absolute()), str(cfg_path.absolute())]))
        raise LoadError(f"config file not found: {given} (looked for {' and '.join(tried)}); pass --cfg-path")
    device = resolve_devices(gpu_ids)
    try:
        texts = load_protocol_file(protocol_file)
    except ProtocolFileError as exc:
        raise LoadError(str(exc)) from exc
    hint = ""
    try:
        cfg = load_config(cfg_path, options)
        if texts.system_text is not None:
            cfg.model.system_text = texts.system_text
        root = resolve_config_root(cfg, sparkles_root)
        hint = missing_model_hint(cfg, root)
        multi = bool(gpu_ids) and len(gpu_ids) > 1
        # Several GPUs: build on the CPU, then dispatch; one device: build there directly.
        model = SparklesChat.from_config(cfg.model, root=root, device="cpu" if multi else device)
    except (ConfigError, FileNotFoundError, CheckpointError) as exc:
        # what writes the files helps only when a file is missing, not when one is there and does not fit
        missing = isinstance(exc, FileNotFoundError)
        raise LoadError(f"{exc}.{hint}" if hint and missing else str(exc)) from exc
    if multi:
        split_decoder(model, gpu_ids)
    model.eval()
    return model, cfg


def missing_model_hint(cfg, root: Path) -> str:
    """What writes the files a config names: its ``run.made_by`` (with the folder, when this run reads another
    one than the config's own), else the released weights' layout."""
    from ..common.paths import project_path

    made_by = cfg.run.get("made_by")
    if made_by:
        own = cfg.run.get("sparkles_root")
        elsewhere = own and Path(root).resolve() != project_path(own).resolve()
        return f" `{made_by}` writes them" + (f" (into {own}; this run reads {root})." if elsewhere else ".")
    return (" Lay out the released weights under the Sparkles root as README.md's \"Using the released weights\" "
            "shows, or pass --sparkles_root.")
