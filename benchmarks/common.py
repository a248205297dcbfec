"""Shared parts of the benchmarks: sizes, model building, synthetic inputs, timing, machine facts, output.

Models have random weights and are built directly from sizes (no checkpoint, no download). The decoder's
vocabulary is served by a *word-level* tokenizer built here: filler words ``w0, w1, ...`` plus every piece of
the conversation template. Its decode → encode round trip is exact, which is what a trained model's natural
text mostly gives with the real LLaMA tokenizer; with a BPE tokenizer a random model's token soup would be
re-tokenised differently every turn, which measures the random weights rather than the chat engine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from sparkles.common.io import atomic_write


# ----------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class BenchSize:
    """Model shapes and workload of one benchmark size."""

    name: str
    # vision tower (EVA-ViT) and Q-Former
    image_size: int
    patch: int
    vit_width: int
    vit_depth: int
    vit_heads: int
    vit_mlp: int
    nq: int
    q_hidden: int
    q_layers: int
    q_heads: int
    q_intermediate: int
    # decoder (LLaMA)
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_intermediate: int
    vocab: int
    q_cross_freq: int = 2
    max_positions: int = 2048
    # training step: batch × (3 images, a turn-2 sample of ~300 text tokens)
    batch: int = 2
    train_words: tuple[int, int, int, int] = (60, 80, 40, 100)  # question 1, answer 1, question 2, target
    train_repeats: int = 9  # many short rounds: a median that a burst of other load on a shared box can't move
    gemm_n: int = 3072
    # chat: one dialogue, images at turns 1 (two) and 3 (one)
    chat_turns: int = 6
    chat_question_words: int = 30
    chat_new_tokens: int = 128
    chat_repeats: int = 5
    # evaluation: independent two-image prompts, greedy, fixed answer length
    eval_items: int = 8
    eval_batches: tuple[int, ...] = (1, 4, 8)
    eval_words: tuple[int, int] = (30, 70)
    eval_new_tokens: int = 128  # a step-by-step BISON/NLVR2 answer; SparklesEval answers run longer
    eval_repeats: int = 3
    # feature cache: distinct images in the synthetic dataset
    cache_images: int = 24


SIZES = {
    "toy": BenchSize(
        name="toy", image_size=32, patch=8, vit_width=32, vit_depth=2, vit_heads=2, vit_mlp=64,
        nq=4, q_hidden=32, q_layers=2, q_heads=2, q_intermediate=64,
        llm_hidden=64, llm_layers=2, llm_heads=2, llm_intermediate=128, vocab=512,
        train_words=(6, 8, 4, 10), train_repeats=2, gemm_n=256,
        chat_turns=3, chat_question_words=6, chat_new_tokens=6, chat_repeats=1,
        eval_items=8, eval_words=(4, 12), eval_new_tokens=6, eval_repeats=1, cache_images=6),
    "small": BenchSize(
        name="small", image_size=224, patch=14, vit_width=384, vit_depth=6, vit_heads=6, vit_mlp=1536,
        nq=32, q_hidden=768, q_layers=4, q_heads=12, q_intermediate=3072,
        llm_hidden=512, llm_layers=4, llm_heads=8, llm_intermediate=1376, vocab=32000),
    # The paper: EVA-ViT-g (39 blocks), BERT-base Q-Former, Vicuna-7B shapes. Kept short: one GPU run < 6 min.
    "full": BenchSize(
        name="full", image_size=224, patch=14, vit_width=1408, vit_depth=39, vit_heads=16, vit_mlp=6144,
        nq=32, q_hidden=768, q_layers=12, q_heads=12, q_intermediate=3072,
        llm_hidden=4096, llm_layers=32, llm_heads=32, llm_intermediate=11008, vocab=32000,
        train_repeats=5, gemm_n=8192, chat_turns=6, chat_new_tokens=32, chat_repeats=2,
        eval_new_tokens=32, eval_repeats=1, cache_images=24),
}


# ----------------------------------------------------------------------------------------------- context
@dataclass
class Context:
    """What every benchmark needs; :func:`run_all` shares one so the model is built once."""

    size: BenchSize
    device: torch.device
    threads: int
    seed: int = 0
    dry_run: bool = False
    profile: bool = False
    allocator: str = "system"
    _model: object = field(default=None, repr=False)
    _tokenizer: object = field(default=None, repr=False)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        """The decoder's compute dtype (float32 on CPU: this machine class has no fast half precision)."""
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = word_tokenizer(self.size.vocab, template_texts(self.size, self.seed))
        return self._tokenizer

    @property
    def model(self):
        if self._model is None:
            self._model = build_model(self.size, self.device, seed=self.seed)
            self._model.tokenizer = self.tokenizer
        return self._model

    @property
    def targets_apply(self) -> bool:
        """The targets are defined for bench-small on a CPU; elsewhere the figures are informative."""
        return self.size.name == "small" and self.device.type == "cpu"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda for --size full when present)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default: the size's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true",
                        help="build the shapes on the meta device and count FLOPs; no timing")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of the main step")
    parser.add_argument("--out", default=None, help="write the JSON result here")
    parser.add_argument("--malloc", choices=("keep", "system"), default="keep",
                        help="CPU runs: 'keep' (default) makes glibc keep freed memory instead of unmapping it, "
                             "'system' leaves glibc's defaults (see tune_malloc)")


