"""Token and cost accounting: a per-model price table and a thread-safe usage ledger.

Prices are USD per one million tokens (input, output). The defaults are list prices at the time of writing
and will drift: pass your own table (``GPTConfig.prices`` or a JSON file ``{"gpt-4": {"input_per_1m": 30,
"output_per_1m": 60}}``) for exact numbers. A model with no price is reported as unpriced — its tokens are
counted but its cost is never silently taken as zero.

The ledger separates paid calls (answered by the API in this run) from cached ones (answered by the response
cache: their tokens and cost are what the cache saved). Paid calls answered through the Batch API
(:mod:`sparkles.gpt.batch`) are counted apart as well and priced at :data:`BATCH_PRICE_FACTOR` times the table's
prices.

Before a call is sent its cost can only be estimated (:func:`estimate_cost`): the prompt's tokens from its
length (:data:`CHARS_PER_TOKEN`, on the high side for English and JSON), the answer at its ``max_tokens``
limit. A :class:`SpendingCap` uses that estimate to refuse new paid calls before the spend would pass a limit.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..common.io import read_json

# OpenAI's tokenizers average about 4 characters per token on English prose and somewhat fewer on JSON; 3 puts
# the estimate of the English and JSON prompts this project sends on the high side of their real counts.
CHARS_PER_TOKEN = 3.0
TOKENS_PER_MESSAGE = 4  # role and separators around each chat message
TOKENS_PER_REQUEST = 3  # the reply's priming

# The Batch API bills input and output tokens at half the synchronous price (OpenAI's and Azure's batch offers).
BATCH_PRICE_FACTOR = 0.5

DEFAULT_PRICES_PER_1M: dict[str, tuple[float, float]] = {
    "gpt-4": (30.0, 60.0),
    "gpt-4-32k": (60.0, 120.0),
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6),
    "gpt-4.1-nano": (0.1, 0.4),
    "gpt-3.5-turbo": (0.5, 1.5),
    "gpt-35-turbo": (0.5, 1.5),
}

# Dated snapshots ("gpt-4-0613", "gpt-4o-2024-08-06") cost what their family costs.
_SNAPSHOT_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")


@dataclass(frozen=True)
class Price:
    input_per_1m: float
    output_per_1m: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m) / 1_000_000


class PriceTable:
    """Model name → ``Price``; exact names first, then the name without a snapshot date. ``batch_factor`` is the
    share of the price that a Batch API call costs."""

    def __init__(self, prices: Mapping[str, Any] | None = None, *, include_defaults: bool = True,
                 batch_factor: float = BATCH_PRICE_FACTOR) -> None:
        if not 0 < batch_factor <= 1:
            raise ValueError(f"batch_factor must be in (0, 1], got {batch_factor!r}")
        self.batch_factor = float(batch_factor)
        self._prices: dict[str, Price] = {}
        if include_defaults:
            self._prices.update({m: Price(*p) for m, p in DEFAULT_PRICES_PER_1M.items()})
        for model, value in (prices or {}).items():
            self._prices[model] = _to_price(model, value)

    @classmethod
    def from_file(cls, path: str | Path, *, include_defaults: bool = True) -> "PriceTable":
        data = read_json(path, what="price table", error=ValueError)
        if not isinstance(data, dict):
            raise ValueError(f"price table {path}: expected an object mapping model names to prices")
        return cls(data, include_defaults=include_defaults)

    def lookup(self, model: str) -> Price | None:
        if model in self._prices:
            return self._prices[model]
        family = _SNAPSHOT_SUFFIX.sub("", model)
        return self._prices.get(family)

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int, *, batch: bool = False) -> float | None:
        """USD for the tokens of one model (None when it has no price), at batch prices with ``batch``."""
        price = self.lookup(model)
        if price is None:
            return None
        return price.cost(prompt_tokens, completion_tokens) * (self.batch_factor if batch else 1.0)

    def to_dict(self, models: list[str] | None = None) -> dict[str, dict[str, float]]:
        names = models if models is not None else sorted(self._prices)
        out = {}
        for m in names:
            p = self.lookup(m)
            if p is not None:
                out[m] = {"input_per_1m": p.input_per_1m, "output_per_1m": p.output_per_1m}
        return out


def _to_price(model: str, value: Any) -> Price:
    try:
        if isinstance(value, Mapping):
            return Price(float(value["input_per_1m"]), float(value["output_per_1m"]))
        inp, out = value
        return Price(float(inp), float(out))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"price for model {model!r} must be {{'input_per_1m': x, 'output_per_1m': y}} "
                         f"or a pair (input, output); got {value!r}") from exc


@dataclass
class _ModelUsage:
    calls: int = 0
    cached_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    # the part of the paid calls and tokens above that went through the Batch API
    batch_calls: int = 0
    batch_prompt_tokens: int = 0
    batch_completion_tokens: int = 0


class UsageLedger:
    """Counts calls and tokens per model (thread-safe) and prices them with a ``PriceTable``."""

    def __init__(self, prices: PriceTable | None = None) -> None:
        self.prices = prices or PriceTable()
        self._lock = threading.Lock()
        self._models: dict[str, _ModelUsage] = {}

    def record(self, model: str, prompt_tokens: int, completion_tokens: int, *, cached: bool,
               batch: bool = False) -> float | None:
        """Add one call; returns its cost in USD (None when the model has no price). ``batch``: a paid call
        answered through the Batch API, priced at the table's batch factor."""
        with self._lock:
            u = self._models.setdefault(model, _ModelUsage())
            if cached:
                u.cached_calls += 1
                u.cached_prompt_tokens += prompt_tokens
                u.cached_completion_tokens += completion_tokens
            else:
                u.calls += 1
                u.prompt_tokens += prompt_tokens
                u.completion_tokens += completion_tokens
                if batch:
                    u.batch_calls += 1
                    u.batch_prompt_tokens += prompt_tokens
                    u.batch_completion_tokens += completion_tokens
        return self.prices.cost(model, prompt_tokens, completion_tokens, batch=batch and not cached)

    def summary(self) -> dict[str, Any]:
        """Machine-readable totals: per model and overall; costs in USD (None where unpriced)."""
        with self._lock:
            models = {m: _ModelUsage(**vars(u)) for m, u in self._models.items()}
        per_model: dict[str, Any] = {}
        total = {"calls": 0, "cached_calls": 0, "batch_calls": 0, "prompt_tokens": 0, "completion_tokens": 0,
                 "cost_usd": 0.0, "saved_usd": 0.0}
        unpriced = []
        for model in sorted(models):
            u = models[model]
            price = self.prices.lookup(model)
            cost = saved = None
            if price is not None:
                synchronous = price.cost(u.prompt_tokens - u.batch_prompt_tokens,
                                         u.completion_tokens - u.batch_completion_tokens)
                batch = price.cost(u.batch_prompt_tokens, u.batch_completion_tokens) * self.prices.batch_factor
                cost = synchronous + batch
                saved = price.cost(u.cached_prompt_tokens, u.cached_completion_tokens)
            per_model[model] = {**vars(u), "cost_usd": cost, "saved_usd": saved,
                                "price_per_1m": self.prices.to_dict([model]).get(model)}
            for k in ("calls", "cached_calls", "batch_calls", "prompt_tokens", "completion_tokens"):
                total[k] += getattr(u, k)
            if price is None:
                unpriced.append(model)
            else:
                total["cost_usd"] += cost
                total["saved_usd"] += saved
        return {"currency": "USD", "models": per_model, "total": total, "unpriced_models": unpriced,
                "batch_price_factor": self.prices.batch_factor}

    def format(self) -> str:
        """A small human-readable table of the summary."""
        s = self.summary()
        rows = [f"{'model':<24}{'calls':>7}{'cached':>8}{'batch':>7}{'prompt tok':>12}{'compl. tok':>12}{'cost $':>11}"]
        for model, u in s["models"].items():
            cost = "unpriced" if u["cost_usd"] is None else f"{u['cost_usd']:.4f}"
            rows.append(f"{model:<24}{u['calls']:>7}{u['cached_calls']:>8}{u['batch_calls']:>7}{u['prompt_tokens']:>12}"
                        f"{u['completion_tokens']:>12}{cost:>11}")
        t = s["total"]
        rows.append(f"{'total':<24}{t['calls']:>7}{t['cached_calls']:>8}{t['batch_calls']:>7}{t['prompt_tokens']:>12}"
                    f"{t['completion_tokens']:>12}{t['cost_usd']:>11.4f}")
        if t["batch_calls"]:
            rows.append(f"batch: {t['batch_calls']} call(s) through the Batch API, priced at "
                        f"{s['batch_price_factor']:g} x the price table")
        if t["saved_usd"]:
            rows.append(f"cache saved ${t['saved_usd']:.4f} on {t['cached_calls']} call(s)")
        if s["unpriced_models"]:
            rows.append("no price for: " + ", ".join(s["unpriced_models"]) + " (add them to the price table)")
        return "\n".join(rows)


