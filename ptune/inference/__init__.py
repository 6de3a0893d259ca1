"""Inference: the one loader (a base with or without a prefix checkpoint) and the one generation path (a
step-wise batched decoder with per-row settings) that the evaluator and every front end use.

May import ``ptune.checkpoints``, ``ptune.model``, ``ptune.data``, ``ptune.utils``. Knows no trainer, no HTTP.
"""