def context_from_args(args: argparse.Namespace) -> Context:
    size = SIZES[args.size]
    if args.repeats is not None:
        size = replace(size, train_repeats=args.repeats, chat_repeats=args.repeats, eval_repeats=args.repeats)
    if args.dry_run:
        device = torch.device("meta")
    elif args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda" if args.size == "full" and torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.size == "full" and device.type == "cpu":
        raise SystemExit("--size full on a CPU would build a 7B decoder in float32 and take hours; use a GPU, "
                         "or --dry-run to check shapes and FLOPs on the meta device")
    torch.set_num_threads(args.threads)  # explicit: results depend on it and are reported with it
    allocator = tune_malloc(args.malloc) if device.type == "cpu" else "system"
    return Context(size=size, device=device, threads=args.threads, seed=args.seed, dry_run=args.dry_run,
                   profile=args.profile, allocator=allocator)


def tune_malloc(mode: str) -> str:
    """Keep freed heap memory in the process (glibc: no ``mmap`` for large blocks, no trimming).

    By default glibc serves every block above 32 MB with a fresh ``mmap`` and unmaps it on free, so the
    ~100 MB logits of a bench-small step and their gradient copies page-fault afresh every step
    (150-230 thousand minor faults, ~8 % of the step's CPU time, measured here). Keeping the memory is the
    usual CPU-PyTorch tuning (jemalloc/tcmalloc do the same); train.py gets it with
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment. Returns what is in effect.
    """
    if mode != "keep":
        return "system"
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers
        ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2 ** 31 - 1) == 1
    except (OSError, AttributeError):
        ok = False
    return "glibc keep (mmap off, no trim)" if ok else "system (mallopt unavailable)"


# ----------------------------------------------------------------------------------------------- building
@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def llama_config(size: BenchSize):
    from transformers import LlamaConfig

    # initializer_range = 1/sqrt(width): at 0.02 a small random decoder is a bigram model whose answers ignore
    # the context, which would make the "identical outputs" checks vacuous.
    config = LlamaConfig(vocab_size=size.vocab, hidden_size=size.llm_hidden, intermediate_size=size.llm_intermediate,
                         num_hidden_layers=size.llm_layers, num_attention_heads=size.llm_heads,
                         num_key_value_heads=size.llm_heads, max_position_embeddings=size.max_positions,
                         rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         tie_word_embeddings=False, initializer_range=size.llm_hidden ** -0.5)
    config._attn_implementation = "sdpa"
    return config


def model_config(size: BenchSize, device: torch.device):
    from sparkles.models.sparkleschat import SparklesChatConfig

    gpu = device.type == "cuda"
    return SparklesChatConfig(
        llama_model="", image_size=size.image_size, vit_patch_size=size.patch, vit_width=size.vit_width,
        vit_depth=size.vit_depth, vit_heads=size.vit_heads, vit_mlp_dim=size.vit_mlp,
        vit_precision="fp16" if gpu else "fp32", num_query_token=size.nq, qformer_hidden=size.q_hidden,
        qformer_layers=size.q_layers, qformer_heads=size.q_heads, qformer_intermediate=size.q_intermediate,
        qformer_cross_attention_freq=size.q_cross_freq, llm_from_scratch=True, llm_hidden=size.llm_hidden,
        llm_layers=size.llm_layers, llm_heads=size.llm_heads, llm_intermediate=size.llm_intermediate,
        llm_max_positions=size.max_positions, dtype="bfloat16" if gpu else "float32")


