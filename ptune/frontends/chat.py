"""``ptune chat``: a terminal chat with a base model and (optionally) a prefix checkpoint.

    ptune chat checkpoint=outputs/DATE/TIME/checkpoint-200
    ptune chat model.path=/models/chatglm2-6b generation.do_sample=true

Answers stream as they are generated; history is kept in the model's prompt format; ``clear`` resets it,
``exit`` or Ctrl-D quits, Ctrl-C stops the current answer and keeps the session.
"""

from __future__ import annotations

import sys

from ptune.frontends.common import describe, fit_prompt, generation_settings
from ptune.frontends.start import frontend_setup
from ptune.inference.generation import stream_answer

PROMPT = "You: "
REPLY = "Model: "


def chat(loaded, settings, read=input, write=sys.stdout.write) -> None:
    """The read-answer loop; ``read``/``write`` are the terminal (replaceable for tests)."""
    history: list[tuple[str, str]] = []
    write(f"{describe(loaded)}\nType a message; 'clear' resets the history, 'exit' or Ctrl-D quits, "
          "Ctrl-C stops an answer.\n")  # fmt: skip
    while True:
        try:
            query = read(PROMPT).strip()
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:  # at the prompt: a fresh line, like a shell
            write("\n")
            continue
        if query in ("exit", "quit"):
            return
        if query == "clear":
            history.clear()
            write("(history cleared)\n")
            continue
        if not query:
            continue
        kept, note = fit_prompt(loaded, query, history)
        if note:
            write(f"{note}\n")
        write(REPLY)
        shown = ""
        try:
            for shown_next in stream_answer(loaded, query, kept, settings):
                write(shown_next[len(shown) :] if shown_next.startswith(shown) else "\n" + shown_next)
                sys.stdout.flush()
                shown = shown_next
            write("\n")
        except KeyboardInterrupt:  # closing the stream stops generation; the session goes on
            write(" [stopped]\n")
        history.append((query, shown))


def main(argv: list[str] | None = None) -> int:
    setup = frontend_setup("chat", sys.argv[1:] if argv is None else argv, __doc__)
    if isinstance(setup, int):
        return setup
    cfg, loaded = setup
    chat(loaded, generation_settings(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
