"""Build the built-in default base model, ``models/tiny-glm``, reproducibly (same bytes on every run).

A 2-layer, hidden-64 GLM (transformers' ``GlmForCausalLM``, the ChatGLM2 architecture: multi-query attention
with 2 key/value groups, partial rotary, SwiGLU) with a character-level tokenizer that mimics ChatGLM2's:
``<unk>`` = pad = 0, ``</s>`` = eos = 2, and prompts start with ``[gMASK] sop``.

The base is pretrained briefly as a plain language model on the *chat* data set's running text, so it knows the
product vocabulary and copy style but has never seen the AdvertiseGen task or the ``[Round 1]`` prompt format:
that is what the prefix has to learn in ``python train.py``.

    python scripts/make_tiny_model.py            # writes models/tiny-glm (about a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GlmConfig, GlmForCausalLM, PreTrainedTokenizerFast

from ptune.data.prompts import CHATGLM2_QUERY, CHATGLM2_TURN

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<unk>", "<s>", "</s>", "[gMASK]", "sop"]


def build_tokenizer(data_files: list[Path]) -> PreTrainedTokenizerFast:
    """One token per character seen in the data, the prompt format or printable ASCII."""
    chars = set(string.printable) | set(CHATGLM2_TURN + CHATGLM2_QUERY)
    for path in data_files:
        chars |= set(path.read_text(encoding="utf-8"))
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for ch in sorted(chars - set(vocab)):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="[gMASK] sop $A", special_tokens=[("[gMASK]", vocab["[gMASK]"]), ("sop", vocab["sop"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<unk>",
        eos_token="</s>",
        additional_special_tokens=["[gMASK]", "sop", "<s>"],
        padding_side="left",
    )


def tiny_glm_config(vocab_size: int) -> GlmConfig:
    """ChatGLM2's shape in miniature (every field set: GlmConfig's defaults are GLM-4's)."""
    return GlmConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        partial_rotary_factor=0.5,
        rms_norm_eps=1e-5,
        attention_bias=True,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
        tie_word_embeddings=False,
    )


def pretraining_texts(chat_file: Path) -> list[str]:
    """Running text of the chat data set: every query and answer of every conversation, one text each."""
    texts = []
    for line in chat_file.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        turns = [*row["history"], [row["prompt"], row["response"]]]
        texts.append("\n".join(part for turn in turns for part in turn))
    return texts


def pretrain(model: GlmForCausalLM, tokenizer, texts: list[str], steps: int, batch_size: int, seed: int) -> None:
    rng = random.Random(seed)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][:256] + [2] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * (1 - s / steps))
    model.train()
    for step in range(steps):
        batch = rng.sample(encoded, batch_size)
        width = max(map(len, batch))
        ids = torch.tensor([row + [0] * (width - len(row)) for row in batch])
        labels = torch.tensor([row + [-100] * (width - len(row)) for row in batch])
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"pretrain step {step:4d}  loss {loss.item():.3f}", flush=True)
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "tiny-glm")
    parser.add_argument("--steps", type=int, default=600, help="pretraining steps (0: random weights)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # One thread and deterministic kernels: the same bytes on every machine with this torch build.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    data = ROOT / "data"
    tokenizer = build_tokenizer(sorted(data.glob("synthetic_*/*.json")))
    model = GlmForCausalLM(tiny_glm_config(len(tokenizer)))
    if args.steps:
        texts = pretraining_texts(data / "synthetic_chat" / "train.json")
        pretrain(model, tokenizer, texts, args.steps, batch_size=16, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()):,} parameters)")


if __name__ == "__main__":
    main()
