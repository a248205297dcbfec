"""Answer I4 (DEMON core) datasets with SparklesChat (or any configured model): ``<result-dir>/<dataset>/pred.json``.

See ``python evaluate_I4.py --help``; the work is done in ``sparkles.eval.i4_cli``. ``python calculate_I4.py`` and
``python i4_score.py`` then score the answers.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from sparkles.eval.i4_cli import main as i4_main

    return i4_main(argv)


if __name__ == "__main__":
    sys.exit(main())
