"""GPT work through the OpenAI Batch API: the synchronous path's requests, answered at batch prices, resumable.

``BatchRunner(client).map_chat(requests)`` takes what ``GPTClient.map_chat`` takes and returns what it returns
(a ``ChatResult``, or a ``GPTCallError`` in place of a failure, in input order), so a caller switches paths
without changing anything else:

1. the request bodies are ``GPTClient.build_request``'s and their cache keys ``GPTClient.key_for``'s: the two
   paths share one ``ResponseCache``, and what one path answered is a cache hit for the other;
2. requests the cache answers are answered from it; the rest become Batch API lines (``custom_id`` = the cache
   key, ``url`` = the chat endpoint, ``body`` = the request), split into batches within the API's limits
   (:data:`MAX_REQUESTS_PER_BATCH`, :data:`MAX_BYTES_PER_BATCH`), uploaded (``files.create(purpose="batch")``)
   and submitted (``batches.create``, 24-hour window);
3. each submitted batch is written to a state file next to the cache (``<cache>.batch-<batch id>.json``: batch
   id, input file id, keys) before the wait begins; the batches are polled every ``poll_interval`` seconds;
4. an ended batch's output and error files are downloaded, every answer is filed into the cache and the ledger
   (at batch prices, ``PriceTable.batch_factor``), and the state file is removed.

**Resuming.** A run that is killed while it waits leaves its state files. Started again, it re-attaches to
every batch whose state file holds keys it needs, instead of uploading and paying again, and submits the
requests no such batch holds at once, so they run while those batches finish. A state file whose
batch ended ``failed``, ``expired`` or ``cancelled`` is reported, what that batch answered is kept, and its other
requests are submitted again. A state file whose keys are all in the cache (a run killed after filing the
answers) is removed.

**Failures.** A request that failed inside a batch (an error-file line, a non-200 status, an answer without
content) or inside a batch of this run that ended failed / expired / cancelled ends as a ``GPTCallError``
naming its status and message, as a failed synchronous call does, and nothing of it is cached: the callers
report it, and the next run submits it again. There is no fallback to synchronous calls, which would cost twice
as much without being asked for.

**Spending cap.** With a ``SpendingCap`` on the client each request is reserved at its batch estimate before it
is submitted; requests that do not fit end as ``GPTCallError`` of kind ``budget`` and are not submitted.
Batches re-attached from state files were committed by an earlier run: their cost is counted as spent.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..common.io import atomic_write_json, read_json
from .cache import CachedResponse
from .client import ChatRequest, ChatResult, GPTClient, to_chat_request
from .errors import GPTCallError, redact

log = logging.getLogger("sparkles.gpt")

# The Batch API's limits on one input file (https://platform.openai.com/docs/guides/batch).
MAX_REQUESTS_PER_BATCH = 50_000
MAX_BYTES_PER_BATCH = 200 * 1000 * 1000  # 200 MB, counted in decimal megabytes to stay on the safe side
BATCH_ENDED = ("completed", "failed", "expired", "cancelled")
DEFAULT_POLL_INTERVAL = 30.0


@dataclass
class _Request:
    """One distinct request of a run (identical requests share a key and are sent once)."""

    key: str
    body: dict[str, Any]
    indices: list[int]
    reserved: float = 0.0


@dataclass
class _Batch:
    """A submitted batch this run waits for."""

    batch_id: str
    input_file_id: str
    model: str
    keys: list[str]
    state_path: Path
    attached: bool  # re-attached from an earlier run's state file
    last_status: str = ""
    input_bodies: dict[str, dict] = field(default_factory=dict)


class BatchRunner:
    """Runs a list of chat requests as Batch API jobs on a ``GPTClient`` (see the module docstring)."""

    def __init__(self, client: GPTClient, *, poll_interval: float = DEFAULT_POLL_INTERVAL,
                 max_requests: int = MAX_REQUESTS_PER_BATCH, max_bytes: int = MAX_BYTES_PER_BATCH,
                 notify: Callable[[str], None] | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        if client.cache is None:
            raise ValueError("the Batch API path needs a response cache: the answers and the state files of "
                             "submitted batches are kept there")
        if poll_interval < 0 or max_requests < 1 or max_bytes < 1:
            raise ValueError("poll_interval must be >= 0, max_requests and max_bytes >= 1")
        self.client = client
        self.poll_interval = poll_interval
        self.max_requests = min(max_requests, MAX_REQUESTS_PER_BATCH)
        self.max_bytes = min(max_bytes, MAX_BYTES_PER_BATCH)
        self._notify = notify or log.info
        self._sleep = sleep

    # --- where things are -------------------------------------------------------------------
    @property
    def cache_path(self) -> Path:
        return self.client.cache.path

    def state_files(self) -> list[Path]:
        """The state files of batches submitted with this cache and not yet filed."""
        return sorted(self.cache_path.parent.glob(f"{self.cache_path.name}.batch-*.json"))

    def _state_path(self, batch_id: str) -> Path:
        return self.cache_path.with_name(f"{self.cache_path.name}.batch-{re.sub(r'[^A-Za-z0-9_.-]', '_', batch_id)}"
                                         ".json")

    def _endpoint(self) -> str:
        # Azure's batch lines and batches name the route without the version prefix
        return "/chat/completions" if self.client.config.is_azure else "/v1/chat/completions"

    # --- the run ----------------------------------------------------------------------------
    def map_chat(self, requests: Iterable[ChatRequest | Mapping[str, Any]], *,
                 on_result: Callable[[int, "ChatResult | GPTCallError"], None] | None = None,
                 return_exceptions: bool = True) -> list["ChatResult | GPTCallError"]:
        """Answer ``requests`` through the cache and the Batch API; results in input order.

        ``on_result(index, result)`` is called in input order, as soon as every earlier request has its
        result. Without ``return_exceptions`` the first failure is raised once every batch has been filed.
        """
        items = [r if isinstance(r, ChatRequest) else to_chat_request(r) for r in requests]
        results: list[Any] = [None] * len(items)
        delivered = [0]

        def deliver(index: int, result: "ChatResult | GPTCallError") -> None:
            results[index] = result
            while delivered[0] < len(results) and results[delivered[0]] is not None:
                if on_result is not None:
                    on_result(delivered[0], results[delivered[0]])
                delivered[0] += 1

        todo: dict[str, _Request] = {}
        for index, r in enumerate(items):
            body = self.client.build_request(r.prompt, model=r.model, temperature=r.temperature,
                                             max_tokens=r.max_tokens, top_p=r.top_p, **r.params)
            key = self.client.key_for(body, r.cache_tag)
            if key in todo:
                todo[key].indices.append(index)
                continue
            hit = self.client.cached_result(key, body["model"])
            if hit is not None:
                deliver(index, hit)
            else:
                todo[key] = _Request(key, body, [index])
        if todo:
            self._notify(f"Batch API: {len(items) - sum(len(r.indices) for r in todo.values())} request(s) answered "
                         f"from the cache, {len(todo)} to answer through batches")
            self._run(todo, deliver)
        if not return_exceptions:
            failure = next((r for r in results if isinstance(r, GPTCallError)), None)
            if failure is not None:
                raise failure
        return results

    def _run(self, todo: dict[str, _Request], deliver: Callable) -> None:
        def settle(key: str, result: "ChatResult | GPTCallError") -> None:
            request = todo.pop(key, None)
            if request is None:
                return
            if self.client.cap is not None:
                cost = result.cost_usd if isinstance(result, ChatResult) else 0.0
                self.client.cap.settle(request.reserved, cost if cost is not None else request.reserved)
            first, *repeats = request.indices
            deliver(first, result)
            for index in repeats:  # the same request again: answered by the cache, as the synchronous path does
                hit = self.client.cached_result(key, request.body["model"]) if isinstance(result, ChatResult) else None
                deliver(index, hit or result)

        attached = self._attach(set(todo))
        covered = {key for b in attached for key in b.keys}
        fresh = self._submit(self._reserve([r for k, r in todo.items() if k not in covered], settle), settle)
        if attached or fresh:  # the new requests run while earlier runs' batches finish
            self._wait(attached + fresh, todo, settle)
        # what re-attached batches that ended early (or an endpoint no longer knows) left unanswered
        again = self._submit(self._reserve(list(todo.values()), settle), settle)
        if again:
            self._wait(again, todo, settle)

    def _attach(self, wanted: set[str]) -> list[_Batch]:
        """The batches of earlier runs' state files that hold keys of ``wanted``; finished state files removed."""
        batches = []
        for path in self.state_files():
            try:
                state = read_json(path, what="batch state file")
                keys = list(state["keys"])
                batch_id, input_file_id, model = state["batch_id"], state["input_file_id"], state["model"]
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable batch state file %s: %s", path, exc)
                continue
            if not wanted & set(keys):
                if all(self.client.cache.get(k) is not None for k in keys):
                    path.unlink(missing_ok=True)  # its answers were filed before a kill removed the file
                continue
            self._notify(f"re-attaching to batch {batch_id} ({len(keys)} request(s), submitted "
                         f"{state.get('submitted_at', '?')}; state file {path})")
            batches.append(_Batch(batch_id, input_file_id, model, keys, path, attached=True))
        return batches

    def _reserve(self, requests: list[_Request], settle: Callable) -> list[_Request]:
        """The requests the spending cap lets through (reserved at their batch estimate); the others fail."""
        cap = self.client.cap
        if cap is None:
            return requests
        allowed = []
        for r in requests:
            reserved = cap.reserve(r.body, batch=True)
            if reserved is None:
                settle(r.key, GPTCallError(
                    f"spending cap ${cap.max_usd:.2f} reached (spent ${cap.spent:.4f}, ${cap.reserved:.4f} reserved "
                    f"for batches, this request estimated at ${cap.estimate(r.body, batch=True):.4f} at batch "
                    "prices): not submitted", model=r.body["model"], kind="budget", retryable=False, attempts=0))
                continue
            r.reserved = reserved
            allowed.append(r)
        return allowed

    def _chunks(self, requests: list[_Request], settle: Callable) -> list[list[tuple[_Request, bytes]]]:
        """The Batch API lines of ``requests``, one model per chunk (a batch input file may name one model only),
        split to stay within the request and size limits."""
        endpoint = self._endpoint()
        chunks: list[list[tuple[_Request, bytes]]] = [[]]
        size = 0
        for r in sorted(requests, key=lambda r: r.body["model"]):  # stable: input order within a model
            body = {**r.body, "model": self.client.sdk_model(r.body["model"])}
            line = (json.dumps({"custom_id": r.key, "method": "POST", "url": endpoint, "body": body},
                               ensure_ascii=False) + "\n").encode("utf-8")
            if len(line) > self.max_bytes:
                settle(r.key, GPTCallError(f"the request is {len(line)} bytes, more than a batch input file may hold "
                                           f"({self.max_bytes})", model=r.body["model"], kind="bad_request"))
                continue
            if chunks[-1] and (len(chunks[-1]) >= self.max_requests or size + len(line) > self.max_bytes
                               or chunks[-1][-1][0].body["model"] != r.body["model"]):
                chunks.append([])
                size = 0
            chunks[-1].append((r, line))
            size += len(line)
        return [c for c in chunks if c]

    def _submit(self, requests: list[_Request], settle: Callable) -> list[_Batch]:
        """Upload and create one batch per chunk; each is written to its state file at once."""
        sdk = self.client.sdk()
        submitted = []
        for chunk in self._chunks(requests, settle):
            model = chunk[0][0].body["model"]
            data = b"".join(line for _, line in chunk)
            keys = [r.key for r, _ in chunk]
            try:
                upload, _ = self.client.call_with_retries(
                    lambda: sdk.files.create(file=(f"sparkles-batch-{keys[0][:16]}.jsonl", data), purpose="batch"),
                    model=model, what="uploading a batch input file")
                # not repeated on an unclear failure: a second batch would be paid for twice
                batch, _ = self.client.call_with_retries(
                    lambda: sdk.batches.create(input_file_id=upload.id, endpoint=self._endpoint(),
                                               completion_window="24h",
                                               metadata={"created_by": "sparkles.gpt.batch",
                                                         "requests": str(len(keys))}),
                    model=model, what="creating a batch", repeatable=False)
            except GPTCallError as exc:
                for key in keys:
                    settle(key, exc)
                continue
            state_path = self._state_path(batch.id)
            atomic_write_json(state_path, {
                "batch_id": batch.id, "input_file_id": upload.id, "model": model,
                "endpoint": redact(self.client.config.endpoint_id(model)), "requests": len(keys),
                "submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "keys": keys})
            self._notify(f"submitted batch {batch.id}: {len(keys)} request(s), input file {upload.id} "
                         f"({len(data)} bytes); state file {state_path}; polling every {self.poll_interval:g} s "
                         "(a killed run started again re-attaches to it)")
            submitted.append(_Batch(batch.id, upload.id, model, keys, state_path, attached=False))
        return submitted

    def _wait(self, batches: list[_Batch], todo: dict[str, _Request], settle: Callable) -> None:
        """Poll until every batch has ended and is filed."""
        sdk = self.client.sdk()
        waiting = list(batches)
        while waiting:
            for b in list(waiting):
                try:
                    batch, _ = self.client.call_with_retries(lambda: sdk.batches.retrieve(b.batch_id), model=b.model,
                                                             what=f"checking batch {b.batch_id}")
                except GPTCallError as exc:
                    if not (b.attached and exc.status == 404):
                        raise  # the state file stays: the next run looks at the batch again
                    # an earlier run's batch this endpoint does not know (another account or server): start afresh
                    self._notify(f"batch {b.batch_id} of {b.state_path} is unknown to the API (HTTP 404); its state "
                                 "file is removed and its requests are submitted again")
                    b.state_path.unlink(missing_ok=True)
                    waiting.remove(b)
                    continue
                counts = batch.request_counts
                status = (f"{batch.status} ({counts.completed}/{counts.total} done, {counts.failed} failed)"
                          if counts is not None else batch.status)
                if status != b.last_status:
                    self._notify(f"batch {b.batch_id}: {status}")
                    b.last_status = status
                if batch.status in BATCH_ENDED:
                    self._file(b, batch, todo, settle)
                    waiting.remove(b)
            if waiting:
                self._sleep(self.poll_interval)

    # --- filing the answers -----------------------------------------------------------------
    def _download(self, file_id: str, model: str) -> list[dict]:
        sdk = self.client.sdk()
        content, _ = self.client.call_with_retries(lambda: sdk.files.content(file_id).content, model=model,
                                                   what=f"downloading batch file {file_id}")
        lines = []
        for number, text in enumerate(content.decode("utf-8").splitlines(), 1):
            if not text.strip():
                continue
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError as exc:
                raise GPTCallError(f"batch file {file_id}: line {number} is not JSON ({exc})", model=model,
                                   kind="bad_response", retryable=True) from None
        return lines

    def _file(self, b: _Batch, batch: Any, todo: dict[str, _Request], settle: Callable) -> None:
        """File an ended batch: answers into the cache and ledger, failures to their callers. What a re-attached
        batch that ended early left unanswered stays in ``todo`` (to be submitted again). The state file goes
        once everything is filed."""
        from openai.types.chat import ChatCompletion

        answers: dict[str, CachedResponse] = {}
        failures: dict[str, GPTCallError] = {}
        keys = set(b.keys)
        for file_id in (batch.output_file_id, batch.error_file_id):
            for line in self._download(file_id, b.model) if file_id else []:
                key = line.get("custom_id")
                if key not in keys or key in answers:
                    continue
                model = (todo[key].body["model"] if key in todo else b.model)
                response = line.get("response") or {}
                if response.get("status_code") == 200 and isinstance(response.get("body"), dict):
                    try:
                        answers[key] = self.client.read_response(ChatCompletion.model_validate(response["body"]),
                                                                 model)
                    except GPTCallError as exc:
                        failures[key] = exc
                    except ValueError as exc:  # a body that is not a chat completion
                        failures[key] = GPTCallError(f"batch {b.batch_id}: the answer is not a chat completion: "
                                                     f"{exc}", model=model, kind="bad_response", retryable=True)
                else:
                    failures[key] = _line_error(b.batch_id, line, model)
        ended_early = batch.status != "completed"
        unanswered = [k for k in b.keys if k not in answers]
        if ended_early:
            reasons = "; ".join(f"{e.code}: {e.message}" for e in (batch.errors.data or [])) if batch.errors else ""
            self._notify(f"batch {b.batch_id} ended {batch.status}{' (' + reasons + ')' if reasons else ''}: "
                         f"{len(answers)} of {len(b.keys)} request(s) answered"
                         + (f"; the other {len(unanswered)} are submitted again" if b.attached and unanswered else ""))
        for key in b.keys:
            if key not in answers:
                continue
            body = todo[key].body if key in todo else self._input_body(b, key)
            if body is not None:
                settle(key, self._paid(key, body, answers[key], todo))
        failed = []
        for key in unanswered:
            if key not in todo or (ended_early and b.attached):
                continue
            failed.append(key)
            error = failures.get(key) or GPTCallError(
                f"batch {b.batch_id} ended {batch.status} without answering this request" if ended_early else
                f"batch {b.batch_id} completed without a line for this request", model=todo[key].body["model"],
                kind=f"batch_{batch.status}" if ended_early else "bad_response", retryable=True)
            settle(key, error)
        if failed:
            self._notify(f"batch {b.batch_id}: {len(failed)} request(s) failed and are not cached (the next run "
                         "submits them again): " + "; ".join(f"{k[:12]}… {failures[k]}" if k in failures else k[:12]
                                                            for k in failed[:5]))
        b.state_path.unlink(missing_ok=True)

    def _paid(self, key: str, body: dict, answer: CachedResponse, todo: dict[str, _Request]) -> ChatResult:
        result = self.client.finish(key, body, answer, attempts=1, batch=True)
        if key not in todo and self.client.cap is not None:
            self.client.cap.settle(0.0, result.cost_usd or 0.0)  # an earlier run's batch: paid now, not reserved
        return result

    def _input_body(self, b: _Batch, key: str) -> dict | None:
        """The request body of ``key`` as the batch's input file holds it (answers this run did not ask for)."""
        if not b.input_bodies:
            for line in self._download(b.input_file_id, b.model):
                b.input_bodies[line.get("custom_id")] = line.get("body")
        body = b.input_bodies.get(key)
        if body is None:
            log.warning("batch %s: no request body for %s in its input file; answer not cached", b.batch_id, key)
        return body


def _line_error(batch_id: str, line: Mapping[str, Any], model: str) -> GPTCallError:
    """The ``GPTCallError`` of an error line (a non-200 answer, or a request the batch did not run)."""
    response = line.get("response") or {}
    status = response.get("status_code")
    body = response.get("body")
    error = line.get("error") or (body.get("error") if isinstance(body, dict) else None) or {}
    message = error.get("message") if isinstance(error, dict) else str(error)
    code = error.get("code") if isinstance(error, dict) else None
    if status == 429:
        kind = "rate_limit"
    elif status is not None and status >= 500:
        kind = "server_error"
    elif status in (401, 403):
        kind = "auth"
    elif status is not None:
        kind = "bad_request"
    else:
        kind = str(code or "batch_error")
    return GPTCallError(f"{kind} error in batch {batch_id}{f' (HTTP {status})' if status else ''}: "
                        f"{message or body or 'no message'}", model=model, kind=kind, status=status,
                        retryable=kind not in ("auth", "bad_request"))
