"""The OpenAI chat-completions wire format: request validation and response/chunk bodies.

Pure data in, data out (no web framework, no model), so every rule is testable on its own. A request is
checked field by field; anything we cannot serve is an :class:`ApiError` carrying the OpenAI error body
``{"error": {"message", "type", "param", "code"}}`` and an HTTP status. Image parts are collected in reading
order and replaced by one slot marker each, exactly where they stood among the text parts.

The body is parsed strictly (:func:`parse_json_body`): NaN and Infinity, which Python's ``json`` accepts,
are refused, and so is nesting deeper than a request needs. Every size a request chooses is capped here,
before anything is tokenised: the characters of text, the stop strings and their length, the seed's range.
No field is ignored silently (:func:`refuse_unserved_fields`): a field is implemented (:data:`SERVED_FIELDS`),
or accepted only at the value that asks for what the server does anyway (:data:`NEUTRAL_VALUES`), or an
identifier that cannot change the answer (:data:`IDENTIFIER_FIELDS`); any other field is a 400 naming it.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from ..conversation.template import ASSISTANT, IMAGE_GLYPHS, IMAGE_MARKER, IMAGE_PLACEHOLDER, USER

DEFAULT_MAX_TEXT_CHARS = 100_000  # all text parts of a request together; far beyond any context we serve
DEFAULT_MAX_JSON_DEPTH = 32  # a chat request nests 6 deep (body → messages → message → content → part → url)
DEFAULT_MAX_STOP_STRINGS = 4  # as OpenAI
DEFAULT_MAX_STOP_CHARS = 64
SEED_RANGE = (-2 ** 63, 2 ** 63 - 1)  # a signed 64-bit integer, as OpenAI documents and torch's generators take
MAX_REPETITION_PENALTY = 10.0

# The request fields this server implements (top_k and repetition_penalty are the extensions other open servers
# take too; the openai client sends them with extra_body={...}).
SERVED_FIELDS = ("model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                 "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed", "n")
# Fields accepted only at the value that asks for what the server does anyway (JSON equality; 0 == 0.0). Any other
# value is refused: no log-probabilities, no tools, plain-text answers, one choice, no penalties OpenAI-style.
NEUTRAL_VALUES: dict[str, tuple] = {
    "logprobs": (False,), "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none",),
    "parallel_tool_calls": (True, False), "functions": ([],), "function_call": ("none",),
    "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "modalities": (["text"],),
    "store": (False,), "metadata": ({},), "service_tier": ("auto", "default"),
}
# Identifiers of the caller or its cache: they never change an answer, so they are accepted and not used.
IDENTIFIER_FIELDS = ("user", "safety_identifier", "prompt_cache_key")
# What each refused field would ask for, for the error message.
UNSERVED_REASONS = {
    "logprobs": "log-probabilities are not returned", "top_logprobs": "log-probabilities are not returned",
    "response_format": "answers are plain text; no JSON mode or schema is enforced",
    "tools": "tool calling is not supported", "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported", "function_call": "function calling is not supported",
    "frequency_penalty": "only 0 is supported (repetition_penalty is)",
    "presence_penalty": "only 0 is supported (repetition_penalty is)",
    "logit_bias": "logit biases are not supported", "modalities": "answers are text only",
    "audio": "answers are text only", "store": "completions are not stored",
    "metadata": "completions are not stored", "service_tier": "there is one service tier",
    "prediction": "predicted outputs are not supported", "reasoning_effort": "the model does not reason in steps",
    "web_search_options": "the server does not search the web", "verbosity": "not supported",
}
STREAM_OPTION_FIELDS = ("include_usage",)
MESSAGE_FIELDS = ("role", "content")  # a message's other fields (name, tool_calls, ...) must be empty or null


class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = dict(headers or {})  # e.g. Retry-After on a 429, WWW-Authenticate on a 401

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------------- body
def _refuse_constant(name: str):
    raise ApiError(f"the request body contains {name}, which is not valid JSON; numbers must be finite",
                   code="invalid_json")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e999, which float() turns into inf
        raise ApiError(f"the request body contains the number {text[:40]}, which overflows; numbers must be finite",
                       code="invalid_json")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests more than ``limit`` containers deep (level by level, containers only, no recursion)."""
    level, depth = [value] if isinstance(value, (dict, list)) else [], 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list = []
        for item in level:
            below.extend(v for v in (item.values() if isinstance(item, dict) else item) if isinstance(v, (dict, list)))
        level = below
    return False


