"""Memory estimate for P-tuning v2 training with ptune (``ptune estimate``): what each part needs, in GiB.

Counted (B = batch, S = sequence length, A = positions with a label, P = prefix length, T = B x S tokens,
K = P + S keys, L layers, H hidden, nh heads, nkv key/value heads, d head_dim, F ffn width, V vocabulary, b = 2
bytes per activation (fp16/bf16 compute; also with an int8/int4 base, whose weights are dequantised to fp16 for
each matmul)):

- base weights: every parameter in fp16/bf16; int8/int4 quantise only the transformer layers' linear weights (one
  fp16 scale per output row), as the original ChatGLM2 ``quantize()``; embedding, output layer, norms and biases
  stay fp16. Weights only: activations are the same in every column.
- prefix: P x L x 2 x nkv x d fp32 parameters (+ the projection MLP and its P-row input table if asked);
  gradients fp32 for the prefix only; AdamW: two fp32 moments per prefix parameter (the prefix is fp32 itself, so
  no separate fp32 master copy; the frozen base has no gradients and no optimizer state).
- activations: the tensors autograd keeps for the backward pass, per layer (checked against
  ``torch.autograd.graph.saved_tensors_hooks`` on a small bf16 GLM with ptune's prefix: within 2%, see
  tests/training/test_estimate.py). With a frozen base the inputs of the linear layers are NOT kept (their input
  gradient
  needs only the weight):
    2 RMSNorms: fp32 copy of the input + 1/rms              2 T (4 H + 4)
    query and attention output                              2 T nh d b
    SDPA log-sum-exp (fp32)                                 T nh 4
    keys and values with the prefix, repeated to nh heads   2 B nh K d b   (transformers repeats GQA heads when
                                                                            a mask is given, as with a prefix)
    attention mask widened by the prefix                    B S K b
    MLP: gate+up projection output and SiLU(gate)           3 T F b
  plus, once, the output side: B A' H b + C V (b + 4 + b), A' = A + 1 rounded up to 32 (at most S), since ptune
  runs the output layer and the loss only on the positions that predict a label, C at a time
  (ptune.model.chunked_loss, C = chunk_tokens(V), 64 for a 65k vocabulary): the input gradient of those positions,
  kept for backward, and, alive at the loss, one chunk's logits in the compute dtype, their fp32 copy turned into
  the softmax in place, and its cast back.
  Attention goes through SDPA with a fused kernel (flash / memory-efficient on GPU): no B x nh x S x K score matrix
  is kept; the math kernel would add about 3 B nh S K b per layer (shown in the notes).
  Gradient checkpointing (every layer): each layer keeps only its input, T H b, and the backward pass recomputes
  one layer at a time, so one layer's full set is added once; the output side is not checkpointed.
Not counted: the CUDA context (~0.5-1 GiB), cuBLAS workspaces, the caching allocator's slack/fragmentation, a
layer's transient buffers (e.g. a dequantised weight matrix), the data loader; see the sanity anchors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ptune.model.chunked_loss import chunk_tokens

GiB = 2**30
BASES = ("fp16/bf16", "int8", "int4")
WEIGHT_BITS = {"fp16/bf16": 16, "int8": 8, "int4": 4}
ACTIVATION_BYTES = 2  # fp16/bf16 compute, also for a quantised base (weights are dequantised per matmul)
KNOWN_MODELS = ("chatglm2-6b",)
# What benchmarks/quantization.py measured (2026-12-02, 2-core x86-64 CPU, its 4-layer hidden-1024 GLM): resident
# bytes of the quantized layers (packed weights, fp16 scales, biases) as a share of the same layers in bf16.
MEASURED_LAYER_RATIO = {"int8": 0.501, "int4": 0.251}


def chatglm2_6b_config() -> dict:
    """The real ChatGLM2-6B ``config.json`` (THUDM/chatglm2-6b), the values that decide shapes and semantics."""
    return {
        "model_type": "chatglm",
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "ffn_hidden_size": 13696,
        "hidden_size": 4096,
        "kv_channels": 128,
        "layernorm_epsilon": 1e-05,
        "multi_query_attention": True,
        "multi_query_group_num": 2,
        "num_attention_heads": 32,
        "num_layers": 28,
        "original_rope": True,
        "padded_vocab_size": 65024,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a decoder-only config (gated MLP, RMSNorm, untied or tied output layer)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    qkv_bias: bool
    tied_embeddings: bool
    rotary_dim: int  # channels of each head that get rotary; the stored inv_freq buffer has rotary_dim / 2

    @classmethod
    def from_config(cls, config: dict, name: str = "model") -> ModelShape:
        """From an original ChatGLM2 config (``model_type: chatglm``) or a Hugging Face one (Llama, Qwen2, GLM...)."""
        if config.get("model_type") == "chatglm":
            heads = config["num_attention_heads"]
            return cls(
                name=name,
                layers=config["num_layers"],
                hidden=config["hidden_size"],
                heads=heads,
                kv_heads=config["multi_query_group_num"] if config.get("multi_query_attention") else heads,
                head_dim=config["kv_channels"],
                ffn=config["ffn_hidden_size"],
                vocab=config["padded_vocab_size"],
                qkv_bias=bool(config.get("add_qkv_bias", True)),
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                rotary_dim=config["kv_channels"] // 2,  # ChatGLM2: rotary on half of each head's channels
            )
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        rope = config.get("rope_parameters") or {}
        partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        return cls(
            name=name,
            layers=config["num_hidden_layers"],
            hidden=config["hidden_size"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            ffn=config["intermediate_size"],
            vocab=config["vocab_size"],
            qkv_bias=bool(config.get("attention_bias", config.get("qkv_bias", False))),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            rotary_dim=int(head_dim * partial),
        )

    # -- parameters ---------------------------------------------------------------------------------------------
    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_linear_weights(self) -> int:
        """q, k, v, o, gate+up and down weights of one layer (what int8/int4 quantise)."""
        h = self.hidden
        return h * self.q_width + 2 * h * self.kv_width + self.q_width * h + h * 2 * self.ffn + self.ffn * h

    @property
    def layer_linear_rows(self) -> int:
        """Output rows of those matrices: one quantisation scale each."""
        return self.q_width + 2 * self.kv_width + self.hidden + 2 * self.ffn + self.hidden

    @property
    def layer_other_params(self) -> int:
        """Two RMSNorm weights and the q/k/v biases."""
        return 2 * self.hidden + ((self.q_width + 2 * self.kv_width) if self.qkv_bias else 0)

    @property
    def embedding_params(self) -> int:
        """Input embedding, output layer (unless tied) and the final norm."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.hidden

    @property
    def parameters(self) -> int:
        return self.layers * (self.layer_linear_weights + self.layer_other_params) + self.embedding_params

    @property
    def inv_freq_elements(self) -> int:
        """The rotary ``inv_freq`` buffer, which original checkpoints store as a tensor (not a parameter)."""
        return self.rotary_dim // 2

    def layer_weight_ratio(self, base: str) -> float:
        """Bytes of the layers' linear weights in ``base`` (one fp16 scale per row included) over fp16."""
        bits = WEIGHT_BITS[base]
        return (self.layer_linear_weights * bits / 8 + self.layer_linear_rows * 2 * (bits < 16)) / (
            2 * self.layer_linear_weights
        )

    def weight_bytes(self, base: str) -> float:
        bits = WEIGHT_BITS[base]
        if bits == 16:
            return 2.0 * self.parameters
        quantised = self.layers * (self.layer_linear_weights * bits / 8 + self.layer_linear_rows * 2)
        return quantised + 2.0 * (self.parameters - self.layers * self.layer_linear_weights)


