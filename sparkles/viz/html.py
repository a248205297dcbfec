"""Self-contained HTML pages for SparklesDialogue, SparklesEval results and BISON/NLVR2 results.

Pages carry their CSS and JavaScript inline (no CDN), escape every piece of text that comes from data
(captions, prompts and GPT replies routinely contain ``<Img>`` markers and may contain anything else), give
every element a unique id, and load images lazily so a 4,521-dialogue file stays usable; the ``write_*``
helpers also split long files into pages. A Content-Security-Policy admits only the page's own script (by
hash), so even a text that slipped past escaping could not run.

Library API (the evaluation merge step writes ``.html`` next to merged results with these):

``render_dialogue_page(items, image_url_fn=None, *, title="SparklesDialogue", model_name=None,
                       summary=None, start_index=0, pages=None) -> str``
    ``items``: SparklesDialogue records or SparklesEval annotation/result records
    (judge entries such as ``"gpt-4": {"A1_C123_scores": [...], ...}`` are shown).
    ``image_url_fn(image_id: str) -> str | None`` maps an image id to the URL written into the page (None: no
    image known, the id is shown as text); default ``relative_image_url()`` = ``../images/<image_id>.jpg``.
    ``summary``: extra ``{label: value}`` rows for the page header (per-judge means are added automatically).
    ``start_index``/``pages``: used by the writer for pagination.

``render_choice_results_page(items, accuracy=None, *, image_url_fn=None, title="Results",
                             model_name=None, summary=None, start_index=0, pages=None) -> str``
    ``items``: BISON/NLVR2 result records (label, predict, prompt, response, sentence, img_paths,
    evaluation_id). ``accuracy`` defaults to ``choice_accuracy(items)`` (all items, not just this page).
    ``image_url_fn(img_path: str) -> str | None`` (None: the recorded path is shown as text instead of an
    image); default ``relative_path_url()`` = ``../images/<file name>``.

Both pages show what else an item carries: failed items (an ``error``, or a ``status`` other than ok/done) get a
visible failure line, failed judgements (a judge entry with ``error`` instead of scores) are listed under their
judge, and any further keys (``generations``, ``warnings``, ``model_input``, ...) appear as name/value rows.

``write_dialogue_page(items, path, *, image_url_fn=None, relative_dir="../images", page_size=500, **kw)``
``write_choice_results_page(items, path, accuracy=None, *, image_url_fn=None, relative_dir="../images",
                            page_size=500, **kw)``
    Write ``path`` (and ``<stem>_page<k>.html`` beside it when there are more than ``page_size`` items,
    linked from each other); return the written paths. Writes are atomic (temp file + rename).

``relative_image_url(relative_dir="../images", ext=".jpg")``, ``relative_path_url(relative_dir="../images")``,
``choice_accuracy(items) -> float``, ``judge_summary(items) -> dict``, ``failure_of(item) -> str | None``,
``choice_text(value) -> str`` (labels and predictions are written alike: ``IMAGE#2``, ``True``) and
``reference_dialogues_label(annotation_path) -> str`` (who wrote a file's reference dialogues: GPT-4 for upstream's
data, the templates of a generated world whose ``world/manifest.json`` lists the file) are public helpers.

Clicking an image opens it in a viewer, never below its natural size; small images are enlarged by whole factors
with square pixels (``image-rendering: pixelated``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import urllib.parse
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePath
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..common.io import atomic_write, read_json
from ..common.paths import WORLD_MANIFEST, WORLD_MANIFEST_FORMAT, WORLD_REPORT
from ..conversation.template import IMAGE_MARKER as SLOT

CAPTION_PREVIEW_CHARS = 100
EXTRA_PREVIEW_CHARS = 200
DEFAULT_PAGE_SIZE = 500
JUDGE_KEYS = ("A1_C123_scores", "A2_C123_scores")
# The fields each page lays out itself; any other key of an item is shown as a name/value row. "raw" (the GPT
# exchange behind a SparklesDialogue record) is left out: it is several times longer than the dialogue.
DIALOGUE_FIELDS = frozenset({"evaluation_id", "dialogue", "raw"})
CHOICE_FIELDS = frozenset({"label", "prompt", "img_paths", "predict", "response", "sentence", "evaluation_id"})
FAILURE_FIELDS = ("status", "error")
_OK_STATUSES = ("ok", "done", "success")

__all__ = [
    "render_dialogue_page", "render_choice_results_page", "write_dialogue_page", "write_choice_results_page",
    "relative_image_url", "relative_path_url", "choice_accuracy", "judge_summary", "page_paths", "failure_of",
    "choice_text", "world_author", "reference_dialogues_label",
]


# --------------------------------------------------------------------------------------------------------
# URL helpers
# --------------------------------------------------------------------------------------------------------
def relative_image_url(relative_dir: str = "../images", ext: str = ".jpg") -> Callable[[str], str]:
    """URL maker for dialogue images: ``<relative_dir>/<image_id><ext>`` (the id is percent-encoded)."""
    base = relative_dir.rstrip("/")

    def url(image_id: str) -> str:
        name = urllib.parse.quote(f"{image_id}{ext}")
        return f"{base}/{name}" if base else name

    return url


def relative_path_url(relative_dir: str = "../images") -> Callable[[str], str]:
    """URL maker for result files whose ``img_paths`` are absolute paths on the machine that ran evaluation."""
    base = relative_dir.rstrip("/")

    def url(img_path: str) -> str:
        # Result files record paths of the evaluation machine; only the file name is portable.
        name = urllib.parse.quote(PurePath(str(img_path).replace("\\", "/")).name)
        return f"{base}/{name}" if base else name

    return url


# --------------------------------------------------------------------------------------------------------
# Who wrote the dialogues of a file
# --------------------------------------------------------------------------------------------------------
# A generated synthetic world lists every file it wrote in its manifest (common.paths.WORLD_MANIFEST). Its
# dialogues and reference answers come from the world's templates; only the upstream formats it mimics say "gpt-4".
UPSTREAM_AUTHOR = "gpt-4"  # SparklesDialogue and SparklesEval's reference dialogues were written by GPT-4


def world_author(path: str | os.PathLike) -> str | None:
    """Who wrote a generated world's file: ``the synthetic world's templates (seed <s>), no language model`` when
    the world manifest of a folder above ``path`` lists the file, else None. The manifest (and the world's
    generation report, for the seed) is read as data."""
    target = Path(path).resolve()
    for root in target.parents:
        manifest = root / WORLD_MANIFEST
        if not manifest.is_file():
            continue
        try:
            data = read_json(manifest, what="world manifest")
            listed = data.get("format") == WORLD_MANIFEST_FORMAT and target.relative_to(root).as_posix() in set(
                data.get("files") or [])
        except (ValueError, OSError, AttributeError, TypeError):
            return None  # an unreadable manifest proves nothing either way
        if not listed:
            return None
        try:
            seed = read_json(root / WORLD_REPORT, what="world report")["config"]["seed"]
        except (ValueError, OSError, KeyError, TypeError):
            seed = None
        return "the synthetic world's templates" + (f" (seed {seed})" if seed is not None else "") + \
            ", no language model"
    return None


def reference_dialogues_label(path: str | os.PathLike) -> str:
    """The page's name for the author of a SparklesDialogue/SparklesEval annotation file's dialogues (``path``):
    ``gpt-4 (reference dialogues)`` for upstream's data, the world's templates for a generated world's."""
    return f"{world_author(path) or UPSTREAM_AUTHOR} (reference dialogues)"


