"""Loaders for the original checkpoint files, with every key accounted for.

- ``eva_vit_g.pth``: a plain EVA state dict; blocks beyond ``vit_depth`` (the 40th) are ignored on purpose.
- ``blip2_pretrained*.pth``: ``{"model": ...}`` with ``query_tokens``, ``ln_vision.*`` and the LAVIS BERT
  ``Qformer.bert.*`` keys (mapped onto ``transformers``' Q-Former names); the text branch and the
  contrastive/matching heads are ignored on purpose. A ``visual_encoder.*`` block, if present, overrides the
  EVA file, as upstream's non-strict whole-model load did.
- MiniGPT-4 / SparklesChat ``.pth``: ``{"model": {"llama_proj.weight", "llama_proj.bias", ...}}``; also the
  checkpoints our runner writes, which hold every trainable part (a decoder trained from scratch included).
  Registered buffers saved by the upstream runner are ignored on purpose.
- Vicuna/LLaMA Hugging Face directories through ``AutoModelForCausalLM``.

A model key with no source, a checkpoint key we cannot place, or a shape mismatch is a
:class:`CheckpointError` naming the key and the file. Every ``.pth`` is read with ``weights_only=True``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..common.io import atomic_write


class CheckpointError(RuntimeError):
    """A checkpoint does not fit the model; the message names the key(s) and the file."""


class CheckpointMissing(CheckpointError, FileNotFoundError):
    """A checkpoint file or folder is not there (as opposed to one that is there but does not fit)."""


@dataclass
class LoadReport:
    """What one file contributed: loaded keys, keys ignored on purpose (with the reason), and the model's
    tensors they set (``filled``, names as in ``model.state_dict()``: what tells a tower the file provides)."""

    file: str
    loaded: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)  # key -> reason
    filled: set[str] = field(default_factory=set)

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for reason in self.ignored.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        extra = "; ".join(f"{n} ignored ({r})" for r, n in sorted(reasons.items()))
        return f"{self.file}: loaded {len(self.loaded)} tensors" + (f"; {extra}" if extra else "")


def read_state_dict(path: str | os.PathLike, *, wrapper_key: str | None = None) -> dict[str, torch.Tensor]:
    """The dict stored in a ``.pth`` file (its ``wrapper_key`` entry if given), read with ``weights_only=True``.

    A missing, empty, truncated or otherwise unreadable file is a :class:`CheckpointError` that names it and
    says which of these it is.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointMissing(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes), e.g. from a copy or download that did not "
                              "finish; replace it with the complete checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Weights only load failed" in str(exc):
            why = "it holds objects other than tensors and plain containers, which are never loaded"
        else:
            why = f"truncated or not a torch checkpoint ({size} bytes)"
        raise CheckpointError(f"{path}: cannot be read: {why}: {type(exc).__name__}: {detail}") from exc
    if wrapper_key is not None:
        if not isinstance(obj, dict) or wrapper_key not in obj:
            raise CheckpointError(f"{path}: expected a dict with a {wrapper_key!r} entry")
        obj = obj[wrapper_key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def _assign(target: dict[str, torch.Tensor], key: str, value: torch.Tensor, path: Path, src_key: str) -> None:
    if key not in target:
        raise CheckpointError(f"{path}: key {src_key!r} maps to {key!r}, which the model does not have")
    if tuple(target[key].shape) != tuple(value.shape):
        raise CheckpointError(f"{path}: key {src_key!r} has shape {tuple(value.shape)} but the model expects "
                              f"{tuple(target[key].shape)} for {key!r}")


def _load_mapped(module: nn.Module, source: dict[str, torch.Tensor], mapping: Callable[[str], str | None | tuple],
                 path: Path, report: LoadReport, *, prefix: str, required: Iterable[str] | None = None) -> set[str]:
    """Copy ``source`` into ``module`` (the model's ``prefix`` part) through ``mapping`` (src key → module key,
    None = not ours, or ("ignore", reason)). Returns the module keys that were filled."""
    target = module.state_dict()
    filled: dict[str, torch.Tensor] = {}
    for src_key, value in source.items():
        mapped = mapping(src_key)
        if mapped is None:
            continue
        if isinstance(mapped, tuple):
            report.ignored[src_key] = mapped[1]
            continue
        _assign(target, mapped, value, path, src_key)
        filled[mapped] = value
        report.loaded.append(src_key)
    need = set(target) if required is None else set(required)
    missing = sorted(need - set(filled))
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise CheckpointError(f"{path}: {len(missing)} required key(s) missing: {shown}")
    module.load_state_dict(filled, strict=False)
    report.filled.update(prefix + k for k in filled)
    return set(filled)


# --------------------------------------------------------------------------------------------- EVA ViT
def _eva_mapping(depth: int, prefix: str = "") -> Callable[[str], str | None | tuple]:
    block = re.compile(r"^blocks\.(\d+)\.")

    def mapping(key: str):
        if not key.startswith(prefix):
            return None
        k = key[len(prefix):]
        m = block.match(k)
        if m and int(m.group(1)) >= depth:
            return ("ignore", f"block beyond vit_depth={depth}")
        if k.startswith(("head.", "fc_norm.", "norm.", "lm_head.")) or k == "rel_pos_bias.relative_position_bias_table":
            return ("ignore", "classification head / final norm not used by BLIP-2")
        if k.endswith("relative_position_index") or k.endswith("attn.k_bias"):
            return ("ignore", "fixed buffer")
        return k

    return mapping


def _resample_pos_embed(sd: dict[str, torch.Tensor], key: str, vit: nn.Module) -> None:
    pos = sd.get(key)
    want = vit.pos_embed
    if pos is None or pos.shape == want.shape:
        return
    from timm.layers import resample_abs_pos_embed

    grid = vit.patch_embed.grid_size
    sd[key] = resample_abs_pos_embed(pos.float(), new_size=list(grid), num_prefix_tokens=1,
                                     interpolation="bicubic", antialias=False).to(pos.dtype)


def load_eva_vit(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load ``eva_vit_g.pth`` into ``model.visual_encoder`` (blocks past ``vit_depth`` ignored)."""
    path = Path(path)
    sd = dict(read_state_dict(path))
    vit = model.visual_encoder.vit
    _resample_pos_embed(sd, "pos_embed", vit)
    report = LoadReport(str(path))
    _load_mapped(vit, sd, _eva_mapping(len(vit.blocks)), path, report, prefix="visual_encoder.vit.")
    return report


# --------------------------------------------------------------------------------------------- BLIP-2
_QFORMER_IGNORED = (
    ("Qformer.bert.embeddings.word_embeddings.", "text embeddings (query-only Q-Former)"),
    ("Qformer.bert.embeddings.position_embeddings.", "text embeddings (query-only Q-Former)"),
    ("Qformer.bert.embeddings.position_ids", "text embeddings (query-only Q-Former)"),
    ("Qformer.cls.", "Q-Former LM head (unused)"),
    ("vision_proj.", "contrastive head (unused)"),
    ("text_proj.", "contrastive head (unused)"),
    ("itm_head.", "matching head (unused)"),
    ("temp", "contrastive temperature (unused)"),
    ("t5_", "FlanT5 decoder side (unused)"),
    ("opt_", "OPT decoder side (unused)"),
    ("llm_", "decoder side (unused)"),
)


_TEXT_EMBEDDINGS = "Qformer.bert.embeddings."
_TEXT_TABLES = ("word_embeddings.weight", "position_embeddings.weight")


def qformer_key(lavis_key: str, *, text_input: bool = False) -> str | None | tuple:
    """LAVIS ``Qformer.bert.*`` key → ``Blip2QFormerModel`` key (or an ignore marker).

    ``text_input``: the model's Q-Former reads instructions (InstructBLIP), so the text feed-forward pairs are
    its own, and the word/position tables belong to its text embeddings (:func:`qformer_text_key`)."""
    if text_input and lavis_key.startswith(_TEXT_EMBEDDINGS) and lavis_key[len(_TEXT_EMBEDDINGS):] in _TEXT_TABLES:
        return None
    for prefix, reason in _QFORMER_IGNORED:
        if lavis_key.startswith(prefix):
            return ("ignore", reason)
    if not lavis_key.startswith("Qformer.bert."):
        return None
    k = lavis_key[len("Qformer.bert."):]
    if k.startswith("embeddings.LayerNorm."):
        return "layernorm." + k[len("embeddings.LayerNorm."):]
    m = re.match(r"^encoder\.layer\.(\d+)\.(.*)$", k)
    if not m:
        return ("ignore", "not part of the query path")
    idx, rest = m.groups()
    if rest.startswith(("intermediate.", "output.")) and not text_input:
        return ("ignore", "text feed-forward (query-only Q-Former)")
    rest = rest.replace("attention.self.", "attention.attention.").replace("crossattention.self.",
                                                                           "crossattention.attention.")
    return f"encoder.layer.{idx}.{rest}"


def load_blip2(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load a BLIP-2 stage-1 file: ``query_tokens``, ``ln_vision``, the Q-Former (and ``visual_encoder``)."""
    path = Path(path)
    sd = read_state_dict(path, wrapper_key="model")
    report = LoadReport(str(path))
    if "query_tokens" not in sd:
        raise CheckpointError(f"{path}: required key 'query_tokens' missing")
    q = sd["query_tokens"]
    if tuple(q.shape) != tuple(model.query_tokens.shape):
        raise CheckpointError(f"{path}: key 'query_tokens' has shape {tuple(q.shape)} but the model expects "
                              f"{tuple(model.query_tokens.shape)} (num_query_token / qformer_hidden)")
    with torch.no_grad():
        model.query_tokens.copy_(q)
    report.loaded.append("query_tokens")
    report.filled.add("query_tokens")
    _load_mapped(model.ln_vision, sd, lambda k: k[len("ln_vision."):] if k.startswith("ln_vision.") else None,
                 path, report, prefix="ln_vision.")
    text = getattr(model, "qformer_text", None)
    _load_mapped(model.Qformer, sd, lambda k: qformer_key(k, text_input=text is not None), path, report,
                 prefix="Qformer.")
    if text is not None:
        _load_mapped(text, sd, qformer_text_key, path, report, prefix="qformer_text.")
    vis = {k: v for k, v in sd.items() if k.startswith("visual_encoder.")}
    if vis:
        vit = model.visual_encoder.vit
        vis = {k[len("visual_encoder."):]: v for k, v in vis.items()}
        _resample_pos_embed(vis, "pos_embed", vit)
        _load_mapped(vit, vis, _eva_mapping(len(vit.blocks)), path, report, prefix="visual_encoder.vit.")
    known = set(report.loaded) | set(report.ignored) | set(vis and [f"visual_encoder.{k}" for k in vis])
    stray = sorted(k for k in sd if k not in known and not k.startswith("visual_encoder."))
    if stray:
        raise CheckpointError(f"{path}: unrecognised key(s) {stray[:8]}")
    return report


def qformer_text_key(lavis_key: str) -> str | None:
    """LAVIS ``Qformer.bert.embeddings.{word,position}_embeddings.weight`` → :class:`QFormerTextEmbeddings` key."""
    rest = lavis_key[len(_TEXT_EMBEDDINGS):] if lavis_key.startswith(_TEXT_EMBEDDINGS) else ""
    return rest if rest in _TEXT_TABLES else None


def lavis_qformer_key(hf_key: str) -> str:
    """``Blip2QFormerModel`` key → LAVIS ``Qformer.bert.*`` key: the inverse of :func:`qformer_key`."""
    if hf_key.startswith("layernorm."):
        return "Qformer.bert.embeddings.LayerNorm." + hf_key[len("layernorm."):]
    k = hf_key.replace("attention.attention.", "attention.self.").replace("crossattention.attention.",
                                                                          "crossattention.self.")
    return "Qformer.bert." + k


def save_blip2(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the image side of ``model`` as a BLIP-2 stage-1 file that :func:`load_blip2` reads back.

    The LAVIS layout (``{"model": {...}}`` with ``query_tokens``, ``ln_vision.*``, ``Qformer.bert.*`` and
    ``visual_encoder.*``) is the form in which the paper's pretrained towers come; towers pretrained by this
    project are written the same way, so the chat model loads them through the same path.
    """
    sd: dict[str, torch.Tensor] = {"query_tokens": model.query_tokens.detach().cpu().clone()}
    for k, v in model.ln_vision.state_dict().items():
        sd[f"ln_vision.{k}"] = v.detach().cpu().clone()
    for k, v in model.Qformer.state_dict().items():
        if not k.endswith(_BUFFER_SUFFIXES):
            sd[lavis_qformer_key(k)] = v.detach().cpu().clone()
    text = getattr(model, "qformer_text", None)
    if text is not None:  # an instruction-reading Q-Former: its word and position tables, in BERT's place
        for k, v in text.state_dict().items():
            sd[_TEXT_EMBEDDINGS + k] = v.detach().cpu().clone()
    for k, v in model.visual_encoder.vit.state_dict().items():
        if not k.endswith(_BUFFER_SUFFIXES + ("relative_position_index",)):
            sd[f"visual_encoder.{k}"] = v.detach().cpu().clone()
    # atomic: a crash never leaves half a file where the next stage looks
    return atomic_write(path, lambda f: torch.save({"model": sd}, f))


# ------------------------------------------------------------------------------------ projection / full checkpoints
_BUFFER_SUFFIXES = ("position_ids", "rotary_emb.inv_freq", "attn.bias", "attn.masked_bias", "k_bias")


def load_sparkles_checkpoint(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load a MiniGPT-4/SparklesChat ``{"model": ...}`` file (``llama_proj.*`` or any subset of our keys)."""
    path = Path(path)
    sd = read_state_dict(path, wrapper_key="model")
    report = LoadReport(str(path))
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    to_load: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in params:
            _assign({k: v for k, v in [(key, params[key])]}, key, value, path, key)
            to_load[key] = value
            report.loaded.append(key)
        elif key in buffers or key.endswith(_BUFFER_SUFFIXES):
            report.ignored[key] = "registered buffer saved by the upstream runner"
        else:
            raise CheckpointError(f"{path}: key {key!r} is not a parameter of SparklesChat")
    if not to_load:
        raise CheckpointError(f"{path}: holds no SparklesChat parameters (expected at least llama_proj.*)")
    if "llama_proj.weight" in params and "llama_proj.weight" not in to_load and not any(
            k.startswith("llama_model.") for k in to_load):
        raise CheckpointError(f"{path}: required key 'llama_proj.weight' missing")
    missing = model.load_state_dict(to_load, strict=False)
    del missing  # partial by design: towers come from their own files
    report.filled.update(to_load)
    return report


# --------------------------------------------------------------------------------------------- decoder
def load_llama(path: str | os.PathLike | None, *, dtype: torch.dtype = torch.float32,
               device_map_8bit: dict | None = None) -> nn.Module:
    """A LLaMA-family decoder from a Hugging Face directory (config.json + weights); with ``device_map_8bit``
    (the device plan's, e.g. ``{"": 3}``) in 8-bit through bitsandbytes, placed by that map."""
    from transformers import AutoModelForCausalLM

    if path is None:
        raise CheckpointError("model.llama_model is not set")
    path = Path(path)
    if not path.exists():
        raise CheckpointMissing(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a Hugging Face model directory (config.json missing)")
    weights = [p for p in path.iterdir() if p.suffix in (".bin", ".safetensors") or p.name.endswith(".index.json")]
    if not weights:
        raise CheckpointError(f"{path}: no weight files (*.safetensors or pytorch_model*.bin); for a decoder "
                              "trained from scratch set model.llm_from_scratch=True")
    kwargs: dict = {"dtype": dtype}
    if device_map_8bit is not None:
        from transformers import BitsAndBytesConfig

        kwargs = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": device_map_8bit,
                  "dtype": torch.float16}
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def build_llama_from_sizes(cfg, *, vocab_size: int | None, llm_dir: Path | None = None) -> nn.Module:
    """A randomly initialised LLaMA of the configured ``llm_*`` sizes (a decoder trained from scratch)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if vocab_size is None:
        raise CheckpointError("model.llm_from_scratch needs a tokenizer to size the vocabulary")
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.llm_hidden, intermediate_size=cfg.llm_intermediate,
                         num_hidden_layers=cfg.llm_layers, num_attention_heads=cfg.llm_heads,
                         num_key_value_heads=cfg.llm_heads, max_position_embeddings=cfg.llm_max_positions,
                         rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)
