"""Chat with SparklesChat in the browser.

    python demo.py                                   # the tiny model trained by `bash run.sh`, on CPU
    python demo.py --cfg-path eval_configs/sparkles_eval.yaml --gpu-id 0 --save-root demo_logs
    python demo.py --cfg-path ... --gpu-id 0,1       # split the decoder over two GPUs

The page listens on 127.0.0.1 only; ``--host 0.0.0.0`` opens it to the network and ``--share`` asks Gradio
for a public link. Every conversation (text, images, settings, votes) is saved under ``--save-root``.
The app itself lives in :mod:`sparkles.serve.demo_app`; :func:`build_demo` is re-exported here.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from sparkles.serve.demo_app import build_demo, launch_kwargs  # noqa: F401  (build_demo is part of the API)
from sparkles.serve.loading import LoadError, add_model_arguments, chat_mode_of, load_model, make_chat

DEFAULT_SAVE_ROOT = "outputs/demo_conversations"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Gradio chat demo for SparklesChat (several images, several turns).")
    add_model_arguments(parser)
    parser.add_argument("--save-root", default=DEFAULT_SAVE_ROOT,
                        help=f"folder that receives one sub-folder per conversation (default: {DEFAULT_SAVE_ROOT})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link (off by default)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model, cfg = load_model(args.cfg_path, options=args.options, sparkles_root=args.sparkles_root,
                                gpu_ids=args.gpu_id, protocol_file=args.protocol_file)
    except LoadError as exc:
        print(f"demo.py: {exc}", file=sys.stderr)
        return 2
    chat = make_chat(model, chat_mode=chat_mode_of(cfg))
    name = f"{cfg.model.arch}:{cfg.model.model_type}"
    demo = build_demo(chat, save_root=args.save_root, model_name=name)
    demo.queue(max_size=64)
    demo.launch(**launch_kwargs(demo, host=args.host, port=args.port, share=args.share))
    return 0


if __name__ == "__main__":
    sys.exit(main())
