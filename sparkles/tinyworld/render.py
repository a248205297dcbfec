"""Pillow renderer for synthetic scenes: a pure function of the scene record and the image size.

Shapes are drawn on a supersampled canvas and downsampled (Pillow's polygon fill has no anti-aliasing), with a
darker outline so that even yellow on cream stays visible after a resize to 64×64. Rendering many images is
spread over worker processes; the output does not depend on the number of workers.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .scenes import BACKGROUND_RGB, COLOUR_RGB, GRID, Scene

# Geometry in units of one grid cell. Large radius + jitter is chosen so that neighbouring objects never touch.
LARGE_RADIUS = 0.40
SMALL_RADIUS = 0.26
JITTER = 0.06
SUPERSAMPLE = 3
JPEG_QUALITY = 95


def object_geometry(obj, size: int) -> tuple[float, float, float]:
    """Centre x, centre y and radius in pixels of an object in a ``size``×``size`` image."""
    cell = size / GRID
    cx = (obj.col + 0.5 + JITTER * obj.jitter[0]) * cell
    cy = (obj.row + 0.5 + JITTER * obj.jitter[1]) * cell
    r = (LARGE_RADIUS if obj.size == "large" else SMALL_RADIUS) * cell
    return cx, cy, r


def _background(scene: Scene, n: int):
    # Pillow's own gradient and compositing (C code) instead of float arrays: rendering dominates generation time.
    from PIL import Image

    bg = scene.background
    a = Image.new("RGB", (n, n), BACKGROUND_RGB[bg.colours[0]])
    if bg.style == "plain":
        return a
    b = Image.new("RGB", (n, n), BACKGROUND_RGB[bg.colours[1]])
    return Image.composite(b, a, _gradient_mask(bg.style, n))


@functools.lru_cache(maxsize=16)
def _gradient_mask(style: str, n: int):
    """0 at the top/left edge, 255 at the bottom/right edge (diagonal: the mean of both)."""
    from PIL import Image

    vertical = Image.linear_gradient("L").resize((n, n), Image.BILINEAR)
    horizontal = vertical.transpose(Image.Transpose.ROTATE_90).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if style == "vertical":
        return vertical
    if style == "horizontal":
        return horizontal
    return Image.blend(vertical, horizontal, 0.5)


def render_scene(scene: Scene, size: int = 96):
    """The scene as an RGB PIL image of ``size``×``size`` pixels."""
    from PIL import ImageDraw

    n = size * SUPERSAMPLE
    img = _background(scene, n)
    draw = ImageDraw.Draw(img)
    outline_width = max(1, round(n / 48))
    for obj in scene.objects:
        cx, cy, r = object_geometry(obj, n)
        fill = COLOUR_RGB[obj.colour]
        outline = tuple(int(v * 0.55) for v in fill)
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=outline_width)
        elif obj.shape == "square":
            h = r * 0.88
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill, outline=outline, width=outline_width)
        elif obj.shape == "triangle":
            # Equilateral, pointing up, circumradius slightly above r so its area is comparable to the others.
            R = r * 1.12
            pts = [(cx + R * math.cos(math.radians(a)), cy + 0.12 * r - R * math.sin(math.radians(a)))
                   for a in (90, 210, 330)]
            draw.polygon(pts, fill=fill, outline=outline, width=outline_width)
        else:  # pragma: no cover - Scene.from_record already rejects unknown shapes
            raise ValueError(f"unknown shape {obj.shape!r}")
    # Box-filter reduction of the supersampled canvas = area anti-aliasing of the edges.
    return img.reduce(SUPERSAMPLE)


def save_scene_image(scene: Scene, path: str | os.PathLike, size: int) -> None:
    """Render and write one image (PNG for a ``.png`` path, else JPEG); the parent directory must exist."""
    img = render_scene(scene, size)
    if str(path).lower().endswith(".png"):
        img.save(path, format="PNG")
    else:
        # No chroma subsampling: at 96 px it would smear colours across the object edges.
        img.save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=0)


def _render_chunk(jobs: list[tuple[Scene, str, int]]) -> int:
    for scene, path, size in jobs:
        save_scene_image(scene, path, size)
    return len(jobs)


def render_all(jobs: list[tuple[Scene, str, int]], *, workers: int = 1, progress=None) -> None:
    """Write every (scene, path, size) job; ``progress(n)`` is called with the number done per chunk."""
    for parent in sorted({str(Path(path).parent) for _scene, path, _size in jobs}):
        Path(parent).mkdir(parents=True, exist_ok=True)
    if workers <= 1 or len(jobs) < 64:
        for i in range(0, len(jobs), 256):
            _render_chunk(jobs[i:i + 256])
            if progress:
                progress(len(jobs[i:i + 256]))
        return
    chunk = max(16, min(256, len(jobs) // (workers * 4) or 1))
    chunks = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for done in pool.map(_render_chunk, chunks):
            if progress:
                progress(done)