def build_model(size: BenchSize, device: torch.device, *, seed: int = 0):
    """A random SparklesChat of ``size`` built directly on ``device``.

    On a GPU the 7B decoder is created in bfloat16 under ``torch.device("cuda")`` so no float32 copy is ever
    materialised on the host; on ``meta`` nothing is allocated at all.
    """
    from transformers import LlamaForCausalLM

    from sparkles.models.sparkleschat import SparklesChat

    torch.manual_seed(seed)
    llm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        with default_dtype(llm_dtype):
            llm = LlamaForCausalLM(llama_config(size))
        model = SparklesChat(model_config(size, device), llm)
    if device.type != "meta":
        model.place(device)  # casts the ViT's linears to fp16 and checks the decoder dtype on CUDA
    return model.eval()


# ----------------------------------------------------------------------------------------------- text
def filler(i: int) -> str:
    return f"w{i}"


class Words:
    """Deterministic random filler text (one token per word with the word-level tokenizer).

    Words are drawn from the first half of the vocabulary's fillers, so every word is a known token.
    """

    def __init__(self, size: BenchSize, seed: int) -> None:
        self.rng = random.Random(seed)
        self.n = size.vocab // 2

    def __call__(self, count: int) -> str:
        return " ".join(filler(self.rng.randrange(self.n)) for _ in range(count))


def marker(k: int) -> str:
    from sparkles.conversation.template import IMAGE_MARKER

    return f"IMAGE#{k}{IMAGE_MARKER}"


def train_messages(size: BenchSize, words: Words, first_image: int = 1):
    """A turn-2 SparklesDialogue-style sample: 2 images, an answer, 1 more image, and the target answer."""
    from sparkles.conversation.render import Message

    q1, a1, q2, target = size.train_words
    a, b, c = first_image, first_image + 1, first_image + 2
    messages = [Message("user", f"{marker(a)} {marker(b)} {words(q1)}?"), Message("assistant", f"{words(a1)}."),
                Message("user", f"And {marker(c)} {words(q2)}?")]
    return messages, f"{words(target)}."


def chat_questions(size: BenchSize, words: Words) -> list[tuple[str, int]]:
    """``(question, number of new images)`` for each turn; slots are written as ✨ like a demo user would."""
    out = []
    for turn in range(size.chat_turns):
        n_img = 2 if turn == 0 else 1 if turn == 2 else 0
        slots = " ".join(f"IMAGE#{turn * 2 + k + 1}✨" for k in range(n_img))
        out.append((f"{slots} {words(size.chat_question_words)}?".strip(), n_img))
    return out


def eval_prompts(size: BenchSize, words: Words) -> list[str]:
    lo, hi = size.eval_words
    return [f"{marker(1)} {marker(2)} {words(words.rng.randint(lo, hi))}? Let's think step by step."
            for _ in range(size.eval_items)]


def template_texts(size: BenchSize, seed: int) -> list[str]:
    """Every fixed string the benchmarks render, for the tokenizer's vocabulary."""
    from sparkles.conversation.render import Message, render_text
    from sparkles.conversation.template import INFER_LAYOUT, TRAIN_LAYOUT, replace_glyphs

    words = Words(size, seed)
    texts = []
    msgs, target = train_messages(size, words)
    texts.append(render_text(msgs, TRAIN_LAYOUT) + target + "###")
    history = []
    for q, _ in chat_questions(size, words):
        history += [Message("user", replace_glyphs(q)), Message("assistant", "w1 w2.")]
    texts.append(render_text(history[:-1], INFER_LAYOUT))
    texts.extend(render_text([Message("user", p)], INFER_LAYOUT) for p in eval_prompts(size, words))
    return texts


