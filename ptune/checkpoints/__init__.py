"""Checkpoint folders, read and written by training, evaluation, every front end and the original-format import:
the prefix and its metadata (``format``), the SHA256 of its files and how a damaged one is named (``integrity``),
the trainer's state files (``state_io``), the checks of a config and of a
checkpoint against the base and the settings it is used with (``config_checks``), and original P-tuning
checkpoints (``original_ptuning``).

It sits below both the writers (training) and the readers (inference, front ends) so that each may import it
without an upward arrow, and above ``ptune.model`` since a checkpoint rebuilds a prefix and hashes a base's config.
May import ``ptune.model``, ``ptune.chatglm2``, ``ptune.data``, ``ptune.utils``. Knows no trainer loop or HTTP.
"""
