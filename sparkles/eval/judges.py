"""SparklesEval judges, found by name: a registered judge, or any chat model behind the project's GPT client.

``--judge_models NAME ...`` asks each named judge. A name registered in ``sparkles.common.registry.JUDGES`` (by a
module of the config's ``run.imports`` or of ``--imports``) is built by its factory, ``factory(root)``; every
other name is a chat model (``gpt-4``, ``gpt-3.5-turbo``, a model an OpenAI-compatible server serves) judging
through :class:`GPTJudge`. A judge has a ``model`` name (the key of its entries in result items), a ``kind``,
``settings()`` and ``judge(dialogue) -> JudgeOutcome``. A GPT judge given ``ask_many`` (``--batch-api``: the
OpenAI Batch API) also rates many dialogues at once with ``judge_all``, with the same replies and outcomes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..common.registry import JUDGES
from ..gpt.errors import GPTCallError
from ..conversation.protocol_file import ProtocolTexts
from .benchmarks.sparkleseval import JUDGE_SYSTEM, JudgeParseError, build_judge_prompt, parse_judge_reply

log = logging.getLogger(__name__)


class JudgeSetupError(RuntimeError):
    """A judge that cannot work here (e.g. one that needs data this Sparkles root does not hold)."""


@dataclass
class JudgeOutcome:
    """One judgement: the original's judge entry (scores, prompt, response) or a recorded failure."""

    entry: dict
    ok: bool
    calls: int = 0  # replies obtained (paid or cached)
    paid_calls: int = 0


class GPTJudge:
    """A chat model judging through :class:`sparkles.gpt.GPTClient`, re-asking while replies do not parse.

    Attempt ``k`` carries its own cache tag, so a re-run replays the same sequence of replies from the cache
    (even at temperature 0, where re-sending one request would just return the cached failure again).

    ``ask_many(requests)``, when given, answers a list of ``chat`` keyword dicts at once with a result or a
    ``GPTCallError`` per request (``sparkles.gpt.batch.BatchRunner.map_chat``); ``judge_all`` then sends
    attempt ``k`` of every dialogue still without a parseable reply as one such call.
    """

    kind = "gpt"

    def __init__(self, client, model: str, *, temperature: float = 0.0, max_tokens: int = 1024,
                 max_attempts: int = 3, texts: ProtocolTexts = ProtocolTexts(),
                 ask_many: Callable[[list[dict]], list] | None = None) -> None:
        if max_attempts < 1:
            raise ValueError("the judge needs at least one attempt")
        self.client = client
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_attempts = max_attempts
        self.system = texts.judge_system if texts.judge_system is not None else JUDGE_SYSTEM
        self.template = texts.judge_template
        self.images_format = texts.judge_images_format
        self.texts = texts
        self.ask_many = ask_many

    def settings(self) -> dict:
        out = {"kind": self.kind, "model": self.model, "temperature": self.temperature,
               "max_tokens": self.max_tokens, "max_attempts": self.max_attempts}
        if any(v is not None for v in (self.texts.judge_system, self.template, self.images_format)):
            out.update(system=self.system, template_fingerprint=self.texts.fingerprint(),
                       images_format=self.images_format or "json")
        return out

    def prompt(self, dialogue: Sequence[Mapping[str, Any]]) -> str:
        return build_judge_prompt(dialogue, self.template, self.images_format)

    def request(self, prompt: str, attempt: int) -> dict:
        """Arguments of ``GPTClient.chat`` for one attempt (1-based)."""
        return {"prompt": [{"role": "system", "content": self.system}, {"role": "user", "content": prompt}],
                "model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "cache_tag": f"sparkleseval-judge:attempt{attempt}"}

    def judge(self, dialogue: Sequence[Mapping[str, Any]]) -> JudgeOutcome:
        """Judge one dialogue. A ``GPTCallError`` (API failure) propagates: nothing is recorded then."""
        (outcome,) = self._rate([dialogue], lambda requests: [self.client.chat(**r) for r in requests])
        return outcome

    def judge_all(self, dialogues: Sequence[Sequence[Mapping[str, Any]]]) -> list["JudgeOutcome | GPTCallError"]:
        """Judge many dialogues through ``ask_many``, one call per attempt; a dialogue whose request failed gets
        its ``GPTCallError`` in place of an outcome (nothing is recorded for it)."""
        if self.ask_many is None:
            raise ValueError(f"judge {self.model}: judge_all needs ask_many (the Batch API)")

        def ask(requests: list[dict]) -> list:
            try:
                return self.ask_many(requests)
            except GPTCallError as exc:  # the batch itself could not be run: every request of it failed
                return [exc] * len(requests)

        return self._rate(dialogues, ask)

    def _rate(self, dialogues: Sequence[Sequence[Mapping[str, Any]]],
              ask: Callable[[list[dict]], list]) -> list["JudgeOutcome | GPTCallError"]:
        """Attempt by attempt, ask (with ``ask``) for the dialogues that have no parseable reply yet."""
        prompts = [self.prompt(d) for d in dialogues]
        outcomes: list[Any] = [None] * len(prompts)
        replies, errors = [""] * len(prompts), [""] * len(prompts)
        calls, paid = [0] * len(prompts), [0] * len(prompts)
        open_ = list(range(len(prompts)))
        for attempt in range(1, self.max_attempts + 1):
            if not open_:
                break
            results = ask([self.request(prompts[i], attempt) for i in open_])
            still_open = []
            for i, result in zip(open_, results):
                if isinstance(result, GPTCallError):
                    outcomes[i] = result
                    continue
                calls[i] += 1
                paid[i] += not result.cached
                replies[i] = result.text
                try:
                    scores = parse_judge_reply(result.text)
                except JudgeParseError as exc:
                    errors[i] = str(exc)
                    log.info("judge %s: reply %d does not parse (%s)", self.model, attempt, errors[i])
                    still_open.append(i)
                    continue
                outcomes[i] = JudgeOutcome({**scores, "prompt": prompts[i], "response": result.text}, True,
                                           calls[i], paid[i])
            open_ = still_open
        for i in open_:
            outcomes[i] = JudgeOutcome({"prompt": prompts[i], "response": replies[i], "attempts": self.max_attempts,
                                        "error": f"no parseable reply in {self.max_attempts} attempt(s): {errors[i]}"},
                                       False, calls[i], paid[i])
        return outcomes


def make_judges(names: Sequence[str], *, root: Path, client, temperature: float, max_tokens: int,
                max_attempts: int, texts: ProtocolTexts = ProtocolTexts(),
                ask_many: Callable[[list[dict]], list] | None = None) -> list:
    """One judge per distinct name, in order: a registered judge built for ``root``, else a :class:`GPTJudge`
    on ``client`` (built lazily by the caller: no API key is needed while nothing is left to judge) asking with
    the protocol's judge texts (and rating many at once through ``ask_many``, the Batch API, when given)."""
    judges = []
    for name in dict.fromkeys(names):
        if name in JUDGES:
            judges.append(JUDGES.get(name)(root))
        else:
            judges.append(GPTJudge(client, name, temperature=temperature, max_tokens=max_tokens,
                                   max_attempts=max_attempts, texts=texts, ask_many=ask_many))
    return judges
