"""The paper's benchmarks, one small file each (its prompt, reading the answer, its score).

- :mod:`.bison` and :mod:`.nlvr2`: two-choice questions over two images (:mod:`.choice` holds what they share);
- :mod:`.sparkleseval`: two-turn dialogues rated by a judge (:mod:`sparkles.eval.judges`);
- :mod:`.i4`: the DEMON core datasets of interleaved image-text instructions, scored by ROUGE-L or accuracy and
  averaged per category (its own command lines: ``evaluate_I4.py``, ``calculate_I4.py``, ``i4_score.py``).

``BENCHMARKS`` lists the three that ``evaluate.py`` runs.
"""

from . import bison, nlvr2, sparkleseval

BENCHMARKS = {m.NAME: m for m in (bison, nlvr2, sparkleseval)}
CHOICE_BENCHMARKS = {m.NAME: m for m in (bison, nlvr2)}
