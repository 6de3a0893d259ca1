"""Training speed: ptune against the usual Hugging Face recipe (Seq2SeqTrainer + PEFT prefix tuning).

Usage: ``.venv/bin/python benchmarks/train_speed.py [--samples 128] [--repeats 3] [--shape wide|default ...]
[--baseline-dtype bfloat16] [--ablations [--ablation NAME-PART]]``

Both sides train a prefix of 128 positions for the same number of samples (one epoch over the same first rows,
effective batch 16, learning rate 2e-2, linear decay, AdamW, seed 42) on the same randomly initialised GLM shaped
like ChatGLM2 (``--shape``, by default both, wide first: the headline; see SHAPES: ``default`` 4 layers x
hidden 512, whose FLOPs are mostly the 65,024-word output layer; ``wide`` 4 layers x hidden 2048 with ChatGLM2's
head layout, whose FLOPs are mostly the transformer layers, as in the real model), saved once to a temporary folder:

- baseline: ``Seq2SeqTrainer`` + PEFT ``PrefixTuningConfig(num_virtual_tokens=128, task_type=CAUSAL_LM)`` on the
  base in ``--baseline-dtype`` (default bfloat16: the reference's main.py runs the base in half precision whenever
  pre_seq_len is set; float16 on a GPU), every row padded to 64 + 128 + 1 = 193 tokens, batch 1 x 16
  accumulation, no gradient checkpointing (the reference ChatGLM2 P-tuning recipe's settings); a secondary
  baseline (``--secondary-baseline-dtype``, default float32) gets its own line;
- ptune: ``ptune.training.recipe.build_trainer`` on the real composed Hydra config, with the overrides printed in the
  output (PTUNE_BEST: bf16 frozen base + fp32 prefix, 8 rows at a time packed into 256-token sequences, chunked loss).

Each run is a fresh subprocess (``--worker``), so its peak resident memory (``ru_maxrss``) is its own; the sides
alternate ``--repeats`` times and the table shows medians. The data are real AdvertiseGen lines tokenised with the
real ChatGLM2 tokenizer when ``../shared`` has them, else the repository's synthetic set with tiny-glm's tokenizer
(the output says which). Each run also times one eval-loss pass over ``--eval-rows`` dev rows. Finally the
tokenisation of 114,599 rows (the full AdvertiseGen train size) is timed, cold and from the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SHARED = REPO.parent / "shared"
REAL_TRAIN = SHARED / "data" / "advertisegen" / "train_5k.json"
REAL_DEV = SHARED / "data" / "advertisegen" / "dev.json"
REAL_TOKENIZER = SHARED / "models" / "chatglm2-6b-files" / "tokenizer.model"
SYNTHETIC = REPO / "data" / "synthetic_adgen"
TINY_GLM = REPO / "models" / "tiny-glm"

# ChatGLM2-6B shrunk for 2 CPU cores; everything else (vocabulary, rotary, GQA layout, norms) as the real config.
SHAPES = {
    # 86% of the parameters in the embedding and output layer: the output layer dominates the FLOPs
    "default": {
        "num_layers": 4,
        "hidden_size": 512,
        "num_attention_heads": 8,
        "kv_channels": 64,
        "multi_query_group_num": 2,
        "ffn_hidden_size": 1369,
    },
    # ChatGLM2's head layout (head_dim 128, 2 key/value groups) and ffn ratio (13696 / 4096) at half its width:
    # the transformer layers have 61% of the matmul weights (ChatGLM2-6B: 96%), 82% of the FLOPs of a labelled row
    "wide": {
        "num_layers": 4,
        "hidden_size": 2048,
        "num_attention_heads": 16,
        "kv_channels": 128,
        "multi_query_group_num": 2,
        "ffn_hidden_size": 6848,
    },
}
HEADLINE_SHAPES = ("wide", "default")  # the headline: the layer-dominated shape of the real model, then the default
PREFIX_LENGTH = 128
SOURCE_LENGTH, TARGET_LENGTH = 64, 128
PADDED_LENGTH = SOURCE_LENGTH + TARGET_LENGTH + 1  # the reference pads every row to this
EFFECTIVE_BATCH = 16
LEARNING_RATE = 2e-2
SEED = 42
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # both sides train on the GPU when there is one
FULL_TRAIN_ROWS = 114_599  # AdvertiseGen's train.json

# ptune's settings for this hardware (2-core CPU), each a documented config key; see benchmarks/README.md.
PTUNE_BEST = {
    "dtype": "bfloat16",  # model.dtype: frozen base in bf16, prefix stays fp32
    "micro_batch": 8,  # trainer.per_device_train_batch_size (x gradient_accumulation_steps 2): two packed batches
    "pack_length": 256,  # dataset.pack_length: each micro-batch of 8 rows packed into 256-token sequences
    "sampling": "random",  # trainer.train_sampling_strategy: mixed lengths pack better than length-sorted ones
    "pad_to_multiple_of": 32,  # dataset.pad_to_multiple_of: labelled positions per loss call rounded to 32
    "checkpointing": "auto",  # trainer.activation_checkpointing: off where the activations fit the load's peak
    "eval_batch": 32,  # trainer.per_device_eval_batch_size: eval rows per (packed) batch
}
# The settings before packing and the chunked loss (benchmarks/README.md, 2026-11-23), for --ablations.
PTUNE_UNPACKED = {
    "micro_batch": 1,
    "pack_length": None,
    "sampling": "group_by_length",
    "eval_batch": 4,
    "checkpointing": False,
}
# ptune with other settings, for --ablations (what each setting contributes).
ABLATIONS = {
    "no packing: 1 x 16, padded to 32 (the previous settings)": PTUNE_UNPACKED,
    "no packing, exact lengths (pad_to_multiple_of=null)": {**PTUNE_UNPACKED, "pad_to_multiple_of": None},
    "no packing, exact lengths, ONEDNN_PRIMITIVE_CACHE_CAPACITY=8": {
        **PTUNE_UNPACKED,
        "pad_to_multiple_of": None,
        "env": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "8"},
    },
    "no chunked loss (logits from the first labelled position on)": {"chunked_loss": False},
    "pack_length=384": {"pack_length": 384},
    "pack_length=512": {"pack_length": 512},
    "packed 16 x 1 (micro-batch 16, no accumulation)": {"micro_batch": 16},
    "packed 4 x 4 (micro-batch 4, accumulation 4)": {"micro_batch": 4},
    "packed, length-grouped order": {"sampling": "group_by_length"},
    "fp32 base (model.dtype=float32)": {"dtype": "float32"},
    "activation checkpointing on (the previous preset)": {"checkpointing": True},
    "no activation checkpointing": {"checkpointing": False},
    "no malloc_trim (ptune.utils.memory off)": {"release_memory": False},
}


# -- set-up (parent) ---------------------------------------------------------------------------------------------
def data_source() -> dict[str, Any]:
    """Real AdvertiseGen + the real ChatGLM2 tokenizer when present, else the shipped synthetic set + tiny-glm's."""
    if REAL_TRAIN.is_file() and REAL_DEV.is_file() and REAL_TOKENIZER.is_file():
        return {
            "name": f"real AdvertiseGen ({REAL_TRAIN.name}), real ChatGLM2 tokenizer",
            "train": REAL_TRAIN,
            "dev": REAL_DEV,
            "real_tokenizer": True,
        }
    return {
        "name": "synthetic AdvertiseGen-style data (data/synthetic_adgen), tiny-glm's character tokenizer",
        "train": SYNTHETIC / "train.json",
        "dev": SYNTHETIC / "dev.json",
        "real_tokenizer": False,
    }


