"""Persistent response cache (SQLite) so that a finished GPT call is never paid for twice.

The key is a SHA-256 of the full request — endpoint (without credentials), model, messages, every sampling
parameter — plus an optional caller tag (e.g. a generation case id, so two cases that happen to build the same
prompt still get independent samples). Only successful completions are stored. The file holds prompts and
answers but never the API key (the request never contains it).

One connection, shared by the client's worker threads behind a lock; WAL mode so another process (a second
run, an inspection tool) can read while a run writes. Each answer is committed as soon as it arrives.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    request TEXT NOT NULL,
    text TEXT NOT NULL,
    response_model TEXT,
    finish_reason TEXT,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created REAL NOT NULL
)
"""


def request_key(endpoint: str, request: dict, tag: str | None = None) -> str:
    """Stable hash of everything that determines an answer."""
    payload = json.dumps({"endpoint": endpoint, "request": request, "tag": tag}, sort_keys=True,
                         ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedResponse:
    text: str
    response_model: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class ResponseCache:
    """SQLite-backed map from request key to the answer; usable from several threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(_SCHEMA)
            self._conn.commit()
        except sqlite3.DatabaseError as exc:
            raise RuntimeError(f"GPT response cache {self.path} is not a usable SQLite file: {exc}") from exc

    def get(self, key: str) -> CachedResponse | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT text, response_model, finish_reason, prompt_tokens, completion_tokens "
                "FROM responses WHERE key = ?", (key,)).fetchone()
        return CachedResponse(*row) if row else None

    def put(self, key: str, request: dict[str, Any], answer: CachedResponse) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, json.dumps(request, ensure_ascii=False, sort_keys=True), answer.text, answer.response_model,
                 answer.finish_reason, int(answer.prompt_tokens), int(answer.completion_tokens), time.time()))
            self._conn.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "ResponseCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
