"""Evaluation: ROUGE/BLEU exactly as the reference recipe (``metrics``), scoring checkpoints, runs and sweeps
(``scoring``), and the tables and plot over them (``report``).

May import ``ptune.inference`` and everything below it. Knows no trainer (the training objective calls in here).
"""
