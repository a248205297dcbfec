"""One GPT chat call from the command line, and ``call_gpt`` for scripts written against the upstream wrapper.

    python dataset/call_gpt_api.py "Write a haiku about lighthouses" --model gpt-4 --temperature 1.0

Both go through ``sparkles.gpt.GPTClient`` (OpenAI, any OpenAI-compatible ``OPENAI_BASE_URL``, or Azure via
``OPENAI_API_BASE``), with bounded retries, the response cache and cost accounting.
"""

from __future__ import annotations

import argparse
import sys

from sparkles.gpt import GPTCallError, GPTClient, GPTConfig, MissingAPIKeyError

_client: GPTClient | None = None


def call_gpt(prompt: str, model: str = "gpt-4", temperature: float = 1.0, max_tokens: int = 2048,
             top_p: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> str:
    """The reply text for ``prompt`` (upstream's defaults); the model given is the model used, retries
    included. Raises ``GPTCallError`` when the call fails for good."""
    global _client
    if _client is None:
        _client = GPTClient.from_env()
    return _client.chat(prompt, model=model, temperature=temperature, max_tokens=max_tokens, top_p=top_p,
                        frequency_penalty=frequency_penalty, presence_penalty=presence_penalty).text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Send one prompt to a chat model and print the reply.")
    p.add_argument("prompt", help="the user message ('-' reads it from stdin)")
    p.add_argument("--model", default="gpt-4")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max_tokens", type=int, default=2048)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--system", default=None, help="system message (default: the client's)")
    p.add_argument("--max_retries", type=int, default=6)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--cache_path", default=None, help="SQLite response cache to use (default: none)")
    p.add_argument("--usage", action="store_true", help="print token usage and cost to stderr")
    args = p.parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        overrides = {"max_retries": args.max_retries, "timeout": args.timeout, "cache_path": args.cache_path}
        if args.system:
            overrides["system_prompt"] = args.system
        with GPTClient(GPTConfig.from_env(**overrides)) as client:
            result = client.chat(prompt, model=args.model, temperature=args.temperature, max_tokens=args.max_tokens,
                                 top_p=args.top_p)
            print(result.text)
            if args.usage:
                print(client.ledger.format(), file=sys.stderr)
    except (MissingAPIKeyError, GPTCallError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
