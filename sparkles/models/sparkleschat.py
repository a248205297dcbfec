"""SparklesChat: EVA-ViT-g + Q-Former (frozen) → linear projection (trainable) → LLaMA/Vicuna (frozen).

Images become ``num_query_token`` soft tokens each (or the last ``decoder_image_tokens`` of them); they enter
the decoder's input embeddings through ``masked_scatter`` on a boolean image-slot mask (the conversation
renderer writes it), so no image placeholder id ever goes through the embedding table. All images of a batch
are encoded in one pass.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import MISSING, OmegaConf
from torch import nn

from ..common.config import ConfigError
from ..common.paths import resolve_path
from ..common.registry import MODEL_PRESETS, MODELS, TOWERS_INITS
from ..common.tensors import IGNORE_INDEX, resolve_dtype
from . import loaders
from .hf_compat import logits_keep_kwarg
from .placement import DECODER_DEVICE_MAP, PARTS, device_plan
from .qformer import QFormerTextEmbeddings, build_qformer, run_qformer, tokenize_instructions
from .tokenizer import load_tokenizer as read_tokenizer
from .vision import VisionTower, build_eva_vit, ln_vision
from .weights import is_url, weight_path

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"
QUERY_TOKEN_STD = 0.02  # BLIP-2's initialisation of fresh query tokens


@dataclass
class SparklesChatConfig:
    """Every model default, once. Presets (``configs/models/sparkleschat_<model_type>.yaml``) override."""

    arch: str = "sparkleschat"
    model_type: str = "pretrain_vicuna"
    # --- vision tower (EVA-ViT-g) ---
    vit_weights: str = ""  # eva_vit_g.pth (a path or an https URL); "" = none (see allow_random_towers)
    image_size: int = 224
    vit_patch_size: int = 14
    vit_width: int = 1408
    vit_depth: int = 39
    vit_heads: int = 16
    vit_mlp_dim: int = 6144
    drop_path_rate: float = 0.0
    use_grad_checkpoint: bool = False
    vit_precision: str = "fp16"  # applied on CUDA only; CPU runs float32
    freeze_vit: bool = True
    # --- Q-Former ---
    q_former_model: str = ""  # blip2_pretrained_flant5xxl.pth (a path or an https URL); "" = none
    num_query_token: int = 32
    qformer_hidden: int = 768
    qformer_layers: int = 12
    qformer_heads: int = 12
    qformer_intermediate: int = 3072
    qformer_cross_attention_freq: int = 2
    qformer_dropout: float = 0.1  # BLIP-2's hidden and attention dropout
    freeze_qformer: bool = True
    # How towers without weight files start: "" = the modules' own initialisation (timm's EVA, BERT's 0.02 for the
    # Q-Former and the query tokens), which pretrained weights overwrite; a name = a recipe for towers trained from
    # scratch, registered in sparkles.common.registry.TOWERS_INITS by a module of run.imports.
    towers_init: str = ""
    # A frozen tower (freeze_vit / freeze_qformer) that no weight file fills (vit_weights, q_former_model, or a ckpt
    # holding it) would stay random for the whole run: refused unless this is true (tests and toy runs).
    allow_random_towers: bool = False
    # InstructBLIP's Q-Former (off in the paper, whose BLIP-2 towers see only the image): each image's queries
    # also read the user message that shows it, through word and position embeddings over the decoder's
    # tokenizer (at most qformer_max_text tokens), so what they extract can depend on the question.
    qformer_text_input: bool = False
    qformer_max_text: int = 128
    qformer_text_position_jitter: int = 0  # training only: random start position of the text (QFormerTextEmbeddings)
    # How many of each image's query outputs the decoder reads: the last N (0 = all num_query_token, as in the
    # paper). Towers whose last queries are trained to carry what the message asks (item queries) can hand the
    # decoder those alone: fewer tokens a step and fewer to search among.
    decoder_image_tokens: int = 0
    # Learned vectors added to the decoder's image tokens by the image's place in the conversation (the k-th
    # image shown, its t-th token), as a transformer's position embedding marks its tokens; 0 = none (the
    # paper). The towers encode every image alike, so without them the decoder can tell two images' tokens apart
    # only by first tagging each with the name written before its slot; images past the last share the last.
    image_ordinal_embeddings: int = 0
    # --- decoder ---
    llama_model: str = MISSING  # HF directory (Vicuna v0 for the paper)
    tokenizer_path: str = ""  # defaults to llama_model
    llm_from_scratch: bool = False  # build the decoder from the llm_* sizes instead of loading weights
    llm_hidden: int = 256
    llm_layers: int = 4
    llm_heads: int = 4
    llm_intermediate: int = 688
    llm_max_positions: int = 2048
    freeze_llm: bool = True
    low_resource: bool = False  # 8-bit decoder through bitsandbytes (CUDA only)
    # The GPU of the 8-bit decoder when the device asked for names none (plain "cuda"; else 0); one that disagrees
    # with the GPU asked for is an error (sparkles.models.placement): the whole model sits on one GPU.
    device_8bit: Optional[int] = None
    dtype: str = "auto"  # decoder dtype: auto | float32 | bfloat16 | float16
    # --- weights of the projection (MiniGPT-4 / SparklesChat .pth) or of a whole trained model (path or URL) ---
    ckpt: str = ""
    # --- conversation layout (see sparkles.conversation.template) ---
    system_text: Optional[str] = None  # None = the template's default system text
    train_with_system: bool = False  # upstream trains without the system text and infers with it

    @property
    def image_embed_dim(self) -> int:
        return self.qformer_hidden


def image_tokens_per_image(cfg) -> int:
    """Decoder tokens per image for a model config (dataclass or OmegaConf): ``decoder_image_tokens`` when set,
    else ``num_query_token``; what the renderer reserves for each ``<ImageHere>``."""
    queries, chosen = int(cfg.num_query_token), int(getattr(cfg, "decoder_image_tokens", 0) or 0)
    if not 0 <= chosen <= queries:
        raise ValueError(f"model.decoder_image_tokens must be in 0..num_query_token ({queries}); got {chosen}")
    return chosen or queries


def first_target_position(labels: torch.Tensor) -> int:
    """Position of the first logit the loss needs: one before the batch's earliest labelled token (0 if none)."""
    has_label = (labels[:, 1:] != IGNORE_INDEX).any(0)
    return int(has_label.nonzero()[0]) if bool(has_label.any()) else 0


