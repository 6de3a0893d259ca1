"""Shared fixtures: the real Hydra config composed and shrunk, and tiny models built from a config."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from transformers import AutoTokenizer, GlmConfig, GlmForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import ptune.training.hydra_setup  # noqa: E402,F401  (registers the config resolvers)
from ptune.inference.streaming import TextSoFar  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_GLM = REPO / "models" / "tiny-glm"
SHARED = REPO.parent / "shared"

# Small enough for a 2-core CI machine: a few steps, a few rows, no TensorBoard.
FAST = [
    "max_steps=6",
    "save_steps=3",
    "max_train_samples=64",
    "max_eval_samples=16",
    "trainer.logging_steps=1",
    "trainer.per_device_train_batch_size=4",
    "trainer.gradient_accumulation_steps=2",
    "trainer.report_to=[none]",
    "trainer.dataloader_num_workers=0",
]


def compose_config(name: str, *overrides: str) -> DictConfig:
    """The real ``conf/NAME.yaml`` composed with ``overrides`` (as on the command line)."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def compose_train(*overrides: str, cache_dir: Path | None = None) -> DictConfig:
    extra = [f"dataset.cache_dir={cache_dir}"] if cache_dir else []
    return compose_config("train", *extra, *overrides)


@pytest.fixture
def fast_cfg(tmp_path):
    def make(*overrides: str) -> DictConfig:
        return compose_train(*FAST, *overrides, cache_dir=tmp_path / "cache")

    return make


def tiny_config(arch: str, vocab_size: int, kv_heads: int = 2):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    if arch == "glm":
        return GlmForCausalLM, GlmConfig(**common, partial_rotary_factor=0.5, attention_bias=True)
    return LlamaForCausalLM, LlamaConfig(**common)


def make_tiny_model(arch: str, folder: Path, kv_heads: int = 2, seed: int = 0) -> Path:
    """A random 2-layer model of ``arch`` (glm or llama) saved with the shipped character tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_GLM)
    model_cls, config = tiny_config(arch, len(tokenizer), kv_heads)
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


def stop_process(proc) -> None:
    """End a server started by a test: politely, then for sure."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def streamed(tokenizer, ids: list[int]) -> tuple[list[str], int]:
    """``TextSoFar``'s text after each token of ``ids``, and the most ids one tokenizer.decode call was given."""
    longest, plain = [0], tokenizer.decode

    def counting(token_ids, *args, **kwargs):
        longest[0] = max(longest[0], len(token_ids))
        return plain(token_ids, *args, **kwargs)

    grown: list[int] = []
    text = TextSoFar(tokenizer, grown)
    text.tokenizer = type("Counting", (), {"decode": staticmethod(counting)})()
    shown = []
    for token in ids:
        grown.append(token)
        shown.append(text.update())
    return shown, longest[0]
