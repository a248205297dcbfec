"""Serving SparklesChat: the Gradio demo app and an OpenAI-compatible HTTP API, on one chat engine.

- :mod:`.loading` — config → model on one or several GPUs (or the CPU) → :class:`~sparkles.engine.chat.Chat`.
- :mod:`.demo_app` — ``build_demo(chat, save_root=...)``, the app ``demo.py`` launches.
- :mod:`.api` — ``create_app(chat, model_name=...)``, run by ``python -m sparkles.serve``.

Nothing heavy is imported here; Gradio and FastAPI load only when an app is built.
"""
