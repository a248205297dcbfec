"""Evaluate SparklesChat (or any configured model) on BISON, NLVR2 and the GPT-judged SparklesEval.

See ``python evaluate.py --help`` and ``docs/sections/evaluation.md``; the work is done in
``sparkles.eval.cli``.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from sparkles.eval.cli import main as eval_main

    return eval_main(argv)


if __name__ == "__main__":
    sys.exit(main())
