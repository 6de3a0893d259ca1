"""ptune: P-tuning v2 for frozen causal language models.

Packages by responsibility, lowest first; a package imports only packages above it in this list (checked by
tests/test_layout.py), so nothing imports upward and there is no circle:

    utils        paths, durable writes, heap trimming
    data         reading files, prompt formats, tokenisation, packing
    quantization frozen int8/int4/nf4 linear layers
    chatglm2     the original ChatGLM2 folders, files and tokenizer
    model        the frozen base, the prefix, the chunked loss
    checkpoints  ptune's checkpoint folder, its state files and checks; the original P-tuning format
    inference    the one loader and the one generation path
    evaluation   metrics, scoring, reports
    training     the recipe, the trainer, Hydra glue, sweeps, the memory estimate
    frontends    terminal chat, web page, their shared start
    serve        the HTTP API
    cli          the ``ptune`` command (a module: it dispatches to every package)

Callers import from the module that defines a thing; packages re-export nothing.
"""
