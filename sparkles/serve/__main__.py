"""``python -m sparkles.serve``: the OpenAI-compatible API server.

    python -m sparkles.serve --cfg-path eval_configs/sparkles_eval.yaml --gpu-id 0 --port 8000
    curl http://127.0.0.1:8000/v1/models

Listens on 127.0.0.1 unless ``--host`` says otherwise. Local image paths in requests are refused unless
``--allowed-image-dir`` names the directories they may come from.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from .loading import LoadError, add_model_arguments, chat_mode_of, load_model, make_chat


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sparkles.serve",
                                     description="OpenAI-compatible chat-completions API for SparklesChat.")
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--model-name", default="sparkleschat",
                        help="the model id clients send and /v1/models lists (default: sparkleschat)")
    parser.add_argument("--allowed-image-dir", action="append", default=[], metavar="DIR",
                        help="allow image_url parts that are local paths inside DIR (repeatable; default: none)")
    parser.add_argument("--max-images", type=int, default=None,
                        help="most images accepted in one request (default: 8)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model, cfg = load_model(args.cfg_path, options=args.options, sparkles_root=args.sparkles_root,
                              gpu_ids=args.gpu_id, protocol_file=args.protocol_file)
    except LoadError as exc:
        print(f"sparkles.serve: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from .api import DEFAULT_MAX_IMAGES, create_app

    app = create_app(make_chat(model, chat_mode=chat_mode_of(cfg)), model_name=args.model_name,
                     allowed_image_dirs=args.allowed_image_dir, max_images=args.max_images or DEFAULT_MAX_IMAGES)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
