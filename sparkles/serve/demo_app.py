"""The Gradio chat app behind ``demo.py``: several images, ✨/⭐ slots, multi-turn streamed answers.

Each browser tab owns a :class:`DemoConversation` (engine session + what the page shows + its record on
disk) held in ``gr.State``. The model is shared, so every event that runs it joins one concurrency group
of size one. Images are encoded once, when uploaded; the engine keeps the decoder's KV cache between turns.
A question whose markers do not match the uploaded images is explained and never reaches the model.

Values sent through Gradio's API need not respect the sliders (NaN passes Gradio's range check, and Gradio
versions differ in what they check), so every handler clamps the decoding settings to the sliders' ranges
itself. A turn or an upload that fails half-way is undone, so the engine session, the transcript, the
gallery and the saved record always agree. :func:`prune_conversations` and :func:`keep_pruning` enforce the
retention of saved conversations (``demo.py --keep-days``); the upload cache gets the same age limit from Gradio.

What the page offers depends on the model: a config's optional ``demo`` section sets the example prompts, the
note on what the model does well and where the temperature slider starts (:class:`DemoSettings`; the tiny model
of ``bash run.sh`` asks greedily about counts, colours, shapes and places), and the page names the model it
serves (:func:`model_label`).

Build the app with :func:`build_demo` (tests drive it through ``gradio_client`` and headless Chromium,
:mod:`.screenshot`); ``demo.py`` launches it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator, Optional, Sequence
from urllib.parse import urlparse

from ..conversation.template import count_glyphs, count_slots, replace_glyphs
from .loading import context_limit, make_chat
from .records import ConversationRecord

TITLE = "Chat with ✨Sparkles✨"
MODEL_GROUP = "sparkles-model"  # concurrency id shared by every event that runs the model
DEFAULT_KEEP_DAYS = 30.0  # saved conversations and uploads older than this are deleted (0: keep everything)
PRUNE_EVERY_S = 3600.0
# The folder names ConversationRecord gives (records.new_conversation_id): pruning touches nothing else.
CONVERSATION_DIR = re.compile(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_[0-9a-f]{6}")

log = logging.getLogger(__name__)

INTRO = f"""# {TITLE}

SparklesChat talks about several images at once, across several turns.
[Paper (arXiv 2308.16463)](https://arxiv.org/abs/2308.16463) · [Original code](https://github.com/HYPJUDY/Sparkles)
"""

HOW_TO = """### How to use it
1. **Upload images.** Each one gets a number in the order it arrives — IMAGE#1, IMAGE#2, … — shown under it in
   the gallery. You can add more images at any point of the conversation.
2. **Mark where each image goes.** Type ✨ or ⭐ in your message at the spot an image belongs. Markers are filled
   with images in upload order over the whole conversation: your first marker ever is IMAGE#1, the next one
   IMAGE#2, and so on. Writing the label in front, as in `IMAGE#2✨`, lets you and the model refer back to it.
3. **Forgot a marker?** With *Place unmarked images for me* ticked, images that have no marker yet are put at the
   start of your message, and the app tells you it did so. Untick it to be warned instead.
4. **Send** with Enter; Shift+Enter starts a new line. **Clear** starts a new conversation.
"""

TERMS = """**Terms of use.** This is a research preview, not a product. Conversations on this page — text, uploaded
images, settings and votes — are saved on the server running it and may be shared for research."""

# For the released SparklesChat weights (a config without a ``demo`` section).
EXAMPLES = (
    "Write a short story that begins in IMAGE#1✨ and ends in IMAGE#2✨.",
    "What do IMAGE#1✨ and IMAGE#2✨ have in common, and how do they differ?",
    "Compose a song verse whose scene moves from IMAGE#1✨ to IMAGE#2✨.",
)
NOTE = "The model can be wrong or make things up; it does best on everyday photographs."
DEFAULT_TEMPERATURE = 1.0
PLACEHOLDER = "Ask about your images; type ✨ or ⭐ where each one belongs"
KEYS_HINT = "Enter sends; Shift+Enter starts a new line"
# Gradio's gallery puts its label over the first thumbnail and cuts captions to "IMAGE…" on a narrow screen;
# here the gallery has no floating label, as many columns of at least 96 px as fit, and captions shown whole.
CSS = """
#sparkles-gallery .grid-container { grid-template-columns: repeat(auto-fill, minmax(96px, 1fr)); }
#sparkles-gallery .caption-label { max-width: calc(100% - 2 * var(--block-label-margin)); font-size: var(--text-sm);
  text-overflow: clip; }
