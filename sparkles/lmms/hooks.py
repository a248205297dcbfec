"""The functions lmms-eval's task files for BISON, NLVR2 and SparklesEval name (``!function sparkles.lmms.hooks.X``).

The questions, the reading of an answer and the scores are the project's benchmark code
(:mod:`sparkles.eval.benchmarks`); this module only moves them into lmms-eval's shapes. A document is one line of
the data files ``python -m sparkles.lmms.export`` writes: the annotation ``record`` (JSON text) with what was
derived from it — ``sentence`` and ``label`` of a BISON / NLVR2 question, the images as absolute paths
(``images``; ``turn_images`` per user turn of a SparklesEval dialogue) and as the root-relative paths result
files record (``img_paths``).

- ``doc_to_messages``: the question as one user message with every image at its slot (the task's ``layout``,
  :func:`~.messages.user_message`); SparklesEval follows lmms-eval's multi-round protocol: round 2 holds Q1, the
  model's own A1 and Q2, as ``evaluate.py`` asks it.
- ``doc_to_text`` / ``doc_to_visual``: the same question for lmms-eval's simple models (an ``<image>`` token at
  each slot, the images in slot order).
- ``choice_process_results`` / ``choice_aggregate``: the answer read with the benchmark's ``extract``, accuracy
  from its ``score``; ``dialogue_process_results`` / ``dialogue_aggregate``: the two answers put into the
  dialogue, as ``evaluate.py`` records them. The aggregations write the items as the project's result file
  (``<output_path>/sparkles_results/<dataset>_lmms_<model>.json``), which ``evaluate.py --results-file F
  --merge-results`` scores again and, for SparklesEval, has judged (``--judge_models``).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Optional

from ..common.io import atomic_write_json
from ..conversation.template import IMAGE_MARKER
from ..eval.benchmarks import CHOICE_BENCHMARKS
from ..eval.benchmarks.sparkleseval import check_dialogue
from .messages import IMAGE_TOKEN, assistant_message, user_message

RESULTS_DIR = "sparkles_results"  # under lmms-eval's --output_path


def _layout(kwargs: Optional[dict]) -> str:
    return (kwargs or {}).get("layout") or "slots"


def record(doc: dict) -> dict:
    """The annotation record the document was made from."""
    return json.loads(doc["record"])


def choice_prompt(doc: dict) -> str:
    """The BISON / NLVR2 question of the project's benchmark code, slot markers included."""
    return CHOICE_BENCHMARKS[doc["dataset"]].prompt(doc["sentence"])


def dialogue_questions(doc: dict) -> tuple[str, str]:
    """Q1 and Q2 of a SparklesEval dialogue, slot markers included."""
    dialogue = check_dialogue(record(doc), f"SparklesEval evaluation_id {doc['evaluation_id']}")
    return dialogue[0]["content"], dialogue[2]["content"]


# ---------------------------------------------------------------------------------------------- questions
def doc_to_messages(doc: dict, lmms_eval_specific_kwargs: Optional[dict] = None, round_idx: Optional[int] = None,
                    previous_output: Optional[list] = None, previous_round_info: Any = None):
    """The first round's messages; for SparklesEval, round 2 as ``(messages, terminal, previous_output, info)``
    after the model's own first answer, and the end after it (lmms-eval's multi-round protocol)."""
    layout = _layout(lmms_eval_specific_kwargs)
    if doc["dataset"] in CHOICE_BENCHMARKS:
        return [user_message(choice_prompt(doc), doc["images"], layout)]
    q1, q2 = dialogue_questions(doc)
    first = user_message(q1, doc["turn_images"][0], layout)
    if not round_idx:
        return [first]
    if round_idx == 1 and previous_output:
        messages = [first, assistant_message(previous_output[0]), user_message(q2, doc["turn_images"][1], layout)]
        return messages, False, previous_output, previous_round_info
    return None, True, previous_output, previous_round_info


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: Optional[dict] = None) -> str:
    """The (first) question with an ``<image>`` token at each slot, for models that take text and images apart."""
    text = choice_prompt(doc) if doc["dataset"] in CHOICE_BENCHMARKS else dialogue_questions(doc)[0]
    return text.replace(IMAGE_MARKER, IMAGE_TOKEN)


