"""The one loader for inference: a base model with or without a prefix checkpoint, ready to generate.

The evaluator and every demo load through here, so a checkpoint is read one way: its ``ptune_checkpoint.json``
says which base model, prefix shape and options, prompt format and lengths to use; nothing is retyped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ptune.checkpoints.config_checks import check_base_model
from ptune.checkpoints.format import build_prefix, load_prefix_weights, read_metadata
from ptune.data.prompts import PromptFormat
from ptune.model.base import load_base_model, load_tokenizer
from ptune.model.prefix import PrefixShape, PrefixTunedModel


@dataclass
class LoadedModel:
    """A model ready to generate, with what is needed to prompt it the way it was trained."""

    model: PrefixTunedModel | PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    prompt_format: PromptFormat
    base_path: str
    max_source_length: int
    max_target_length: int
    checkpoint: str | None = None
    metadata: dict[str, Any] | None = None

    def load_prefix(self, checkpoint: str | Path) -> None:
        """Swap in the weights of another checkpoint of the same prefix configuration (no reload of the base)."""
        if not isinstance(self.model, PrefixTunedModel):
            raise TypeError("this model was loaded without a prefix")
        load_prefix_weights(checkpoint, self.model.prefix)
        self.checkpoint = str(checkpoint)
        self.metadata = read_metadata(checkpoint)


def load_checkpoint(
    checkpoint: str | Path,
    base_path: str | None = None,
    dtype: str | None = None,
    quantization: str | None = None,
    allow_base_mismatch: bool = False,
) -> LoadedModel:
    """Base model + prefix from a ``checkpoint-N`` folder; ``base_path``/``dtype``/``quantization`` override the
    recorded ones (``quantization="none"``: a full-precision base even if the checkpoint's was quantized).

    A base whose config.json differs from the one the checkpoint was trained on is refused (naming the keys) unless
    ``allow_base_mismatch``."""
    meta = read_metadata(checkpoint)
    config = meta["config"]
    base = base_path or meta["base_model"]["path"]
    if not Path(base).is_dir():
        raise FileNotFoundError(
            f"{checkpoint}: its base model {base} is not there; give the folder where it now is with model.path=..."
        )
    check_base_model(checkpoint, meta, base, allow_base_mismatch)
    tokenizer = load_tokenizer(base)
    recorded = meta["base_model"].get("quantization")  # absent in checkpoints from before quantization existed
    model = load_base_model(base, dtype or config["model"]["dtype"], quantization or recorded)
    spec = meta["prefix"]
    prefix = build_prefix(PrefixShape(**spec["shape"]), spec, hidden_size=model.config.hidden_size)
    try:
        prefixed = PrefixTunedModel(model, prefix)
    except ValueError as err:
        raise ValueError(f"{checkpoint}: {err} ({base}); pass the right base with model.path=...") from err
    load_prefix_weights(checkpoint, prefix)
    prefixed.eval()
    return LoadedModel(
        model=prefixed,
        tokenizer=tokenizer,
        prompt_format=PromptFormat.from_config(config["model"]["prompt"]),
        base_path=str(base),
        max_source_length=config["dataset"]["max_source_length"],
        max_target_length=config["dataset"]["max_target_length"],
        checkpoint=str(checkpoint),
        metadata=meta,
    )


def load_prefix_on(
    first: LoadedModel, checkpoint: str | Path, allow_base_mismatch: bool = False
) -> tuple[LoadedModel, torch.Tensor]:
    """Another checkpoint on ``first``'s base, which is not loaded again (``ptune serve checkpoint=A,B``): its
    prompt format and lengths, sharing ``first``'s model and tokenizer, and its prefix's keys/values for inference
    (``[layers, 2, heads, length, dim]`` in the base's dtype). A checkpoint trained on another base is refused,
    naming the config keys that differ, unless ``allow_base_mismatch``."""
    meta = read_metadata(checkpoint)
    check_base_model(checkpoint, meta, first.base_path, allow_base_mismatch)
    base = first.model.base if isinstance(first.model, PrefixTunedModel) else first.model
    spec = meta["prefix"]
    prefix = build_prefix(PrefixShape(**spec["shape"]), spec, hidden_size=base.config.hidden_size)
    if PrefixShape.from_config(base.config) != prefix.shape:
        raise ValueError(f"{checkpoint}: its prefix was built for {prefix.shape}, not for the base {first.base_path}")
    load_prefix_weights(checkpoint, prefix)
    with torch.inference_mode():
        weight = next(base.parameters())
        kv = prefix.to(weight.device).eval()().to(weight.dtype)
    config = meta["config"]
    loaded = LoadedModel(
        model=first.model,
        tokenizer=first.tokenizer,
        prompt_format=PromptFormat.from_config(config["model"]["prompt"]),
        base_path=first.base_path,
        max_source_length=config["dataset"]["max_source_length"],
        max_target_length=config["dataset"]["max_target_length"],
        checkpoint=str(checkpoint),
        metadata=meta,
    )
    return loaded, kv


def load_base(
    path: str | Path,
    dtype: str,
    prompt: dict[str, Any],
    max_source_length: int,
    max_target_length: int,
    quantization: str | None = None,
) -> LoadedModel:
    """The bare base model, no prefix (``model.path=...`` in the demos)."""
    model = load_base_model(path, dtype, quantization).eval()
    return LoadedModel(
        model=model,
        tokenizer=load_tokenizer(path),
        prompt_format=PromptFormat.from_config(prompt),
        base_path=str(path),
        max_source_length=max_source_length,
        max_target_length=max_target_length,
    )
