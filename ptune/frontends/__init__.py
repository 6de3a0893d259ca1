"""The chat front ends: terminal chat, the Gradio page, and the start they share with ``ptune serve`` (``--help``,
config, model, one-line errors; ``common``: settings and model loading).

May import ``ptune.training`` (its Hydra glue only) and everything below. Knows nothing of the HTTP API.
"""
