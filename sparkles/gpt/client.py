"""The one OpenAI chat client of the project: OpenAI / compatible endpoints / Azure, retries, cache, accounting.

``GPTClient.chat`` sends one chat completion and returns a ``ChatResult``. Each call keeps exactly the model
and parameters it was given — retries resend the identical request (upstream's retry silently fell back to
gpt-4). Retryable failures (HTTP 408/409/429/5xx, timeouts, connection errors, malformed bodies) are retried
with bounded exponential backoff and jitter; anything else (bad key, bad request, content filter) fails at
once. Either way the failure is a ``GPTCallError``. ``map_chat`` runs a batch on a thread pool while a
semaphore caps concurrent calls for the whole client.

Finished answers go into the SQLite ``ResponseCache`` before they are returned, so a re-run never pays for
them again; every call (paid or cached) is entered in the client's ``UsageLedger``. With a ``SpendingCap`` a
paid call is sent only if its estimated cost fits under the cap; otherwise it fails with kind ``budget``
without any HTTP request (cached answers are free and still returned).

The Batch API (:mod:`sparkles.gpt.batch`) sends the same request bodies under the same cache keys
(``build_request``, ``key_for``) and files its answers through ``finish``, so the two paths share one cache and
one ledger.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, TypeVar

from ..common.logging import progress_bar
from .cache import CachedResponse, ResponseCache, request_key
from .config import GPTConfig
from .cost import PriceTable, SpendingCap, UsageLedger
from .errors import GPTCallError, redact

log = logging.getLogger("sparkles.gpt")

Messages = list[dict[str, Any]]
T = TypeVar("T")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class ChatResult:
    """One answer. ``model`` is the model that was requested; ``response_model`` what the server reported."""

    text: str
    usage: Usage
    cached: bool
    model: str
    response_model: str | None = None
    finish_reason: str | None = None
    attempts: int = 0
    cost_usd: float | None = None
    key: str = ""
    batch: bool = False  # answered through the Batch API (billed at batch prices)

    @property
    def truncated(self) -> bool:
        """The answer hit ``max_tokens`` (its end is missing)."""
        return self.finish_reason == "length"


@dataclass
class ChatRequest:
    """One call of a batch for ``map_chat`` (the same arguments as ``GPTClient.chat``)."""

    prompt: str | Messages
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    cache_tag: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


# HTTP statuses worth another try: request timeout, conflict/lock, rate limit, and server-side failures.
_RETRYABLE_STATUS = {408, 409, 429}
# Failures after which the server may still have generated (and billed) the answer: they count against a cap.
_MAYBE_BILLED = {"timeout", "connection", "bad_response"}


def _classify(exc: BaseException) -> tuple[str, int | None, bool, float | None]:
    """(kind, status, retryable, retry_after seconds) for an exception raised by the openai SDK."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return "timeout", None, True, None
    if isinstance(exc, openai.APIConnectionError):
        return "connection", None, True, None
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retry_after = _retry_after(exc.response.headers) if exc.response is not None else None
        if status == 429:
            return "rate_limit", status, True, retry_after
        if status >= 500:
            return "server_error", status, True, retry_after
        if status in _RETRYABLE_STATUS:
            return "transient", status, True, retry_after
        if status in (401, 403):
            return "auth", status, False, None
        return "bad_request", status, False, None
    if isinstance(exc, (openai.APIResponseValidationError, json.JSONDecodeError)):
        # a body that is not the JSON we expect (proxy error page, cut connection): transient in practice
        return "bad_response", None, True, None
    return "unexpected", None, False, None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after-ms")
    if value:
        try:
            return float(value) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date; rare for this API, the backoff applies instead


