"""SparklesDialogue generation: GPT writes two-turn, multi-image dialogues from image descriptions.

Modules, in the order data flows through them:

- ``schema``   — the slot marker, training-template strings and checks of a finished dialogue record;
- ``sources``  — loaders for the inputs (cc_sbu_align captions, demo seeds, SVIT descriptions, ...);
- ``demos``    — demo dialogues as GPT sees them, and the VG demo choice by unique verb–noun;
- ``prompts``  — our wording of the CC and VG generation prompts;
- ``parse``    — GPT reply text → candidate dialogues (strict JSON first, tolerant fallbacks after);
- ``validate`` — the original's rules: roles, image counts, ids in the candidate pool, slot insertion and order;
- ``pipeline`` — planning the calls, running them resumably, collecting accepted / rejected dialogues;
- ``export``   — the full ``SparklesDialogue{CC,VG}.json`` and the ``_turn{1,2}_{n}img.json`` training splits;
- ``llava_svit`` — LLaVA / SVIT re-formatting with the image-overlap filters;
- ``cli``      — the command line behind ``dataset/generate_SparklesDialogue.py``.
"""