def prefix_parameters(shape: ModelShape, prefix: int, projection: bool = False, projection_hidden: int = 0) -> int:
    """The prefix table (P x L x 2 x nkv x d) or, with a projection, its input table and the two-layer MLP."""
    kv_size = shape.layers * 2 * shape.kv_width
    if not projection:
        return prefix * kv_size
    hidden = projection_hidden or shape.hidden
    return prefix * kv_size + (kv_size * hidden + hidden) + (hidden * kv_size + kv_size)


def layer_activation_bytes(shape: ModelShape, batch: int, seq: int, prefix: int, b: int = ACTIVATION_BYTES) -> float:
    """Bytes autograd keeps for one layer (the formula in the module docstring)."""
    tokens, keys = batch * seq, prefix + seq
    norms = 2 * tokens * (4 * shape.hidden + 4)
    query_and_output = 2 * tokens * shape.q_width * b
    logsumexp = tokens * shape.heads * 4
    keys_values = 2 * batch * shape.heads * keys * shape.head_dim * b
    mask = batch * seq * keys * b
    mlp = 3 * tokens * shape.ffn * b
    return norms + query_and_output + logsumexp + keys_values + mask + mlp


def output_activation_bytes(shape: ModelShape, batch: int, positions: int, b: int = ACTIVATION_BYTES) -> float:
    """The chunked loss's input gradient at ``positions`` per row (those that predict a label), kept for backward,
    and one chunk's logits (compute dtype, fp32 softmax, its cast back), alive at the loss."""
    return batch * positions * shape.hidden * b + chunk_tokens(shape.vocab) * shape.vocab * (b + 4 + b)


