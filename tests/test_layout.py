"""The repository's shape: imports flow one way, the CPU world is one optional room, one helper per job, and the
project's text links only to what exists and speaks of the project alone."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sparkles"
TOY = "sparkles.tinyworld"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is a package ``__init__``) for every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports, at module level or inside functions alike."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def room(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_import_cycles_between_modules_or_rooms():
    graph = import_graph()
    assert cycles(graph) == []
    rooms: dict[str, set[str]] = {}
    for module, targets in graph.items():
        rooms.setdefault(room(module), set()).update(room(t) for t in targets if room(t) != room(module))
    assert cycles(rooms) == []
    # data flows one way: models → conversation → engine → serve / eval; data → tasks / runners
    assert "sparkles.conversation" not in rooms["sparkles.models"]
    assert "sparkles.engine" not in rooms["sparkles.conversation"] | rooms["sparkles.models"]
    assert not {"sparkles.serve", "sparkles.eval"} & rooms["sparkles.engine"]
    assert not {"sparkles.tasks", "sparkles.runners"} & rooms["sparkles.data"]


def test_the_checker_finds_a_cycle_hidden_in_a_function():
    graph = {"a": {"b"}, "b": set(), "c": {"a"}}
    assert cycles(graph) == []
    graph["b"].add("c")
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_core_names_no_toy():
    """Only the world's own room imports it or mentions it; configs opt in with run.imports."""
    graph = import_graph()
    importers = sorted(m for m, targets in graph.items() if not m.startswith(TOY)
                       and any(t.startswith(TOY) for t in targets))
    assert importers == []
    for path in PACKAGE.rglob("*.py"):
        if TOY.replace(".", "/") in path.as_posix():
            continue
        text = path.read_text(encoding="utf-8")
        assert "tinyworld" not in text, path
        assert not re.search(r"register\w*\(\s*[\"']synthetic_", text), path


def test_one_helper_for_one_job():
    """One atomic writer and one JSON reader (common/io.py), one IGNORE_INDEX, one seeding function, one dtype
    table (common/tensors.py)."""
    io, tensors = PACKAGE / "common" / "io.py", PACKAGE / "common" / "tensors.py"
    sources = {p: p.read_text(encoding="utf-8") for p in [*PACKAGE.rglob("*.py"), REPO / "train.py",
                                                           *(REPO / "benchmarks").glob("*.py"),
                                                           *(REPO / "dataset").glob("*.py")]}
    rules = {r"os\.replace\(|\.replace\(\s*path\s*\)|mkstemp\(|\.write_text\(\s*json": io,  # writing a file
             r"json\.load\(|json\.loads\([^)]*read_(text|bytes)\(": io,  # reading a JSON file
             r"IGNORE(_INDEX)?\s*=\s*-100": tensors, r"def \w*seed_everything": tensors,
             r"[\"']bf16[\"']\s*:": tensors}
    for pattern, home in rules.items():
        where = sorted(str(p.relative_to(REPO)) for p, text in sources.items() if re.search(pattern, text))
        assert where == [str(home.relative_to(REPO))], (pattern, where)


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    return [REPO / f for f in out if f.endswith((".md", ".py", ".yaml", ".yml", ".sh", ".toml", ".txt", ".j2"))
            and (REPO / f).is_file()]


def test_the_project_text_speaks_of_the_project_alone():
    history = re.compile("sess" + r"ion [0-9]|this sess" + "ion|next sess" + "ion", re.IGNORECASE)
    outside = re.compile(r"\.\./" + "shared")
    found = [str(p.relative_to(REPO)) for p in _tracked_text_files()
             if history.search(p.read_text(encoding="utf-8", errors="replace"))
             or outside.search(p.read_text(encoding="utf-8", errors="replace"))]
    assert found == []


def _links(markdown: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", markdown.read_text(encoding="utf-8"), flags=re.DOTALL)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    for link in _links(page):
        if re.match(r"^[a-z]+:", link) or link.startswith("#"):
            continue
        target = (page.parent / link.split("#", 1)[0]).resolve()
        assert target.exists(), f"{page.relative_to(REPO)} links to {link}, which does not exist"


def test_the_readme_is_a_manual():
    assert len((REPO / "README.md").read_text(encoding="utf-8")) <= 20_000
