"""Every command of the README runs as written on the CPU default, or is listed here with the reason it cannot.

The commands are read from the README's ``bash`` and ``python`` blocks. Each one must match a rule:
run as written against the CI-sized ``bash run.sh`` output (``outputs/tiny`` stands for that folder, and
``$SPARKLES_ROOT`` points there so the configs' own root does too), run as a smaller twin (named, with why), or
skipped with the reason (released weights, GPUs, a network or a paid key). A README command no rule knows fails
the test, so the README cannot drift from what runs.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# (pattern, reason): commands that need what a CPU test machine does not have
SKIPPED = [
    (r"/path/to/Sparkles|\.to\(\"cuda\"\)|device=\"cuda\"", "the released weights (and GPUs)"),
    (r"^bash scripts/install\.sh$", "installs into the environment; .ci/run runs it"),
    (r"^conda env create", "conda"),
    (r"^conda activate|&& conda activate", "conda"),
    (r"^bash \.ci/run$|^python -m pytest", "the test suite itself"),
    (r"^git clone ", "the network"),
    (r"^export OPENAI_API_KEY=", "a paid API key"),
    (r"^python -m sparkles\.tools\.import_protocol --upstream upstream_sparkles", "the original's checkout"),
    (r"^for cfg in .*; do$|^done$", "a loop over the released models"),
    (r"--results-file SparklesEval_models_pretrained_sparkleschat_7b\.json", "a released result file"),
    (r"^torchrun --nproc-per-node 8 ", "8 GPUs"),
    (r"--gpu-id 0", "a GPU"),
]
# (pattern, twin arguments appended, why): commands run smaller than written
TWINS = [
    (r"^bash run\.sh$", None, "the trained_tiny fixture runs it with SPARKLES_PRESET=ci"),
    (r"^python train\.py --cfg-path train_configs/sparkleschat_tiny\.yaml ",
     ["run.iters_per_epoch=2", "run.warmup_steps=1"], "two steps instead of 1,300"),
    (r"^python -m benchmarks\.run_all --size small$", None, "run at --size toy into a temporary folder"),
]
SERVERS = {r"^python demo\.py$": "/", r"^python -m sparkles\.serve --port 8000$": "/v1/models"}


def _logical_lines(block: str) -> list[str]:
    lines, current = [], ""
    for raw in block.splitlines():
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        words = shlex.split(current, comments=True)
        if words:
            lines.append(" ".join(shlex.quote(w) if re.search(r"[\s\"'*]", w) else w for w in words))
        current = ""
    return lines


def readme_commands() -> list[str]:
    return [c for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S) for c in _logical_lines(block)]


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _rule(command: str):
    """``(kind, detail)`` of the first rule that matches ``command``, or None."""
    for pattern, reason in SKIPPED:
        if re.search(pattern, command):
            return "skip", reason
    for pattern, extra, why in TWINS:
        if re.search(pattern, command):
            return "twin", (extra, why)
    for pattern, path in SERVERS.items():
        if re.search(pattern, command):
            return "server", path
    if re.match(r"^python (evaluate\.py|dataset/|-m sparkles\.tinyworld\.demo_chat)", command):
        return "run", None
    return None


def test_every_readme_command_has_a_rule():
    commands = readme_commands()
    assert len(commands) >= 15, commands
    unknown = [c for c in commands if _rule(c) is None]
    assert not unknown, f"README commands that {Path(__file__).name} does not know: {unknown}"
    for block in readme_python_blocks():
        assert "OpenAI(base_url=\"http://127.0.0.1:8000/v1\"" in block or re.search(SKIPPED[0][0], block), block


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer in {timeout} s")


def _env(out: Path) -> dict:
    env = dict(os.environ, SPARKLES_ROOT=str(out), PYTHONUNBUFFERED="1")
    env.pop("SPARKLES_OUT", None)
    return env


def _as_run(command: str, out: Path) -> str:
    return command.replace("outputs/tiny", shlex.quote(str(out)))


@pytest.mark.slow
def test_readme_commands_run_on_the_cpu_default(trained_tiny, tmp_path):
    out, _ = trained_tiny
    ran = []
    for command in readme_commands():
        kind, detail = _rule(command)
        if kind == "skip" or (kind == "twin" and detail[0] is None and "run.sh" in command):
            continue
        if kind == "server":
            continue  # test_readme_servers_answer
        script = _as_run(command, out)
        if kind == "twin" and "benchmarks.run_all" in command:
            script = (f"{sys.executable} -m benchmarks.run_all --size toy --threads 1 --repeats 1 --no-profile "
                      f"--out {tmp_path}/bench.json --results-md {tmp_path}/RESULTS.md")
        elif kind == "twin":
            script += " " + " ".join(detail[0])
        proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=_env(out), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        ran.append(command)
    assert any("visualize_eval_results" in c for c in ran) and any("data_statistics" in c for c in ran)
    assert any("--data-from" in c for c in ran) and any("train.py" in c for c in ran)
    # what they wrote: result pages, statistics, the slice's metrics beside (not over) run.sh's full run
    assert list((out / "evaluation" / "BISON" / "results").glob("*.html"))
    assert list((out / "assets" / "statistics").rglob("*.json"))
    assert (out / "models" / "sparkleschat_tiny_lr3e-4").is_dir()


@pytest.mark.slow
def test_readme_servers_answer(trained_tiny, tmp_path):
    """``python demo.py`` serves its page and ``python -m sparkles.serve`` answers the README's client code."""
    out, _ = trained_tiny
    commands = [c for c in readme_commands() if (_rule(c) or ("",))[0] == "server"]
    assert len(commands) == 2, commands
    for command in commands:
        port = _free_port()
        script = command.replace("--port 8000", f"--port {port}") if "8000" in command else f"{command} --port {port}"
        proc = subprocess.Popen(["bash", "-c", f"exec {script}"], cwd=REPO, env=_env(out), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            _wait_http(f"http://127.0.0.1:{port}{_rule(command)[1]}", proc)
            if "sparkles.serve" in command:
                [client] = [b for b in readme_python_blocks() if "OpenAI(" in b]
                images = sorted((out / "evaluation" / "DemoChat" / "images").glob("*.jpg"))[:2]
                for name, image in zip(("a.png", "b.png"), images):
                    shutil.copy(image, tmp_path / name)
                code = client.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
                run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                                     timeout=300, env=_env(out))
                assert run.returncode == 0, run.stderr[-3000:]
                assert run.stdout.strip(), "the README's client printed no answer"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
