"""An ASGI app served for real on a free loopback port, in a background thread: for tests and benchmarks that
talk to the API over HTTP with the official clients."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app, *, host: str = "127.0.0.1", startup_timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` with uvicorn until the block ends; yields its base URL ``http://host:port``."""
    import uvicorn

    port = free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + startup_timeout
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
