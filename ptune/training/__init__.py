"""Training: the recipe top to bottom (``recipe``), the Seq2Seq trainer with prefix-only checkpoints, loss
guards, the swept objective, sweep plugins, Hydra glue (resolvers, run directory, logging) and the memory estimate.

May import ``ptune.evaluation`` and everything below it. Knows no front end and no HTTP.
"""
