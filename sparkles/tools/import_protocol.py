"""Import the original repository's protocol texts into a protocol file, by reading its source (never running it).

    python -m sparkles.tools.import_protocol --upstream path/to/Sparkles --out protocol_upstream.yaml
    python evaluate.py ... --protocol upstream --protocol-file protocol_upstream.yaml

The original keeps its texts in code: the chat system text in its conversation module (the ``system=`` of the
conversation template), the BISON and NLVR2 questions and the judge prompt in ``evaluate.py``, the judge's
system message in ``dataset/call_gpt_api.py``. This tool parses those files with :mod:`ast` and folds string
expressions statically — literals, f-strings, ``+`` chains, ``+=`` on a name, ``str.format`` and names bound
to such expressions — leaving a *hole* wherever a value is only known at run time. A text is recognised by
what it must contain:

- the system text: a ``system=`` keyword argument that folds to plain text (the one mentioning ``<Img>`` when
  there are several);
- the BISON question: a text with two image slots and "(IMAGE#1 or IMAGE#2)" and one hole, the caption;
- the NLVR2 question: the same with "(TRUE or FALSE)" and one hole, the statement;
- the judge prompt: the longest text that asks for "Evaluating A1" and "A2" ratings; its holes are the image
  list and the four messages (Q1, A1, Q2, A2) in order, or the image list and a dialogue text that itself holds
  the four messages. An image list written with ``json.dumps`` stays JSON, anything else is the Python repr;
- the judge's system message: the ``content`` of a ``{"role": "system", ...}`` literal.

The extraction rule is set to ``upstream``. A text that cannot be found is an error naming the file and what
was looked for; the file is written only when every text was found.
"""

from __future__ import annotations

import argparse
import ast
import logging
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from ..common.io import atomic_write
from ..conversation.protocol_file import ProtocolFileError, ProtocolTexts, check_texts, dump_protocol
from ..conversation.template import IMAGE_MARKER

log = logging.getLogger(__name__)

EVALUATE_FILE = "evaluate.py"
CONVERSATION_FILES = ("sparkles/conversation/conversation_sparkleschat.py", "sparkles/conversation/conversation.py")
GPT_API_FILE = "dataset/call_gpt_api.py"


class ImportProtocolError(RuntimeError):
    """A text the protocol needs was not found (or not understood) in the original's source."""


# --------------------------------------------------------------------------------------------- static folding
@dataclass(frozen=True)
class Hole:
    """A run-time value inside a text: its source code and the expression node."""

    source: str
    node: ast.AST


Part = Union[str, Hole]


@dataclass(frozen=True)
class Text:
    """A string expression folded into literal parts and holes."""

    parts: tuple[Part, ...]

    @property
    def literal(self) -> str:
        """The text with every hole left out (for recognising it)."""
        return "".join(p for p in self.parts if isinstance(p, str))

    @property
    def holes(self) -> list[Hole]:
        return [p for p in self.parts if isinstance(p, Hole)]

    def __add__(self, other: "Text") -> "Text":
        parts: list[Part] = []
        for p in self.parts + other.parts:
            if isinstance(p, str) and parts and isinstance(parts[-1], str):
                parts[-1] += p
            elif p != "":
                parts.append(p)
        return Text(tuple(parts))

    def with_holes(self, names: Sequence[str]) -> str:
        """The text with its holes, in order, written as ``{name}`` placeholders."""
        if len(names) != len(self.holes):
            raise ValueError("one name per hole")
        it = iter(names)
        return "".join(p if isinstance(p, str) else "{" + next(it) + "}" for p in self.parts)


_BLOCKS = ("body", "orelse", "finalbody")