def doc_to_visual(doc: dict) -> list:
    """The images of the (first) question in slot order, decoded."""
    from ..processors.image import load_rgb

    paths = doc["images"] if doc["dataset"] in CHOICE_BENCHMARKS else doc["turn_images"][0]
    return [load_rgb(p) for p in paths]


def reference_answers(doc: dict) -> list[str]:
    """SparklesEval's target: the reference dialogue's two answers (lmms-eval logs it beside each sample)."""
    dialogue = record(doc)["dialogue"]
    return [dialogue[1]["content"], dialogue[3]["content"]]


# ---------------------------------------------------------------------------------------------- scoring
def choice_process_results(doc: dict, results: list) -> dict:
    """The answer read by the benchmark's ``extract`` and scored by its ``score``, kept as a result item."""
    benchmark = CHOICE_BENCHMARKS[doc["dataset"]]
    response = results[0] if results else ""
    item = {"label": doc["label"], "prompt": choice_prompt(doc), "img_paths": list(doc["img_paths"]),
            "predict": benchmark.extract(response), "response": response, "sentence": doc["sentence"],
            "evaluation_id": record(doc)["evaluation_id"], "generations": 1}
    return {"accuracy": {"score": benchmark.score([item])["correct"], "index": doc["index"],
                         "dataset": doc["dataset"], "item": item}}


def dialogue_process_results(doc: dict, results: list) -> dict:
    """The model's two answers in place of the reference answers: a SparklesEval result item, not judged yet."""
    rounds = results[0] if results else []
    rounds = [rounds] if isinstance(rounds, str) else list(rounds or [])
    dialogue = copy.deepcopy(check_dialogue(record(doc), f"SparklesEval evaluation_id {doc['evaluation_id']}"))
    item = {"evaluation_id": record(doc)["evaluation_id"], "dialogue": dialogue,
            "prompt": [dialogue[0]["content"], dialogue[2]["content"]][:max(1, len(rounds))]}
    if len(rounds) >= 2:
        dialogue[1]["content"], dialogue[3]["content"] = rounds[0], rounds[1]
    else:
        item["error"] = f"the model answered {len(rounds)} of the dialogue's 2 turns"
    return {"answered": {"score": int("error" not in item), "index": doc["index"], "dataset": "SparklesEval",
                         "item": item}}


def results_path(dataset: str, args: Any) -> Optional[Path]:
    """Where the result file of ``dataset`` goes under lmms-eval's ``--output_path`` (None without one)."""
    output = getattr(args, "output_path", None)
    if not output:
        return None
    out = Path(output).expanduser()
    if out.suffix in (".json", ".jsonl"):
        out = out.parent
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", str(getattr(args, "model", None) or "model"))
    return out / RESULTS_DIR / f"{dataset}_lmms_{model}.json"


def _write(values: list, args: Any) -> list:
    """The result items in annotation order, written as the project's result file when there is an output path."""
    ordered = sorted(values, key=lambda v: v["index"])
    items = [v["item"] for v in ordered]
    dataset = ordered[0]["dataset"] if ordered else "unknown"
    path = results_path(dataset, args)
    if path is None:
        print(f"[sparkles] {dataset}: pass --output_path to keep the result file for evaluate.py --results-file")
    else:
        atomic_write_json(path, items)
        print(f"[sparkles] {dataset}: {len(items)} result items written to {path}")
    return items


def choice_aggregate(values: list, args: Any = None) -> Optional[float]:
    """Accuracy by the benchmark's ``score``; the items are written as a BISON / NLVR2 result file."""
    items = _write(values, args)
    if not items:
        return None
    return CHOICE_BENCHMARKS[values[0]["dataset"]].score(items)["accuracy"]


def dialogue_aggregate(values: list, args: Any = None) -> Optional[float]:
    """The share of dialogues answered in both turns; the items are written as a SparklesEval result file for
    ``evaluate.py --results-file F --merge-results --judge_models ...`` to judge."""
    _write(values, args)
    path = results_path("SparklesEval", args)
    if path is not None:
        print(f"[sparkles] judge them: python evaluate.py --results-file {path} --merge-results --judge_models gpt-4")
    return sum(v["score"] for v in values) / len(values) if values else None