# --------------------------------------------------------------------------------------------------------
# Text → segments (the templates render each kind; all escaping happens in Jinja's autoescape)
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    # "text" | "slot" (inline thumbnail) | "orphan" (marker without an image) | "missing" (an image whose file is
    # unknown) | "mention"
    kind: str
    text: str
    url: str | None = None
    image_id: str | None = None


def _mention_pattern(image_ids: Iterable[str]) -> re.Pattern[str] | None:
    ids = sorted({str(i) for i in image_ids if str(i)}, key=len, reverse=True)
    if not ids:
        return None
    alternatives = "|".join(re.escape(i) for i in ids)
    # The look-ahead makes matches whole-id: "#14" must not light up inside "#1417".
    return re.compile(r"(?:IMAGE\s?)?#(?P<id>" + alternatives + r")(?![0-9A-Za-z_])", re.IGNORECASE)


def split_text(text: str, slot_images: Sequence[tuple[str, str]], mention_urls: Mapping[str, str]) -> list[Segment]:
    """Split ``text`` into plain text, slot thumbnails (k-th marker ↔ ``slot_images[k]``) and id mentions.

    ``slot_images`` holds ``(image_id, url)`` pairs in order; ``mention_urls`` maps an id to its URL (ids are
    matched case-insensitively, whole ids only). A None URL makes a slot a "missing" segment and a mention
    plain text.
    """
    mention_urls = {k: v for k, v in mention_urls.items() if v}
    mention_re = _mention_pattern(mention_urls)
    lower_urls = {k.lower(): (k, v) for k, v in mention_urls.items()}
    segments: list[Segment] = []
    slot_index = 0

    def add_text(chunk: str) -> None:
        if not chunk:
            return
        if mention_re is None:
            segments.append(Segment("text", chunk))
            return
        pos = 0
        for m in mention_re.finditer(chunk):
            if m.start() > pos:
                segments.append(Segment("text", chunk[pos:m.start()]))
            image_id, url = lower_urls[m.group("id").lower()]
            segments.append(Segment("mention", m.group(0), url=url, image_id=image_id))
            pos = m.end()
        if pos < len(chunk):
            segments.append(Segment("text", chunk[pos:]))

    parts = text.split(SLOT)
    for k, part in enumerate(parts):
        add_text(part)
        if k == len(parts) - 1:
            break
        if slot_index < len(slot_images):
            image_id, url = slot_images[slot_index]
            # No URL: the image is unknown on this machine; keep the marker as text rather than a broken image.
            segments.append(Segment("slot" if url else "missing", SLOT, url=url, image_id=image_id))
        else:
            # More markers than images: show the marker itself so the mismatch is visible, not hidden.
            segments.append(Segment("orphan", SLOT))
        slot_index += 1
    return segments