class Folder:
    """Folds the string expressions of one source file; collects every text it meets."""

    def __init__(self, source: str, path: Path) -> None:
        self.source = source
        self.path = path
        self.tree = ast.parse(source, filename=str(path))
        self.texts: list[Text] = []
        self.keywords: list[tuple[str, Text]] = []  # (keyword name, value) of every call
        self.dicts: list[dict[str, Text]] = []  # dict literals with string keys
        self._walk(self.tree.body, {})

    # ---- expressions
    def fold(self, node: ast.AST, env: dict[str, Text]) -> Text:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return Text((node.value,))
        if isinstance(node, ast.JoinedStr):
            out = Text(())
            for value in node.values:
                if isinstance(value, ast.FormattedValue) and value.format_spec is None and value.conversion == -1:
                    out = out + self.fold(value.value, env)
                else:
                    out = out + (self.fold(value, env) if isinstance(value, ast.Constant) else self._hole(value))
            return out
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.fold(node.left, env) + self.fold(node.right, env)
        if isinstance(node, ast.Name) and node.id in env:
            return env[node.id]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
            base = self.fold(node.func.value, env)
            if not base.holes:
                return self._format(base.literal, node, env)
        return self._hole(node)

    def _hole(self, node: ast.AST) -> Text:
        target = node.value if isinstance(node, ast.FormattedValue) else node
        return Text((Hole(ast.get_source_segment(self.source, target) or ast.dump(target), target),))

    def _format(self, template: str, call: ast.Call, env: dict[str, Text]) -> Text:
        out, auto = Text(()), 0
        keywords = {k.arg: k.value for k in call.keywords if k.arg}
        for literal, field, spec, conversion in string.Formatter().parse(template):
            out = out + Text((literal,))
            if field is None:
                continue
            if field == "":
                field, auto = str(auto), auto + 1
            node = call.args[int(field)] if field.isdigit() and int(field) < len(call.args) else keywords.get(field)
            if node is None or spec or conversion:
                raise ImportProtocolError(f"{self.path}: cannot follow the format field {{{field}}} "
                                          f"at line {call.lineno}")
            out = out + self.fold(node, env)
        return out

    # ---- statements
    def _note(self, text: Text) -> Text:
        if text.parts and any(isinstance(p, str) and p for p in text.parts):
            self.texts.append(text)
        return text

    def _scan(self, stmt: ast.stmt):
        """The expression nodes of ``stmt`` itself (a compound statement's inner blocks are walked on their own)."""
        for name, value in ast.iter_fields(stmt):
            if name in _BLOCKS or name == "handlers":
                continue
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    yield from ast.walk(child)

    def _walk(self, body: Iterable[ast.stmt], env: dict[str, Text]) -> None:
        for stmt in body:
            for node in self._scan(stmt):  # every string expression, call keyword and dict literal of the statement
                if isinstance(node, (ast.JoinedStr, ast.BinOp, ast.Call)):
                    self._note(self.fold(node, env))
                if isinstance(node, ast.Call):
                    for kw in node.keywords:
                        if kw.arg:
                            self.keywords.append((kw.arg, self.fold(kw.value, env)))
                if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) for k in node.keys):
                    self.dicts.append({str(k.value): self.fold(v, env) for k, v in zip(node.keys, node.values)})
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                value = self.fold(stmt.value, env)
                if value.literal or value.holes and len(value.parts) > 1:
                    env[stmt.targets[0].id] = self._note(value)
                else:
                    env.pop(stmt.targets[0].id, None)
            elif isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, ast.Add) \
                    and isinstance(stmt.target, ast.Name) and stmt.target.id in env:
                env[stmt.target.id] = self._note(env[stmt.target.id] + self.fold(stmt.value, env))
            for field_name in _BLOCKS:
                inner = getattr(stmt, field_name, None)
                if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                    self._walk(inner, dict(env))
            for handler in getattr(stmt, "handlers", []) or []:
                self._walk(handler.body, dict(env))


# --------------------------------------------------------------------------------------------- finding the texts
def _read(path: Path) -> Folder:
    try:
        return Folder(path.read_text(encoding="utf-8"), path)
    except SyntaxError as exc:
        raise ImportProtocolError(f"{path}: not parseable Python ({exc.msg}, line {exc.lineno})") from None


def _unique(texts: Iterable[Text]) -> list[Text]:
    seen, out = set(), []
    for t in texts:
        key = tuple(p if isinstance(p, str) else ("hole", p.source) for p in t.parts)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def find_system_text(folder: Folder) -> str:
    found = _unique(v for k, v in folder.keywords if k == "system" and v.literal and not v.holes)
    if not found:
        raise ImportProtocolError(f"{folder.path}: no `system=` argument with plain text (the conversation "
                                  "template's system text)")
    if len(found) > 1:
        with_image = [t for t in found if "<Img>" in t.literal]
        if len(with_image) == 1:
            return with_image[0].literal
        raise ImportProtocolError(f"{folder.path}: {len(found)} different `system=` texts; cannot tell which one "
                                  "the multi-image chat uses")
    return found[0].literal


def find_choice_template(folder: Folder, options_phrase: str, placeholder: str, what: str) -> str:
    found = [t for t in _unique(folder.texts)
             if options_phrase in t.literal and t.literal.count(IMAGE_MARKER) == 2 and len(t.holes) == 1]
    if not found:
        raise ImportProtocolError(f"{folder.path}: no {what} question found (a text with two image slots, "
                                  f"{options_phrase!r} and one value inserted)")
    best = max(found, key=lambda t: len(t.literal))  # the whole question, not a fragment of it
    return best.with_holes([placeholder])