def estimate_prompt_tokens(messages: list[Mapping[str, Any]]) -> int:
    """The prompt tokens of a chat request, estimated from its text (see :data:`CHARS_PER_TOKEN`)."""
    return TOKENS_PER_REQUEST + sum(TOKENS_PER_MESSAGE + math.ceil(len(str(m.get("content") or "")) / CHARS_PER_TOKEN)
                                    for m in messages)


def estimate_cost(prices: PriceTable, request: Mapping[str, Any], *, batch: bool = False) -> float | None:
    """USD a request body (``model``, ``messages``, ``max_tokens``) may cost: its estimated prompt and an answer
    of ``max_tokens`` tokens (at batch prices with ``batch``). None when the model has no price or the answer has
    no length limit."""
    if request.get("max_tokens") is None:
        return None
    return prices.cost(request["model"], estimate_prompt_tokens(request["messages"]), int(request["max_tokens"]),
                       batch=batch)


class SpendingCap:
    """A limit on the USD spent on paid calls (thread-safe).

    Before a call is sent it reserves its estimated cost (:func:`estimate_cost`); the call goes out only if the
    cost already spent, the reservations of the calls in flight and its own estimate stay within ``max_usd``.
    When the call returns its reservation is replaced by its actual cost. After the first refusal every later
    call is refused too, so a run stops scheduling calls instead of picking the cheap ones.
    """

    def __init__(self, max_usd: float, prices: PriceTable | None = None) -> None:
        if not max_usd > 0:
            raise ValueError(f"a spending cap must be a positive number of USD, got {max_usd!r}")
        self.max_usd = float(max_usd)
        self.prices = prices or PriceTable()
        self.spent = 0.0
        self.reserved = 0.0
        self.refused = 0
        self._lock = threading.Lock()

    def estimate(self, request: Mapping[str, Any], *, batch: bool = False) -> float:
        """The request's estimated cost; an error when it cannot be estimated (so it cannot be capped)."""
        cost = estimate_cost(self.prices, request, batch=batch)
        if cost is None:
            raise ValueError(f"a spending cap needs a price for model {request['model']!r} (add one with a price "
                             "table) and a max_tokens limit on the answer")
        return cost

    def reserve(self, request: Mapping[str, Any], *, batch: bool = False) -> float | None:
        """Reserve the request's estimated cost (at batch prices with ``batch``) and return it; None when it does
        not fit (nothing reserved)."""
        cost = self.estimate(request, batch=batch)
        with self._lock:
            if self.refused or self.spent + self.reserved + cost > self.max_usd:
                self.refused += 1
                return None
            self.reserved += cost
            return cost

    def settle(self, reserved: float, cost: float) -> None:
        """Replace a reservation by the call's actual cost (0 for a call that was never billed)."""
        with self._lock:
            self.reserved -= reserved
            self.spent += cost