class GPTClient:
    """Chat completions with retries, a persistent cache and usage accounting (see the module docstring)."""

    def __init__(self, config: GPTConfig, *, cache: ResponseCache | str | os.PathLike | None = None,
                 ledger: UsageLedger | None = None, cap: SpendingCap | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        config.require_key()
        self.config = config
        self.cap = cap
        cache = cache if cache is not None else config.cache_path
        self.cache: ResponseCache | None = (cache if cache is None or isinstance(cache, ResponseCache)
                                            else ResponseCache(cache))
        self.ledger = ledger or UsageLedger(PriceTable(config.prices))
        self._sleep = sleep
        self._slots = threading.BoundedSemaphore(config.concurrency)
        # a private RNG for jitter, so retries never disturb a caller's seeded random state
        self._jitter = random.Random()
        self._sdk = None
        self._sdk_lock = threading.Lock()

    @classmethod
    def from_env(cls, *, cache: ResponseCache | str | os.PathLike | None = None, ledger: UsageLedger | None = None,
                 cap: SpendingCap | None = None, env: Mapping[str, str] | None = None,
                 **overrides: Any) -> "GPTClient":
        """Client configured from ``OPENAI_*`` variables (see ``sparkles.gpt.config``) plus ``overrides``."""
        return cls(GPTConfig.from_env(env, **overrides), cache=cache, ledger=ledger, cap=cap)

    # --- SDK --------------------------------------------------------------------------------
    def sdk(self):
        """The ``openai`` SDK client (``OpenAI`` or ``AzureOpenAI``), built on first use, without SDK retries."""
        with self._sdk_lock:
            if self._sdk is None:
                import openai  # imported on first use: keeps `import sparkles.gpt` light

                c = self.config
                common = dict(api_key=c.api_key, organization=c.organization, timeout=c.timeout,
                              max_retries=0)  # our loop does the retrying, with our rules
                if c.is_azure:
                    self._sdk = openai.AzureOpenAI(azure_endpoint=c.azure_endpoint, api_version=c.azure_api_version,
                                                   **common)
                else:
                    self._sdk = openai.OpenAI(base_url=c.base_url, **common)
            return self._sdk

    def close(self) -> None:
        if self._sdk is not None:
            self._sdk.close()
            self._sdk = None
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> "GPTClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- requests ---------------------------------------------------------------------------
    def build_request(self, prompt: str | Messages, *, model: str | None = None, temperature: float | None = None,
                      max_tokens: int | None = None, top_p: float | None = None, **params: Any) -> dict[str, Any]:
        """The complete request body (defaults filled in from the config), as sent and as cached."""
        c = self.config
        if isinstance(prompt, str):
            messages: Messages = [{"role": "system", "content": c.system_prompt}, {"role": "user", "content": prompt}]
        else:
            messages = [dict(m) for m in prompt]
            for i, m in enumerate(messages):
                if "role" not in m or "content" not in m:
                    raise ValueError(f"chat message {i} needs 'role' and 'content', got keys {sorted(m)}")
        request = {
            "model": model or c.model,
            "messages": messages,
            "temperature": c.temperature if temperature is None else temperature,
            "max_tokens": c.max_tokens if max_tokens is None else max_tokens,
            "top_p": c.top_p if top_p is None else top_p,
        }
        request.update(params)
        # None = leave the parameter out (e.g. models that refuse max_tokens or temperature)
        return {k: v for k, v in request.items() if v is not None}

    def chat(self, prompt: str | Messages, *, model: str | None = None, temperature: float | None = None,
             max_tokens: int | None = None, top_p: float | None = None, cache_tag: str | None = None,
             use_cache: bool = True, **params: Any) -> ChatResult:
        """One chat completion. ``prompt``: a user message (sent after the config's system prompt) or a full
        message list. Unset parameters take the config defaults; ``params`` go to the API as they are
        (e.g. ``frequency_penalty``, ``seed``, ``stop``). Raises ``GPTCallError``."""
        request = self.build_request(prompt, model=model, temperature=temperature, max_tokens=max_tokens,
                                     top_p=top_p, **params)
        model_name = request["model"]
        key = self.key_for(request, cache_tag)
        if use_cache:
            hit = self.cached_result(key, model_name)
            if hit is not None:
                return hit
        reserved = 0.0
        if self.cap is not None:
            reserved = self.cap.reserve(request)
            if reserved is None:
                raise GPTCallError(
                    f"spending cap ${self.cap.max_usd:.2f} reached (spent ${self.cap.spent:.4f}, "
                    f"${self.cap.reserved:.4f} reserved by calls in flight, this call estimated at "
                    f"${self.cap.estimate(request):.4f}): call not made", model=model_name, kind="budget",
                    retryable=False, attempts=0)
        try:
            with self._slots:
                answer, attempts = self._call_with_retries(request)
        except GPTCallError as exc:
            if self.cap is not None:
                self.cap.settle(reserved, reserved if exc.kind in _MAYBE_BILLED else 0.0)
            raise
        except BaseException:
            if self.cap is not None:
                self.cap.settle(reserved, reserved)  # interrupted in flight: it may have been billed
            raise
        result = self.finish(key, request, answer, attempts=attempts)
        if self.cap is not None:
            self.cap.settle(reserved, result.cost_usd if result.cost_usd is not None else reserved)
        return result

    def key_for(self, request: Mapping[str, Any], cache_tag: str | None = None) -> str:
        """The cache key of a request body (``build_request``) with its caller tag."""
        return request_key(self.config.endpoint_id(request["model"]), dict(request), cache_tag)

    def cached_result(self, key: str, model: str) -> ChatResult | None:
        """The cached answer under ``key`` (entered in the ledger as a cached call), or None."""
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is None:
            return None
        cost = self.ledger.record(model, hit.prompt_tokens, hit.completion_tokens, cached=True)
        return ChatResult(text=hit.text, usage=Usage(hit.prompt_tokens, hit.completion_tokens), cached=True,
                          model=model, response_model=hit.response_model, finish_reason=hit.finish_reason,
                          attempts=0, cost_usd=cost, key=key)

    def finish(self, key: str, request: Mapping[str, Any], answer: CachedResponse, *, attempts: int = 1,
               batch: bool = False) -> ChatResult:
        """File a paid answer: into the cache (first, so it is never paid for again) and the ledger."""
        model = request["model"]
        if self.cache is not None:
            self.cache.put(key, dict(request), answer)
        cost = self.ledger.record(model, answer.prompt_tokens, answer.completion_tokens, cached=False, batch=batch)
        return ChatResult(text=answer.text, usage=Usage(answer.prompt_tokens, answer.completion_tokens), cached=False,
                          model=model, response_model=answer.response_model, finish_reason=answer.finish_reason,
                          attempts=attempts, cost_usd=cost, key=key, batch=batch)

    def sdk_model(self, model: str) -> str:
        """The model name the API expects: on Azure, the deployment that serves ``model``."""
        return self.config.deployment_for(model) if self.config.is_azure else model

    def _call_with_retries(self, request: dict[str, Any]) -> tuple[CachedResponse, int]:
        model = request["model"]
        sdk_request = {**request, "model": self.sdk_model(model)}
        return self.call_with_retries(
            lambda: self.read_response(self.sdk().chat.completions.create(**sdk_request), model), model=model)

    def call_with_retries(self, send: Callable[[], T], *, model: str, what: str = "",
                          repeatable: bool = True) -> tuple[T, int]:
        """``send()`` with this client's retry rules; returns its value and the attempts made.

        ``what`` names the operation in messages (default: the chat call). ``repeatable=False`` is for a request
        that must not run twice (creating a batch): only a rate-limit refusal, which the server did not act on,
        is retried then.
        """
        c = self.config
        secrets = (c.api_key,)
        attempt = 0
        while True:
            attempt += 1
            try:
                return send(), attempt
            except GPTCallError as exc:
                kind, status, retryable, retry_after, message = exc.kind, exc.status, exc.retryable, None, str(exc)
            except Exception as exc:  # the SDK's errors, classified below
                kind, status, retryable, retry_after = _classify(exc)
                message = redact(f"{type(exc).__name__}: {exc}", secrets)
            target = f"model {model!r} at {c.endpoint_id(model).split(':', 1)[1]}"
            where = redact(f"{what} for {target}" if what else target, secrets)
            if not repeatable and kind != "rate_limit":
                retryable = False
            if not retryable:
                raise GPTCallError(f"{kind} error from {where} (not retried): {message}", model=model, kind=kind,
                                   status=status, retryable=False, attempts=attempt) from None
            if attempt > c.max_retries:
                raise GPTCallError(f"{kind} error from {where}, giving up after {attempt} attempts: {message}",
                                   model=model, kind=kind, status=status, retryable=True,
                                   attempts=attempt) from None
            delay = self.backoff_delay(attempt, retry_after)
            log.warning("%s (%s) failed with %s%s; retry %d/%d in %.2fs", what or "GPT call", model, kind,
                        f" {status}" if status else "", attempt, c.max_retries, delay)
            self._sleep(delay)

    def backoff_delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Exponential backoff with jitter, capped at ``backoff_max``; a server's Retry-After is a floor."""
        c = self.config
        ceiling = min(c.backoff_max, c.backoff_base * (2 ** (attempt - 1)))
        delay = ceiling * (0.5 + 0.5 * self._jitter.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, c.backoff_max))
        return delay

    @staticmethod
    def read_response(response: Any, model: str) -> CachedResponse:
        """The answer of a chat completion (an SDK object); a ``GPTCallError`` when it carries none."""
        choices = getattr(response, "choices", None) or []
        if not choices:
            raise GPTCallError("response has no choices", model=model, kind="bad_response", retryable=True)
        choice = choices[0]
        text = getattr(choice.message, "content", None) if getattr(choice, "message", None) else None
        if text is None:
            if choice.finish_reason == "content_filter":
                raise GPTCallError("the answer was withheld by the content filter", model=model,
                                   kind="content_filter", retryable=False)
            raise GPTCallError("response has no message content", model=model, kind="bad_response", retryable=True)
        usage = getattr(response, "usage", None)
        return CachedResponse(text=text, response_model=getattr(response, "model", None),
                              finish_reason=choice.finish_reason,
                              prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                              completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0))

    # --- batches ----------------------------------------------------------------------------
    def map_chat(self, requests: Iterable[ChatRequest | Mapping[str, Any]], *, concurrency: int | None = None,
                 return_exceptions: bool = True,
                 on_result: Callable[[int, "ChatResult | GPTCallError"], None] | None = None,
                 progress: str | None = None) -> list["ChatResult | GPTCallError"]:
        """Run many calls on ``concurrency`` threads (default: the config's limit); results in input order.

        Each request is a ``ChatRequest`` or a dict of ``chat`` keyword arguments (with ``prompt``).
        ``on_result(index, result)`` is called in the caller's thread as each call finishes — the place to
        write results incrementally. With ``return_exceptions`` a failed call yields its ``GPTCallError`` in
        the list; otherwise the first failure cancels the calls not yet started and is raised.
        ``progress``: a tqdm description to show a progress bar.
        """
        items = [r if isinstance(r, ChatRequest) else to_chat_request(r) for r in requests]
        results: list[Any] = [None] * len(items)
        if not items:
            return results
        workers = max(1, min(concurrency or self.config.concurrency, len(items)))
        bar = progress_bar(total=len(items), desc=progress, unit="call", enabled=bool(progress))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gpt")
        try:
            futures = {pool.submit(self._run_request, r): i for i, r in enumerate(items)}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    results[i] = fut.result()
                except GPTCallError as exc:
                    if not return_exceptions:
                        raise
                    results[i] = exc
                if on_result is not None:
                    on_result(i, results[i])
                bar.update(1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        return results

    def _run_request(self, r: ChatRequest) -> ChatResult:
        return self.chat(r.prompt, model=r.model, temperature=r.temperature, max_tokens=r.max_tokens, top_p=r.top_p,
                         cache_tag=r.cache_tag, **r.params)


def to_chat_request(values: Mapping[str, Any]) -> ChatRequest:
    """A ``ChatRequest`` from a dict of ``chat`` keyword arguments (with ``prompt``; unknown keys are params)."""
    values = dict(values)
    if "prompt" not in values:
        raise ValueError(f"a map_chat request needs 'prompt'; got keys {sorted(values)}")
    known = {k: values.pop(k) for k in ("prompt", "model", "temperature", "max_tokens", "top_p", "cache_tag")
             if k in values}
    extra = values.pop("params", {})
    return ChatRequest(**known, params={**extra, **values})