# --------------------------------------------------------------------------------------------------------
# Item preparation
# --------------------------------------------------------------------------------------------------------
def _fmt_score(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{float(value):g}"
    return str(value)


def _judge_entries(item: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """Every judge entry of an item: with score vectors, or a failed judgement (``error`` with the judge's
    ``prompt``/``response``, as the evaluation records a reply that never parsed)."""
    return [(k, v) for k, v in item.items()
            if isinstance(v, Mapping) and (any(key in v for key in JUDGE_KEYS)
                                           or ("error" in v and ("response" in v or "prompt" in v)))]


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, indent=1, default=str)


def failure_of(item: Mapping[str, Any]) -> str | None:
    """What went wrong with a failed item (an ``error``, or a ``status`` other than ok/done), else None."""
    status, error = item.get("status"), item.get("error")
    status_ok = status is None or str(status).strip().lower() in _OK_STATUSES
    if error in (None, "") and status_ok:
        return None
    head = "failed" if status_ok else str(status)
    return f"{head}: {_value_text(error)}" if error not in (None, "") else head


def _extras(item: Mapping[str, Any], known: frozenset) -> list[dict[str, Any]]:
    judges = {k for k, _ in _judge_entries(item)}
    out = []
    for key, value in item.items():
        if key in known or key in judges or key in FAILURE_FIELDS:
            continue
        full = _value_text(value)
        short, truncated = _short(full, EXTRA_PREVIEW_CHARS)
        out.append({"name": str(key), "full": full, "short": short, "truncated": truncated})
    return out


def _short(text: str, limit: int = CAPTION_PREVIEW_CHARS) -> tuple[str, bool]:
    if len(text) <= limit:
        return text, False
    return text[:limit] + "...", True


def _prepare_dialogue(index: int, item: Any, image_url_fn: Callable[[str], str | None]) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise ValueError(f"record {index}: expected an object with a 'dialogue' list")
    failure = failure_of(item)
    dialogue = item.get("dialogue")
    if dialogue is None and failure is not None:
        dialogue = []  # a failed item may hold no dialogue at all; its failure line says why
    if not isinstance(dialogue, list):
        raise ValueError(f"record {index}: expected an object with a 'dialogue' list")
    images: list[dict[str, Any]] = []
    seen: dict[str, str | None] = {}
    messages = []
    # First pass: every image of the dialogue, so a turn-2 mention of a turn-1 image still links.
    for j, msg in enumerate(dialogue):
        if not isinstance(msg, Mapping):
            raise ValueError(f"record {index}: message {j} is not an object")
        msg_images = msg.get("images") or []
        if not isinstance(msg_images, list):
            raise ValueError(f"record {index}: message {j}: field 'images' is not a list")
        for k, img in enumerate(msg_images):
            if not isinstance(img, Mapping) or "image_id" not in img:
                raise ValueError(f"record {index}: message {j}: images[{k}] has no 'image_id'")
            image_id = str(img["image_id"])
            url = image_url_fn(image_id)
            caption = "" if img.get("caption") is None else str(img.get("caption"))
            short, truncated = _short(caption)
            images.append({"id": image_id, "url": url, "caption": caption, "short": short,
                           "truncated": truncated, "message": j})
            seen.setdefault(image_id, url)
    for j, msg in enumerate(dialogue):
        for field in ("role", "content"):
            if field not in msg:
                raise ValueError(f"record {index}: message {j} has no '{field}'")
        slot_images = [(str(img["image_id"]), image_url_fn(str(img["image_id"])))
                       for img in (msg.get("images") or [])]
        role = str(msg["role"])
        messages.append({"role": role, "is_user": role.lower() in ("user", "human"),
                         "segments": split_text(str(msg["content"]), slot_images, seen)})
    judges = []
    for name, entry in _judge_entries(item):
        turns = []
        for turn, key in ((1, "A1_C123_scores"), (2, "A2_C123_scores")):
            scores = entry.get(key)
            if isinstance(scores, (list, tuple)) and scores:
                labels = [f"A{turn}"] + [f"C{c}" for c in range(1, len(scores))]
                turns.append({"turn": turn, "scores": [(lab, _fmt_score(s)) for lab, s in zip(labels, scores)]})
        response = "" if entry.get("response") is None else str(entry.get("response"))
        short, truncated = _short(response)
        error = entry.get("error")
        judges.append({"name": str(name), "turns": turns, "response": response, "short": short,
                       "truncated": truncated, "error": None if error in (None, "") else _value_text(error)})
    return {"index": index, "evaluation_id": item.get("evaluation_id"), "images": images,
            "messages": messages, "judges": judges, "failure": failure, "extras": _extras(item, DIALOGUE_FIELDS)}


_IMAGE_CHOICE = re.compile(r"image\s*#\s*(\d+)", re.IGNORECASE)


def choice_text(value: Any) -> str:
    """A BISON/NLVR2 label or prediction as the page writes both: ``IMAGE#<k>``, ``True``/``False``.

    Result files hold the gold label as the annotations spell it (``IMAGE#2``, ``True``) and the prediction as the
    answer reader returns it (``image#2``, ``true``); the page writes the two alike so that they compare at a glance.
    Any other text is shown as it is.
    """
    text = str(value).strip()
    image = _IMAGE_CHOICE.fullmatch(text)
    if image:
        return f"IMAGE#{image.group(1)}"
    return text.capitalize() if text.lower() in ("true", "false") else text


def _is_correct(item: Mapping[str, Any]) -> bool:
    predict, label = item.get("predict"), item.get("label")
    if predict is None or label is None:
        return False
    return str(predict).strip().lower() == str(label).strip().lower()


def choice_accuracy(items: Sequence[Mapping[str, Any]]) -> float:
    """Share of items whose ``predict`` equals ``label`` (case-insensitive); 0.0 for no items."""
    return sum(_is_correct(it) for it in items) / len(items) if items else 0.0


def _prepare_choice(index: int, item: Any, image_url_fn: Callable[[str], str | None]) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise ValueError(f"record {index}: expected an object")
    paths = item.get("img_paths") or []
    if not isinstance(paths, list):
        raise ValueError(f"record {index}: field 'img_paths' is not a list")
    urls = [image_url_fn(str(p)) for p in paths]
    # In the prompts, IMAGE#1 / IMAGE#2 name positions, so mentions map to the k-th image.
    mention_urls = {str(k + 1): u for k, u in enumerate(urls)}
    slot_images = [(str(k + 1), u) for k, u in enumerate(urls)]
    def text(field: str) -> str:
        value = item.get(field)
        return "" if value is None else str(value)
    return {
        "index": index, "evaluation_id": item.get("evaluation_id"), "correct": _is_correct(item),
        "sentence": text("sentence"), "label": choice_text(text("label")),
        "predict": "(none)" if item.get("predict") is None else choice_text(text("predict")),
        "prompt": split_text(text("prompt"), slot_images, mention_urls),
        "response": split_text(text("response"), [], mention_urls),
        "images": [{"url": u, "name": PurePath(str(p).replace("\\", "/")).name, "path": str(p), "position": k + 1}
                   for k, (p, u) in enumerate(zip(paths, urls))],
        "failure": failure_of(item), "extras": _extras(item, CHOICE_FIELDS),
    }


def judge_summary(items: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per judge model: rated and failed counts, mean A1/A2 vectors and A1, A2, overall as the paper computes them.

    A turn's score is the mean of its C1–C3 means (the judge's own overall is shown, not used), and overall
    is the mean of the two turns. Display only: the evaluation merge step owns the reported number.
    """
    vectors: dict[str, dict[str, list[list[float]]]] = {}
    failed: dict[str, int] = {}
    for item in items:
        for name, entry in _judge_entries(item):
            per = vectors.setdefault(str(name), {k: [] for k in JUDGE_KEYS})
            failed[str(name)] = failed.get(str(name), 0) + (not any(k in entry for k in JUDGE_KEYS))
            for key in JUDGE_KEYS:
                scores = entry.get(key)
                if isinstance(scores, (list, tuple)) and len(scores) == 4:
                    per[key].append([float(s) for s in scores])
    out: dict[str, dict[str, Any]] = {}
    for name, per in vectors.items():
        row: dict[str, Any] = {"n": max(len(per[k]) for k in JUDGE_KEYS), "failed": failed[name]}
        turn_scores = []
        for key, label in zip(JUDGE_KEYS, ("A1", "A2")):
            rows = per[key]
            if not rows:
                continue
            mean = [sum(col) / len(rows) for col in zip(*rows)]
            row[f"{label}_vector"] = mean
            row[label] = sum(mean[1:]) / 3
            turn_scores.append(row[label])
        if len(turn_scores) == 2:
            row["overall"] = sum(turn_scores) / 2
        out[name] = row
    return out


# --------------------------------------------------------------------------------------------------------
# Jinja environment and page assembly
# --------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _env():
    import jinja2  # lazily: importing sparkles.viz must stay cheap

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
        autoescape=True,  # every {{ }} is escaped; no template uses |safe on data
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


@lru_cache(maxsize=1)
def _assets() -> tuple[str, str, str]:
    """(css, js, CSP hash of js). The script is static, so hashing it once pins the only code that may run."""
    env = _env()
    css = env.get_template("_style.html.j2").render()
    js = env.get_template("_script.html.j2").render()
    digest = base64.b64encode(hashlib.sha256(js.encode("utf-8")).digest()).decode("ascii")
    return css, js, f"sha256-{digest}"


def _render(template: str, **context: Any) -> str:
    import markupsafe

    css, js, js_hash = _assets()
    return _env().get_template(template).render(
        css=markupsafe.Markup(css), js=markupsafe.Markup(js), js_hash=js_hash, **context)


def _summary_rows(summary: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    if not summary:
        return []
    return [(str(k), _fmt_score(v) if isinstance(v, float) else str(v)) for k, v in summary.items()]


def _judge_rows(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, row in judge_summary(items).items():
        def vec(key: str) -> str:
            return ", ".join(f"{v:.2f}" for v in row[key]) if key in row else "–"
        rows.append({"name": name, "n": row["n"], "failed": row["failed"],
                     "A1_vector": vec("A1_vector"), "A2_vector": vec("A2_vector"),
                     "A1": f"{row['A1']:.2f}" if "A1" in row else "–",
                     "A2": f"{row['A2']:.2f}" if "A2" in row else "–",
                     "overall": f"{row['overall']:.2f}" if "overall" in row else "–"})
    return rows


def render_dialogue_page(items: Sequence[Mapping[str, Any]], image_url_fn: Callable[[str], str] | None = None, *,
                         title: str = "SparklesDialogue", model_name: str | None = None,
                         summary: Mapping[str, Any] | None = None, start_index: int = 0,
                         pages: Sequence[Mapping[str, Any]] | None = None,
                         judge_rows: Sequence[Mapping[str, Any]] | None = None) -> str:
    """One HTML page of dialogues (see the module docstring)."""
    url_fn = image_url_fn or relative_image_url()
    dialogues = [_prepare_dialogue(start_index + i, it, url_fn) for i, it in enumerate(items)]
    return _render("dialogue.html.j2", title=title, model_name=model_name, dialogues=dialogues,
                   summary=_summary_rows(summary), pages=list(pages or []),
                   judges=list(judge_rows) if judge_rows is not None else _judge_rows(items),
                   total=len(items))


def render_choice_results_page(items: Sequence[Mapping[str, Any]], accuracy: float | None = None, *,
                               image_url_fn: Callable[[str], str] | None = None, title: str = "Results",
                               model_name: str | None = None, summary: Mapping[str, Any] | None = None,
                               start_index: int = 0, pages: Sequence[Mapping[str, Any]] | None = None,
                               total: int | None = None, correct: int | None = None) -> str:
    """One HTML page of BISON/NLVR2 results with the accuracy on top (see the module docstring)."""
    url_fn = image_url_fn or relative_path_url()
    prepared = [_prepare_choice(start_index + i, it, url_fn) for i, it in enumerate(items)]
    if accuracy is None:
        accuracy = choice_accuracy(items)
    return _render("choice.html.j2", title=title, model_name=model_name, items=prepared,
                   accuracy=f"{accuracy:.3f}", summary=_summary_rows(summary), pages=list(pages or []),
                   total=len(items) if total is None else total,
                   correct=sum(p["correct"] for p in prepared) if correct is None else correct)


# --------------------------------------------------------------------------------------------------------
# Writers (pagination, atomic writes)
# --------------------------------------------------------------------------------------------------------
def page_paths(path: str | os.PathLike, n_items: int, page_size: int = DEFAULT_PAGE_SIZE) -> list[Path]:
    """The files a writer produces: ``path`` then ``<stem>_page2.html``, ``<stem>_page3.html``, ..."""
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    path = Path(path)
    n_pages = max(1, math.ceil(n_items / page_size))
    return [path] + [path.with_name(f"{path.stem}_page{k}{path.suffix or '.html'}") for k in range(2, n_pages + 1)]


def _nav(paths: list[Path], current: int, page_size: int, n_items: int) -> list[dict[str, Any]]:
    if len(paths) == 1:
        return []
    return [{"label": f"{k + 1}", "href": urllib.parse.quote(p.name), "current": k == current,
             "range": f"{k * page_size + 1}–{min((k + 1) * page_size, n_items)}"} for k, p in enumerate(paths)]


def write_dialogue_page(items: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                        image_url_fn: Callable[[str], str] | None = None, relative_dir: str = "../images",
                        page_size: int = DEFAULT_PAGE_SIZE, title: str | None = None, **kwargs: Any) -> list[Path]:
    """Write a dialogue page (paginated); returns the paths written. ``kwargs`` go to ``render_dialogue_page``."""
    url_fn = image_url_fn or relative_image_url(relative_dir)
    paths = page_paths(path, len(items), page_size)
    judges = _judge_rows(items)  # header numbers cover the whole file, not one page
    for k, p in enumerate(paths):
        chunk = items[k * page_size:(k + 1) * page_size]
        page_title = title or Path(path).stem
        html = render_dialogue_page(chunk, url_fn, title=page_title, start_index=k * page_size,
                                    pages=_nav(paths, k, page_size, len(items)), judge_rows=judges, **kwargs)
        atomic_write(p, html)
    return paths


def write_choice_results_page(items: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                              accuracy: float | None = None, *, image_url_fn: Callable[[str], str] | None = None,
                              relative_dir: str = "../images", page_size: int = DEFAULT_PAGE_SIZE,
                              title: str | None = None, **kwargs: Any) -> list[Path]:
    """Write a BISON/NLVR2 results page (paginated); returns the paths written."""
    url_fn = image_url_fn or relative_path_url(relative_dir)
    if accuracy is None:
        accuracy = choice_accuracy(items)
    correct = sum(_is_correct(it) for it in items)
    paths = page_paths(path, len(items), page_size)
    for k, p in enumerate(paths):
        chunk = items[k * page_size:(k + 1) * page_size]
        html = render_choice_results_page(chunk, accuracy, image_url_fn=url_fn, title=title or Path(path).stem,
                                          start_index=k * page_size, pages=_nav(paths, k, page_size, len(items)),
                                          total=len(items), correct=correct, **kwargs)
        atomic_write(p, html)
    return paths
