"""Load test of the OpenAI-compatible API server: 32 concurrent clients against a tiny model on loopback.

The server runs in a child process (this module with ``--serve-port``, a tiny random SparklesChat behind
``sparkles.serve.api.create_app`` with an API key, a 4 MiB body cap and a queue of 8), so its memory is
measured alone. The clients start together and send, round-robin, plain and streaming requests (some with
an image); a third of the well-formed ones hang up early (a read timeout, or a stream closed after its
first events). Every fourth request is hostile: an oversized body with a ``Content-Length`` and one sent
chunked (``--oversized-mib`` each), ``NaN`` in a field, a form content type, nesting 100 000 deep, no API key.

It checks that every well-formed request that was not abandoned was answered (200) or refused with 429 and
``Retry-After`` — none lost to a reset, a timeout or a 5xx; that each hostile one got its 4xx (a full queue
answers 429 before reading a body, so those checked in the app come back as told, a few times);
that the server's peak RSS grew by at most ``--memory-budget-mib`` over its idle size; and that it answers
normally afterwards. Bounded in requests (``--requests-per-client``) and time (``--duration``); it stops
the server and itself.

    python -m benchmarks.api_load [--quick] [--out api_load.json]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import httpx

REPO = Path(__file__).resolve().parents[1]
MODEL = "sparkles-tiny"
MIB = 1024 * 1024
HOSTILE = ("oversized_length", "oversized_chunked", "nan", "form_content_type", "deep_nesting", "no_api_key")
# What each hostile request must get. Those refused inside the app (after admission) may meet a full queue first.
EXPECTED = {"oversized_length": {413}, "oversized_chunked": {413, 429}, "nan": {400, 429},
            "form_content_type": {415}, "deep_nesting": {400, 429}, "no_api_key": {401}}
HOSTILE_EVERY = 4
HOSTILE_TRIES = 5
SERVER_MAX_BODY_MIB = 4
SERVER_MAX_QUEUE = 8


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one request per client, short answers, 128 MiB hostile bodies (for tests)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=None, help="default 6 (1 with --quick)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per answer (default 48; 12 with --quick)")
    parser.add_argument("--oversized-mib", type=int, default=None,
                        help="size of the oversized hostile bodies (default 200; 128 with --quick)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds after which clients stop sending (default 300; 90 with --quick)")
    parser.add_argument("--memory-budget-mib", type=float, default=192.0,
                        help="most the server's RSS may grow over its idle size (default 192)")
    parser.add_argument("--start-timeout", type=float, default=180.0, help="seconds to wait for the server")
    parser.add_argument("--server-max-body-mib", type=int, default=SERVER_MAX_BODY_MIB,
                        help=f"the server's body cap (default {SERVER_MAX_BODY_MIB}; raise it past --oversized-mib to "
                             "see the checks catch a server without one)")
    parser.add_argument("--out", default="api_load.json", help="JSON result (default api_load.json)")
    parser.add_argument("--serve-port", type=int, default=None, help=argparse.SUPPRESS)  # the child's side
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.requests_per_client = args.requests_per_client or (1 if quick else 6)
    args.max_tokens = args.max_tokens or (12 if quick else 48)
    args.oversized_mib = args.oversized_mib or (128 if quick else 200)
    args.duration = args.duration or (90.0 if quick else 300.0)
    return args


# ------------------------------------------------------------------------------------------------ server
def serve(port: int, work: Path, max_body_mib: int) -> None:
    """The child: a tiny model whose answers always run to ``max_tokens`` (no stop string, no end token)."""
    import torch
    import uvicorn

    from sparkles.engine.decoding import GenerationConfig
    from sparkles.serve.api import create_app, loopback_hosts
    from sparkles.serve.loading import make_chat
    from sparkles.testing.tiny import build_tiny_model

    torch.set_num_threads(1)  # the clients share this machine
    generation = GenerationConfig(max_new_tokens=16, stop_strings=(), stop_on_eos=False)
    chat = make_chat(build_tiny_model(work / "model", init_std=0.3), generation=generation)
    app = create_app(chat, model_name=MODEL, api_key=os.environ["SPARKLES_API_KEY"],
                     allowed_hosts=loopback_hosts(port), max_body_bytes=max_body_mib * MIB,
                     max_queue=SERVER_MAX_QUEUE)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_kib(pid: int, field: str) -> Optional[float]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib(pid: int) -> Optional[float]:
    """The process's resident memory now (psutil when installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        kib = _status_kib(pid, "VmRSS")
        return kib / 1024 if kib is not None else None
    try:
        return psutil.Process(pid).memory_info().rss / MIB
    except psutil.Error:
        return None


