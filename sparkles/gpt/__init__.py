"""GPT access for the project: one client (OpenAI / compatible / Azure) with retries, cache and cost accounting.

Typical use::

    from sparkles.gpt import GPTClient
    with GPTClient.from_env(cache="outputs/gpt_cache.sqlite") as gpt:
        result = gpt.chat("Describe ...", model="gpt-4", temperature=1.0, max_tokens=2048)
        print(result.text, result.usage.total_tokens, result.cached)
        print(gpt.ledger.format())

``BatchRunner(gpt).map_chat(...)`` answers the same requests through the OpenAI Batch API (half price,
resumable; :mod:`sparkles.gpt.batch`). Importing this package does not import the ``openai`` SDK; that happens
on the first call.
"""

from .batch import BatchRunner
from .cache import ResponseCache, request_key
from .client import ChatRequest, ChatResult, GPTClient, Usage
from .config import GPTConfig
from .cost import BATCH_PRICE_FACTOR, PriceTable, SpendingCap, UsageLedger, estimate_cost
from .errors import GPTCallError, MissingAPIKeyError, redact

__all__ = ["BATCH_PRICE_FACTOR", "BatchRunner", "ChatRequest", "ChatResult", "GPTCallError", "GPTClient",
           "GPTConfig", "MissingAPIKeyError", "PriceTable", "ResponseCache", "SpendingCap", "Usage", "UsageLedger",
           "estimate_cost", "redact", "request_key"]