"""


@dataclass(frozen=True)
class DemoSettings:
    """What the page offers for the loaded model: example prompts, a note on what it does well, and the
    temperature the slider starts at. A config's ``demo`` section sets them (:meth:`from_config`); the defaults
    suit the released weights."""

    examples: Sequence[str] = EXAMPLES
    note: str = NOTE
    temperature: float = DEFAULT_TEMPERATURE

    @classmethod
    def from_config(cls, cfg) -> "DemoSettings":
        section = cfg.get("demo") if cfg is not None else None
        if section is None:
            return cls()
        return cls(examples=tuple(section.get("examples") or EXAMPLES), note=section.get("note") or NOTE,
                   temperature=DEFAULT_TEMPERATURE if section.get("temperature") is None
                   else float(section.temperature))


def model_label(cfg) -> str:
    """The name the page and the saved records give the model: arch and preset, and the checkpoint's folder and
    file (never a whole server path), e.g. ``sparkleschat:tiny (sparkleschat_tiny/checkpoint_last.pth)``."""
    name = f"{cfg.model.arch}:{cfg.model.model_type}"
    ckpt = cfg.model.get("ckpt")
    if not ckpt:
        return name
    tail = PurePosixPath(urlparse(str(ckpt)).path.replace("\\", "/")).parts[-2:]
    return f"{name} ({'/'.join(tail)})"

START_NOTICE = "Upload one or more images to begin (or just type to chat without images)."


@dataclass(frozen=True)
class SliderRange:
    """One slider's limits and start value; :meth:`clamp` applies them to a value that came through the API."""

    lo: float
    hi: float
    default: float
    integer: bool = False

    def clamp(self, value) -> float | int:
        try:
            x = float(value)
        except (TypeError, ValueError):
            x = self.default
        if not math.isfinite(x):
            x = self.default
        x = min(self.hi, max(self.lo, x))
        return int(round(x)) if self.integer else x