def build_model(folder: Path, source: dict[str, Any], shrink: dict[str, int]) -> dict[str, Any]:
    """Save the shrunk ChatGLM2-shaped GLM (seed 0) and the tokenizer; return the model's shape for FLOP counts."""
    from transformers import AutoTokenizer, GlmForCausalLM

    from ptune.chatglm2.conversion import glm_config
    from ptune.chatglm2.tokenizer import save_chatglm2_tokenizer
    from ptune.training.estimate import chatglm2_6b_config

    original = {**chatglm2_6b_config(), **shrink}
    config = glm_config(original)  # dtype float16, as the real checkpoint is stored (both sides convert on load)
    torch.manual_seed(0)
    GlmForCausalLM(config).to(torch.float16).save_pretrained(folder)
    if source["real_tokenizer"]:
        save_chatglm2_tokenizer(REAL_TOKENIZER, folder)
    else:
        AutoTokenizer.from_pretrained(TINY_GLM).save_pretrained(folder)
    return {
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "ffn": config.intermediate_size,
        "vocab": config.vocab_size,
    }


def matmul_params(shape: dict[str, int]) -> int:
    """Weights of the matmuls every token goes through: q, k, v, o, gate+up, down per layer, and the output layer."""
    h, q, kv = shape["hidden"], shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + h * 2 * shape["ffn"] + shape["ffn"] * h
    return shape["layers"] * per_layer + h * shape["vocab"]


