"""Files that survive a crash, read back with errors that name them: the project's one writer and one JSON reader.

Every file the project writes in place (checkpoints, towers, evaluation shards and manifests, paid GPT work,
HTML pages, world files) goes through :func:`atomic_write`, so a killed process leaves the old content or the
new, never half of either. Paid GPT calls are appended one durable line at a time (:func:`append_jsonl`).
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path
from typing import IO, Any, Callable, Optional, Union

from .paths import MissingPathError

Content = Union[bytes, str, Callable[[IO[bytes]], Any]]


def atomic_write(path: str | os.PathLike, content: Content) -> Path:
    """Write ``content`` (bytes, text as UTF-8, or a function that writes into the open binary file) to ``path``.

    The data goes into a new file beside ``path``, is flushed to disk, and is then renamed over ``path`` in one
    step. The file gets the permissions a plain ``open`` gives (0666 less the umask; the kernel applies the umask,
    so no thread reads or changes it), or, when ``path`` exists, that file's permissions (a rewritten script stays
    executable, a private file stays private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        kept_mode: Optional[int] = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        kept_mode = None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            if kept_mode is not None:
                os.chmod(tmp, kept_mode)
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: Optional[int] = 2) -> Path:
    """``data`` as UTF-8 JSON (non-ASCII kept as written) and a final newline, through :func:`atomic_write`."""
    return atomic_write(path, json.dumps(data, ensure_ascii=False, indent=indent) + "\n")


def read_json(path: str | os.PathLike, *, what: str = "JSON file", error: Optional[type[Exception]] = None) -> Any:
    """The parsed content of a JSON file.

    A missing file raises :class:`MissingPathError`, content that is not UTF-8 JSON a ``ValueError``; both name
    ``what``, the path and (for bad JSON) the line and column. ``error`` replaces both types, so that each
    caller reports in its own terms (e.g. ``DataError`` for training data).
    """
    path = Path(path)
    if not path.is_file():
        raise (error or MissingPathError)(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        message = f"{what} {path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
    except UnicodeDecodeError as exc:
        message = f"{what} {path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
    raise (error or ValueError)(message) from None


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append one JSON record as a line and fsync it (one finished, paid-for call = one durable line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike, *, repair: bool = True) -> list[Any]:
    """Records of a JSON-lines file. A torn last line (process killed mid-write) is dropped, and with
    ``repair`` the file is rewritten without it; a bad line elsewhere is an error naming file and line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    records: list[Any] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1 and not line.endswith("\n"):
                if repair:
                    atomic_write(path, "".join(lines[:i]))
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({exc})") from exc
    return records
