"""Score I4 (DEMON core) predictions per dataset: ``<result-dir>/<dataset>/eval.json`` and ``eval_score.json``.

See ``python calculate_I4.py --help``; the work is done in ``sparkles.eval.i4_scoring_cli`` and the rules are in
``sparkles.eval.benchmarks.i4``. ``python i4_score.py`` then averages the datasets per category.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from sparkles.eval.i4_scoring_cli import calculate_main

    return calculate_main(argv)


if __name__ == "__main__":
    sys.exit(main())
