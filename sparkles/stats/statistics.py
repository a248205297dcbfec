"""Statistics of a SparklesDialogue file: message lengths, verb–noun structure of requests, word clouds.

For user messages and for assistant messages: word-length histograms (whitespace words, slot markers removed,
Freedman–Diaconis bins, mean marked). For user messages: the 20 most frequent root verbs with their 4 most
frequent direct-object nouns (``sparkles.stats.verb_noun``) drawn as a two-ring sunburst. For assistant
messages: a word cloud. Plots are PNG (and PDF for the charts); every number also goes to
``statistics_<name>.json`` so results can be compared without reading pictures.

matplotlib (Agg, through the object API so no global backend is touched), wordcloud and spaCy are imported
inside the functions that need them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from ..common.io import atomic_write_json, read_json
from ..common.logging import progress_bar
from ..conversation.template import IMAGE_MARKER as SLOT

TOP_VERBS = 20
TOP_NOUNS = 4
# IMAGE#<id> are references, not words: left in, "IMAGE" would top every assistant word cloud.
_IMAGE_REF = re.compile(r"\bIMAGE\s?#\s?\w+", re.IGNORECASE)


# --------------------------------------------------------------------------------------------------------
# Loading and message selection
# --------------------------------------------------------------------------------------------------------
def load_dialogues(path: str | Path) -> list[dict]:
    """Records of a SparklesDialogue/SparklesEval file (a JSON list of ``{"dialogue": [...]}``)."""
    path = Path(path)
    data = read_json(path, what="dialogue file")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of dialogue records")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or not isinstance(rec.get("dialogue"), list):
            raise ValueError(f"{path}: record {i} has no 'dialogue' list")
    return data


def split_messages(dialogues: Sequence[dict]) -> tuple[list[str], list[str]]:
    """(user contents, assistant contents) in file order, slot markers removed."""
    user, assistant = [], []
    for i, rec in enumerate(dialogues):
        for j, msg in enumerate(rec["dialogue"]):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise ValueError(f"record {i}: message {j} needs 'role' and 'content'")
            text = " ".join(str(msg["content"]).replace(SLOT, " ").split())
            role = str(msg["role"]).lower()
            if role in ("user", "human"):
                user.append(text)
            elif role in ("assistant", "gpt"):
                assistant.append(text)
            else:
                raise ValueError(f"record {i}: message {j} has unknown role {msg['role']!r}")
    return user, assistant


def word_lengths(messages: Sequence[str]) -> list[int]:
    return [len(m.split()) for m in messages]


# --------------------------------------------------------------------------------------------------------
# Length histograms
# --------------------------------------------------------------------------------------------------------
def length_histogram(lengths: Sequence[int]) -> dict[str, Any]:
    """Summary and Freedman–Diaconis histogram of ``lengths`` (``numpy.histogram(bins="fd")``)."""
    import numpy as np

    if len(lengths) == 0:
        return {"n": 0, "mean": None, "median": None, "min": None, "max": None, "bin_rule": "fd",
                "bin_edges": [], "counts": []}
    x = np.asarray(lengths, dtype=float)
    counts, edges = np.histogram(x, bins="fd")
    return {"n": int(x.size), "mean": float(x.mean()), "median": float(np.median(x)), "min": int(x.min()),
            "max": int(x.max()), "bin_rule": "fd", "bin_edges": [float(e) for e in edges],
            "counts": [int(c) for c in counts]}


def _save(fig, stem: Path, formats: Sequence[str]) -> list[Path]:
    out = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        # No creation date in the PDF: the same data gives the same file.
        meta = {"CreationDate": None} if fmt == "pdf" else None
        fig.savefig(path, format=fmt, bbox_inches="tight", metadata=meta)
        out.append(path)
    return out


def plot_length_histogram(hist: dict[str, Any], stem: Path, *, title: str, color: str = "#4C72B0",
                          formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Bar chart of a ``length_histogram`` result with the mean as a dashed line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=150)
    ax = fig.add_subplot()
    edges, counts = hist["bin_edges"], hist["counts"]
    if counts:
        widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
        ax.bar(edges[:-1], counts, width=widths, align="edge", color=color, edgecolor="white", linewidth=0.6)
        ax.axvline(hist["mean"], color="#C44E52", linestyle="--", linewidth=1.5,
                   label=f"mean = {hist['mean']:.1f} words")
        ax.legend(frameon=False)
    ax.set_title(title)
    ax.set_xlabel("words per message")
    ax.set_ylabel("messages")
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, stem, formats)


# --------------------------------------------------------------------------------------------------------
# Verb–noun sunburst
# --------------------------------------------------------------------------------------------------------
def verb_noun_table(pairs: Sequence[tuple[str | None, str | None]], top_verbs: int = TOP_VERBS,
                    top_nouns: int = TOP_NOUNS) -> list[dict[str, Any]]:
    """Top verbs, each with its top nouns, from (verb, noun) pairs; pairs missing either are dropped.

    ``count`` is the verb's number of complete pairs (its rank); ``shown`` the sum over the listed nouns,
    which is the verb's share of the chart (as in a sunburst whose parents sum their children).
    Ties are broken alphabetically so the output is stable.
    """
    complete = [(v, n) for v, n in pairs if v and n]
    by_verb = Counter(v for v, _ in complete)
    verbs = sorted(by_verb.items(), key=lambda kv: (-kv[1], kv[0]))[:top_verbs]
    table = []
    for verb, count in verbs:
        nouns = Counter(n for v, n in complete if v == verb)
        top = sorted(nouns.items(), key=lambda kv: (-kv[1], kv[0]))[:top_nouns]
        table.append({"verb": verb, "count": count, "shown": sum(c for _, c in top),
                      "nouns": [{"noun": n, "count": c} for n, c in top]})
    return table


def _radial_label(ax, text: str, angle_deg: float, radius: float, size: float) -> None:
    theta = math.radians(angle_deg)
    rotation = angle_deg if -90 <= ((angle_deg + 180) % 360 - 180) <= 90 else angle_deg - 180
    ax.text(radius * math.cos(theta), radius * math.sin(theta), text, rotation=rotation,
            rotation_mode="anchor", ha="center", va="center", fontsize=size)


def plot_verb_noun_sunburst(table: Sequence[dict[str, Any]], stem: Path, *, title: str,
                            formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Two rings: verbs inside, their top nouns outside, wedge sizes proportional to counts."""
    from matplotlib import colormaps
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 10), dpi=100)
    ax = fig.add_subplot()
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=18)
    total = sum(row["shown"] for row in table)
    if not total:
        ax.text(0, 0, "no verb–noun pairs", ha="center", va="center", fontsize=16)
        return _save(fig, stem, formats)
    cmap = colormaps["tab20"]
    inner_colors, outer_sizes, outer_colors, outer_labels = [], [], [], []
    for k, row in enumerate(table):
        base = to_rgb(cmap(k % 20))
        inner_colors.append(base)
        for m, noun in enumerate(row["nouns"]):
            mix = 0.35 + 0.12 * m  # lighter shades of the verb's colour, one per noun
            outer_colors.append(tuple(c + (1 - c) * mix for c in base))
            outer_sizes.append(noun["count"])
            outer_labels.append(noun["noun"])
    wedge = {"edgecolor": "white", "linewidth": 1.0}
    inner = [row["shown"] for row in table]
    ax.pie(inner, radius=0.62, colors=inner_colors, startangle=90, counterclock=False,
           wedgeprops={**wedge, "width": 0.42})
    ax.pie(outer_sizes, radius=1.0, colors=outer_colors, startangle=90, counterclock=False,
           wedgeprops={**wedge, "width": 0.38})

    def place(sizes: list[int], labels: list[str], radius: float, size: float) -> None:
        start = 90.0
        for s, label in zip(sizes, labels):
            span = 360.0 * s / total
            if span >= 2.5:  # labels on slivers would only overlap
                _radial_label(ax, label, start - span / 2, radius, size)
            start -= span

    place(inner, [row["verb"] for row in table], 0.41, 12)
    place(outer_sizes, outer_labels, 0.81, 9)
    return _save(fig, stem, formats)


