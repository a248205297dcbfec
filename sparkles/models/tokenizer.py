"""Tokenizers: load a LLaMA/Vicuna tokenizer, or train a small one for a decoder trained from scratch.

A trained tokenizer mirrors LLaMA's conventions (``<unk>``=0, ``<s>``=1, ``</s>``=2, a SentencePiece-style
``▁`` word prefix; no byte fallback, which a closed training vocabulary does not need) so the same renderer and
stop-string logic serve both the released and a small model. It is trained with ``tokenizers`` and saved in
Hugging Face format, loadable with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, *, vocab_size: int = 2048) -> Path:
    """Train a BPE tokenizer with a ``▁`` word prefix on ``texts`` and save it to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Metaspace with prepend "first" reproduces SentencePiece's dummy prefix: a separately tokenised
    # piece starts a new word, and a space belongs to the word that follows it.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        # Punctuation as its own pieces keeps '###', ':' and '#<id>' stable across contexts.
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=[chr(c) for c in range(33, 127)] + ["▁"])
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", add_bos_token=False, add_eos_token=False)
    fast.model_max_length = 4096
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


def load_tokenizer(path: str | os.PathLike):
    """Load the tokenizer of a Vicuna/LLaMA HF directory (or a tiny one); ``pad`` falls back to ``eos``."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    names = {p.name for p in path.iterdir()}
    if not names & {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"}:
        raise FileNotFoundError(
            f"{path} holds no tokenizer (expected tokenizer.json or a SentencePiece tokenizer.model; "
            "reading tokenizer.model needs the 'sentencepiece' and 'protobuf' packages)")
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # upstream convention: pad := eos
    return tok