def build_instruction_embeddings(cfg: SparklesChatConfig, vocab_size: int, *,
                                 init_std: float = QUERY_TOKEN_STD) -> Optional[nn.Module]:
    """The Q-Former's text embeddings when ``qformer_text_input`` is on (else None): word and position tables over
    the decoder's vocabulary, drawn with ``init_std``."""
    if not cfg.qformer_text_input:
        return None
    return QFormerTextEmbeddings(vocab_size, cfg.qformer_hidden, cfg.qformer_max_text, init_std=init_std,
                                 position_jitter=cfg.qformer_text_position_jitter)


def build_towers(cfg: SparklesChatConfig) -> tuple[nn.Module, nn.Module, nn.Module, nn.Parameter]:
    """The image side of the model, freshly initialised: ``(visual_encoder, ln_vision, Qformer, query_tokens)``.

    Shared by :class:`SparklesChat` and tower pretraining (so both hold the same modules under the same names).
    The query tokens are drawn from N(0, 0.02), as BLIP-2 draws them, unless ``towers_init`` names a registered
    recipe, which draws them and may redraw the other towers' weights.
    """
    visual_encoder = VisionTower(build_eva_vit(
        image_size=cfg.image_size, patch_size=cfg.vit_patch_size, width=cfg.vit_width, depth=cfg.vit_depth,
        heads=cfg.vit_heads, mlp_dim=cfg.vit_mlp_dim, drop_path_rate=cfg.drop_path_rate,
        grad_checkpointing=cfg.use_grad_checkpoint))
    qformer = build_qformer(
        hidden=cfg.qformer_hidden, layers=cfg.qformer_layers, heads=cfg.qformer_heads,
        intermediate=cfg.qformer_intermediate, encoder_width=cfg.vit_width,
        cross_attention_freq=cfg.qformer_cross_attention_freq, dropout=cfg.qformer_dropout,
        text_input=cfg.qformer_text_input)
    query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_token, cfg.qformer_hidden))
    if cfg.towers_init:
        TOWERS_INITS.get(cfg.towers_init)(visual_encoder, qformer, query_tokens)
    else:
        nn.init.normal_(query_tokens, std=QUERY_TOKEN_STD)
    return visual_encoder, ln_vision(cfg.vit_width), qformer, query_tokens


