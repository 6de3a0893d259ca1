"""A quantized frozen base: weight-only int8/int4 linear layers (the original ChatGLM2 scheme) and NF4.

Any architecture's linear layers. May import ``ptune.utils``; knows no model family, checkpoint or trainer
(ChatGLM2's saved int4 folders are read by ``ptune.chatglm2``, which builds these layers).
"""