def _images_format(hole: Hole) -> str:
    node = hole.node
    if isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name == "dumps":
            return "json"
    return "python_repr"


def find_judge_template(folder: Folder) -> tuple[str, str]:
    """``(template, images_format)`` of the judge prompt."""
    found = [t for t in _unique(folder.texts)
             if "Evaluating A1" in t.literal and "A2" in t.literal and "rating" in t.literal.lower()]
    if not found:
        raise ImportProtocolError(f"{folder.path}: no judge prompt found (a text asking for 'Evaluating A1' and "
                                  "A2 ratings)")
    best = max(found, key=lambda t: len(t.literal))
    holes = best.holes
    if len(holes) == 5:
        return best.with_holes(["images", "q1", "a1", "q2", "a2"]), _images_format(holes[0])
    if len(holes) == 2:  # the image list and a dialogue text built elsewhere
        dialogues = [t for t in _unique(folder.texts) if "Q1" in t.literal and "A2" in t.literal and len(t.holes) == 4]
        if len(dialogues) != 1:
            raise ImportProtocolError(f"{folder.path}: the judge prompt inserts a dialogue text, but "
                                      f"{len(dialogues)} candidate dialogue texts (Q1 ... A2 with four values) "
                                      "were found")
        dialogue = dialogues[0].with_holes(["q1", "a1", "q2", "a2"])
        template = best.with_holes(["images", "\x00dialogue"]).replace("{\x00dialogue}", dialogue)
        return template, _images_format(holes[0])
    raise ImportProtocolError(f"{folder.path}: the judge prompt inserts {len(holes)} values "
                              f"({', '.join(h.source for h in holes)}); expected the image list and the four messages")


def find_judge_system(folder: Folder) -> Optional[str]:
    for d in folder.dicts:
        role, content = d.get("role"), d.get("content")
        if role is not None and role.literal == "system" and not role.holes and content is not None \
                and not content.holes and content.literal:
            return content.literal
    return None


def _commit(upstream: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(upstream), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def import_protocol(upstream: str | Path) -> ProtocolTexts:
    """The protocol texts of a checkout of the original repository (see the module docstring)."""
    upstream = Path(upstream)
    evaluate = upstream / EVALUATE_FILE
    if not evaluate.is_file():
        raise ImportProtocolError(f"{evaluate} not found: --upstream must be a checkout of the original repository")
    conversation = next((upstream / c for c in CONVERSATION_FILES if (upstream / c).is_file()), None)
    if conversation is None:
        raise ImportProtocolError(f"no conversation module under {upstream} "
                                  f"(looked for {', '.join(CONVERSATION_FILES)})")
    ev, conv = _read(evaluate), _read(conversation)
    judge_template, images_format = find_judge_template(ev)
    judge_system = None
    api = upstream / GPT_API_FILE
    if api.is_file():
        judge_system = find_judge_system(_read(api))
    if judge_system is None:
        judge_system = find_judge_system(ev)
    if judge_system is None:
        raise ImportProtocolError(f"no judge system message found (a {{'role': 'system', 'content': ...}} literal) "
                                  f"in {api} or {evaluate}")
    commit = _commit(upstream)
    texts = ProtocolTexts(
        system_text=find_system_text(conv),
        bison_template=find_choice_template(ev, "(IMAGE#1 or IMAGE#2)", "caption", "BISON"),
        nlvr2_template=find_choice_template(ev, "(TRUE or FALSE)", "statement", "NLVR2"),
        judge_system=judge_system,
        judge_template=judge_template,
        judge_images_format=images_format,
        extraction="upstream",
        source=f"imported from the original repository at {upstream.resolve()}"
               + (f" (commit {commit})" if commit else ""),
    )
    try:
        return check_texts(texts, "imported protocol")
    except ProtocolFileError as exc:
        raise ImportProtocolError(str(exc)) from None


HEADER = ("Protocol texts of the original Sparkles repository, read from its source by\n"
          "python -m sparkles.tools.import_protocol. Use with: evaluate.py --protocol upstream --protocol-file <this>")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparkles.tools.import_protocol",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="a checkout of the original Sparkles repository")
    parser.add_argument("--out", required=True, help="the protocol file to write (YAML)")
    args = parser.parse_args(argv)
    try:
        texts = import_protocol(args.upstream)
    except ImportProtocolError as exc:
        print(f"import_protocol: {exc}", file=sys.stderr)
        return 1
    atomic_write(args.out, dump_protocol(texts, HEADER))
    for key in texts.given():
        value = getattr(texts, key)
        print(f"{key:16s} {len(value):5d} characters: {value[:60]!r}...")
    print(f"wrote {args.out} (extraction: {texts.extraction}, judge images as {texts.judge_images_format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