# Frozen towers that only a weight file can fill: (what, its parameters' name prefixes, the config key of its own
# file, the freeze flag, the other keys whose files may hold it).
_FILE_TOWERS = (
    ("the vision tower", ("visual_encoder.",), "vit_weights", "freeze_vit", ("q_former_model", "ckpt")),
    ("the Q-Former and its query tokens", ("Qformer.", "query_tokens", "qformer_text."), "q_former_model",
     "freeze_qformer", ("ckpt",)),
)


def check_frozen_towers(cfg: SparklesChatConfig, model: Optional[nn.Module] = None,
                        filled: Collection[str] = ()) -> None:
    """Refuse a frozen tower that would stay random: its own weight file (``vit_weights`` / ``q_former_model``) is
    empty and no other file provides it, unless ``allow_random_towers`` (a :class:`ConfigError`).

    Without ``model`` (before anything loads) a tower is refused when none of the other files that could hold it
    is configured; with ``model`` and the tensor names the weight files ``filled`` (:class:`LoadReport.filled`),
    when one of its parameters is in no file (a BLIP-2 file without ``visual_encoder.*``, a checkpoint of a run
    whose towers were frozen). A ``towers_init`` recipe does not count: it draws the towers, it does not train them.
    """
    if cfg.allow_random_towers:
        return
    for what, prefixes, key, freeze, others in _FILE_TOWERS:
        if not getattr(cfg, freeze) or getattr(cfg, key):
            continue
        given = [f"model.{k}" for k in others if getattr(cfg, k)]
        why = None
        if model is None:
            if not given:
                why = f"no {' or '.join(f'model.{k}' for k in others)} is set that could hold it"
        else:
            names = [n for n, _ in model.named_parameters() if n.startswith(prefixes)]
            missing = [n for n in names if n not in filled]
            if missing and len(missing) == len(names):
                why = f"{' and '.join(given) or 'no file'} {'holds' if len(given) < 2 else 'hold'} none of its weights"
            elif missing:
                why = f"{len(missing)} of its {len(names)} parameters are in no weight file, e.g. {missing[0]}"
        if why:
            raise ConfigError(f"model.{key} is empty and {freeze} is true: {what} would stay random ({why}); "
                             f"set the path, or model.allow_random_towers: true for tests/toy runs")


class ImageOrdinalEmbedding(nn.Module):
    """A learned mark per image ordinal (the first, second, ... image of a conversation), added to that image's
    decoder tokens as a position embedding marks words; images past the last ordinal share the last mark."""

    def __init__(self, num_ordinals: int, tokens_per_image: int, hidden: int) -> None:
        super().__init__()
        # about the spread of a freshly projected image token, so that the mark is legible from the first step
        self.weight = nn.Parameter(torch.randn(num_ordinals, tokens_per_image, hidden) * 0.5)

    def forward(self, image_embeds: torch.Tensor, image_slot_mask: torch.Tensor) -> torch.Tensor:
        """``image_embeds [N, tokens, D]`` of a batch's images in reading order, marked by their ordinal in their
        row of ``image_slot_mask [B, T]``."""
        tokens = self.weight.shape[1]
        per_row = image_slot_mask.sum(dim=1) // tokens
        # index within the batch minus the index of the row's first image (no per-row loop, no host sync)
        first_of_row = torch.cumsum(per_row, 0) - per_row
        ordinals = torch.arange(image_embeds.shape[0], device=image_slot_mask.device)
        ordinals = (ordinals - torch.repeat_interleave(first_of_row, per_row)).clamp(max=self.weight.shape[0] - 1)
        return image_embeds + self.weight[ordinals.to(self.weight.device)].to(image_embeds.device)


