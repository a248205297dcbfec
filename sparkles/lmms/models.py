"""SparklesChat as lmms-eval models: ``sparkles_chat`` in process, ``sparkles_api`` behind an OpenAI-compatible API.

Both are chat-style lmms-eval models (``is_simple = False``): lmms-eval hands them each task's messages
(``doc_to_messages``) and they answer through :class:`~.answering.Answerer`, images placed where their parts stand
(or at ``<image>`` tokens of stock-layout messages). ``generate_until_multi_round`` follows lmms-eval's multi-round
protocol, so SparklesEval's second round is asked after the model's own first answer. Likelihood requests are not
served: lmms-eval gives chat models generation tasks only. :mod:`.plugin` registers both classes.

``--model sparkles_chat --model_args cfg_path=CONFIG[,sparkles_root=ROOT,...]`` loads the model ``evaluate.py
--cfg-path CONFIG`` loads and answers as it does. Arguments: ``cfg_path``, ``sparkles_root``, ``device`` (default
lmms-eval's ``--device``, else auto), ``options`` (config overrides ``KEY=VALUE KEY=VALUE``, as evaluate.py's
``--options``), ``image_tokens`` (default true), ``max_length`` (context plus answer, default 2000), ``seed``;
lmms-eval's ``--batch_size N`` answers N greedy requests together.

``--model sparkles_api --model_args base_url=URL[,model=NAME,...]`` sends each request as ``evaluate.py
--model-endpoint URL`` does. Arguments: ``base_url``, ``model`` (default: the only model the server lists),
``api_key`` (default ``$MODEL_ENDPOINT_API_KEY``), ``timeout``, ``max_retries``, ``image_tokens``, ``seed``;
``--batch_size N`` keeps N requests in flight.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from lmms_eval.api.model import lmms

from ..eval.protocol import DEFAULT_MAX_LENGTH
from .answering import Answerer, Conversation, TaskRounds, endpoint_answerer, load_answerer

log = logging.getLogger(__name__)

_PASSED_BY_LMMS_EVAL = ("max_batch_size", "device")  # given to every model; only the in-process one uses device


def _batch_size(value: Any) -> int:
    text = str(1 if value is None else value)
    if not text.isdigit():
        raise ValueError(f"batch_size {value!r}: give a number (lmms-eval's automatic sizing is not supported)")
    return max(1, int(text))


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


def _ignore(kwargs: dict, model: str) -> None:
    unknown = sorted(k for k in kwargs if k not in _PASSED_BY_LMMS_EVAL)
    if unknown:
        log.warning("%s: unknown model_args ignored: %s", model, ", ".join(unknown))


class _SparklesModel(lmms):
    """What both models share: lmms-eval requests → :class:`~.answering.Conversation` → answers."""

    is_simple = False

    def __init__(self, answerer: Answerer) -> None:
        super().__init__()
        self.answerer = answerer

    @property
    def batch_size(self) -> int:
        return self.answerer.generator.batch_size

    def _conversations(self, requests, multi_round: bool) -> list[Conversation]:
        conversations = []
        for request in requests:
            _, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            rounds = TaskRounds(doc_to_messages, doc) if multi_round else None
            conversations.append(Conversation(doc_to_messages(doc), dict(gen_kwargs or {}),
                                              f"{task} ({split}) document {doc_id}", rounds))
        return conversations

    def generate_until(self, requests) -> list[str]:
        return [rounds[0] for rounds in self.answerer.answer(self._conversations(requests, False))]

    def generate_until_multi_round(self, requests) -> list[list[str]]:
        return self.answerer.answer(self._conversations(requests, True))

    def loglikelihood(self, requests):
        # lmms' abstract base requires it; lmms-eval cannot call it on a chat model: a chat model's tasks are built as
        # messages tasks, whose request builder admits generation output types only (lmms-eval 0.7.3,
        # api/task.py, ConfigurableMessagesTask.construct_requests), and an OpenAI-compatible server returns no
        # prompt log-probabilities to score a continuation with.
        raise NotImplementedError("sparkles_chat and sparkles_api answer generate_until tasks only; a task with "
                                  "output_type loglikelihood is not served (docs/lmms_eval.md)")


class SparklesChatModel(_SparklesModel):
    """SparklesChat in this process, loaded from a run config as ``evaluate.py`` loads it."""

    def __init__(self, cfg_path: str, sparkles_root: Optional[str] = None, device: Optional[str] = None,
                 batch_size: Any = 1, options: str = "", image_tokens: Any = True,
                 max_length: int = DEFAULT_MAX_LENGTH, seed: int = 2023, **kwargs) -> None:
        _ignore(kwargs, "sparkles_chat")
        super().__init__(load_answerer(cfg_path, sparkles_root, device=device or "auto",
                                       batch_size=_batch_size(batch_size), options=str(options or "").split(),
                                       image_tokens=_flag(image_tokens), max_length=int(max_length),
                                       seed=int(seed)))


class SparklesApiModel(_SparklesModel):
    """A model behind an OpenAI-compatible chat API (``python -m sparkles.serve``, vLLM, ...), asked as
    ``evaluate.py --model-endpoint`` asks it; unlike lmms-eval's ``openai`` model it answers multi-round tasks."""

    def __init__(self, base_url: str, model: Optional[str] = None, api_key: Optional[str] = None,
                 batch_size: Any = 1, timeout: float = 600.0, max_retries: int = 3, image_tokens: Any = True,
                 seed: int = 2023, **kwargs) -> None:
        _ignore(kwargs, "sparkles_api")
        super().__init__(endpoint_answerer(base_url, model, api_key=api_key, batch_size=_batch_size(batch_size),
                                           timeout=float(timeout), max_retries=int(max_retries),
                                           image_tokens=_flag(image_tokens), seed=int(seed)))
