"""Data: reading example files with clear errors, prompt formats, tokenisation (with its cache), packing.

May import ``ptune.utils``. Knows no model, checkpoint or trainer: it sees a tokenizer and rows, nothing more.
"""
