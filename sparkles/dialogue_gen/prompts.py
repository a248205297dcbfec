"""The generation prompts (our own wording; the structure follows the original's).

Both prompts show demo dialogues and the candidate images as real JSON, tell GPT that the descriptions are
for its eyes only, define the four-message structure, fix how many images the first user message takes, and
ask for a bare JSON array so the reply can be parsed strictly.
"""

from __future__ import annotations

import json

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def _word(n: int) -> str:
    return _NUMBER_WORDS.get(n, str(n))


def _compact(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def conversation_block(conversation: list[dict], indent: str = "") -> str:
    """One conversation as valid JSON with one message per line (no indentation tokens inside messages)."""
    lines = ",\n".join(f"{indent}  {_compact(m)}" for m in conversation)
    return f"{indent}[\n{lines}\n{indent}]"


def conversations_block(conversations: list[list[dict]]) -> str:
    return "[\n" + ",\n".join(conversation_block(c, "  ") for c in conversations) + "\n]"


def candidates_block(candidates: list[dict]) -> str:
    rows = [_compact({"image_id": c["image_id"], "description": c["caption"]}) for c in candidates]
    return "[\n" + ",\n".join("  " + r for r in rows) + "\n]"


_INTRO = (
    "You are helping to build a dataset of conversations between a person and an AI assistant that can look "
    "at several pictures at the same time and reason about them. The person's requests cover a wide range: "
    "explaining ideas, comparing scenes, planning trips or events, telling stories, writing poems or ads, "
    "asking for advice, practical how-to questions and more."
)

_NO_DESCRIPTIONS = (
    "The descriptions are only there so that you know what each picture shows. Write as if both the user and "
    "the assistant are looking at the pictures themselves: never mention a \"description\", a \"caption\" or "
    "any text about the pictures."
)

_MESSAGE_SHAPES = (
    "{\"role\": \"user\", \"image_ids\": [...], \"content\": \"...\"} for a user message and "
    "{\"role\": \"assistant\", \"content\": \"...\"} for an assistant message. Use the image ids exactly as "
    "they are listed."
)
_OUTPUT = "Output format: reply with JSON and nothing else (no explanation, no code fence): "


def cc_prompt(demos: list[list[dict]], candidates: list[dict], first_turn_images: list[int]) -> str:
    """The SparklesDialogueCC prompt: several demos, candidates, one conversation per entry of
    ``first_turn_images`` (upstream: three demos, nine candidates, first turns with 1, 2 and 3 images)."""
    n = len(first_turn_images)
    counts = "; ".join(f"in conversation {i + 1}, the first user message uses exactly {_word(k)} "
                       f"picture{'s' if k != 1 else ''}" for i, k in enumerate(first_turn_images))
    return "\n\n".join([
        _INTRO,
        f"Below are {_word(len(demos))} sample conversations in JSON. In every user message, \"image_ids\" lists "
        "the pictures the user newly brings into the conversation, and the text refers to each of them as "
        "IMAGE#<image_id>.",
        "```json\n" + conversations_block(demos) + "\n```",
        "The ids and topics in the samples are just for illustration. These are the pictures you may use, each "
        "with its id and a description of what it shows:",
        "```json\n" + candidates_block(candidates) + "\n```",
        _NO_DESCRIPTIONS,
        "Every conversation has exactly four messages:\n"
        "1. user: chooses candidate pictures that go well together and writes a natural, imaginative request "
        "about them.\n"
        "2. assistant: gives a genuinely useful, detailed answer that reasons carefully about what the pictures "
        "show.\n"
        "3. user: brings in exactly one further candidate picture that message 1 did not use, and asks a "
        "follow-up that involves the new picture together with the earlier ones.\n"
        "4. assistant: answers the follow-up in detail, with clear reasoning.",
        f"Write {_word(n)} independent conversations: {counts}. Make the topics varied and do not stick closely "
        "to the samples. Write every message in full, including the final assistant message, which the samples "
        "shorten to \"...\".",
        _OUTPUT + f"an array of the {_word(n)} conversations in the order above, each conversation an array of "
        "exactly four objects: " + _MESSAGE_SHAPES,
    ])


def vg_prompt(demo: list[dict], candidates: list[dict], first_turn_images: int) -> str:
    """The SparklesDialogueVG prompt: one demo, candidates (upstream: four), one conversation whose first
    user message uses exactly ``first_turn_images`` pictures."""
    k = _word(first_turn_images)
    return "\n\n".join([
        _INTRO,
        "Below is a sample conversation in JSON. In every user message, \"image_ids\" lists the pictures the user "
        "newly brings into the conversation, and the text refers to each of them as IMAGE#<image_id>.",
        "```json\n" + conversation_block(demo) + "\n```",
        "The ids and topics in the sample are just for illustration. Note that the sample's user messages "
        "sometimes give away what their pictures contain; yours must not: a user never describes or hints at "
        "the content of a picture, they only refer to it by its IMAGE#<image_id>. These are the pictures you may "
        "use, each with its id and a description of what it shows:",
        "```json\n" + candidates_block(candidates) + "\n```",
        _NO_DESCRIPTIONS,
        "The conversation has exactly four messages:\n"
        f"1. user: chooses exactly {k} candidate pictures that go well together and writes a natural, imaginative "
        "request about them.\n"
        "2. assistant: gives a genuinely useful, detailed answer that reasons carefully about what the pictures "
        "show.\n"
        "3. user: brings in exactly one of the other candidate pictures and asks a follow-up that involves the "
        "new picture together with the earlier ones.\n"
        "4. assistant: answers the follow-up in detail, with clear reasoning.",
        "Write one conversation. Its topic must not follow the sample. Write every message in full, including "
        "the final assistant message, which the sample shortens to \"...\".",
        _OUTPUT + "the conversation as an array of exactly four objects, like the sample: " + _MESSAGE_SHAPES,
    ])
