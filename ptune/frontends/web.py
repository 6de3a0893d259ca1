"""``ptune web``: a Gradio chat page over the one generation path (``ptune.inference.generation.stream_answer``).

    ptune web checkpoint=outputs/DATE/TIME/checkpoint-200 [port=7860] [host=0.0.0.0] [generation.max_new_tokens=512]

Answers stream in as they are generated; the turns on the page go back to the model as (query, answer) pairs, the
exact text of each (Clear, or the chat's trash icon, starts afresh). The user's messages show as plain text
(escaped: AdvertiseGen's ``*`` separators are not emphasis); answers render as Markdown through Gradio's own
renderer with its HTML sanitiser on and no custom tags let through, so model output cannot put scripts or event
handlers into the page. Generation is not thread-safe: one answer at a time (Gradio's queue, concurrency 1).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import sys
import threading
from collections.abc import Iterator

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a closed network

import gradio as gr  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ptune.frontends.common import describe, fit_prompt, generation_settings  # noqa: E402
from ptune.frontends.start import LOOPBACK, configured_api_key, frontend_setup  # noqa: E402
from ptune.inference.generation import stream_answer  # noqa: E402
from ptune.inference.loading import LoadedModel  # noqa: E402

DEFAULT_PORT = 7860
Messages = list[dict]


def _text(content: str | list | dict | None) -> str:
    """A Chatbot message's text: Gradio 6 hands content back as a list of ``{"type": "text", "text": ...}``."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return "".join(_text(part) for part in content or [])


# Every ASCII punctuation character: CommonMark lets a backslash make any of them literal
_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")
_ESCAPED = re.compile(r"\\([!-/:-@\[-`{-~])")


def plain(text: str) -> str:
    """The user's text as the page must show it, literally: AdvertiseGen prompts such as ``类型#裙*颜色#红色*风格#复古``
    are not Markdown (the two ``*`` would vanish and italicise what is between), and HTML stays text. The
    Chatbot renders Markdown for answers, so the user's text is backslash-escaped; ``unplain`` undoes it exactly."""
    return _PUNCTUATION.sub(r"\\\1", text)


def unplain(text: str) -> str:
    return _ESCAPED.sub(r"\1", text)


def history_pairs(messages: Messages | None) -> list[tuple[str, str]]:
    """The finished turns on the page as (query, answer) pairs: what the model is given as history."""
    pairs, query = [], None
    for message in messages or []:
        if message["role"] == "user":
            query = unplain(_text(message["content"]))
        elif query is not None:
            pairs.append((query, _text(message["content"])))
            query = None
    return pairs


def to_messages(pairs: list[tuple[str, str]]) -> Messages:
    """The turns for the Chatbot: the user's text shown literally (``plain``), answers as Markdown."""
    return [m for q, a in pairs for m in ({"role": "user", "content": plain(q)}, {"role": "assistant", "content": a})]


def _ready() -> dict:
    return gr.Button(interactive=True)


def build_demo(cfg: DictConfig, loaded: LoadedModel) -> gr.Blocks:
    """The chat page for ``loaded``; ``cfg`` (conf/chat.yaml) gives the sliders' defaults and limits."""
    gen = cfg.generation
    limit = int(cfg.max_new_tokens_limit)

    def respond(
        query: str, messages: Messages, max_new_tokens: float, top_p: float, temperature: float
    ) -> Iterator[tuple[Messages, str, dict]]:
        """Stream the answer to ``query`` into the chat, the earlier turns on the page as history."""
        busy = gr.Button(interactive=False)  # Send is off until the answer is done (``.then`` turns it on)
        pairs = history_pairs(messages)
        if not query or not query.strip():
            yield to_messages(pairs), query, busy
            return
        settings = generation_settings(cfg, max_new_tokens=int(max_new_tokens), top_p=top_p, temperature=temperature)
        stop = threading.Event()  # set when Gradio closes this generator (the page went away, Clear pressed)
        kept, note = fit_prompt(loaded, query, pairs)
        if note:
            gr.Info(note)
        try:
            yield to_messages([*pairs, (query, "")]), "", busy
            for answer in stream_answer(loaded, query, kept, settings, stop):
                yield to_messages([*pairs, (query, answer)]), "", busy
        finally:
            stop.set()

    with gr.Blocks(title="ptune chat") as demo:
        gr.Markdown("## ptune chat")
        gr.Markdown(f"Model: `{describe(loaded)}`", elem_id="model-line")
        chatbot = gr.Chatbot(
            label="Chat",
            elem_id="chat",
            height=460,
            render_markdown=True,  # Markdown and code blocks render...
            sanitize_html=True,  # ...and any HTML in them is sanitised: no scripts, no event handlers
            allow_tags=False,  # no custom tags are let through the sanitiser either
            feedback_options=None,
            buttons=["copy"],
        )
        with gr.Row():
            query = gr.Textbox(
                show_label=False, placeholder="Message (Enter sends)", lines=1, scale=8, elem_id="query", autofocus=True
            )
            send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
            clear = gr.Button("Clear", scale=1, min_width=80, elem_id="clear")
        with gr.Row():
            max_new_tokens = gr.Slider(
                1, limit, value=min(int(gen.max_new_tokens), limit), step=1, label="Max new tokens", elem_id="max-new"
            )
            top_p = gr.Slider(0.01, 1.0, value=float(gen.top_p), step=0.01, label="Top p", elem_id="top-p")
            temperature = gr.Slider(
                0.0,
                2.0,
                value=float(gen.temperature) if gen.do_sample else 0.0,
                step=0.01,
                label="Temperature (0: greedy)",
                elem_id="temperature",
            )

        chat = gr.on(
            triggers=[send.click, query.submit],
            fn=respond,
            inputs=[query, chatbot, max_new_tokens, top_p, temperature],
            outputs=[chatbot, query, send],
            concurrency_limit=1,  # generation is not thread-safe: one answer at a time
            concurrency_id="generate",
            show_progress="hidden",
        )
        chat.then(_ready, outputs=send, queue=False)
        clear.click(lambda: ([], _ready()), outputs=[chatbot, send], cancels=[chat], queue=False)
        chatbot.clear(_ready, outputs=send, cancels=[chat], queue=False)  # the chat's own trash icon
    return demo


def access(cfg: DictConfig) -> dict:
    """Gradio's login when ``api_key`` is set (any user name, the key as password, compared in constant time);
    without one, a warning when the page listens beyond loopback."""
    key = configured_api_key(cfg)
    if key is None:
        if str(cfg.host or "127.0.0.1") not in LOOPBACK:
            logging.getLogger(__name__).warning(
                "ptune web: listening on %s without api_key: anyone who can reach it can use it", cfg.host
            )
        return {}

    def check(_user: str, password: str) -> bool:
        return secrets.compare_digest(password.encode(), key.encode())

    return {"auth": check, "auth_message": "Log in with any user name and the server's api_key as password."}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up probes
    setup = frontend_setup("web", argv, __doc__)
    if isinstance(setup, int):
        return setup
    cfg, loaded = setup
    print(f"ptune web: {describe(loaded)}", flush=True)
    demo = build_demo(cfg, loaded)
    demo.queue(default_concurrency_limit=1).launch(
        server_name=cfg.host,
        server_port=int(cfg.port or DEFAULT_PORT),
        share=False,
        ssr_mode=False,
        quiet=True,  # Gradio's start-up lines end in "set `share=True` in `launch()`", which ptune users cannot do
        prevent_thread_lock=True,
        **access(cfg),
    )
    print(f"ptune web: open {demo.local_url} (Ctrl-C stops it)", flush=True)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
