"""The entry point lmms-eval reads to find SparklesChat (``[project.entry-points."lmms_eval.models"]``).

lmms-eval loads every entry point of the group ``lmms_eval.models`` when it builds its model registry and accepts
a callable that returns model manifests; the classes themselves (:mod:`.models`) are imported only when a run
names one of them.
"""

from __future__ import annotations

MODELS = {  # lmms-eval's --model name → the chat-style class that serves it
    "sparkles_chat": "sparkles.lmms.models.SparklesChatModel",
    "sparkles_api": "sparkles.lmms.models.SparklesApiModel",
}


def model_manifests() -> list:
    """lmms-eval's manifests of :data:`MODELS`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, chat_class_path=path) for name, path in MODELS.items()]