@MODELS.register("sparkleschat")
class SparklesChat(nn.Module):
    """The multi-image chat model. Build it with :meth:`from_config` or directly from modules."""

    config_class = SparklesChatConfig

    @classmethod
    def default_config_path(cls, model_type: str | None) -> Path | None:
        """The preset of ``model_type``: ``configs/models/sparkleschat_<model_type>.yaml`` of this package, or one a
        module registered in ``MODEL_PRESETS`` under ``sparkleschat/<model_type>``."""
        if not model_type:
            return None
        if f"sparkleschat/{model_type}" in MODEL_PRESETS:
            return Path(MODEL_PRESETS.get(f"sparkleschat/{model_type}"))
        path = PRESET_DIR / f"sparkleschat_{model_type}.yaml"
        if not path.is_file():
            known = sorted({p.stem.removeprefix("sparkleschat_") for p in PRESET_DIR.glob("sparkleschat_*.yaml")}
                           | {n.split("/", 1)[1] for n in MODEL_PRESETS.names() if n.startswith("sparkleschat/")})
            raise KeyError(f"unknown model_type {model_type!r} for arch sparkleschat; known: {', '.join(known)} "
                           "(presets of other modules appear once the config's run.imports names them)")
        return path

    def __init__(self, cfg: SparklesChatConfig, llama_model: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        # decoder tokens per image: the last decoder_image_tokens query outputs, or all of them (checked here, so
        # a bad value fails at construction rather than at the first image)
        self.image_tokens = image_tokens_per_image(cfg)
        self.visual_encoder, self.ln_vision, self.Qformer, self.query_tokens = build_towers(cfg)
        self.llama_model = llama_model
        self.llama_proj = nn.Linear(cfg.qformer_hidden, llama_model.config.hidden_size)
        if cfg.image_ordinal_embeddings < 0:
            raise ValueError(f"model.image_ordinal_embeddings must be >= 0; got {cfg.image_ordinal_embeddings}")
        self.image_ordinal_embed = ImageOrdinalEmbedding(
            cfg.image_ordinal_embeddings, self.image_tokens, llama_model.config.hidden_size) \
            if cfg.image_ordinal_embeddings else None
        # named after LAVIS' Qformer.bert.embeddings (word and position tables), which loaders map to it
        self.qformer_text = build_instruction_embeddings(cfg, llama_model.get_input_embeddings().num_embeddings)
        self.tokenizer = None  # attached by from_config; not a module
        self.apply_freezing()

    # ------------------------------------------------------------------ construction helpers
    @property
    def num_query_token(self) -> int:
        return self.cfg.num_query_token

    @property
    def device(self) -> torch.device:
        return self.llama_proj.weight.device

    def frozen_modules(self) -> list[nn.Module]:
        mods: list[nn.Module] = []
        if self.cfg.freeze_vit:
            mods += [self.visual_encoder, self.ln_vision]
        if self.cfg.freeze_qformer:
            mods.append(self.Qformer)
            if self.qformer_text is not None:
                mods.append(self.qformer_text)
        if self.cfg.freeze_llm:
            mods.append(self.llama_model)
        return mods

    def apply_freezing(self) -> None:
        for mod in self.frozen_modules():
            for p in mod.parameters():
                p.requires_grad_(False)
            mod.eval()
        self.query_tokens.requires_grad_(not self.cfg.freeze_qformer)

    def train(self, mode: bool = True) -> "SparklesChat":
        super().train(mode)
        for mod in self.frozen_modules():  # frozen towers stay in eval mode (dropout/drop-path off)
            mod.eval()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trainable parameters (``llama_proj.*`` for the paper recipe), upstream checkpoint layout."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------ one folder in the Hub's conventions
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> Path:
        """Write this model as one folder (``model.safetensors``, ``config.json``, tokenizer, ``README.md``); the
        options are those of :func:`sparkles.models.hub.save_pretrained`."""
        from .hub import save_pretrained

        return save_pretrained(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, **kwargs) -> "SparklesChat":
        """A model written by :meth:`save_pretrained`, from a local folder or a Hub repo id; the options are those
        of :func:`sparkles.models.hub.from_pretrained`."""
        from .hub import from_pretrained

        return from_pretrained(cls, source, **kwargs)

    # ------------------------------------------------------------------ images
    def _autocast(self, device: torch.device):
        if device.type == "cuda" and self.cfg.vit_precision in ("fp16", "bf16"):
            dtype = torch.float16 if self.cfg.vit_precision == "fp16" else torch.bfloat16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    @property
    def reads_messages(self) -> bool:
        """True when each image is encoded together with the user message that shows it."""
        return self.qformer_text is not None

    def vision_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` → the ViT's LayerNormed tokens ``[N, L, vit_width]`` (float32), which the Q-Former
        reads."""
        pixels = pixels.to(self.device)
        with self._autocast(pixels.device):
            vis = self.visual_encoder(pixels.to(self.visual_encoder.vit.patch_embed.proj.weight.dtype))
            vis = self.ln_vision(vis.float()).to(vis.dtype)  # upcast like LAVIS' fp16-safe LayerNorm
        return vis.float()

    def query_features(self, vision_tokens: torch.Tensor, messages: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Q-Former outputs ``[N, nq, qformer_hidden]`` from :meth:`vision_tokens`; with ``qformer_text_input``
        image ``i`` is read together with ``messages[i]`` (required then, ignored otherwise)."""
        if self.qformer_text is None:
            return run_qformer(self.Qformer, self.query_tokens, vision_tokens)
        if messages is None or len(messages) != vision_tokens.shape[0]:
            got = "no messages" if messages is None else f"{len(messages)} message(s)"
            raise ValueError(f"model.qformer_text_input: each image is encoded with the user message that shows "
                             f"it; {vision_tokens.shape[0]} image(s) but {got}")
        if self.tokenizer is None:
            raise ValueError("model.qformer_text_input needs the tokenizer (SparklesChat.from_config attaches it)")
        ids, mask = tokenize_instructions(self.tokenizer, messages, self.cfg.qformer_max_text, vision_tokens.device)
        return run_qformer(self.Qformer, self.query_tokens, vision_tokens, self.qformer_text(ids), mask)

    def image_features(self, pixels: torch.Tensor, messages: Optional[Sequence[str]] = None) -> torch.Tensor:
        """``[N, 3, H, W]`` (and, with ``qformer_text_input``, one message per image) → Q-Former outputs
        ``[N, nq, qformer_hidden]`` (before the projection)."""
        return self.query_features(self.vision_tokens(pixels), messages)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Q-Former outputs ``[N, nq, qformer_hidden]`` → the decoder's image tokens ``[N, image_tokens, D]``."""
        features = features[:, features.shape[1] - self.image_tokens:]
        return self.llama_proj(features.to(self.llama_proj.weight.dtype))

    def encode_images(self, pixels: torch.Tensor, messages: Optional[Sequence[str]] = None) -> torch.Tensor:
        """``[N, 3, H, W]`` → decoder-space image tokens ``[N, nq, llm_hidden]``, one pass for all N."""
        if pixels.ndim != 4:
            raise ValueError(f"encode_images expects [N, 3, H, W], got shape {tuple(pixels.shape)}")
        return self.project(self.image_features(pixels, messages))

    # ------------------------------------------------------------------ text + images
    def embed_inputs(self, input_ids: torch.Tensor, image_slot_mask: torch.Tensor,
                     image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with every image slot replaced, in reading order, by the image tokens."""
        embed = self.llama_model.get_input_embeddings()
        inputs_embeds = embed(input_ids)
        n_slots = int(image_slot_mask.sum())
        n_given = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if n_slots != n_given:
            n_img = 0 if image_embeds is None else image_embeds.shape[0]
            raise ValueError(f"image slots and images disagree: {n_slots} slot positions "
                             f"({n_slots / self.image_tokens:g} images of {self.image_tokens} tokens) "
                             f"but {n_img} image(s) given")
        if n_slots:
            if self.image_ordinal_embed is not None:
                image_embeds = self.image_ordinal_embed(image_embeds, image_slot_mask)
            mask = image_slot_mask.unsqueeze(-1).expand_as(inputs_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_embeds.to(inputs_embeds.dtype))
        return inputs_embeds

    def forward(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_slot_mask: torch.Tensor,
                images: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, image_messages: Optional[Sequence[str]] = None,
                labels: torch.Tensor | None = None, full_logits: bool = False) -> dict:
        """Training/scoring forward. Give ``images`` (pixels, with ``image_messages`` when the Q-Former reads
        them), cached ``image_features`` or ``image_embeds``.

        Returns ``{"loss", "logits", "logits_start", "num_target_tokens"}``; the loss is the mean next-token
        cross-entropy over positions whose label is not -100, computed in float32. With labels, the LM head runs
        only from the position before the batch's first target token on (``logits`` covers positions
        ``logits_start:``): prompts and images are long and the vocabulary is wide, so this skips most of the
        head's work without changing the loss. ``full_logits=True`` (or no labels) returns every position.
        """
        if image_embeds is None:
            if image_features is not None:
                image_embeds = self.project(image_features.to(self.device))
            elif images is not None and images.numel():
                image_embeds = self.encode_images(images, image_messages)
        inputs_embeds = self.embed_inputs(input_ids.to(self.device), image_slot_mask.to(self.device), image_embeds)
        start = 0
        if labels is not None and not full_logits:
            start = first_target_position(labels)
        kwargs = {}
        keep_name = logits_keep_kwarg(type(self.llama_model)) if start else None
        if keep_name is None:
            start = 0  # a decoder that cannot limit its logits gives all of them; the loss is the same
        else:
            kwargs[keep_name] = inputs_embeds.shape[1] - start
        out = self.llama_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask.to(self.device),
                               use_cache=False, **kwargs)
        logits = out.logits
        result = {"logits": logits, "logits_start": start}
        if labels is not None:
            labels = labels.to(logits.device)
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, start + 1:]
            n = int((shift_labels != IGNORE_INDEX).sum())
            if n == 0:
                raise ValueError("no target tokens in this batch (every label is -100)")
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
            result["loss"] = loss
            result["num_target_tokens"] = n
        return result

    # ------------------------------------------------------------------ building from config
    @classmethod
    def from_config(cls, cfg, *, root: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                    load_tokenizer: bool = True, verbose: bool = True) -> "SparklesChat":
        """Build from a model config (dict, OmegaConf or dataclass), loading every configured weight file."""
        if not isinstance(cfg, SparklesChatConfig):
            cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SparklesChatConfig), cfg))
        plan = device_plan(cfg, device)
        check_frozen_towers(cfg)  # before the decoder loads: a tower no configured file could fill

        def path_of(value: str, what: str) -> Path:
            if is_url(value):
                raise ConfigError(f"{what}: {value} is a URL; only the weight files (model.vit_weights, "
                                 "model.q_former_model, model.ckpt) may be URLs")
            return resolve_path(value, root, what=what)

        def weights_of(key: str) -> Path:
            return weight_path(getattr(cfg, key), root, what=f"model.{key}")

        llm_dir = path_of(cfg.llama_model, "model.llama_model (decoder directory)") if cfg.llama_model else None
        tokenizer = None
        if load_tokenizer:
            tok_dir = path_of(cfg.tokenizer_path, "model.tokenizer_path") if cfg.tokenizer_path else llm_dir
            tokenizer = read_tokenizer(tok_dir)
        llm_dtype = resolve_dtype(cfg.dtype, plan["llama_model"])
        if cfg.llm_from_scratch:
            llama = loaders.build_llama_from_sizes(cfg, vocab_size=len(tokenizer) if tokenizer is not None else None,
                                                   llm_dir=llm_dir)
        else:
            llama = loaders.load_llama(llm_dir, dtype=llm_dtype, device_map_8bit=plan[DECODER_DEVICE_MAP])
        model = cls(cfg, llama)
        reports = []
        if cfg.vit_weights:
            reports.append(loaders.load_eva_vit(model, weights_of("vit_weights")))
        if cfg.q_former_model:
            reports.append(loaders.load_blip2(model, weights_of("q_former_model")))
        if cfg.ckpt:
            reports.append(loaders.load_sparkles_checkpoint(model, weights_of("ckpt")))
        check_frozen_towers(cfg, model, set().union(*(r.filled for r in reports)))
        if verbose:
            for report in reports:
                log.info("%s", report.summary())
        model.tokenizer = tokenizer
        model.load_reports = reports
        return model.apply_plan(plan).eval()  # inference by default; the runner switches to train()

    def place(self, device: str | torch.device) -> "SparklesChat":
        """Move to ``device``; on CUDA cast the ViT to ``vit_precision`` and the decoder to ``dtype``. An 8-bit
        decoder (``low_resource``) stays where it was loaded; every other part moves."""
        if self.cfg.low_resource:
            return self.place_all_but_decoder(device)
        return self.apply_plan(device_plan(self.cfg, device))

    def apply_plan(self, plan: dict) -> "SparklesChat":
        """Put every part where ``plan`` (:func:`sparkles.models.placement.device_plan`) says; on CUDA cast the ViT
        to ``vit_precision`` and a decoder that was not loaded in 8-bit to ``dtype``."""
        eight_bit = plan[DECODER_DEVICE_MAP] is not None
        self._move_parts(plan, keep_decoder=eight_bit)  # an 8-bit decoder: bitsandbytes put it there while loading
        if plan["visual_encoder"].type == "cuda" and self.cfg.vit_precision in ("fp16", "bf16"):
            vit_dtype = torch.float16 if self.cfg.vit_precision == "fp16" else torch.bfloat16
            for mod in self.visual_encoder.modules():
                if isinstance(mod, (nn.Linear, nn.Conv2d)):
                    mod.to(vit_dtype)
        if not eight_bit and plan["llama_model"].type == "cuda":
            self.llama_model.to(resolve_dtype(self.cfg.dtype, plan["llama_model"]))
        return self

    def place_all_but_decoder(self, device: str | torch.device) -> "SparklesChat":
        """Move every part except ``llama_model`` to ``device`` (an 8-bit or device-mapped decoder stays where it
        was put): the child modules and the model's own parameters (``query_tokens``)."""
        device = torch.device(device)
        return self._move_parts({part: device for part in PARTS}, keep_decoder=True)

    def _move_parts(self, devices: dict, *, keep_decoder: bool) -> "SparklesChat":
        """Move each child module and own parameter to ``devices[name]`` (all but ``llama_model`` if
        ``keep_decoder``); a part ``devices`` does not name is an error, so no new part is left behind."""
        unplanned = [n for n in [*self._modules, *self._parameters] if n not in devices]
        if unplanned:
            raise KeyError(f"the device plan places no {', '.join(unplanned)} (sparkles.models.placement.PARTS)")
        for name, module in self.named_children():
            if not (keep_decoder and name == "llama_model"):
                module.to(devices[name])
        for name, param in list(self._parameters.items()):
            if param.device != devices[name]:
                setattr(self, name, nn.Parameter(param.detach().to(devices[name]), requires_grad=param.requires_grad))
        return self
