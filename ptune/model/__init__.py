"""The model being tuned: the frozen base (loaded from any Hugging Face folder or an original ChatGLM2 one,
optionally quantized), the P-tuning v2 prefix, its attention hook and its start (``prefix_init``), and the chunked
output-layer loss.

May import ``ptune.chatglm2``, ``ptune.quantization``, ``ptune.utils``. Knows no checkpoint files, trainer, data
files or HTTP: it is modules and tensors.
"""
