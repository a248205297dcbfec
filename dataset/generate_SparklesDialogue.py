"""Generate SparklesDialogue (CC or VG) with GPT, resumably; then validate and export it.

    python dataset/generate_SparklesDialogue.py --subset CC --case_num 20 --sparkles_root /data/Sparkles

See ``sparkles.dialogue_gen.cli`` for every option (``--help``).
"""

from __future__ import annotations

import sys

from sparkles.dialogue_gen.cli import main

if __name__ == "__main__":
    sys.exit(main())