def logit_positions(seq: int, labelled: int | None) -> int:
    """Positions per row that get logits: ptune keeps the last ones from the position before the first label
    (``labelled`` + 1 for right-padded rows), rounded up to a multiple of 32; all ``seq`` when ``None``."""
    if labelled is None:
        return seq
    bucket = 32  # dataset.pad_to_multiple_of of trainer=fast's command line; with null it is exact (fewer)
    return min(seq, -(-(labelled + 1) // bucket) * bucket)


def activation_bytes(
    shape: ModelShape,
    batch: int,
    seq: int,
    prefix: int,
    checkpointing: bool,
    b: int = ACTIVATION_BYTES,
    labelled: int | None = None,
) -> float:
    """Bytes autograd keeps for the whole model; ``labelled`` tokens per row carry a label (default: all)."""
    layer = layer_activation_bytes(shape, batch, seq, prefix, b)
    output = output_activation_bytes(shape, batch, logit_positions(seq, labelled), b)
    if checkpointing:
        return shape.layers * batch * seq * shape.hidden * b + layer + output
    return shape.layers * layer + output


@dataclass(frozen=True)
class Estimate:
    shape: ModelShape
    batch: int
    seq: int
    labelled: int
    prefix: int
    projection: bool
    projection_hidden: int
    rows: list[tuple[str, dict[str, float]]]  # (component, bytes per base)
    totals: list[tuple[str, dict[str, float]]]

    def total(self, name: str, base: str) -> float:
        return dict(self.totals)[name][base]


def estimate(
    shape: ModelShape,
    batch: int = 1,
    seq: int = 193,
    prefix: int = 128,
    projection: bool = False,
    projection_hidden: int = 0,
    labelled: int = 127,
) -> Estimate:
    """Bytes for every component and base precision (see the module docstring for what is counted).

    ``labelled``: tokens per row that carry a label (clipped to ``seq``); the reference layout has at most
    126 answer tokens + eos = 127 of its 193."""
    if min(batch, seq, prefix, labelled) < 1:
        raise ValueError("batch, seq, labelled and prefix must be at least 1")
    labelled = min(labelled, seq)
    prefix_params = prefix_parameters(shape, prefix, projection, projection_hidden)

    def same(value: float) -> dict[str, float]:
        return dict.fromkeys(BASES, float(value))

    weights = {base: shape.weight_bytes(base) for base in BASES}
    prefix_bytes = same(4 * prefix_params)
    grads = same(4 * prefix_params)
    adam = same(8 * prefix_params)
    act = same(activation_bytes(shape, batch, seq, prefix, checkpointing=False, labelled=labelled))
    act_ckpt = same(activation_bytes(shape, batch, seq, prefix, checkpointing=True, labelled=labelled))
    kv_prefix = same(batch * shape.layers * 2 * shape.heads * prefix * shape.head_dim * ACTIVATION_BYTES)
    kv_cache = same(shape.layers * 2 * shape.kv_width * batch * seq * ACTIVATION_BYTES)
    fixed = {base: weights[base] + prefix_bytes[base] + grads[base] + adam[base] for base in BASES}
    rows = [
        ("base weights (frozen)", weights),
        (f"prefix parameters (fp32{', with projection' if projection else ''})", prefix_bytes),
        ("prefix gradients (fp32)", grads),
        ("AdamW state (2 fp32 moments, prefix only)", adam),
        ("activations, no checkpointing", act),
        ("activations, gradient checkpointing", act_ckpt),
        ("  of which prefix keys/values in attention", kv_prefix),
    ]
    totals = [
        ("training, no checkpointing", {base: fixed[base] + act[base] for base in BASES}),
        ("training, gradient checkpointing", {base: fixed[base] + act_ckpt[base] for base in BASES}),
        (
            "inference (weights + prefix + KV cache of seq)",
            {base: weights[base] + prefix_bytes[base] + kv_cache[base] for base in BASES},
        ),
    ]
    return Estimate(shape, batch, seq, labelled, prefix, projection, projection_hidden, rows, totals)


def load_shape(model: str) -> ModelShape:
    """A known name (``chatglm2-6b``), a ``config.json`` path or a model folder holding one."""
    if model.lower() in KNOWN_MODELS:
        return ModelShape.from_config(chatglm2_6b_config(), name="chatglm2-6b")
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"--model {model}: not a known model ({', '.join(KNOWN_MODELS)}), a config.json or a folder with one"
        )
    config = json.loads(path.read_text(encoding="utf-8"))
    try:
        return ModelShape.from_config(config, name=str(model))
    except KeyError as err:
        raise ValueError(f"{path}: no {err} field; is it a decoder-only causal LM config?") from None


def is_chatglm2_6b(shape: ModelShape) -> bool:
    known = ModelShape.from_config(chatglm2_6b_config())
    return {**vars(shape), "name": known.name} == vars(known)


def format_table(est: Estimate) -> str:
    s = est.shape
    prefix_params = prefix_parameters(s, est.prefix, est.projection, est.projection_hidden)
    largest = max(values[base] for _, values in est.totals for base in BASES)
    unit, scale, digits = ("GiB", GiB, 3) if largest >= GiB else ("MiB", 2**20, 2)
    lines = [
        f"{s.name}: {s.parameters:,} parameters ({s.layers} layers, hidden {s.hidden}, {s.heads} heads, "
        f"{s.kv_heads} kv heads x {s.head_dim}, ffn {s.ffn}, vocab {s.vocab:,}); prefix {est.prefix} "
        f"({prefix_params:,} trainable parameters); batch {est.batch} x seq {est.seq} "
        f"({est.labelled} with a label: logits at {logit_positions(est.seq, est.labelled)}); "
        "activations in fp16/bf16, SDPA with a fused kernel",
        "",
        f"| {unit} ({'2^30' if unit == 'GiB' else '2^20'} bytes) | " + " | ".join(f"{b} base" for b in BASES) + " |",
        "|---" * (len(BASES) + 1) + "|",
    ]
    for name, values in est.rows:
        lines.append(f"| {name} | " + " | ".join(f"{values[base] / scale:.{digits}f}" for base in BASES) + " |")
    for name, values in est.totals:
        cells = " | ".join(f"**{values[base] / scale:.{digits - 1}f}**" for base in BASES)
        lines.append(f"| **{name}** | {cells} |")
    ratios = " / ".join(f"{s.layer_weight_ratio(base):.3f}x" for base in ("int8", "int4"))
    measured = " / ".join(f"{MEASURED_LAYER_RATIO[base]:.3f}x" for base in ("int8", "int4"))
    math_scores = 3 * est.batch * s.heads * est.seq * (est.prefix + est.seq) * ACTIVATION_BYTES * s.layers
    lines += [
        "",
        "Not included: CUDA context (~0.5-1 GiB), cuBLAS workspace, allocator slack (often 10-30% of activations), "
        "transient buffers; the SDPA math kernel (no fused kernel) would add "
        f"{math_scores / scale:.{digits}f} {unit} of attention scores.",
        f"int8 / int4 (model.quantization): the layers' linear weights at {ratios} their fp16 bytes here; "
        f"benchmarks/quantization.py measured {measured} (resident bytes, bf16 = 1) on a 4-layer hidden-1024 GLM.",
    ]
    return "\n".join(lines)


def anchors(est: Estimate) -> str:
    """How the estimate compares with the reference recipe's published figures (ChatGLM2-6B only)."""
    if not is_chatglm2_6b(est.shape):
        return ""
    s, tokens = est.shape, est.batch * est.seq
    infer = {base: est.total("inference (weights + prefix + KV cache of seq)", base) / GiB for base in BASES}
    train = est.total("training, no checkpointing", "int4") / GiB
    v1_extra = (130_528 - s.vocab) * s.hidden * 2 * 2 / GiB  # ChatGLM-6B (v1): 130,528-token embedding + output
    kept_inputs = s.layers * tokens * (3 * s.hidden + s.ffn) * ACTIVATION_BYTES / GiB
    scores = 3 * est.batch * s.heads * est.seq * (est.prefix + est.seq) * ACTIVATION_BYTES * s.layers / GiB
    biggest = s.hidden * 2 * s.ffn * 2 / GiB
    return "\n".join(
        [
            "",
            "Sanity anchors (published GPU figures: peak memory as nvidia-smi shows it, CUDA context included):",
            f"- inference ~13 GB fp16: estimate {infer['fp16/bf16']:.1f} GiB + context 0.5-1 = "
            f"{infer['fp16/bf16'] + 0.5:.1f}-{infer['fp16/bf16'] + 1:.1f}: agrees.",
            f"- inference ~10 GB int8 / ~6-7 GB int4: estimate {infer['int8']:.1f} / {infer['int4']:.1f} GiB + "
            "context: lower. Counted: the embedding and output layer stay fp16 (0.99 GiB). Not counted: each quantised "
            f"matmul dequantises its weight to fp16 (transient, up to {biggest:.2f} GiB). If the figures were measured "
            f"on ChatGLM-6B (v1, 130,528-token vocabulary) its fp16 embedding + output layer add {v1_extra:.1f} GiB: "
            f"{infer['int8'] + v1_extra:.1f} / {infer['int4'] + v1_extra:.1f} GiB + context, close to the 8 / 6 GB "
            "of ChatGLM-6B's README table; the ~10 GB int8 figure stays ~2 GB above anything counted here.",
            f"- P-tuning, int4 base, batch 1 x 16 accumulation: 6.7-7.6 GB published; estimate {train:.1f} GiB + "
            f"context. The reference differs: its quantised linear layers keep their fp16 inputs for backward "
            f"(+{kept_inputs:.2f} GiB; ptune's frozen layers keep none), its attention with a mask may use the "
            f"math kernel (+{scores:.2f} GiB of scores), and the caching allocator keeps freed blocks (10-30%): "
            f"{train + kept_inputs + scores:.1f} GiB + context 0.5-1 + slack, i.e. about 6-7 GiB.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """``ptune estimate``: print the table (used by ``ptune.cli``; also runnable as
    ``python -m ptune.training.estimate``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="ptune estimate", description=__doc__.split("\n", 1)[0])
    add_arguments(parser)
    return run(parser.parse_args(as_options(argv)))


def as_options(argv: list[str] | None) -> list[str] | None:
    """Accept the Hydra-style spelling of the other commands too: ``model=chatglm2-6b batch=4 projection=true``
    is ``--model chatglm2-6b --batch 4 --projection``."""
    if argv is None:
        return None
    options = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("-"):
            options.append(arg)
        elif key == "projection":
            if value.lower() not in ("true", "false"):
                raise SystemExit(f"ptune estimate: projection={value}: use projection=true or projection=false")
            options += ["--projection"] if value.lower() == "true" else []
        else:
            options += [f"--{key.replace('_', '-')}", value]
    return options


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="chatglm2-6b", help="chatglm2-6b, a config.json, or a model folder")
    parser.add_argument("--batch", type=int, default=1, help="rows per micro-batch (per_device_train_batch_size)")
    parser.add_argument("--seq", type=int, default=193, help="tokens per row (reference: 64 + 128 + 1 = 193)")
    parser.add_argument("--prefix", type=int, default=128, help="prefix length (prefix.length)")
    parser.add_argument(
        "--labelled",
        type=int,
        default=127,
        help="positions per row that predict a label; ptune computes logits only there (reference: 126 + eos)",
    )
    parser.add_argument("--projection", action="store_true", help="prefix reparametrised by an MLP")
    parser.add_argument("--projection-hidden", type=int, default=0, help="its hidden width (default: hidden size)")


def run(args) -> int:
    import sys

    try:
        shape = load_shape(args.model)
        est = estimate(shape, args.batch, args.seq, args.prefix, args.projection, args.projection_hidden, args.labelled)
    except (FileNotFoundError, ValueError) as err:
        print(f"ptune estimate: {err}", file=sys.stderr)
        return 1
    print(format_table(est) + anchors(est))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