def word_tokenizer(vocab_size: int, texts: Iterable[str]):
    """A word-level tokenizer with LLaMA's special ids (``<unk>``=0, ``<s>``=1, ``</s>``=2) and exactly
    ``vocab_size`` entries: the template's pieces, then filler words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sparkles.conversation.template import IMAGE_PLACEHOLDER

    pre = pre_tokenizers.Whitespace()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for text in texts:
        for piece in text.split(IMAGE_PLACEHOLDER):  # the renderer tokenises around the placeholders
            for word, _ in pre.pre_tokenize_str(piece):
                vocab.setdefault(word, len(vocab))
    i = 0
    while len(vocab) < vocab_size:
        vocab.setdefault(filler(i), len(vocab))
        i += 1
    if len(vocab) > vocab_size:
        raise ValueError(f"vocabulary of {vocab_size} is too small for the template ({len(vocab)} pieces)")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", clean_up_tokenization_spaces=False)
    fast.model_max_length = 1 << 20
    return fast


def random_pixels(n: int, size: BenchSize, *, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size.image_size, size.image_size, generator=g).to(device)


# ----------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device):
    """``(seconds, result)`` of one call, with the device drained before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - t0, result


def paired_rounds(fns: dict[str, Callable], *, repeats: int, warmup: int, device: torch.device) -> dict[str, list]:
    """Time several variants in alternating order (ABC, CBA, ...) so that a slow drift of the machine (other
    processes, clock changes) hits every variant alike; returns seconds per variant per round."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(timed(fns[name], device)[0])
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


class Gemm:
    """A large square matrix product in the given dtype: the machine's practical matmul peak."""

    def __init__(self, n: int, device: torch.device, dtype: torch.dtype) -> None:
        g = torch.Generator(device="cpu").manual_seed(0)
        self.a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        self.b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        self.c = torch.empty(n, n, device=device, dtype=dtype)
        # On a GPU one product takes ~1 ms; repeat it so a timing is far above launch and timer noise.
        self.iters = 20 if device.type == "cuda" else 1
        self.flops = 2 * n ** 3 * self.iters

    def __call__(self) -> None:
        for _ in range(self.iters):
            torch.mm(self.a, self.b, out=self.c)


# ----------------------------------------------------------------------------------------------- facts
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(ctx: Context) -> dict:
    import transformers

    info = dict(cpu=cpu_model(), cpu_cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                device=str(ctx.device), dtype=str(ctx.dtype).removeprefix("torch."),
                vision_dtype="float16" if ctx.is_cuda else str(ctx.dtype).removeprefix("torch."),
                size=ctx.size.name, allocator=ctx.allocator)
    if ctx.is_cuda:
        info["gpu"] = torch.cuda.get_device_name(ctx.device)
    with contextlib.suppress(OSError):
        info["loadavg_1min"] = os.getloadavg()[0]
    return info


def target(name: str, value: float, op: str, threshold: float, applies: bool) -> dict:
    ok = value >= threshold if op == ">=" else value <= threshold
    return dict(name=name, value=round(float(value), 4), op=op, threshold=threshold,
                status=("PASS" if ok else "MISS") if applies else "n/a")


# ----------------------------------------------------------------------------------------------- output
def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence]) -> None:
    rows = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def print_targets(result: dict) -> None:
    for t in result.get("targets", []):
        print(f"  target {t['name']}: {t['value']:.4g} {t['op']} {t['threshold']:g} -> {t['status']}")


def write_json(path: Optional[str], obj: dict) -> None:
    if not path:
        return
    atomic_write(path, json.dumps(obj, indent=2, default=str))  # a killed run never leaves half a file


def command_line(module: str, argv: Optional[Sequence[str]]) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m", module, *args])


def size_dict(size: BenchSize) -> dict:
    return asdict(size)


def benchmark_main(module: str, doc: str, run: Callable[[Context], dict], report: Callable[[dict], None],
                   argv: Optional[Sequence[str]] = None) -> int:
    """The shared command line of every benchmark: common flags → run → machine/command → table → JSON."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args(argv)
    ctx = context_from_args(args)
    result = run(ctx)
    result["machine"] = machine_info(ctx)
    result["command"] = command_line(module, argv)
    report(result)
    write_json(args.out, result)
    return 0


def run_benchmark(name: str, mod, ctx) -> dict:
    """Run one benchmark module and print its report, timed. A failure becomes its result (error and traceback):
    one broken benchmark must not cost the others of a one-shot GPU run."""
    t0 = time.perf_counter()
    try:
        result = mod.run(ctx)
        mod.report(result)
    except Exception as exc:
        result = dict(benchmark=name, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        print(f"\n{name}: FAILED: {result['error']}\n{result['traceback']}")
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    return result
