"""Exceptions of the GPT client and the secret scrubbing applied to every message they carry."""

from __future__ import annotations

import re

# OpenAI keys (sk-..., sk-proj-...) and bearer tokens; server error bodies sometimes echo part of the key.
_KEY_PATTERN = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{4,}|Bearer\s+[A-Za-z0-9_\-.]{8,})")

_URL_USERINFO = re.compile(r"://[^/@\s]+@")  # credentials written into an endpoint URL


def redact(text: str, secrets: tuple[str | None, ...] = ()) -> str:
    """``text`` with the given secrets and anything shaped like an API key replaced by ``***``."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return _URL_USERINFO.sub("://***@", _KEY_PATTERN.sub("***", text))


class MissingAPIKeyError(RuntimeError):
    """No API key was configured (``OPENAI_API_KEY``)."""


class GPTCallError(RuntimeError):
    """A chat call failed for good: the error was not retryable, or the retries were used up.

    Attributes: ``model`` (the requested model), ``status`` (HTTP status or None), ``kind`` (a short error
    class such as ``rate_limit``, ``server_error``, ``timeout``, ``connection``, ``bad_response``, ``auth``,
    ``bad_request``, ``content_filter``), ``retryable`` (whether the last error was of a retryable kind) and
    ``attempts`` (HTTP attempts made). The message never contains the API key.
    """

    def __init__(self, message: str, *, model: str, kind: str, status: int | None = None,
                 retryable: bool = False, attempts: int = 1) -> None:
        super().__init__(message)
        self.model = model
        self.kind = kind
        self.status = status
        self.retryable = retryable
        self.attempts = attempts

    def to_dict(self) -> dict:
        return {"error": str(self), "model": self.model, "kind": self.kind, "status": self.status,
                "retryable": self.retryable, "attempts": self.attempts}
