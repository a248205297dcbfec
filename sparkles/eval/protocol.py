"""Evaluation protocols: how answers are decoded, read and judged, and with which texts.

``default`` — reproducible: greedy decoding, an unparseable BISON/NLVR2 answer is counted, not re-asked;
the judge samples at temperature 0; a turn-2 context that does not fit drops whole earlier turns.

``upstream`` — the paper's settings: sampling at temperature 1.0 with top-p 0.9,
up to 1000 new tokens in a 2000-token window, unparseable answers generated again up to ``max_retries``
times (upstream looped forever), judge at temperature 1.0. Every generation gets its own seed derived from
the run seed, the item's ``evaluation_id`` and the attempt, so results do not depend on how items are
sharded or batched. BISON/NLVR2 answers are read with the original's extraction rule, turn 2 of SparklesEval is
one user message holding the first turn (as the original asked it), and a context that does not fit is cut
from the left, as the original cut it.

The texts (system text, prompts, judge prompt and system message) come from a protocol file
(:mod:`sparkles.conversation.protocol_file`); without one they are the project's own wording, and under
``upstream`` the run warns that its numbers are not comparable with the paper's.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..conversation.protocol_file import ProtocolTexts

log = logging.getLogger(__name__)

PROTOCOLS = ("default", "upstream")
DEFAULT_MAX_NEW_TOKENS = 1000  # both protocols' answer budget, as upstream's evaluation scripts set it
DEFAULT_MAX_LENGTH = 2000  # both protocols' context window (prompt + answer), as upstream's


@dataclass(frozen=True)
class Protocol:
    name: str
    do_sample: bool
    temperature: Optional[float]
    top_p: Optional[float]
    max_new_tokens: int
    max_length: int
    num_beams: int
    max_retries: int  # extra generations for an unparseable BISON/NLVR2 answer
    judge_temperature: float
    judge_attempts: int
    extraction: str = "sparkles"  # how a BISON/NLVR2 answer is read (benchmarks.choice)
    overflow: str = "drop_turns"  # a context that does not fit: drop whole earlier turns | truncate_left
    turn2: str = "messages"  # SparklesEval turn 2: the real conversation | one message holding turn 1 (inline)
    texts: ProtocolTexts = field(default_factory=ProtocolTexts)

    def generation(self, seed: Optional[int] = None) -> dict[str, Any]:
        """Keyword arguments for ``ChatSession.answer`` / ``generate_batch``."""
        return {"do_sample": self.do_sample, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "max_length": self.max_length, "num_beams": self.num_beams,
                "seed": seed, "overflow": self.overflow}

    def to_dict(self) -> dict[str, Any]:
        """The settings a run directory is tied to (a protocol file's texts by their hash)."""
        out = asdict(self)
        out.pop("texts")
        if self.texts.given():
            out["texts"] = self.texts.summary()
        return out


def make_protocol(name: str, *, num_beams: int = 1, temperature: Optional[float] = None,
                  max_new_tokens: Optional[int] = None, max_length: Optional[int] = None,
                  max_retries: Optional[int] = None, judge_temperature: Optional[float] = None,
                  judge_attempts: Optional[int] = None, texts: Optional[ProtocolTexts] = None) -> Protocol:
    """The named protocol with explicit overrides (None = the protocol's value) and a protocol file's texts."""
    texts = texts or ProtocolTexts()
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    upstream = name == "upstream"
    if num_beams < 1:
        raise ValueError("--num-beams must be >= 1")
    proto = Protocol(
        name=name,
        do_sample=upstream,
        # sampling-only settings are blanked under greedy decoding, so an ignored flag changes nothing
        temperature=(1.0 if temperature is None else float(temperature)) if upstream else None,
        top_p=0.9 if upstream else None,
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else int(max_new_tokens),
        max_length=DEFAULT_MAX_LENGTH if max_length is None else int(max_length),
        num_beams=int(num_beams),
        max_retries=(10 if upstream else 0) if max_retries is None else int(max_retries),
        judge_temperature=(1.0 if upstream else 0.0) if judge_temperature is None else float(judge_temperature),
        judge_attempts=(10 if upstream else 3) if judge_attempts is None else int(judge_attempts),
        extraction=texts.extraction or ("upstream" if upstream else "sparkles"),
        overflow="truncate_left" if upstream else "drop_turns",
        turn2="inline" if upstream else "messages",
        texts=texts,
    )
    if proto.max_retries < 0 or proto.judge_attempts < 1:
        raise ValueError("--max-retries must be >= 0 and --judge-attempts >= 1")
    if proto.max_new_tokens >= proto.max_length:
        raise ValueError(f"max_new_tokens ({proto.max_new_tokens}) must be below max_length ({proto.max_length})")
    return proto


def comparability_warning(proto: Protocol) -> Optional[str]:
    """The warning an ``upstream`` run without the original's texts gets (None when there is nothing to say)."""
    missing = proto.texts.missing()
    if proto.name != "upstream" or not missing:
        return None
    return ("--protocol upstream decodes and reads answers as the original did, but these texts are this "
            f"project's own wording, not the original's: {', '.join(missing)}. The numbers are NOT comparable "
            "with the paper's. Import the original texts with `python -m sparkles.tools.import_protocol "
            "--upstream DIR --out protocol_upstream.yaml` and pass --protocol-file protocol_upstream.yaml.")


def item_seed(seed: int, evaluation_id: Any, attempt: int = 0, stage: str = "") -> int:
    """A 31-bit seed that depends only on the run seed, the item, the attempt and the stage (turn)."""
    digest = hashlib.sha256(f"{seed}|{evaluation_id}|{attempt}|{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
