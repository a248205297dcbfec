"""Weight files of a model config, local or named by URL; a URL is downloaded once into a cache and read there.

Any weight path of the model config (``model.vit_weights``, ``model.q_former_model``, ``model.ckpt``) may be an
``https://`` (or ``http://``) URL, e.g. the BLIP-2 authors' public EVA-ViT-g and Q-Former files. The first load
downloads it into ``$SPARKLES_CACHE`` (default ``~/.cache/sparkles/weights``) with a progress bar, checks its
SHA-256 when one is known (a ``#sha256=<hex>`` fragment of the URL, else :data:`KNOWN_SHA256`), and later loads
read the cached file. The download goes through the project's atomic writer, so a failed, cut or mismatching
download leaves no file at the cache path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Optional

from ..common.io import atomic_write
from ..common.paths import resolve_path
from .loaders import CheckpointError

log = logging.getLogger(__name__)

CACHE_ENV = "SPARKLES_CACHE"
DEFAULT_CACHE = "~/.cache/sparkles/weights"
# SHA-256 of files whose checksum is published, by URL (without fragment); a URL's #sha256= fragment overrides it.
KNOWN_SHA256: dict[str, str] = {}
CHUNK = 1 << 20
TIMEOUT_S = 60  # per network read: a stalled server fails the load instead of hanging it


class WeightDownloadError(CheckpointError):
    """A weight URL could not be fetched or its content is not the expected one; the message names the URL."""


def is_url(value: str | os.PathLike) -> bool:
    return urllib.parse.urlsplit(str(value)).scheme.lower() in ("http", "https")


def split_checksum(url: str) -> tuple[str, Optional[str]]:
    """``url`` → (the URL without its fragment, the expected SHA-256 in lower case or None)."""
    base, fragment = urllib.parse.urldefrag(url)
    if fragment:
        m = re.fullmatch(r"sha256=([0-9a-fA-F]{64})", fragment)
        if not m:
            raise WeightDownloadError(f"{url}: the only URL fragment understood is #sha256=<64 hex digits>")
        return base, m.group(1).lower()
    known = KNOWN_SHA256.get(base)
    return base, known.lower() if known else None


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def cache_path(url: str) -> Path:
    """Where ``url``'s file is cached: ``<cache>/<key>/<file name>``, the key a digest of the URL and of the
    expected checksum (a file fetched under another expected checksum is not taken for this one)."""
    base, expected = split_checksum(url)
    key = hashlib.sha256(f"{base}#{expected or ''}".encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(urllib.parse.urlsplit(base).path).name).lstrip(".") or "weights"
    return cache_dir() / key / name


def fetch(url: str, *, progress: bool = True) -> Path:
    """The cached file of ``url``, downloaded (and checked) first when absent."""
    base, expected = split_checksum(url)
    path = cache_path(url)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # one download per file when several processes (torchrun) start together: the others wait, then read it
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return path
        log.info("downloading %s into %s", base, path)
        atomic_write(path, lambda f: _download(base, f, expected, progress))
    return path


def _download(url: str, out: IO[bytes], expected: Optional[str], progress: bool) -> None:
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "sparkles"})
    try:
        with contextlib.ExitStack() as stack:
            response = stack.enter_context(urllib.request.urlopen(request, timeout=TIMEOUT_S))
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                           desc=Path(urllib.parse.urlsplit(url).path).name, disable=not progress))
            digest, received = hashlib.sha256(), 0
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise WeightDownloadError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise WeightDownloadError(f"cannot download {url}: {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise WeightDownloadError(f"cannot download {url}: {type(exc).__name__}: {exc}") from None
    if total is not None and received != total:
        raise WeightDownloadError(f"cannot download {url}: got {received} of {total} bytes")
    actual = digest.hexdigest()
    if expected is not None and actual != expected:
        raise WeightDownloadError(f"{url}: checksum mismatch: expected sha256 {expected}, got {actual} "
                                  "(the download was discarded)")


def weight_path(value: str, root: str | os.PathLike | None, *, what: str) -> Path:
    """A config's weight file: a URL's cached download, else ``value`` resolved against the Sparkles root."""
    return fetch(value) if is_url(value) else resolve_path(value, root, what=what)