# --------------------------------------------------------------------------------------------------------
# Word cloud
# --------------------------------------------------------------------------------------------------------
def word_cloud(messages: Sequence[str], path: Path, *, seed: int = 0, top_k: int = 30) -> dict[str, Any]:
    """800×800 word cloud (white, default stop words, ≤80 words, font 30–150 px, horizontal); top counts.

    Single words only (no bigram "collocations"), so the picture and the counts in the JSON agree.
    """
    from wordcloud import STOPWORDS, WordCloud

    text = _IMAGE_REF.sub(" ", "\n".join(messages))
    wc = WordCloud(width=800, height=800, background_color="white", stopwords=set(STOPWORDS), max_words=80,
                   min_font_size=30, max_font_size=150, prefer_horizontal=1.0, random_state=seed,
                   collocations=False)
    counts = wc.process_text(text)
    if not counts:
        return {"file": None, "skipped": "no words left after removing stop words", "top_words": []}
    wc.generate_from_frequencies(counts)
    wc.to_file(str(path))
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
    return {"file": path.name, "top_words": [{"word": w, "count": c} for w, c in top]}


# --------------------------------------------------------------------------------------------------------
# Everything for one file
# --------------------------------------------------------------------------------------------------------
def compute_statistics(dialogues: Sequence[dict], out_dir: str | Path, name: str, *, verb_noun: bool = True,
                       nlp: Any = None, spacy_model: str | None = None, source: str | None = None,
                       formats: Sequence[str] = ("png", "pdf"), progress: bool = False) -> dict[str, Any]:
    """Write all plots for ``dialogues`` under ``out_dir`` and return (and save) the numbers.

    Files: ``len_dist_user_<name>.*``, ``len_dist_assistant_<name>.*``, ``verb_noun_user_<name>.*``,
    ``word_cloud_assistant_<name>.png``, ``statistics_<name>.json``. When no spaCy pipeline is installed
    (and ``nlp`` is not given) the verb–noun step is skipped with the install instruction in the JSON
    (``verb_noun.skipped``); everything else still runs. ``progress``: a bar over these steps (and one over the
    parsing of user requests) on stderr, :func:`sparkles.common.logging.progress_bar`.
    """
    from sparkles.stats import verb_noun as vn

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    user, assistant = split_messages(dialogues)
    files: list[Path] = []
    result: dict[str, Any] = {"name": name, "source": source, "num_dialogues": len(dialogues),
                              "num_user_messages": len(user), "num_assistant_messages": len(assistant)}
    # One bar over the steps (plots and the word cloud take seconds each; parsing has a bar of its own).
    steps = ["user lengths", "assistant lengths", "verb–noun", "word cloud"]
    with progress_bar(total=len(steps), desc=f"statistics {name}", unit="step", enabled=progress) as bar:
        for role, messages, color in (("user", user, "#4C72B0"), ("assistant", assistant, "#55A868")):
            bar.set_postfix_str(f"{role} lengths")
            hist = length_histogram(word_lengths(messages))
            result[f"{role}_lengths"] = hist
            files += plot_length_histogram(hist, out / f"len_dist_{role}_{name}",
                                           title=f"{name}: {role} message length", color=color, formats=formats)
            bar.update(1)

        bar.set_postfix_str("verb–noun")
        if not verb_noun:
            result["verb_noun"] = {"skipped": "disabled"}
        else:
            try:
                pipeline = nlp if nlp is not None else vn.load_spacy_pipeline(spacy_model)
            except vn.SpacyPipelineMissing as e:
                result["verb_noun"] = {"skipped": str(e)}
            else:
                pairs = vn.verb_noun_pairs(user, pipeline, progress=progress)
                table = verb_noun_table(pairs)
                result["verb_noun"] = {
                    "pipeline": f"{pipeline.meta.get('lang', '')}_{pipeline.meta.get('name', '')}"
                                f"-{pipeline.meta.get('version', '')}",
                    "messages": len(pairs), "with_verb": sum(v is not None for v, _ in pairs),
                    "with_verb_and_noun": sum(bool(v and n) for v, n in pairs), "top": table}
                files += plot_verb_noun_sunburst(table, out / f"verb_noun_user_{name}",
                                                 title=f"{name}: user requests (root verb → object noun)",
                                                 formats=formats)
        bar.update(1)

        bar.set_postfix_str("word cloud")
        cloud = word_cloud(assistant, out / f"word_cloud_assistant_{name}.png")
        bar.update(1)
    result["assistant_word_cloud"] = cloud
    if cloud["file"]:
        files.append(out / cloud["file"])
    result["files"] = sorted(p.name for p in files)
    json_path = out / f"statistics_{name}.json"
    atomic_write_json(json_path, result)
    return result