class MemoryWatch:
    """The server's peak RSS from now on: the kernel's high-water mark (reset first) where Linux keeps one,
    and samples every 20 ms besides (psutil or /proc), so a short peak between samples is still counted."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0.0
        self.baseline = rss_mib(pid) or 0.0
        try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            self.hwm = _status_kib(pid, "VmHWM") is not None
        except OSError:
            self.hwm = False
        self.method = "VmHWM + samples" if self.hwm else "samples"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mib(self.pid) or 0.0)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        if self.hwm:
            self.peak = max(self.peak, (_status_kib(self.pid, "VmHWM") or 0.0) / 1024)
        self.peak = max(self.peak, self.baseline)
        return self.peak


def _stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------ clients
def _png_data_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Load:
    """The request plan, the clients that send it and what came back."""

    def __init__(self, base: str, key: str, args: argparse.Namespace) -> None:
        self.base, self.key, self.args = base, key, args
        self.auth = {"Authorization": f"Bearer {key}"}
        self.image = _png_data_url()
        self.outcomes: list[dict] = []
        self._lock = threading.Lock()
        self.deadline = time.monotonic() + args.duration  # restarted when the clients start

    def plan(self, index: int) -> tuple[str, bool, bool]:
        """``(kind, streaming, abandons)`` of request ``index``: every fourth hostile, a third of the rest leave."""
        if index % HOSTILE_EVERY == HOSTILE_EVERY - 1:
            return HOSTILE[(index // HOSTILE_EVERY) % len(HOSTILE)], False, False
        j = index - index // HOSTILE_EVERY
        return "well_formed", j % 2 == 1, j % 3 == 2

    def body(self, index: int, stream: bool) -> dict:
        content: list = [{"type": "text", "text": f"Request {index}: what is in IMAGE#1"}]
        if index % 2 == 0:
            content.append({"type": "image_url", "image_url": {"url": self.image}})
        content.append({"type": "text", "text": "?"})
        return {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0,
                "max_tokens": self.args.max_tokens, "stream": stream}

    def record(self, **outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def timeout(self, read: Optional[float] = None):
        left = max(1.0, self.deadline + 60 - time.monotonic())
        return httpx.Timeout(left, read=read if read is not None else left)

    # --- one request of each sort
    def well_formed(self, client, index: int, stream: bool, abandons: bool) -> dict:
        url, body = self.base + "/chat/completions", self.body(index, stream)
        read = 0.05 + 0.05 * (index % 5) if abandons else None
        t0 = time.perf_counter()
        try:
            if not stream:
                resp = client.post(url, json=body, headers=self.auth, timeout=self.timeout(read))
                ok = resp.status_code == 200 and isinstance(resp.json()["choices"][0]["message"]["content"], str)
                return self._classify(resp, ok, t0)
            with client.stream("POST", url, json=body, headers=self.auth, timeout=self.timeout()) as resp:
                if resp.status_code != 200:
                    resp.read()
                    return self._classify(resp, False, t0)
                events = []
                for line in resp.iter_lines():
                    if line:
                        events.append(line)
                    if abandons and len(events) >= 2:
                        return {"outcome": "abandoned"}  # leaving the block closes the connection mid-stream
                ok = events[-1:] == ["data: [DONE]"] and not any('"error"' in e for e in events)
                return self._classify(resp, ok, t0)
        except httpx.ReadTimeout:
            if abandons:
                return {"outcome": "abandoned"}
            return {"outcome": "lost", "detail": "read timeout"}
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            return {"outcome": "lost", "detail": f"{type(exc).__name__}: {exc}"[:200]}

    def _classify(self, resp, ok: bool, t0: float) -> dict:
        if resp.status_code == 200 and ok:
            return {"outcome": "answered", "status": 200, "latency_s": time.perf_counter() - t0}
        if resp.status_code == 429 and resp.headers.get("retry-after", "").isdigit():
            return {"outcome": "refused", "status": 429, "retry_after": int(resp.headers["retry-after"])}
        return {"outcome": "lost", "status": resp.status_code, "detail": resp.text[:200]}

    def hostile(self, client, kind: str) -> dict:
        url = self.base + "/chat/completions"
        json_type = {"Content-Type": "application/json"}
        size = self.args.oversized_mib * MIB
        block = b" " * MIB

        def oversized():  # streamed: the client never holds the body either
            for _ in range(size // MIB):
                yield block

        request = {
            "oversized_length": dict(content=oversized(), headers={**self.auth, **json_type,
                                                                   "Content-Length": str(size)}),
            "oversized_chunked": dict(content=oversized(), headers={**self.auth, **json_type}),
            "nan": dict(content='{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
                        % MODEL, headers={**self.auth, **json_type}),
            "form_content_type": dict(content="model=x&messages=hi", headers={
                **self.auth, "Content-Type": "application/x-www-form-urlencoded"}),
            "deep_nesting": dict(content='{"model": "%s", "messages": %s%s}' % (MODEL, "[" * 100_000, "]" * 100_000),
                                 headers={**self.auth, **json_type}),
            "no_api_key": dict(json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, headers={}),
        }[kind]
        try:
            for _ in range(HOSTILE_TRIES):  # a full queue answers 429 before the body is read: come back as told
                resp = client.post(url, timeout=self.timeout(), **request)
                if resp.status_code != 429 or time.monotonic() > self.deadline:
                    break
                time.sleep(min(2.0, int(resp.headers.get("retry-after", "1"))))
                request = {**request, **({"content": oversized()} if kind.startswith("oversized") else {})}
        except httpx.HTTPError as exc:
            return {"outcome": "hostile_unexpected", "detail": f"{type(exc).__name__}: {exc}"[:200]}
        shape = False
        try:
            shape = set(resp.json()["error"]) == {"message", "type", "param", "code"}
        except (ValueError, KeyError, TypeError):
            pass
        good = resp.status_code in EXPECTED[kind] and shape
        return {"outcome": "hostile_refused" if good else "hostile_unexpected", "status": resp.status_code,
                **({} if good else {"detail": resp.text[:200]})}

    def client(self, c: int, start: threading.Barrier) -> None:
        start.wait()
        with httpx.Client() as client:
            for r in range(self.args.requests_per_client):
                if time.monotonic() > self.deadline:
                    break
                index = c * self.args.requests_per_client + r
                kind, stream, abandons = self.plan(index)
                if kind == "well_formed":
                    outcome = self.well_formed(client, index, stream, abandons)
                else:
                    outcome = self.hostile(client, kind)
                self.record(index=index, kind=kind, stream=stream, abandons=abandons, **outcome)
                if outcome.get("status") == 429:  # a polite client waits as told (capped, to stay bounded)
                    time.sleep(min(2.0, outcome.get("retry_after", 1)))

    def run(self) -> bool:
        """All clients at once; True when every client finished before the deadline."""
        n = self.args.clients
        start = threading.Barrier(n)
        self.deadline = time.monotonic() + self.args.duration
        threads = [threading.Thread(target=self.client, args=(c, start), daemon=True) for c in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(0.0, self.deadline + 120 - time.monotonic()))
        return not any(t.is_alive() for t in threads)


def _serves_normally(base: str, key: str) -> bool:
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}

    def post(payload):  # the last abandoned requests may still be leaving the queue: wait as told, a few times
        for _ in range(10):
            resp = httpx.post(base + "/chat/completions", json=payload, headers=auth, timeout=120)
            if resp.status_code != 429:
                break
            time.sleep(min(2, int(resp.headers.get("retry-after", "1"))))
        return resp

    try:
        models = httpx.get(base + "/models", headers=auth, timeout=60)
        plain, stream = post(body), post({**body, "stream": True})
    except httpx.HTTPError:
        return False
    return (models.status_code == 200 and plain.status_code == 200
            and isinstance(plain.json()["choices"][0]["message"]["content"], str)
            and stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]"))


def _wait_ready(proc: subprocess.Popen, base: str, key: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it answered")
        try:
            if httpx.get(base + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer within {timeout:.0f} s")


def _percentile(xs: list[float], q: float) -> Optional[float]:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


# ------------------------------------------------------------------------------------------------ main
def summarize(load: Load, *, finished: bool, after_ok: bool, baseline: float, peak: float, method: str,
              elapsed: float, args: argparse.Namespace, command: str) -> dict:
    outcomes = sorted(load.outcomes, key=lambda o: o["index"])
    count = {k: sum(o["outcome"] == k for o in outcomes) for k in
             ("answered", "refused", "abandoned", "lost", "hostile_refused", "hostile_unexpected")}
    hostile: dict[str, dict] = {}
    for o in outcomes:
        if o["kind"] != "well_formed":
            h = hostile.setdefault(o["kind"], {"sent": 0, "statuses": {}})
            h["sent"] += 1
            key = str(o.get("status", "no answer"))
            h["statuses"][key] = h["statuses"].get(key, 0) + 1
    latencies = [o["latency_s"] for o in outcomes if o["outcome"] == "answered"]
    growth = peak - baseline
    failures = []
    if count["lost"]:
        failures.append(f"{count['lost']} well-formed requests were neither answered nor refused with 429: "
                        + "; ".join(str(o.get("detail", o.get("status"))) for o in outcomes
                                    if o["outcome"] == "lost")[:600])
    if count["hostile_unexpected"]:
        failures.append(f"{count['hostile_unexpected']} hostile requests got an unexpected answer: "
                        + "; ".join(f"{o['kind']}: {o.get('status')} {o.get('detail', '')}" for o in outcomes
                                    if o["outcome"] == "hostile_unexpected")[:600])
    if not count["answered"]:
        failures.append("no request was answered")
    if not finished:
        failures.append("clients were still running after the deadline")
    if growth > args.memory_budget_mib:
        failures.append(f"the server's RSS grew by {growth:.0f} MiB, over the {args.memory_budget_mib:.0f} MiB budget")
    if not after_ok:
        failures.append("the server did not answer normally after the load")
    return {
        "benchmark": "api_load", "quick": args.quick, "clients": args.clients,
        "requests": len(outcomes), "well_formed": sum(o["kind"] == "well_formed" for o in outcomes),
        "answered": count["answered"], "refused_429": count["refused"], "abandoned": count["abandoned"],
        "lost": count["lost"], "hostile_refused": count["hostile_refused"],
        "hostile_unexpected": count["hostile_unexpected"], "hostile": hostile,
        "latency_s": {"p50": _percentile(latencies, 0.5), "p95": _percentile(latencies, 0.95),
                      "max": max(latencies, default=None)},
        "server_rss_mib": {"baseline": round(baseline, 1), "peak": round(peak, 1), "growth": round(growth, 1),
                           "budget": args.memory_budget_mib, "method": method},
        "after_load_ok": after_ok, "duration_s": round(elapsed, 2),
        "settings": {"requests_per_client": args.requests_per_client, "max_tokens": args.max_tokens,
                     "oversized_mib": args.oversized_mib, "server_max_body_mib": args.server_max_body_mib,
                     "server_max_queue": SERVER_MAX_QUEUE, "duration_limit_s": args.duration},
        "machine": {"cpu_cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "command": command,
        "failures": failures, "passed": not failures,
    }


def report(r: dict) -> None:
    lat, mem = r["latency_s"], r["server_rss_mib"]

    def s(x):
        return "-" if x is None else f"{x:.3f} s"

    print(f"\napi_load: {r['clients']} clients, {r['requests']} requests in {r['duration_s']:.1f} s")
    print(f"  well-formed {r['well_formed']}: answered {r['answered']}, refused 429 {r['refused_429']}, "
          f"abandoned early {r['abandoned']}, lost {r['lost']}")
    print(f"  hostile: {r['hostile_refused']} refused as expected, {r['hostile_unexpected']} unexpected "
          + ", ".join(f"{k} {v['statuses']}" for k, v in sorted(r["hostile"].items())))
    print(f"  latency of answered requests: p50 {s(lat['p50'])}, p95 {s(lat['p95'])}, max {s(lat['max'])}")
    print(f"  server RSS: idle {mem['baseline']:.0f} MiB, peak {mem['peak']:.0f} MiB (+{mem['growth']:.0f}, "
          f"budget {mem['budget']:.0f}; {mem['method']})")
    print(f"  serves normally afterwards: {r['after_load_ok']}")
    print("  PASSED" if r["passed"] else "  FAILED:\n    " + "\n    ".join(r["failures"]))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.serve_port:
        serve(args.serve_port, Path(args.work), args.server_max_body_mib)
        return 0
    command = " ".join(["python -m benchmarks.api_load", *(sys.argv[1:] if argv is None else argv)])
    from sparkles.common.io import atomic_write_json

    with tempfile.TemporaryDirectory(prefix="api_load_") as tmp:
        port, key = _free_port(), secrets.token_hex(16)
        base = f"http://127.0.0.1:{port}/v1"
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "benchmarks.api_load", "--serve-port", str(port),
                                     "--work", tmp, "--server-max-body-mib", str(args.server_max_body_mib)],
                                    cwd=REPO, env={**os.environ, "SPARKLES_API_KEY": key},
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(proc, base, key, args.start_timeout)
            load = Load(base, key, args)
            with httpx.Client() as client:  # warm up: both answer paths once before the idle size is taken
                for i in range(2):
                    load.well_formed(client, i, bool(i), False)
            memory = MemoryWatch(proc.pid)
            t0 = time.perf_counter()
            finished = load.run()
            elapsed = time.perf_counter() - t0
            after_ok = _serves_normally(base, key) and proc.poll() is None
            peak = memory.stop()
            result = summarize(load, finished=finished, after_ok=after_ok, baseline=memory.baseline, peak=peak,
                               method=memory.method, elapsed=elapsed, args=args, command=command)
        except RuntimeError as exc:  # the server never came up
            print(f"api_load: {exc}\nserver log (end):\n" + log_path.read_text(errors="replace")[-3000:],
                  file=sys.stderr)
            return 1
        finally:
            _stop_server(proc)
        if not result["passed"]:
            print("server log (end):\n" + log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
    report(result)
    if args.out:
        atomic_write_json(args.out, result)
        print(f"  wrote {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
