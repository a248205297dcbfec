"""SparklesChat and the paper's benchmarks in lmms-eval (the optional extra ``pip install -e .[lmms]``).

- :mod:`.hooks` and ``tasks/``: BISON, NLVR2 and SparklesEval as lmms-eval tasks whose questions, answer reading
  and scores are the project's benchmark code, every image at its slot; :mod:`.export` writes their data and task
  files for a Sparkles root.
- :mod:`.models` (registered by :mod:`.plugin` through lmms-eval's entry point group ``lmms_eval.models``):
  ``sparkles_chat``, SparklesChat in process, and ``sparkles_api``, a model behind an OpenAI-compatible API; both
  answer multi-round tasks with the model's own earlier answers.
- :mod:`.messages` and :mod:`.answering`: what those models do, testable without lmms-eval.

Only :mod:`.models` imports lmms-eval. Usage and measurements: docs/lmms_eval.md.
"""
