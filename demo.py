"""Chat with SparklesChat in the browser.

    python demo.py                                   # the tiny model trained by `bash run.sh`, on CPU
    python demo.py --cfg-path eval_configs/sparkles_eval.yaml --gpu-id 0 --save-root demo_logs
    python demo.py --cfg-path ... --gpu-id 0,1       # split the decoder over two GPUs

The page listens on 127.0.0.1 only; ``--host 0.0.0.0`` opens it to the network and ``--share`` asks Gradio
for a public link, which needs a login (``--auth USER:PASSWORD``, repeatable) unless ``--share-without-auth``
says the page may be public. Every conversation (text, images, settings, votes) is saved under ``--save-root``;
saved conversations and Gradio's copies of the uploads are deleted ``--keep-days`` days (default 30) after
their last change, checked at start and every hour (``--keep-days 0`` keeps everything).
The app itself lives in :mod:`sparkles.serve.demo_app`; :func:`build_demo` is re-exported here.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from sparkles.serve.demo_app import build_demo  # noqa: F401  (part of this module's API)
from sparkles.serve.demo_app import DEFAULT_KEEP_DAYS, build_demo_for, keep_pruning, launch_kwargs, startup_message
from sparkles.serve.loading import LoadError, add_model_arguments, load_model

DEFAULT_SAVE_ROOT = "outputs/demo_conversations"
LOOPBACK = ("127.0.0.1", "localhost", "::1")

log = logging.getLogger("demo")


def parse_login(value: str) -> tuple[str, str]:
    """``USER:PASSWORD`` → ``(user, password)`` (the password may itself contain ``:``)."""
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("--auth expects USER:PASSWORD with both parts non-empty")
    return user, password


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Gradio chat demo for SparklesChat (several images, several turns).")
    add_model_arguments(parser)
    parser.add_argument("--save-root", default=DEFAULT_SAVE_ROOT,
                        help=f"folder that receives one sub-folder per conversation (default: {DEFAULT_SAVE_ROOT})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--share", action="store_true",
                        help="also create a public gradio.live link (off by default; needs --auth)")
    parser.add_argument("--auth", type=parse_login, action="append", default=None, metavar="USER:PASSWORD",
                        help="require this login to open the page or use its API (repeat for more users); the "
                             "password is visible to other users of this machine in its process list")
    parser.add_argument("--share-without-auth", action="store_true",
                        help="allow --share without --auth: anyone with the link can use the model")
    parser.add_argument("--keep-days", type=float, default=DEFAULT_KEEP_DAYS, metavar="N",
                        help="delete saved conversations and uploaded files N days after their last change "
                             f"(default: {DEFAULT_KEEP_DAYS:g}; 0 keeps everything)")
    args = parser.parse_args(argv)
    if args.share and not args.auth and not args.share_without_auth:
        parser.error("--share makes the page public: give a login with --auth USER:PASSWORD, or pass "
                     "--share-without-auth to share it without one")
    if args.keep_days < 0:
        parser.error(f"--keep-days must be 0 (keep everything) or more, got {args.keep_days:g}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model, cfg = load_model(args.cfg_path, options=args.options, sparkles_root=args.sparkles_root,
                                gpu_ids=args.gpu_id, protocol_file=args.protocol_file)
    except LoadError as exc:
        print(f"demo.py: {exc}", file=sys.stderr)
        return 2
    if not args.auth and args.host not in LOOPBACK:
        print(f"demo.py: warning: listening on {args.host} without --auth: anyone who can reach this port can chat "
              "with the model (add --auth USER:PASSWORD to require a login)", file=sys.stderr)
    stop_pruning = keep_pruning(args.save_root, args.keep_days)
    demo = build_demo_for(model, cfg, save_root=args.save_root, keep_days=args.keep_days)
    demo.queue(max_size=64)
    try:
        demo.launch(prevent_thread_lock=True, quiet=True,
                    **launch_kwargs(demo, host=args.host, port=args.port, share=args.share, auth=args.auth))
        log.info(startup_message(demo.local_url, demo.share_url, shared=args.share, loopback=args.host in LOOPBACK))
        demo.block_thread()
    finally:
        stop_pruning.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
