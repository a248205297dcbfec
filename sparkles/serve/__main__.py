"""``python -m sparkles.serve``: the OpenAI-compatible API server.

    python -m sparkles.serve --cfg-path eval_configs/sparkles_eval.yaml --gpu-id 0 --port 8000
    curl http://127.0.0.1:8000/v1/models

Listens on 127.0.0.1 unless ``--host`` says otherwise; there it answers only requests addressed to the
loopback names (``Host`` header), which keeps web pages from reaching it through DNS rebinding. Any other
address needs an API key (``--api-key`` or ``$SPARKLES_API_KEY``), or the server refuses to start. Local
image paths in requests are refused unless ``--allowed-image-dir`` names the directories they may come from.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from .api import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_IMAGES, DEFAULT_MAX_QUEUE, is_loopback, loopback_hosts
from .loading import LoadError, add_model_arguments, load_model, make_chat
from .openai_format import DEFAULT_MAX_TEXT_CHARS

API_KEY_ENV = "SPARKLES_API_KEY"
MIB = 1024 * 1024


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {value}")
    return n


def _count(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more; got {value}")
    return n


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sparkles.serve",
                                     description="OpenAI-compatible chat-completions API for SparklesChat.")
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1); any non-loopback address needs an API key")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--model-name", default="sparkleschat",
                        help="the model id clients send and /v1/models lists (default: sparkleschat)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None, metavar="KEY",
                        help=f"require 'Authorization: Bearer KEY' on every request (default: ${API_KEY_ENV}; "
                             "prefer the variable, a command line is visible to other users of the machine)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME[:PORT]",
                        help="also answer requests whose Host header is NAME (e.g. behind a reverse proxy); "
                             "repeatable. On loopback only the loopback names are answered by default")
    parser.add_argument("--allowed-image-dir", action="append", default=[], metavar="DIR",
                        help="allow image_url parts that are local paths inside DIR (repeatable; default: none)")
    parser.add_argument("--max-images", type=_positive, default=None,
                        help=f"most images accepted in one request (default: {DEFAULT_MAX_IMAGES})")
    parser.add_argument("--max-body-mib", type=_positive, default=None, metavar="MIB",
                        help=f"largest request body in MiB; larger ones get 413 "
                             f"(default: {DEFAULT_MAX_BODY_BYTES // MIB})")
    parser.add_argument("--max-text-chars", type=_positive, default=None, metavar="N",
                        help=f"most characters of text in one request's messages (default: {DEFAULT_MAX_TEXT_CHARS})")
    parser.add_argument("--max-batch", type=_positive, default=8, metavar="N",
                        help="requests decoded together (continuous batching; default 8; 1 = one at a time)")
    parser.add_argument("--max-queue", type=_count, default=None, metavar="N",
                        help="requests that may wait while one is answered; more get 429 with Retry-After "
                             f"(default: {DEFAULT_MAX_QUEUE})")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def app_options(args: argparse.Namespace) -> dict:
    """The :func:`~sparkles.serve.api.create_app` keywords the flags set (the others keep its defaults)."""
    options = dict(model_name=args.model_name, allowed_image_dirs=args.allowed_image_dir, api_key=args.api_key,
                   max_images=args.max_images, max_text_chars=args.max_text_chars, max_queue=args.max_queue,
                   max_batch=args.max_batch,
                   max_body_bytes=args.max_body_mib * MIB if args.max_body_mib else None)
    if is_loopback(args.host):
        options["allowed_hosts"] = loopback_hosts(args.port, args.host) + list(args.allowed_host)
    elif args.allowed_host:
        options["allowed_hosts"] = list(args.allowed_host)
    else:
        options["allowed_hosts"] = None  # reachable by any name; the API key guards it
    return {k: v for k, v in options.items() if v is not None or k in ("allowed_hosts", "api_key")}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if not args.api_key and not is_loopback(args.host):
        print(f"sparkles.serve: --host {args.host} makes the server reachable from other machines, so it needs an "
              f"API key: set {API_KEY_ENV}=<key> (or pass --api-key <key>); clients then send "
              "'Authorization: Bearer <key>'. To serve this machine only, leave out --host.", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model, cfg = load_model(args.cfg_path, options=args.options, sparkles_root=args.sparkles_root,
                              gpu_ids=args.gpu_id, protocol_file=args.protocol_file)
    except LoadError as exc:
        print(f"sparkles.serve: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from .api import create_app

    chat = make_chat(model, cfg)
    app = create_app(chat, **app_options(args))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
