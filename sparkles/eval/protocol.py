"""Decoding protocols for evaluation.

``default`` — reproducible: greedy decoding, an unparseable BISON/NLVR2 answer is counted, not re-asked;
the judge samples at temperature 0.

``upstream`` — the paper's settings: sampling at temperature 1.0 with top-p 0.9,
up to 1000 new tokens in a 2000-token window, unparseable answers generated again up to ``max_retries``
times (upstream looped forever), judge at temperature 1.0. Every generation gets its own seed derived from
the run seed, the item's ``evaluation_id`` and the attempt, so results do not depend on how items are
sharded or batched.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Optional

PROTOCOLS = ("default", "upstream")


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

    def generation(self, seed: Optional[int] = None) -> dict[str, Any]:
        """Keyword arguments for ``ChatSession.answer`` / ``generate_batch``."""
        return {"do_sample": self.do_sample, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "max_length": self.max_length, "num_beams": self.num_beams,
                "seed": seed}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_protocol(name: str, *, num_beams: int = 1, temperature: Optional[float] = None,
                  max_new_tokens: Optional[int] = None, max_length: Optional[int] = None,
                  max_retries: Optional[int] = None, judge_temperature: Optional[float] = None,
                  judge_attempts: Optional[int] = None) -> Protocol:
    """The named protocol with explicit overrides (None = the protocol's value)."""
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
        max_new_tokens=1000 if max_new_tokens is None else int(max_new_tokens),
        max_length=2000 if max_length is None else int(max_length),
        num_beams=int(num_beams),
        max_retries=(10 if upstream else 0) if max_retries is None else int(max_retries),
        judge_temperature=(1.0 if upstream else 0.0) if judge_temperature is None else float(judge_temperature),
        judge_attempts=(10 if upstream else 3) if judge_attempts is None else int(judge_attempts),
    )
    if proto.max_retries < 0 or proto.judge_attempts < 1:
        raise ValueError("--max-retries must be >= 0 and --judge-attempts >= 1")
    if proto.max_new_tokens >= proto.max_length:
        raise ValueError(f"max_new_tokens ({proto.max_new_tokens}) must be below max_length ({proto.max_length})")
    return proto


def item_seed(seed: int, evaluation_id: Any, attempt: int = 0, stage: str = "") -> int:
    """A 31-bit seed that depends only on the run seed, the item, the attempt and the stage (turn)."""
    digest = hashlib.sha256(f"{seed}|{evaluation_id}|{attempt}|{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
