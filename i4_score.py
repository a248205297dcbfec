"""Average I4 (DEMON core) dataset scores per category: ``<result-dir>/i4-score.txt`` and ``i4-score.json``.

See ``python i4_score.py --help``; run ``calculate_I4.py`` first. The work is done in
``sparkles.eval.i4_scoring_cli``.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from sparkles.eval.i4_scoring_cli import score_main

    return score_main(argv)


if __name__ == "__main__":
    sys.exit(main())
