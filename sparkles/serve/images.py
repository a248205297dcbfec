"""Turn an ``image_url`` of an API request into a PIL image, safely.

Accepted: ``data:image/...;base64,...`` URLs, and — only when the server was started with
``--allowed-image-dir`` — local files inside those directories (``file://`` URLs or plain paths; symlinks are
resolved before the check). Remote ``http(s)`` URLs are refused: the server never fetches from the network.
Decoding goes through :func:`sparkles.processors.image.open_image`: only PNG, JPEG, WEBP, GIF and BMP, at most
``MAX_IMAGE_PIXELS`` pixels (checked before decoding), a bounded number of decodes at once. Every refusal is an
:class:`ApiError` (400): ``invalid_image`` or ``image_too_large``.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote, urlparse

from .openai_format import ApiError

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024


def _decode(data: bytes, param: str, what: str):
    """Decode through :func:`sparkles.processors.image.open_image` (allowed formats only, pixel cap, bounded
    concurrency), answering its errors with a 400."""
    from ..processors.image import ImageLoadError, ImageTooLargeError, UnsupportedImageError, open_image

    try:
        return open_image(data, what=what)
    except ImageTooLargeError as exc:
        message, code = f"{param}: {what} is too large: {exc.reason}", exc.code
    except UnsupportedImageError as exc:  # reason: "not a PNG, JPEG, WEBP, GIF or BMP image"
        message, code = f"{param}: {what} is {exc.reason}", exc.code
    except ImageLoadError as exc:
        message, code = f"{param}: {what} is not an image we can decode ({exc.reason})", exc.code
    raise ApiError(message, param=param, code=code)


def _from_data_url(url: str, param: str, max_bytes: int):
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ApiError(f"{param}: data URLs must look like data:image/png;base64,<data>", param=param,
                       code="invalid_image_url")
    if len(payload) * 3 // 4 > max_bytes:
        raise ApiError(f"{param}: the image is larger than {max_bytes // (1024 * 1024)} MiB", param=param,
                       code="image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(f"{param}: the data URL is not valid base64", param=param, code="invalid_image") from None
    return _decode(data, param, "the data URL")


def _from_local(url: str, param: str, allowed_dirs: Sequence[Path], max_bytes: int):
    if not allowed_dirs:
        raise ApiError(f"{param}: this server does not read local files; send the image inline as a data URL "
                       "(data:image/png;base64,...), or start the server with --allowed-image-dir", param=param,
                       code="local_images_disabled")
    raw = unquote(urlparse(url).path) if url.startswith("file://") else url
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = allowed_dirs[0] / path
    resolved = path.resolve()
    if not any(resolved == d or resolved.is_relative_to(d) for d in allowed_dirs):
        raise ApiError(f"{param}: {raw!r} is outside the directories this server may read images from",
                       param=param, code="image_path_not_allowed")
    if not resolved.is_file():
        raise ApiError(f"{param}: image file not found: {raw!r}", param=param, code="image_not_found")
    with open(resolved, "rb") as f:  # read at most one byte past the limit, whatever the size was at stat()
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ApiError(f"{param}: the image is larger than {max_bytes // (1024 * 1024)} MiB", param=param,
                       code="image_too_large")
    return _decode(data, param, repr(raw))


def load_image_url(url: str, *, param: str, allowed_dirs: Sequence[str | os.PathLike] = (),
                   max_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
    """The RGB image an ``image_url`` names, or an :class:`ApiError` (400) saying why not."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _from_data_url(url, param, max_bytes)
    if scheme in ("http", "https"):
        raise ApiError(f"{param}: this server does not download images from the web; send the image inline as a "
                       "data URL (data:image/png;base64,...)", param=param, code="remote_image_url_not_supported")
    if scheme in ("", "file") or len(scheme) == 1:  # plain paths (a one-letter scheme is a Windows drive)
        dirs = [Path(d).expanduser().resolve() for d in allowed_dirs]
        return _from_local(url, param, dirs, max_bytes)
    raise ApiError(f"{param}: unsupported URL scheme {scheme!r}; use a data URL", param=param,
                   code="invalid_image_url")
