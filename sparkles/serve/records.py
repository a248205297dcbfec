"""On-disk record of one demo conversation: ``<save_root>/<id>/conversation.json`` plus ``images/``.

The JSON holds only relative paths, the text of every turn, the decoding settings of each answer and the
votes, so a folder can be copied or published as it is. Images are re-encoded as PNG (which also drops
their metadata). Every change rewrites the JSON atomically, so a crash never leaves half a file.
"""

from __future__ import annotations

import os
import secrets
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from ..common.io import atomic_write_json

SCHEMA = "sparkles-demo-conversation/1"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_conversation_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S") + "_" + secrets.token_hex(3)


class ConversationRecord:
    """Collects one conversation and saves it after every change (the folder appears on the first save)."""

    def __init__(self, save_root: str | os.PathLike, *, model: Optional[str] = None) -> None:
        self.id = new_conversation_id()
        self.dir = Path(save_root) / self.id
        self._lock = threading.Lock()
        self.data: dict[str, Any] = {
            "schema": SCHEMA, "id": self.id, "model": model, "created": _now(), "updated": None,
            "images": [], "turns": [], "feedback": [],
        }

    @property
    def is_empty(self) -> bool:
        return not (self.data["images"] or self.data["turns"] or self.data["feedback"])

    def add_image(self, image, *, number: int, name: str) -> None:
        """Store a PIL image as ``images/image_<number>.png``; ``name`` is the uploaded file's base name."""
        rel = f"images/image_{number}.png"
        with self._lock:
            (self.dir / "images").mkdir(parents=True, exist_ok=True)
            image.save(self.dir / rel, format="PNG")
            self.data["images"].append({"number": number, "label": f"IMAGE#{number}", "file": rel,
                                        "uploaded_as": os.path.basename(name), "time": _now()})
            self._save()

    def add_turn(self, *, user: str, typed: str, answer: str, generation: dict,
                 auto_placed: list[int], warning: Optional[str] = None) -> None:
        turn = {"user": user, "assistant": answer, "generation": generation, "time": _now()}
        if typed != user:
            turn["typed"] = typed
        if auto_placed:
            turn["auto_placed_images"] = auto_placed
        if warning:
            turn["warning"] = warning
        with self._lock:
            self.data["turns"].append(turn)
            self._save()

    def add_feedback(self, kind: str, *, generation: dict) -> None:
        with self._lock:
            self.data["feedback"].append({"kind": kind, "after_turn": len(self.data["turns"]),
                                          "generation": generation, "time": _now()})
            self._save()

    def _save(self) -> None:
        self.data["updated"] = _now()
        atomic_write_json(self.dir / "conversation.json", self.data)