def row_flops(shape: dict[str, int], length: int, prefix: int = PREFIX_LENGTH) -> float:
    """Forward + backward-through-activations FLOPs of one row of ``length`` tokens (frozen base, no weight grads).

    Matmuls: 2 x params x tokens forward, 2 x params x tokens for the input gradients -> 4 x params x tokens.
    Attention per layer and query at position i (1-based): QK^T and AV over prefix + i keys, 2 x 2 x heads x
    head_dim each forward (4 h d (p + i)), and twice that backward (dQ, dK, dV, dP): 12 h d (p + i) in all.
    The prefix without projection is a table lookup: no matmul FLOPs. Norms, rotary, softmax, loss: not counted.
    """
    attention = (
        12 * shape["layers"] * shape["heads"] * shape["head_dim"] * (prefix * length + length * (length + 1) / 2)
    )
    return 4 * matmul_params(shape) * length + attention


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of an n x n x n matmul in ``dtype`` (torch's default threads, or the GPU)."""
    a, b = (torch.randn(n, n, dtype=dtype, device=DEVICE) for _ in range(2))
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def prepare(work: Path, source: dict[str, Any], samples: int, eval_rows: int, shape_name: str) -> dict[str, Any]:
    """Model, data files and the tokenised cache every worker reuses (tokenisation is not part of the timing)."""
    data = work / "data"
    data.mkdir(parents=True)
    train_lines = source["train"].read_text(encoding="utf-8").splitlines()
    if len(train_lines) < samples:
        raise SystemExit(f"--samples {samples}: {source['train']} has only {len(train_lines)} rows")
    (data / "train.json").write_text("\n".join(train_lines[:samples]) + "\n", encoding="utf-8")
    dev_lines = source["dev"].read_text(encoding="utf-8").splitlines()[:eval_rows]
    (data / "dev.json").write_text("\n".join(dev_lines) + "\n", encoding="utf-8")
    shape = build_model(work / "model", source, SHAPES[shape_name])
    cfg = compose_ptune(work, PTUNE_BEST, samples)

    from ptune.data.prompts import PromptFormat
    from ptune.model.base import load_tokenizer
    from ptune.training.recipe import load_split

    tokenizer = load_tokenizer(cfg.model.path)
    train = load_split(cfg.dataset, cfg.dataset.train_file, tokenizer, PromptFormat.from_config(cfg.model.prompt))
    load_split(cfg.dataset, cfg.dataset.validation_file, tokenizer, PromptFormat.from_config(cfg.model.prompt))
    lengths = [len(ids) for ids in train["input_ids"]]
    targets = sum(sum(1 for t in labels if t != -100) for labels in train["labels"])
    return {
        "shape": shape,
        "rows": len(lengths),
        "real_tokens": sum(lengths),
        "target_tokens": targets,
        "mean_length": statistics.mean(lengths),
        "max_length": max(lengths),
        "useful_flops": sum(row_flops(shape, n) for n in lengths),
    }


# -- the two sides (worker subprocesses) -------------------------------------------------------------------------
def ptune_overrides(work: Path, settings: dict[str, Any], samples: int) -> list[str]:
    """The ``train.py`` command-line overrides that give ptune's side of the benchmark."""
    micro = settings["micro_batch"]
    overrides = [
        "model=hf",
        f"model.path={work / 'model'}",
        f"model.dtype={settings['dtype']}",
        "model.prompt.kind=chatglm2",
        "dataset=advertisegen",
        f"dataset.dir={work / 'data'}",
        f"dataset.cache_dir={work / 'cache'}",
        f"dataset.max_source_length={SOURCE_LENGTH}",
        f"dataset.max_target_length={TARGET_LENGTH}",
        f"prefix.length={PREFIX_LENGTH}",
        f"learning_rate={LEARNING_RATE}",
        f"seed={SEED}",
        f"max_steps={samples // EFFECTIVE_BATCH}",
        f"save_steps={samples // EFFECTIVE_BATCH + 1}",  # no checkpoint and no eval inside the timed steps
        f"max_train_samples={samples}",
        f"trainer.per_device_train_batch_size={micro}",
        f"trainer.per_device_eval_batch_size={settings['eval_batch']}",
        f"trainer.gradient_accumulation_steps={EFFECTIVE_BATCH // micro}",
        f"trainer.train_sampling_strategy={settings['sampling']}",
        f"trainer.activation_checkpointing={str(settings['checkpointing']).lower()}",
        "trainer.logging_steps=1",
        "trainer.report_to=[none]",
    ]
    if settings.get("pack_length"):
        overrides.append(f"dataset.pack_length={settings['pack_length']}")
    if settings.get("pad_to_multiple_of"):
        overrides.append(f"dataset.pad_to_multiple_of={settings['pad_to_multiple_of']}")
    if settings.get("optim"):
        overrides.append(f"trainer.optim={settings['optim']}")
    if settings.get("compile"):
        overrides.append("trainer.torch_compile=true")
    return overrides


def compose_ptune(work: Path, settings: dict[str, Any], samples: int):
    from hydra import compose, initialize_config_dir

    import ptune.training.hydra_setup  # noqa: F401  (registers ${ptune_root:} and friends)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=ptune_overrides(work, settings, samples))


class Counting:
    """Wraps a collator: counts rows, executed (padded) tokens and real tokens while ``active``."""

    def __init__(self, collator) -> None:
        self.collator = collator
        self.active = False
        self.rows = self.executed = self.real = 0
        self.order: list[int] = []  # real length of each row in the order trained (to compare the sides' orders)

    def __call__(self, features):
        batch = self.collator(features)
        if self.active:  # from the rows given, not the batch's: a packed sequence holds several rows
            self.rows += len(features)
            self.executed += batch["input_ids"].numel()
            lengths = [len(f["input_ids"]) for f in features]
            self.real += sum(lengths)
            self.order += lengths
        return batch


def timing_callback(counter: Counting):
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        """Times the training steps only: from the first batch fetched to the last optimizer step."""

        def __init__(self) -> None:
            self.start: float | None = None
            self.step_ends: list[float] = []
            self.peak_rss_mb = 0.0
            self.peak_gpu_mb: float | None = None

        def on_epoch_begin(self, args, state, control, **kwargs):
            if self.start is None:
                self.start = time.perf_counter()
            counter.active = True

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())
            if state.global_step >= state.max_steps:  # before the trainer's closing evaluation
                counter.active = False
                self.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
                if DEVICE == "cuda":
                    self.peak_gpu_mb = torch.cuda.max_memory_reserved() / 2**20

    return Timing()


