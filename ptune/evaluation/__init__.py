"""Evaluation: ROUGE/BLEU exactly as the reference recipe (``metrics``), scoring checkpoints, runs and sweeps
(``scoring``), the tables and plot over them (``report``), and what ``evaluate.py`` does with its config
(``command``).

May import ``ptune.inference`` and everything below it. Knows no trainer (the training objective calls in here).
"""
