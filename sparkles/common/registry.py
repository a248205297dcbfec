"""Name → builder tables: models, their presets and tower initialisations, datasets, processors, tasks, judges.

Modules register their entries when they are imported (``import sparkles.models``; a config's ``run.imports``
names further modules, which register their own). This module imports nothing
else from the project, so it can never be part of an import cycle. A lookup of an unknown name fails with the
list of known names instead of returning ``None``.
"""

from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate name in a registry table."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class Registry(Generic[T]):
    """One table of named builders (classes or functions)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._table: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._table and self._table[name] is not obj:
                raise RegistryError(f"{self.kind} {name!r} is already registered to {self._table[name]!r}")
            self._table[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._table[name]
        except KeyError:
            known = ", ".join(sorted(self._table)) or ("(none registered: is the module that registers them "
                                                       "imported, e.g. through the config's run.imports?)")
            raise RegistryError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._table

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._table))

    def names(self) -> list[str]:
        return sorted(self._table)


MODELS: Registry = Registry("model")
MODEL_PRESETS: Registry = Registry("model preset")  # "<arch>/<model_type>" → preset YAML path
# model.towers_init → fn(visual_encoder, Qformer, query_tokens), the recipe for towers trained from scratch
TOWERS_INITS: Registry = Registry("towers initialisation")
DATASETS: Registry = Registry("dataset")
PROCESSORS: Registry = Registry("processor")
TASKS: Registry = Registry("task")
JUDGES: Registry = Registry("judge")  # SparklesEval judges other than chat models (--judge_models NAME)
