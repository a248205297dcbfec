"""Tiny random SparklesChat models for tests and benchmarks: small towers, a small LLaMA and a tokenizer trained
on a few template sentences. Nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..models.sparkleschat import SparklesChat, SparklesChatConfig
from ..models.tokenizer import train_tokenizer

TINY_SIZES = dict(
    image_size=32, vit_patch_size=8, vit_width=32, vit_depth=2, vit_heads=2, vit_mlp_dim=64, vit_precision="fp32",
    num_query_token=4, qformer_hidden=32, qformer_layers=2, qformer_heads=2, qformer_intermediate=64,
    llm_from_scratch=True, llm_hidden=32, llm_layers=2, llm_heads=2, llm_intermediate=64, llm_max_positions=512,
    dtype="float32",
)

DEFAULT_CORPUS = (
    "###Human: What is in IMAGE#1<Img><ImageHere></Img>?###Assistant: IMAGE#1 shows two red circles.###",
    "###Human: Compare IMAGE#12<Img><ImageHere></Img> with IMAGE#7<Img><ImageHere></Img>.###Assistant: "
    "IMAGE#12 has a blue square and IMAGE#7 has three green triangles.###",
    "Let's think step by step. Therefore, the answer (IMAGE#1 or IMAGE#2) is IMAGE#2.",
    "Let's think step by step. Therefore, the answer (TRUE or FALSE) is TRUE. The statement is false.",
    "Give the following image: <Img>ImageContent</Img>. Once I share an image you can look at it; reply to what "
    "I ask about it.",
)


def write_tiny_tokenizer(out_dir: str | os.PathLike, texts: Optional[Iterable[str]] = None,
                         vocab_size: int = 400) -> Path:
    corpus = list(texts) if texts is not None else list(DEFAULT_CORPUS) * 20
    return train_tokenizer(corpus, out_dir, vocab_size=vocab_size)


def build_tiny_model(work_dir: str | os.PathLike, *, seed: int = 0, texts: Optional[Iterable[str]] = None,
                     init_std: Optional[float] = None, **overrides) -> SparklesChat:
    """A randomly initialised tiny SparklesChat with its own tokenizer in ``work_dir/tokenizer``.

    ``init_std`` re-draws every weight matrix with that spread: the default 0.02 initialisation makes a
    random model's output almost independent of its input, which would let equality tests pass vacuously.
    """
    tok_dir = Path(work_dir) / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        write_tiny_tokenizer(tok_dir, texts)
    # random frozen towers are this model's purpose (model.allow_random_towers), unless the caller says otherwise
    fields = {"allow_random_towers": True, **TINY_SIZES, **overrides}
    cfg = SparklesChatConfig(llama_model=str(tok_dir), **fields)
    torch.manual_seed(seed)
    model = SparklesChat.from_config(cfg, device="cpu", verbose=False)
    if init_std is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim >= 2:
                    p.normal_(0.0, init_std)
    return model