def slider_ranges(max_length: int, *, temperature: float = DEFAULT_TEMPERATURE) -> dict[str, SliderRange]:
    """The decoding sliders for a context of ``max_length`` positions: answers may take at most half of it, so
    the conversation always keeps the other half. ``temperature``: where its slider starts."""
    cap = max(16, min(1024, max_length // 2) // 16 * 16)
    return {"beams": SliderRange(1, 5, 1, integer=True),
            "temperature": SliderRange(0.0, 2.0, min(2.0, max(0.0, temperature))),
            "top_p": SliderRange(0.1, 1.0, 0.9),
            "max_new_tokens": SliderRange(16, cap, min(512, max(16, cap // 32 * 16)), integer=True)}


def generation_options(beams, temperature, top_p, max_new_tokens, *, max_length: int,
                       default_temperature: float = DEFAULT_TEMPERATURE) -> dict:
    """Slider values → engine options, each clamped to its slider's range (the API can send anything; a value
    that is no number gets the slider's start value). Temperature 0 means greedy (deterministic) decoding."""
    ranges = slider_ranges(max_length, temperature=default_temperature)
    temperature = ranges["temperature"].clamp(temperature)
    options = {"num_beams": ranges["beams"].clamp(beams), "do_sample": temperature > 0,
               "top_p": ranges["top_p"].clamp(top_p), "max_new_tokens": ranges["max_new_tokens"].clamp(max_new_tokens),
               "max_length": int(max_length)}
    if temperature > 0:
        options["temperature"] = temperature
    return options


def recorded_settings(options: dict) -> dict:
    """What a saved turn or vote records of the decoding settings (the temperature even when greedy)."""
    return {**options, "temperature": float(options.get("temperature", 0.0))}


def prune_conversations(save_root: str | os.PathLike, keep_days: float, *, now: Optional[float] = None
                        ) -> list[Path]:
    """Delete the saved conversations under ``save_root`` whose newest file is older than ``keep_days`` days.

    Only folders named as :class:`ConversationRecord` names them are considered; ``keep_days <= 0`` keeps
    everything. Returns the folders deleted.
    """
    root = Path(save_root)
    if keep_days <= 0 or not root.is_dir():
        return []
    cutoff = (time.time() if now is None else now) - keep_days * 86400
    removed = []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or folder.is_symlink() or not CONVERSATION_DIR.fullmatch(folder.name):
            continue
        try:
            # the newest file counts: a conversation still being added to is never cut
            newest = max([folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.rglob("*"))])
            if newest < cutoff:
                shutil.rmtree(folder)
                removed.append(folder)
        except OSError as exc:
            log.warning("could not prune %s: %s", folder, exc)
    if removed:
        log.info("deleted %d saved conversation(s) older than %g day(s) from %s", len(removed), keep_days, root)
    return removed


def keep_pruning(save_root: str | os.PathLike, keep_days: float, *, every_s: float = PRUNE_EVERY_S
                 ) -> threading.Event:
    """Prune now, then every ``every_s`` seconds in a daemon thread, until the returned event is set."""
    stop = threading.Event()
    prune_conversations(save_root, keep_days)
    if keep_days <= 0:
        return stop

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                prune_conversations(save_root, keep_days)
            except Exception:  # a failed pass must not end the retention for the server's lifetime
                log.exception("pruning %s failed", save_root)

    threading.Thread(target=loop, name="sparkles-demo-retention", daemon=True).start()
    return stop


def _labels(numbers: list[int]) -> str:
    return ", ".join(f"IMAGE#{k}" for k in numbers)


def place_images(text: str, *, slots_before: int, num_images: int, auto_place: bool
                 ) -> tuple[str, list[int], Optional[str]]:
    """Check a new message's markers against the uploaded images.

    Returns ``(text_to_send, auto_placed_numbers, problem)``; ``problem`` is a message for the user when the
    question must not be sent. With ``auto_place`` the images that have no marker yet are prepended as
    ``IMAGE#k✨``.
    """
    new = count_slots(replace_glyphs(text))
    total = slots_before + new
    if total == num_images:
        return text, [], None
    if total > num_images:
        earlier = f" (earlier messages already hold {slots_before})" if slots_before else ""
        return text, [], (
            f"**Not sent:** this message has {new} image marker(s){earlier}, so the conversation would need "
            f"{total} image(s), but {num_images} {'is' if num_images == 1 else 'are'} uploaded. "
            "Upload the missing image(s) or remove marker(s), then send again.")
    missing = list(range(total + 1, num_images + 1))
    if auto_place:
        prefix = " ".join(f"IMAGE#{k}✨" for k in missing)
        return f"{prefix} {text}", missing, None
    return text, [], (
        f"**Not sent:** {_labels(missing)} {'has' if len(missing) == 1 else 'have'} no ✨/⭐ marker yet. "
        f"Type one marker per image where it belongs (in upload order), or tick *Place unmarked images for me*.")


@dataclass
class DemoConversation:
    """One tab's conversation: engine session, gallery items, chat transcript and its saved record."""

    session: object
    record: ConversationRecord
    gallery: list = field(default_factory=list)  # (file path, "IMAGE#k")
    transcript: list = field(default_factory=list)  # Gradio chat messages {"role", "content"}


def build_demo(chat, *, save_root: str | os.PathLike, model_name: Optional[str] = None, title: str = TITLE,
               keep_days: float = DEFAULT_KEEP_DAYS, settings: Optional[DemoSettings] = None):
    """The Gradio Blocks app for ``chat`` (a :class:`~sparkles.engine.chat.Chat`), which the page names
    ``model_name``, with ``settings`` (default: the released weights').

    API names (for ``gradio_client``): ``/add_images`` (files), ``/chat`` (message, beams, temperature, top_p,
    max_new_tokens, auto_place; streams), ``/clear``, ``/upvote``, ``/downvote``, ``/flag``. Uploads are deleted
    from Gradio's cache ``keep_days`` days after they arrive (``0``: kept until the server stops); saved
    conversations are pruned by :func:`keep_pruning`, which ``demo.py`` starts.
    """
    import gradio as gr

    from ..engine.chat import ChatError
    from ..processors.image import ImageLoadError, load_rgb

    settings = settings or DemoSettings()

    def new_conversation() -> DemoConversation:
        return DemoConversation(session=chat.session(), record=ConversationRecord(save_root, model=model_name))

    def add_images(files, conv: Optional[DemoConversation]):
        conv = conv or new_conversation()
        added, skipped, failed = [], [], None
        for path in files or []:
            path = str(path)
            name = os.path.basename(path)
            try:
                image = load_rgb(path)
            except ImageLoadError:
                skipped.append(name)
                continue
            # One image is added to the session, the gallery and the record together, or to none of them.
            embeds, gallery, images = (len(conv.session.image_embeds), len(conv.gallery),
                                       len(conv.record.data["images"]))
            try:
                number = conv.session.add_image(image)
                conv.record.add_image(image, number=number, name=name)
                conv.gallery.append((path, f"IMAGE#{number}"))
            except Exception as exc:
                log.exception("adding %s failed", name)
                del conv.session.image_embeds[embeds:]
                del conv.gallery[gallery:]
                del conv.record.data["images"][images:]
                failed = f"Could not add {name} ({type(exc).__name__}); it and the images after it were not added."
                break
            added.append(number)
        parts = []
        if added:
            unplaced = list(range(conv.session.num_slots + 1, len(conv.session.image_embeds) + 1))
            parts.append(f"Added {_labels(added)}. Type ✨ or ⭐ where each image belongs; markers are filled in "
                         f"upload order. Not placed yet: {_labels(unplaced)}.")
        if skipped:
            parts.append(f"Skipped {', '.join(skipped)}: not a readable image.")
        if failed:
            parts.append(failed)
        if not parts:
            parts.append("Choose one or more image files to upload.")
        return conv.gallery, " ".join(parts), None, conv

    def respond(text, conv: Optional[DemoConversation], beams, temperature, top_p, max_new_tokens, auto_place
                ) -> Iterator[tuple]:
        conv = conv or new_conversation()
        session = conv.session
        text = (text or "").strip()
        if not text:
            yield conv.transcript, "Type a message first.", "", conv
            return
        if session.messages and session.messages[-1].role == "user":
            session.messages.pop()  # a previous answer was interrupted (tab closed, error): drop its question
        sent, auto_placed, problem = place_images(text, slots_before=session.num_slots,
                                                  num_images=len(session.image_embeds), auto_place=bool(auto_place))
        if problem:
            yield conv.transcript, problem, text, conv
            return
        notice = ""
        if auto_placed:
            notice = (f"Placed {_labels(auto_placed)} at the start of your message, since "
                      f"{'it had' if len(auto_placed) == 1 else 'they had'} no ✨/⭐ marker yet.")
        options = generation_options(beams, temperature, top_p, max_new_tokens, max_length=context_limit(chat),
                                     default_temperature=settings.temperature)
        # The turn is kept only once its record is saved; anything before that (an engine error, a failed save,
        # a cancelled stream) leaves the session, the transcript and the record as they were before it.
        messages, turns = len(session.messages), len(conv.record.data["turns"])
        transcript = conv.transcript + [{"role": "user", "content": sent}, {"role": "assistant", "content": ""}]
        answer, problem, kept = "", None, False
        try:
            session.ask(sent)
            yield transcript, notice or "Thinking…", "", conv
            for answer in session.stream(**options):
                transcript[-1] = {"role": "assistant", "content": answer}
                yield transcript, notice or "Answering…", "", conv
            conv.record.add_turn(user=sent, typed=text, answer=answer, auto_placed=auto_placed,
                                 warning=session.last_warning, generation=recorded_settings(options))
            kept = True
        except ChatError as exc:
            problem = f"**Not answered:** {exc}"
        except Exception as exc:
            log.exception("a turn failed")  # the engine drops a KV cache that a failed forward left half-updated
            problem = (f"**Not answered:** the server hit an error ({type(exc).__name__}). The conversation is as "
                       "it was before this message; send it again.")
        finally:
            if not kept:
                del session.messages[messages:]
                del conv.record.data["turns"][turns:]
        if problem:
            yield conv.transcript, problem, text, conv
            return
        conv.transcript = transcript
        warning = session.last_warning
        final = " ".join(x for x in (notice, warning) if x) or "Done. Ask a follow-up, add images, or vote."
        yield transcript, final, "", conv

    def clear(conv: Optional[DemoConversation]):
        # A fresh conversation rather than an in-place reset: an answer being cancelled may still be
        # finishing on the old session in another thread. The old record stays on disk as it is.
        return None, [], [], "", START_NOTICE, new_conversation()

    def make_vote(kind: str):
        def vote(conv: Optional[DemoConversation], beams, temperature, top_p, max_new_tokens):
            if conv is None or not conv.transcript:
                return "Nothing to rate yet — ask something first."
            options = generation_options(beams, temperature, top_p, max_new_tokens, max_length=context_limit(chat),
                                         default_temperature=settings.temperature)
            conv.record.add_feedback(kind, generation=recorded_settings(options))
            return f"Thanks — your {kind} is saved with this conversation."
        vote.__name__ = kind
        return vote

    ranges = slider_ranges(context_limit(chat), temperature=settings.temperature)
    images_needed = max((count_glyphs(e) for e in settings.examples), default=0)
    theme = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                           font_mono=["ui-monospace", "monospace"])  # no web fonts: works offline
    # Gradio keeps every upload (the original file, metadata included) in its cache: same age limit as records.
    delete_cache = (int(min(PRUNE_EVERY_S, keep_days * 86400)) or 1, int(keep_days * 86400) or 1) \
        if keep_days > 0 else None
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=delete_cache) as demo:
        demo.sparkles_theme = theme  # launch() takes the theme in Gradio 6; see launch_kwargs()
        state = gr.State(None)
        gr.Markdown(INTRO)
        gr.Markdown(f"**Model:** {model_name or 'SparklesChat'} — {settings.note}", elem_id="sparkles-model")
        with gr.Row():
            with gr.Column(scale=1):
                # No file_types: Gradio would refuse another file with an error that stays on the upload box;
                # add_images explains it in the notice instead, which the next action replaces.
                files = gr.File(label="Upload images", file_count="multiple", type="filepath", height=160)
                notice = gr.Markdown(START_NOTICE, elem_id="sparkles-notice")
                with gr.Accordion("Parameters", open=False):
                    r = ranges["beams"]
                    beams = gr.Slider(r.lo, r.hi, value=r.default, step=1, label="Beam search numbers",
                                      info="1 streams the answer; more beams answer in one piece")
                    r = ranges["temperature"]
                    temperature = gr.Slider(r.lo, r.hi, value=r.default, step=0.1, label="Temperature",
                                            info="0 = greedy, the same answer every time")
                    r = ranges["top_p"]
                    top_p = gr.Slider(r.lo, r.hi, value=r.default, step=0.05, label="Top p")
                    r = ranges["max_new_tokens"]
                    max_new_tokens = gr.Slider(r.lo, r.hi, value=r.default, step=16, label="Max new tokens")
                    auto_place = gr.Checkbox(value=True, label="Place unmarked images for me")
                with gr.Row():
                    upvote = gr.Button("👍 Upvote", size="sm")
                    downvote = gr.Button("👎 Downvote", size="sm")
                    flag = gr.Button("⚠️ Flag", size="sm")
                clear_btn = gr.Button("🧹 Clear", variant="stop")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Images", show_label=False, columns=5, height=190, object_fit="contain",
                                     fit_columns=False, preview=False, interactive=False, buttons=[],
                                     elem_id="sparkles-gallery")
                chatbot = gr.Chatbot(label="Sparkles", height=420, elem_id="sparkles-chat")
                with gr.Row():
                    # One line that grows (max_lines): Enter sends, Shift+Enter starts a new line (Gradio's rule for
                    # lines=1; with lines>1 it is the other way round).
                    textbox = gr.Textbox(label="Me", info=KEYS_HINT, placeholder=PLACEHOLDER, scale=5, lines=1,
                                         max_lines=8, elem_id="sparkles-message")
                    send = gr.Button("Send", variant="primary", scale=0, min_width=80)
                label = f"Example prompts (upload {images_needed} images first)" if images_needed > 1 else \
                    "Example prompts"
                gr.Examples([[e] for e in settings.examples], inputs=[textbox], label=label)
        gr.Markdown(HOW_TO)
        gr.Markdown(TERMS)

        params = [beams, temperature, top_p, max_new_tokens]
        files.upload(add_images, [files, state], [gallery, notice, files, state], api_name="add_images",
                     concurrency_id=MODEL_GROUP, concurrency_limit=1)
        chat_io = dict(inputs=[textbox, state, *params, auto_place], outputs=[chatbot, notice, textbox, state],
                       concurrency_id=MODEL_GROUP, concurrency_limit=1)
        sending = [send.click(respond, api_name="chat", **chat_io),
                   textbox.submit(respond, api_visibility="undocumented", api_name="chat_submit", **chat_io)]
        clear_btn.click(clear, [state], [files, gallery, chatbot, textbox, notice, state], api_name="clear",
                        cancels=sending)
        for button, kind in ((upvote, "upvote"), (downvote, "downvote"), (flag, "flag")):
            button.click(make_vote(kind), [state, *params], [notice], api_name=kind)
    return demo


def build_demo_for(model, cfg, **kwargs):
    """:func:`build_demo` for a model loaded from ``cfg`` (:func:`~.loading.load_model`), as ``demo.py`` serves it:
    the config's chat mode and decoding, its name on the page, its ``demo`` settings (unless ``settings`` is
    given). ``kwargs`` go to :func:`build_demo`."""
    chat = make_chat(model, cfg)
    settings = kwargs.pop("settings", None) or DemoSettings.from_config(cfg)
    return build_demo(chat, model_name=model_label(cfg), settings=settings, **kwargs)


def launch_kwargs(demo, *, host: str = "127.0.0.1", port: Optional[int] = None, share: bool = False,
                  auth: Optional[list[tuple[str, str]]] = None) -> dict:
    """Keyword arguments for ``demo.launch``: loopback and no share link unless asked, a login when ``auth``
    lists (user, password) pairs, a cap on upload size, the page's theme and style, and no Node server-side
    rendering (plain Python serving is enough for this page)."""
    return dict(server_name=host, server_port=port, share=share, auth=list(auth) if auth else None,
                theme=getattr(demo, "sparkles_theme", None), css=CSS, ssr_mode=False, max_file_size="25mb")


def startup_message(local_url: str, share_url: Optional[str], *, shared: bool, loopback: bool) -> str:
    """What ``demo.py`` logs once the page is up, in the demo's own flags (Gradio's lines, hidden by ``quiet``,
    would tell the user to edit ``launch()``)."""
    where = f"{local_url} (this machine only)" if loopback else local_url
    if share_url:
        return f"demo running on {where} and publicly on {share_url}"
    if shared:
        return f"demo running on {where}; the public link could not be created (Gradio said why above)"
    return f"demo running on {where}; add --share (with --auth USER:PASSWORD) for a public link"
