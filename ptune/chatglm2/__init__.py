"""The ChatGLM2 model family as downloaded: its folders (config, fp16 or saved-quantized weights, conversion to
the native ``GlmForCausalLM``), the checks of its files (every tensor's name, dtype and shape by config.json, sizes,
archive structure, published SHA256s) and its tokenizer. One family's config, conversion and tokenizer together, as
transformers keeps ``models/<family>/``.

May import ``ptune.quantization`` and ``ptune.utils``. Knows no prefix, checkpoint or trainer.
"""
