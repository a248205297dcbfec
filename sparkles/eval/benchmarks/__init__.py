"""The paper's benchmarks, one small file each (its prompt, reading the answer, its score).

- :mod:`.bison` and :mod:`.nlvr2`: two-choice questions over two images (:mod:`.choice` holds what they share);
- :mod:`.sparkleseval`: two-turn dialogues rated by a judge (:mod:`sparkles.eval.judges`).
"""

from . import bison, nlvr2, sparkleseval

BENCHMARKS = {m.NAME: m for m in (bison, nlvr2, sparkleseval)}
CHOICE_BENCHMARKS = {m.NAME: m for m in (bison, nlvr2)}
