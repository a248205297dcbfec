"""Performance benchmarks of SparklesChat's training step, chat engine, batched evaluation and feature cache.

Each module is a script with ``main(argv=None)`` that prints a short table and writes JSON;
``python -m benchmarks.run_all`` runs them all and regenerates ``benchmarks/RESULTS.md``. Sizes: ``toy``
(seconds, used by the smoke test), ``small`` (CPU, matmul-dominated) and ``full`` (the paper's shapes on a GPU,
or on the meta device with ``--dry-run``). Nothing heavy happens at import time.
"""
