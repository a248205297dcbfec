"""A small source tree shaped like the original repository (its file names, and texts kept in code the ways the
original keeps them), with invented sentences: what ``python -m sparkles.tools.import_protocol`` is tested on.

``write_upstream_tree(root, judge_style)`` writes ``evaluate.py``, the conversation module and
``dataset/call_gpt_api.py``. The tests also load ``evaluate.py`` as a module to compare what its functions
build with what the imported protocol file gives.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

CONVERSATION = '''
import dataclasses


class SeparatorStyle:
    SINGLE = 1


@dataclasses.dataclass
class Conversation:
    system: str
    roles: tuple
    messages: list
    offset: int
    sep_style: int = SeparatorStyle.SINGLE
    sep: str = "###"


CONV_VISION = Conversation(
    system="Picture given: <Img>ImageContent</Img>. "
           "You may look at every picture the user shares, then answer plainly.",
    roles=("Human", "Assistant"),
    messages=[],
    offset=2,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)
'''

EVALUATE_HEAD = '''
import json
import random

SLOT = "<Img><ImageHere></Img>"


def bison_prompt(caption):
    prompt = (f"Study two close pictures, IMAGE#1{SLOT} and IMAGE#2{SLOT}, and the caption '{caption}'. "
              "Which picture matches it? Think it through, start with \\"Let's think step by step.\\" and close "
              "with \\"Therefore, the answer (IMAGE#1 or IMAGE#2) is\\".")
    return prompt


def nlvr2_prompt(sentence):
    prompt = "A pair: left IMAGE#1" + SLOT + ", right IMAGE#2" + SLOT + ". "
    prompt += "Is it true that '" + sentence + "'? Count and compare; {braces stay}. "
    prompt += "Close with \\"Therefore, the answer (TRUE or FALSE) is\\"."
    return prompt


def strip_slots(text):
    return text.replace(SLOT, "")


def image_list(dialogue):
    seen, out = set(), []
    for message in dialogue:
        for image in message.get("images", []):
            if str(image["image_id"]) not in seen:
                seen.add(str(image["image_id"]))
                out.append({"image_id": image["image_id"], "caption": image["caption"]})
    return out
'''

JUDGE_FIVE_HOLES = '''

def judge_prompt(dialogue):
    images = image_list(dialogue)
    q1 = strip_slots(dialogue[0]["content"]).strip()
    a1 = strip_slots(dialogue[1]["content"]).strip()
    q2 = strip_slots(dialogue[2]["content"]).strip()
    a2 = strip_slots(dialogue[3]["content"]).strip()
    return (f"Grade an assistant over two rounds about several pictures.\\n```json\\n{images}\\n```\\n"
            f"```\\n###User Q1: {q1}\\n###Assistant A1: {a1}\\n###User Q2: {q2}\\n###Assistant A2: {a2}\\n```\\n"
            "Score (C1), (C2), (C3) from 1 to 10 as:\\n* Evaluating A1\\n- (C1) Explanation: \\"...\\" Rating: [[x]]\\n"
            "Therefore, the overall rating of A1 is [[x]]\\n* Evaluating A2\\n...")


def main():
    random.seed(0)
    print(json.dumps([bison_prompt("x"), nlvr2_prompt("y")]))
'''

JUDGE_TWO_HOLES = '''

def dialogue_text(dialogue):
    q1, a1, q2, a2 = (strip_slots(m["content"]).strip() for m in dialogue)
    return "###User Q1: {}\\n###Assistant A1: {}\\n###User Q2: {}\\n###Assistant A2: {}".format(q1, a1, q2, a2)


def build_judge(dialogue, dialogue_str):
    text = "Grade the assistant.\\n```json\\n"
    text += json.dumps(image_list(dialogue), ensure_ascii=False, indent=2)
    text += "\\n```\\n```\\n" + dialogue_str + "\\n```\\n"
    text += "* Evaluating A1 ... overall rating of A1 is [[x]]\\n* Evaluating A2 ... rating of A2 is [[x]]"
    return text


def judge_prompt(dialogue):
    return build_judge(dialogue, dialogue_text(dialogue))
'''

GPT_API = '''
import openai


def call_gpt(prompt, model="gpt-4", temperature=1.0):
    response = openai.ChatCompletion.create(
        model=model,
        messages=[{"role": "system", "content": "You answer carefully and well."},
                  {"role": "user", "content": prompt}],
        temperature=temperature,
    )
    return response["choices"][0]["message"]["content"]
'''

JUDGE_SYSTEM = "You answer carefully and well."
SYSTEM_TEXT = ("Picture given: <Img>ImageContent</Img>. "
               "You may look at every picture the user shares, then answer plainly.")


def write_upstream_tree(root: Path, judge_style: str = "five") -> Path:
    """The tree under ``root``; ``judge_style``: ``five`` (an f-string with the image list and four messages) or
    ``two`` (the image list as JSON, ``+=`` pieces, and a dialogue text built by another function with
    ``str.format``)."""
    (root / "sparkles/conversation").mkdir(parents=True, exist_ok=True)
    (root / "dataset").mkdir(parents=True, exist_ok=True)
    (root / "sparkles/conversation/conversation_sparkleschat.py").write_text(CONVERSATION)
    judge = JUDGE_FIVE_HOLES if judge_style == "five" else JUDGE_TWO_HOLES
    (root / "evaluate.py").write_text(EVALUATE_HEAD + judge)
    (root / "dataset/call_gpt_api.py").write_text(GPT_API)
    return root


def load_upstream_evaluate(root: Path):
    """The tree's ``evaluate.py`` as a module (tests compare its texts with the imported ones)."""
    spec = importlib.util.spec_from_file_location(f"upstream_evaluate_{abs(hash(str(root)))}", root / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
