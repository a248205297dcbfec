"""Weight files named by URL: downloaded once into the cache, checked, read from there; failures leave no file.

A local HTTP server (``http.server`` in a thread) serves a folder and counts the requests it answers.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
from functools import partial

import pytest
import torch

from sparkles.models import weights
from sparkles.models.loaders import save_blip2
from sparkles.models.sparkleschat import SparklesChat, SparklesChatConfig
from sparkles.models.weights import WeightDownloadError, cache_path, fetch
from sparkles.testing.tiny import TINY_SIZES, build_tiny_model


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder; ``/short/<name>`` announces more bytes than it sends (a cut connection)."""

    requests: list[str]

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.requests.append(self.path)
        if self.path.startswith("/short/"):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """``(base URL, served folder, list of request paths)``; the cache goes to tmp_path/cache."""
    served = tmp_path / "www"
    served.mkdir()
    monkeypatch.setenv("SPARKLES_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served, requests
    httpd.shutdown()
    httpd.server_close()


def _files_under(path):
    return sorted(p.name for p in path.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def test_a_url_is_downloaded_once_then_read_from_the_cache(server, tmp_path):
    base, served, requests = server
    data = bytes(range(256)) * 4000
    (served / "BLIP2").mkdir()
    (served / "BLIP2" / "eva_vit_g.pth").write_bytes(data)
    url = f"{base}/BLIP2/eva_vit_g.pth"
    path = fetch(url, progress=False)
    assert path.read_bytes() == data
    assert path == cache_path(url) and path.is_relative_to(tmp_path / "cache") and path.name == "eva_vit_g.pth"
    assert len(requests) == 1
    assert fetch(url, progress=False) == path
    assert len(requests) == 1  # the second load reads the cache


def test_a_matching_checksum_fragment_is_accepted(server):
    base, served, requests = server
    data = b"weights" * 1000
    (served / "w.pth").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert fetch(f"{base}/w.pth#sha256={digest.upper()}", progress=False).read_bytes() == data


def test_a_checksum_mismatch_names_the_url_and_both_hashes_and_leaves_no_file(server, tmp_path):
    base, served, _ = server
    data = b"not the file you expect"
    (served / "w.pth").write_bytes(data)
    url, expected = f"{base}/w.pth", "0" * 64
    with pytest.raises(WeightDownloadError) as err:
        fetch(f"{url}#sha256={expected}", progress=False)
    message = str(err.value)
    assert url in message and expected in message and hashlib.sha256(data).hexdigest() in message
    assert not cache_path(f"{url}#sha256={expected}").exists()
    assert _files_under(tmp_path / "cache") == []  # nor a temporary file


def test_the_table_of_known_checksums_is_checked(server, tmp_path, monkeypatch):
    base, served, _ = server
    (served / "w.pth").write_bytes(b"abc")
    url = f"{base}/w.pth"
    monkeypatch.setitem(weights.KNOWN_SHA256, url, "f" * 64)
    with pytest.raises(WeightDownloadError, match="checksum mismatch: expected sha256 f{64}, got "):
        fetch(url, progress=False)
    assert _files_under(tmp_path / "cache") == []


def test_a_missing_file_is_an_error_naming_the_url_and_the_status(server, tmp_path):
    base, _, _ = server
    url = f"{base}/models/pretrained/nothing.pth"
    with pytest.raises(WeightDownloadError, match=rf"cannot download {url}: HTTP 404"):
        fetch(url, progress=False)
    assert _files_under(tmp_path / "cache") == []


def test_a_cut_download_leaves_no_file(server, tmp_path):
    base, _, _ = server
    url = f"{base}/short/w.pth"
    with pytest.raises(WeightDownloadError, match=rf"cannot download {url}"):
        fetch(url, progress=False)
    assert _files_under(tmp_path / "cache") == []


def test_a_bad_fragment_is_refused(server):
    base, served, requests = server
    with pytest.raises(WeightDownloadError, match="#sha256=<64 hex digits>"):
        fetch(f"{base}/w.pth#md5=abc", progress=False)
    assert requests == []


def test_from_config_loads_weight_urls_through_the_cache(server, tmp_path):
    """model.q_former_model and model.ckpt as URLs: the frozen towers and the projection come from the served
    files, and a second build downloads nothing."""
    base, served, requests = server
    source = build_tiny_model(tmp_path / "src", seed=1, init_std=0.3)
    save_blip2(source, served / "blip2_towers.pth")
    proj = {k: v for k, v in source.state_dict().items() if k.startswith("llama_proj.")}
    torch.save({"model": proj}, served / "sparkleschat.pth")
    digest = hashlib.sha256((served / "sparkleschat.pth").read_bytes()).hexdigest()
    cfg = SparklesChatConfig(llama_model=str(tmp_path / "src" / "tokenizer"), **TINY_SIZES,
                             q_former_model=f"{base}/blip2_towers.pth", ckpt=f"{base}/sparkleschat.pth#sha256={digest}")
    for _ in range(2):
        model = SparklesChat.from_config(cfg, device="cpu", verbose=False)
        want = source.state_dict()
        for name, value in model.state_dict().items():
            if name.startswith(("visual_encoder.", "Qformer.", "query_tokens", "ln_vision.", "llama_proj.")):
                assert torch.equal(value, want[name]), name
    assert sorted(requests) == ["/blip2_towers.pth", "/sparkleschat.pth"]


def test_only_weight_files_may_be_urls(tmp_path):
    cfg = SparklesChatConfig(llama_model="https://example.org/vicuna", **TINY_SIZES, allow_random_towers=True)
    with pytest.raises(ValueError, match="model.llama_model .* is a URL; only the weight files"):
        SparklesChat.from_config(cfg, device="cpu", verbose=False)