def baseline_trainer(work: Path, samples: int, dtype: str):
    """What a user would otherwise run: Seq2SeqTrainer + PEFT prefix tuning, rows padded to 193, 1 x 16, the base in
    ``dtype`` (the reference's main.py runs it in half precision: model.half() when pre_seq_len is set)."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments
    from transformers import set_seed as hf_set_seed

    from ptune.data.prompts import PromptFormat
    from ptune.model.base import load_tokenizer
    from ptune.training.recipe import load_split

    cfg = compose_ptune(work, PTUNE_BEST, samples)  # only for the data settings: the same files, rows and ids
    hf_set_seed(SEED)
    tokenizer = load_tokenizer(cfg.model.path)
    prompt_format = PromptFormat.from_config(cfg.model.prompt)
    train = load_split(cfg.dataset, cfg.dataset.train_file, tokenizer, prompt_format).select(range(samples))
    dev = load_split(cfg.dataset, cfg.dataset.validation_file, tokenizer, prompt_format)
    base = AutoModelForCausalLM.from_pretrained(
        str(work / "model"), dtype=getattr(torch, dtype), attn_implementation="sdpa"
    )
    model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PREFIX_LENGTH))
    tokenizer.padding_side = "right"
    args = Seq2SeqTrainingArguments(
        output_dir=str(work / "runs" / f"baseline-{os.getpid()}"),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=EFFECTIVE_BATCH,
        per_device_eval_batch_size=16,
        learning_rate=LEARNING_RATE,
        max_steps=samples // EFFECTIVE_BATCH,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=SEED,
        use_cpu=DEVICE == "cpu",
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        label_names=["labels"],
    )
    collator = DataCollatorForSeq2Seq(
        tokenizer, padding="max_length", max_length=PADDED_LENGTH, label_pad_token_id=-100, return_tensors="pt"
    )
    return Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=dev,
        data_collator=collator,
        processing_class=tokenizer,
    )


def run_worker(args: argparse.Namespace) -> None:
    import psutil
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    work = Path(args.work)
    settings = json.loads(args.settings) if args.settings else {}
    if args.worker == "baseline":
        trainer = baseline_trainer(work, args.samples, settings["dtype"])
    else:
        import ptune.model.prefix
        import ptune.utils.memory
        from ptune.training.recipe import build_trainer

        if not settings.get("chunked_loss", True):
            ptune.model.prefix.CHUNKED_LOSS_MODELS = frozenset()  # ablation: transformers' head on the labelled span
        if not settings.get("release_memory", True):
            ptune.utils.memory._malloc_trim = lambda: None  # ablation: freed heap memory stays with the process

        cfg = compose_ptune(work, settings, args.samples)
        trainer = build_trainer(cfg, str(work / "runs" / f"ptune-{os.getpid()}"))
        trainer.args.eval_on_start = False  # evaluation is not part of the comparison (the baseline has none)
    counter = Counting(trainer.data_collator)
    trainer.data_collator = counter
    timing = timing_callback(counter)
    trainer.add_callback(timing)
    rss_before = psutil.Process().memory_info().rss
    trainer.train()
    train_seconds = timing.step_ends[-1] - timing.start
    start = time.perf_counter()
    eval_loss = trainer.evaluate()["eval_loss"]
    eval_seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {
        "side": args.worker,
        "settings": settings,
        "steps": trainer.state.global_step,
        "rows": counter.rows,
        "executed_tokens": counter.executed,
        "real_tokens": counter.real,
        "order": counter.order,
        "train_seconds": train_seconds,
        "step_seconds": [b - a for a, b in zip([timing.start, *timing.step_ends], timing.step_ends, strict=False)],
        "train_losses": losses,
        "eval_loss": eval_loss,
        "eval_seconds": eval_seconds,
        "rss_before_train_mb": rss_before / 2**20,
        "peak_rss_mb": timing.peak_rss_mb,  # model load + training steps, before any evaluation
        "peak_gpu_mb": timing.peak_gpu_mb,  # torch's reserved GPU memory (no CUDA context), None on CPU
        "threads": torch.get_num_threads(),
    }
    Path(args.out).write_text(json.dumps(result), encoding="utf-8")


# -- the parent: runs, table --------------------------------------------------------------------------------------
def spawn(side: str, work: Path, samples: int, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    out = work / f"result-{time.monotonic_ns()}.json"
    command = [sys.executable, __file__, "--worker", side, "--work", str(work), "--samples", str(samples)]
    command += ["--out", str(out), "--settings", json.dumps(settings or {})]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(settings or {}).get("env", {})}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"worker {side} {settings or ''} failed (exit {done.returncode})")
    result = json.loads(out.read_text(encoding="utf-8"))
    label = f"{side} {json.dumps(settings) if settings else ''}"
    print(
        f"  {label}: {result['train_seconds']:.1f} s, {result['rows'] / result['train_seconds']:.2f} samples/s, "
        f"peak {result['peak_rss_mb']:.0f} MB, eval loss {result['eval_loss']:.4f}",
        file=sys.stderr,
        flush=True,
    )
    return result


def summarise(runs: list[dict[str, Any]], data: dict[str, Any]) -> dict[str, float]:
    """Medians over the runs of one side."""

    def median(fn) -> float:
        return statistics.median(fn(r) for r in runs)

    gpu = {}
    if all(r.get("peak_gpu_mb") for r in runs):
        gpu = {"peak GPU memory reserved (MB)": median(lambda r: r["peak_gpu_mb"])}
    return {
        "samples/s": median(lambda r: r["rows"] / r["train_seconds"]),
        "target tokens/s": median(lambda r: data["target_tokens"] / r["train_seconds"]),
        "s per optimizer step": median(lambda r: r["train_seconds"] / r["steps"]),
        "s per step after the first": median(lambda r: statistics.mean(r["step_seconds"][1:])),
        "peak RSS (MB)": median(lambda r: r["peak_rss_mb"]),
        "peak RSS, max of the runs (MB)": max(r["peak_rss_mb"] for r in runs),
        **gpu,
        "model FLOP/s (real tokens)": median(lambda r: data["useful_flops"] / r["train_seconds"]),
        "executed tokens per row": median(lambda r: r["executed_tokens"] / r["rows"]),
        "eval-loss pass (s)": median(lambda r: r["eval_seconds"]),
        "eval loss after training": median(lambda r: r["eval_loss"]),
        "train loss, last step": median(lambda r: r["train_losses"][-1]),
        "train loss, mean of all steps": median(lambda r: statistics.mean(r["train_losses"])),
    }


def fmt(name: str, value: float) -> str:
    if "loss" in name:
        return f"{value:.4f}"
    if "FLOP/s" in name:
        return f"{value / 1e9:.1f} G"
    if "MB" in name or "tokens per row" in name:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def print_table(baseline: dict[str, float], ptune: dict[str, float], peaks: dict[str, float]) -> None:
    print("| metric (median) | baseline (HF + PEFT) | ptune | ptune / baseline |")
    print("|---|---|---|---|")
    for name, value in baseline.items():
        print(f"| {name} | {fmt(name, value)} | {fmt(name, ptune[name])} | {ptune[name] / value:.2f}x |")
    for peak_name, peak in peaks.items():
        b = 100 * baseline["model FLOP/s (real tokens)"] / peak
        p = 100 * ptune["model FLOP/s (real tokens)"] / peak
        print(f"| % of {peak_name} matmul peak ({peak / 1e9:.0f} GFLOP/s) | {b:.1f}% | {p:.1f}% | {p / b:.2f}x |")


def print_loss_curves(runs: dict[str, list[dict[str, Any]]], rows: int = 16) -> None:
    """Train loss against samples seen, both sides (median over runs per step): the same function within noise?"""
    steps = len(runs["ptune"][0]["train_losses"])
    every = max(1, steps // rows)
    curves = {
        side: [statistics.median(r["train_losses"][i] for r in results) for i in range(steps)]
        for side, results in runs.items()
        if side in ("baseline", "ptune")
    }
    print("\n| optimizer step | samples seen | baseline train loss | ptune train loss | ptune - baseline |")
    print("|---|---|---|---|---|")
    for i in range(every - 1, steps, every):
        b, p = curves["baseline"][i], curves["ptune"][i]
        print(f"| {i + 1} | {(i + 1) * EFFECTIVE_BATCH} | {b:.4f} | {p:.4f} | {p - b:+.4f} |")


def time_tokenisation(work: Path, source: dict[str, Any]) -> tuple[float, float, float, int]:
    """Read + tokenise 114,599 rows (the train lines repeated) into a fresh cache, then again from the cache."""
    from ptune.data.features import tokenize_file
    from ptune.data.prompts import PromptFormat
    from ptune.data.reading import read_examples
    from ptune.model.base import load_tokenizer

    lines = source["train"].read_text(encoding="utf-8").splitlines()
    big = work / "tokenise" / "train.json"
    big.parent.mkdir()
    big.write_text("\n".join(lines[i % len(lines)] for i in range(FULL_TRAIN_ROWS)) + "\n", encoding="utf-8")
    start = time.perf_counter()
    examples = read_examples(big, prompt_column="content", response_column="summary").examples
    read_seconds = time.perf_counter() - start
    seconds = []
    for _ in range(2):
        # A freshly loaded tokenizer each time, as in a new run: tokenising sets the backend's truncation state,
        # which ptune's cache key (tokenizer_fingerprint) includes, so a reused tokenizer would miss the cache.
        tokenizer = load_tokenizer(work / "model")
        start = time.perf_counter()
        dataset = tokenize_file(
            big, examples, tokenizer, PromptFormat(), SOURCE_LENGTH, TARGET_LENGTH, work / "tokenise" / "cache"
        )
        seconds.append(time.perf_counter() - start)
    return read_seconds, seconds[0], seconds[1], len(dataset)


def wait_for_quiet(max_wait: float, threshold: float = 0.8) -> str:
    start = time.monotonic()
    while True:
        load = os.getloadavg()[0]
        if load < threshold:
            return f"1-min load average {load:.2f} at the start"
        if time.monotonic() - start > max_wait:
            return f"ran anyway after waiting {max_wait / 60:.0f} min: 1-min load average still {load:.2f}"
        print(f"  waiting for a quiet machine: load {load:.2f}", file=sys.stderr, flush=True)
        time.sleep(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    samples_help = "training rows per run (a multiple of 16, at least 32: two optimizer steps)"
    parser.add_argument("--samples", type=int, default=128, help=samples_help)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per side (medians)")
    parser.add_argument("--ablations", action="store_true", help="also run ptune with one setting changed at a time")
    parser.add_argument("--ablation-repeats", type=int, default=1, help="runs per ablation (medians)")
    parser.add_argument("--ablation", action="append", help="run only the ablations whose name contains this")
    parser.add_argument(
        "--baseline-dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="the baseline's frozen base: the reference runs it in half precision (bfloat16 on this CPU, float16 "
        "on a GPU); default %(default)s",
    )
    parser.add_argument(
        "--secondary-baseline-dtype",
        choices=["bfloat16", "float16", "float32", "none"],
        default="float32",
        help="a second baseline, in its own table row (default %(default)s: the fp32 comparison); none: skip it",
    )
    parser.add_argument("--secondary-repeats", type=int, default=1, help="runs of the secondary baseline")
    parser.add_argument(
        "--shape",
        action="append",
        choices=sorted(SHAPES),
        help="model shape (see SHAPES); repeat for several; default: both, wide (the real model's) first",
    )
    parser.add_argument("--eval-rows", type=int, default=128, help="dev rows for the timed eval-loss pass")
    parser.add_argument("--skip-tokenisation", action="store_true", help="skip the 114,599-row tokenisation timing")
    parser.add_argument("--wait-quiet", type=float, default=0, help="wait up to N minutes for load average < 0.8")
    parser.add_argument("--work", help="working folder (default: a fresh temporary folder, removed afterwards)")
    parser.add_argument("--worker", choices=["baseline", "ptune"], help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    if args.samples % EFFECTIVE_BATCH or args.samples < 2 * EFFECTIVE_BATCH:
        parser.error(f"--samples must be a multiple of {EFFECTIVE_BATCH}, at least {2 * EFFECTIVE_BATCH}")

    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    quiet = wait_for_quiet(args.wait_quiet * 60) if args.wait_quiet else f"1-min load {os.getloadavg()[0]:.2f}"
    for i, shape_name in enumerate(args.shape or HEADLINE_SHAPES):  # one table per shape, each measured in full
        print(f"## shape: {shape_name}\n", flush=True)
        measure_shape(args, shape_name, quiet, tokenise=i == 0 and not args.skip_tokenisation)


def measure_shape(args: argparse.Namespace, shape_name: str, quiet: str, tokenise: bool) -> None:
    """Both sides (and any ablations) on one model shape, alternating fresh processes; prints its report."""
    work = Path(args.work) / shape_name if args.work else Path(tempfile.mkdtemp(prefix="ptune-train-speed-"))
    try:
        source = data_source()
        data = prepare(work, source, args.samples, args.eval_rows, shape_name)
        peaks = {"bf16": matmul_rate(torch.bfloat16), "fp32": matmul_rate(torch.float32)}
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "ptune": [], "secondary": []}
        for i in range(args.repeats):  # alternate, so drift in the machine's load affects both sides alike
            runs["baseline"].append(spawn("baseline", work, args.samples, {"dtype": args.baseline_dtype}))
            runs["ptune"].append(spawn("ptune", work, args.samples, PTUNE_BEST))
            if args.secondary_baseline_dtype != "none" and i < args.secondary_repeats:
                runs["secondary"].append(
                    spawn("baseline", work, args.samples, {"dtype": args.secondary_baseline_dtype})
                )
        ablations = {}
        if args.ablations:
            for name, change in ABLATIONS.items():
                if args.ablation and not any(part in name for part in args.ablation):
                    continue
                settings = {**PTUNE_BEST, **change}
                ablations[name] = [spawn("ptune", work, args.samples, settings) for _ in range(args.ablation_repeats)]
        for name, peak in (("bf16", matmul_rate(torch.bfloat16)), ("fp32", matmul_rate(torch.float32))):
            peaks[name] = max(peaks[name], peak)
        tokenisation = time_tokenisation(work, source) if tokenise else None  # once, with the first shape
        report(args, source, data, runs, ablations, peaks, tokenisation, quiet, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def report(args, source, data, runs, ablations, peaks, tokenisation, quiet, work) -> None:
    shape = data["shape"]
    params = matmul_params(shape) + shape["vocab"] * shape["hidden"]
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    model_name = names[0] if names else platform.processor() or platform.machine()
    print(
        f"machine: {model_name}, {os.cpu_count()} cores, torch {torch.__version__} ({runs['ptune'][0]['threads']} "
        f"threads), {platform.system()} {platform.release()}"
        f"{f', GPU {torch.cuda.get_device_name()}' if DEVICE == 'cuda' else ', no GPU'}; {quiet}"
    )
    print(
        f"model: random GLM shaped like ChatGLM2 ({shape['layers']} layers, hidden {shape['hidden']}, {shape['heads']} "
        f"heads, {shape['kv_heads']} kv groups, head_dim {shape['head_dim']}, ffn {shape['ffn']}, vocab "
        f"{shape['vocab']:,}; ~{params / 1e6:.1f}M parameters), prefix {PREFIX_LENGTH}"
    )
    print(
        f"data: {source['name']}; {data['rows']} rows (one epoch, {data['rows'] // EFFECTIVE_BATCH} optimizer "
        f"steps of 16), {data['mean_length']:.1f} tokens per row on average (max {data['max_length']}), "
        f"{data['target_tokens']:,} target tokens; eval loss (timed) on the first {args.eval_rows} dev rows"
    )
    overrides = " ".join(o for o in ptune_overrides(work, PTUNE_BEST, args.samples) if "=" in o)
    print(f"ptune: build_trainer on conf/train.yaml with {overrides.replace(str(work), '$WORK')}")
    print(
        f"timing: the training steps only (first batch fetched -> last optimizer step), median of {args.repeats} "
        "alternating runs per side, each a fresh process; peak RSS = the process's ru_maxrss (model load included)\n"
    )
    baseline, ptune = summarise(runs["baseline"], data), summarise(runs["ptune"], data)
    same = runs["baseline"][0]["order"] == runs["ptune"][0]["order"]
    same_order = "the same on both sides" if same else "different (the samplers differ)"
    print(f"baseline: base in {args.baseline_dtype} (the reference recipe's half precision)")
    print_table(baseline, ptune, peaks)
    if runs["secondary"]:
        second = summarise(runs["secondary"], data)
        print(
            f"\nsecondary row, baseline with its base in {args.secondary_baseline_dtype} ({len(runs['secondary'])} "
            f"run(s)): {second['samples/s']:.3g} samples/s, peak RSS {second['peak RSS (MB)']:,.0f} MB; ptune / it: "
            f"**{ptune['samples/s'] / second['samples/s']:.2f}x** samples/s at "
            f"**{ptune['peak RSS (MB)'] / second['peak RSS (MB)']:.2f}x** peak memory"
        )
    print(
        "\nmodel FLOPs = 4 x matmul params x real tokens + 12 x layers x heads x head_dim x (prefix x L + L(L+1)/2) "
        f"per row of L real tokens (forward + backward through activations; padding not counted): "
        f"{data['useful_flops'] / 1e12:.2f} TFLOP for the {data['rows']} rows. Matmul peaks: best of 5 2048^3 "
        "matmuls in this run. Losses may differ slightly by design: PEFT shifts every real token's position by "
        "the prefix length (ptune keeps positions 0, 1, ...) and the prefixes start from different random tables of "
        f"the same size; row order: {same_order}."
    )
    print_loss_curves(runs)
    if ablations:
        best = ptune["samples/s"]
        print(
            "\n| ptune with one change (runs) | samples/s | vs ptune's settings | vs bf16 baseline | peak RSS (MB) | "
            "vs baseline | s/step after the first | executed tokens per row | eval pass (s) | eval loss |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        rows = [("ptune's settings", runs["ptune"]), *ablations.items()]
        for name, results in rows:
            s = summarise(results, data)
            print(
                f"| {name} ({len(results)}) | {s['samples/s']:.3g} | {s['samples/s'] / best:.2f}x | "
                f"{s['samples/s'] / baseline['samples/s']:.2f}x | {s['peak RSS (MB)']:,.0f} | "
                f"{s['peak RSS (MB)'] / baseline['peak RSS (MB)']:.2f}x | {s['s per step after the first']:.2f} | "
                f"{s['executed tokens per row']:.0f} | {s['eval-loss pass (s)']:.1f} | "
                f"{s['eval loss after training']:.4f} |"
            )
    if tokenisation:
        read_s, cold, warm, rows = tokenisation
        print(
            f"\ntokenisation of {rows:,} rows ({source['name'].split(';')[0]}, lines repeated to the full train size) "
            f"with ptune.data.features.tokenize_file: reading {read_s:.1f} s; cold {cold:.1f} s; "
            f"from the cache {warm:.2f} s"
        )


if __name__ == "__main__":
    main()