def parse_json_body(raw: bytes, *, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> Any:
    """A request body parsed as strict JSON, or an :class:`ApiError` (400) saying why not.

    NaN, Infinity and numbers that overflow a float are refused while parsing, and so are bodies nesting more
    than ``max_depth`` arrays/objects deep (Python's parser itself gives up with a ``RecursionError`` at
    about a thousand levels, which would otherwise be an internal error)."""
    too_deep = ApiError(f"the request body nests more than {max_depth} arrays/objects deep", code="json_too_deep")
    try:
        value = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:  # bad syntax, not UTF-8, an integer of more than 4300 digits
        raise ApiError(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if _deeper_than(value, max_depth):
        raise too_deep
    return value


# -------------------------------------------------------------------------------------------- requests
@dataclass
class ImagePart:
    """One ``image_url`` part: where it was (``param``) and its URL (a data URL or a local path)."""

    url: str
    param: str


@dataclass
class ChatRequest:
    """A validated request: alternating turns (user first and last) with slot markers, plus settings."""

    model: str
    turns: list[tuple[str, str]]  # (role, text); each image part became IMAGE_MARKER
    images: list[ImagePart]
    system: Optional[str] = None
    stream: bool = False
    include_usage: bool = False
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    top_k: int = 0  # 0: no limit
    repetition_penalty: float = 1.0

    def generation_options(self) -> dict:
        """Engine options; temperature 0 is greedy decoding."""
        opts: dict[str, Any] = {"do_sample": self.temperature > 0, "top_p": self.top_p, "seed": self.seed,
                                "top_k": self.top_k, "repetition_penalty": self.repetition_penalty}
        if self.temperature > 0:
            opts["temperature"] = self.temperature
        if self.max_tokens is not None:
            opts["max_new_tokens"] = self.max_tokens
        return opts


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(body: dict, key: str, default, lo: float, hi: float, *, lo_open: bool = False):
    value = body.get(key)
    if value is None:
        return default
    if not _is_number(value) or value > hi or value < lo or (lo_open and value == lo):
        lower = f"greater than {lo:g}" if lo_open else f"at least {lo:g}"
        raise ApiError(f"'{key}' must be a number {lower} and at most {hi:g}; got {value!r}", param=key,
                       code="invalid_value")
    return float(value)


def _json_equal(a, b) -> bool:
    """JSON equality: ``false`` is not ``0``, but ``0`` is ``0.0``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if _is_number(a) and _is_number(b):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def refuse_unserved_fields(body: dict) -> None:
    """Raise a 400 (``unsupported_parameter``) naming every field of ``body`` that this server would not honour;
    ``param`` is the first of them. A field set to ``null`` counts as absent, as OpenAI's clients mean it."""
    refused = []
    for key, value in body.items():
        if value is None or key in SERVED_FIELDS or key in IDENTIFIER_FIELDS:
            continue
        if any(_json_equal(value, neutral) for neutral in NEUTRAL_VALUES.get(key, ())):
            continue
        why = UNSERVED_REASONS.get(key, "not a chat-completions field this server knows")
        refused.append((key, f"'{key}' ({why})"))
    options = body.get("stream_options")
    if isinstance(options, dict):
        refused += [(f"stream_options.{k}", f"'stream_options.{k}' (only include_usage is supported)")
                    for k, v in options.items() if k not in STREAM_OPTION_FIELDS and v is not None]
    if refused:
        them = "it" if len(refused) == 1 else "them"
        raise ApiError(f"this server does not implement {', '.join(text for _, text in refused)}; leave {them} "
                       f"out (it implements {', '.join(SERVED_FIELDS)})", param=refused[0][0],
                       code="unsupported_parameter")


class _TextBudget:
    """The characters of text a request may still send; checked part by part, before any tokenising."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def take(self, text: str, param: str) -> None:
        self.used += len(text)
        if self.used > self.limit:
            raise ApiError(f"{param}: the messages hold more than {self.limit} characters of text, the most this "
                           "server accepts in one request", param=param, code="text_too_long")


def _text_of(text: Any, param: str, budget: _TextBudget) -> str:
    if not isinstance(text, str):
        raise ApiError(f"{param} must be a string", param=param, code="invalid_type")
    budget.take(text, param)
    glyphs = [g for g in (*IMAGE_GLYPHS, IMAGE_PLACEHOLDER) if g in text]
    if glyphs:
        raise ApiError(f"{param} contains {glyphs[0]!r}, which this model reads as an image slot; send each image as "
                       "an image_url part placed where it belongs instead", param=param, code="invalid_value")
    return text


def _content(message: dict, i: int, role: str, images: list[ImagePart], budget: _TextBudget) -> str:
    """A message's content as text, images replaced by slot markers in place."""
    param = f"messages[{i}].content"
    content = message.get("content")
    if isinstance(content, str):
        return _text_of(content, param, budget)
    if not isinstance(content, list) or not content:
        raise ApiError(f"{param} must be a string or a non-empty list of content parts", param=param,
                       code="invalid_type")
    pieces = []
    for j, part in enumerate(content):
        p = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(_text_of(part.get("text"), f"{p}.text", budget))
        elif kind == "image_url":
            if role != USER:
                raise ApiError(f"{p}: only user messages may contain images", param=p, code="invalid_value")
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str) or not url:
                raise ApiError(f"{p}.image_url.url must be a non-empty string", param=f"{p}.image_url.url",
                               code="invalid_type")
            if "\x00" in url:  # no file name or data URL holds one; the path functions would choke on it
                raise ApiError(f"{p}.image_url.url contains a NUL character", param=f"{p}.image_url",
                               code="invalid_image_url")
            images.append(ImagePart(url=url, param=f"{p}.image_url"))
            pieces.append(IMAGE_MARKER)
        else:
            raise ApiError(f"{p}.type must be 'text' or 'image_url'; got {kind!r}", param=f"{p}.type",
                           code="invalid_value")
    return "".join(pieces)


def parse_chat_request(body: Any, *, model_name: str, max_images: int, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
                       max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS,
                       max_stop_chars: int = DEFAULT_MAX_STOP_CHARS) -> ChatRequest:
    """Validate a ``/v1/chat/completions`` body; raise :class:`ApiError` naming the offending field."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError("'model' is required", param="model", code="missing_required_parameter")
    if model != model_name:
        raise ApiError(f"The model '{model}' does not exist; this server serves '{model_name}'", status=404,
                       param="model", code="model_not_found")
    refuse_unserved_fields(body)
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise ApiError(f"only n=1 is supported; got n={n!r}", param="n", code="unsupported_value")

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list", param="messages", code="missing_required_parameter")
    system_parts: list[str] = []
    turns: list[tuple[str, str]] = []
    images: list[ImagePart] = []
    budget = _TextBudget(max_text_chars)
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(f"messages[{i}] must be an object", param=f"messages[{i}]", code="invalid_type")
        role = message.get("role")
        if role in ("system", "developer"):
            if turns:
                raise ApiError(f"messages[{i}]: a {role} message must come before the conversation",
                               param=f"messages[{i}].role", code="invalid_value")
            system_parts.append(_content(message, i, role, images, budget))
            continue
        if role not in (USER, ASSISTANT):
            raise ApiError(f"messages[{i}].role must be system, user or assistant; got {role!r}",
                           param=f"messages[{i}].role", code="invalid_value")
        extra = [k for k, v in message.items() if k not in MESSAGE_FIELDS and v not in (None, "", [], {})]
        if extra:  # e.g. a participant's name or tool calls, which the model's template has no place for
            raise ApiError(f"messages[{i}]: this server does not implement the message field(s) "
                           f"{', '.join(map(repr, extra))}; send only role and content",
                           param=f"messages[{i}].{extra[0]}", code="unsupported_parameter")
        text = _content(message, i, role, images, budget)
        if turns and turns[-1][0] == role:  # the model's template alternates; join consecutive messages
            turns[-1] = (role, turns[-1][1] + "\n" + text)
        else:
            turns.append((role, text))
    if not turns or turns[0][0] != USER:
        raise ApiError("the conversation must start with a user message (after any system message)",
                       param="messages", code="invalid_value")
    if turns[-1][0] != USER:
        raise ApiError("the last message must come from the user", param="messages", code="invalid_value")
    if len(images) > max_images:
        raise ApiError(f"this request has {len(images)} images; at most {max_images} are allowed per request",
                       param="messages", code="too_many_images")

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        raise ApiError(f"'{key}' must be a positive integer; got {max_tokens!r}", param=key, code="invalid_value")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= max_stop_strings:
        stops = list(stop)
    else:
        raise ApiError(f"'stop' must be a string or a list of at most {max_stop_strings} strings", param="stop",
                       code="invalid_value")
    if any(not s for s in stops):
        raise ApiError("'stop' strings must not be empty", param="stop", code="invalid_value")
    if any(len(s) > max_stop_chars for s in stops):
        raise ApiError(f"'stop' strings may be at most {max_stop_chars} characters long", param="stop",
                       code="invalid_value")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError("'seed' must be an integer", param="seed", code="invalid_type")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ApiError(f"'seed' must be a 64-bit signed integer (from {SEED_RANGE[0]} to {SEED_RANGE[1]})",
                       param="seed", code="invalid_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError("'stream' must be true or false", param="stream", code="invalid_type")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError("'stream_options' must be an object", param="stream_options", code="invalid_type")
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < -1):
        raise ApiError(f"'top_k' must be an integer, at least 1 (0 or -1: no limit); got {top_k!r}", param="top_k",
                       code="invalid_value")
    return ChatRequest(
        model=model, turns=turns, images=images,
        system="\n".join(system_parts) if system_parts else None,
        stream=stream, include_usage=bool(stream_options.get("include_usage", False)),
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=max(0, top_k or 0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, MAX_REPETITION_PENALTY, lo_open=True),
        stop=stops, seed=seed)


# ---------------------------------------------------------------------------------------------- responses
def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(*, id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict:
    return {
        "id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(*, id: str, model: str, created: int, delta: dict, finish_reason: Optional[str] = None,
               usage_: Optional[dict] = None, empty_choices: bool = False) -> dict:
    body = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [] if empty_choices else [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish_reason}]}
    if usage_ is not None or empty_choices:
        body["usage"] = usage_
    return body


class DeltaTracker:
    """Turns "answer so far" snapshots into append-only deltas for streaming.

    The engine's snapshots only grow: a tail that could still become a stop string is held back until it
    resolves (:func:`sparkles.engine.decoding.partial_answer`). A snapshot that does not extend what was sent
    (a stray "Assistant:" makes the engine restart the answer) adds nothing, since a delta cannot be taken back.
    """

    def __init__(self) -> None:
        self.sent = ""

    def update(self, text: str) -> str:
        if not text.startswith(self.sent):
            return ""
        delta = text[len(self.sent):]
        self.sent = text
        return delta
