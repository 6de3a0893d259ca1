"""What the chat front ends (terminal, web page, HTTP API) share: config, model loading, generation settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ptune.checkpoints.config_checks import check_frontend_config
from ptune.frontends.config import compose_chat_config
from ptune.inference.generation import GenerationSettings, fit_history, query_is_cut
from ptune.inference.loading import LoadedModel, load_base, load_checkpoint


def compose_frontend_config(overrides: list[str]) -> DictConfig:
    """``conf/chat.yaml`` with command-line ``key=value`` overrides, as Hydra composes it for train.py, checked."""
    cfg = compose_chat_config(overrides)
    check_frontend_config(cfg)  # a bad value fails here, naming its key, not in every request
    return cfg


def load_model(cfg: DictConfig) -> LoadedModel:
    """A checkpoint (its base, prefix and prompt format), or with only ``model.path`` the bare base model."""
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    if cfg.checkpoint:
        checkpoint = Path(cfg.checkpoint).expanduser()
        quantization, allow = cfg.model.quantization, cfg.allow_base_mismatch
        loaded = load_checkpoint(checkpoint, cfg.model.path, cfg.model.dtype, quantization, allow)
    elif cfg.model.path:
        prompt = OmegaConf.to_container(cfg.model.prompt)
        dtype = cfg.model.dtype or "float32"
        loaded = load_base(cfg.model.path, dtype, prompt, cfg.max_source_length, 0, cfg.model.quantization)
    else:
        raise SystemExit("give checkpoint=PATH (a ptune checkpoint) or model.path=PATH (a bare base model)")
    loaded.max_source_length = prompt_limit(cfg.max_source_length, loaded)
    return loaded


def prompt_limit(wanted: int | None, loaded: LoadedModel) -> int:
    """The demos' max_source_length: ``wanted`` (``max_source_length=``), else the checkpoint's training length,
    never more than the model's positions (``max_position_embeddings``)."""
    positions = getattr(loaded.model.config, "max_position_embeddings", None)
    chosen = [n for n in (wanted if wanted is not None else loaded.max_source_length, positions) if n]
    if not chosen:
        raise ValueError(f"{loaded.base_path}: the model states no position limit; set max_source_length=N")
    return min(chosen)


def fit_prompt(
    loaded: LoadedModel, query: str, history: Sequence[tuple[str, str]]
) -> tuple[list[tuple[str, str]], str]:
    """The turns of ``history`` that fit with ``query`` (``fit_history``) and what to tell the user about what was
    left out or cut ("" when nothing was)."""
    kept, dropped = fit_history(loaded, query, history)
    limit = loaded.max_source_length
    if kept or not query_is_cut(loaded, query):
        if not dropped:
            return kept, ""
        return kept, (
            f"(the oldest {dropped} turn(s) of the history are left out: the prompt holds at most {limit} tokens, "
            "max_source_length; 'clear' starts afresh)"
        )
    left_out = "the history is left out and " if dropped else ""
    return kept, (
        f"({left_out}your message is longer than the prompt's {limit} tokens (max_source_length): its end is cut, "
        "as in training)"
    )


def generation_settings(cfg: DictConfig, **request: float | int | None) -> GenerationSettings:
    """The configured settings, with what a request (a slider, an API call) sets; temperature 0 means greedy."""
    settings = GenerationSettings(**OmegaConf.to_container(cfg.generation))
    changes = {k: v for k, v in request.items() if v is not None}
    wanted = int(changes.get("max_new_tokens", settings.max_new_tokens))
    changes["max_new_tokens"] = min(wanted, cfg.max_new_tokens_limit)
    if "temperature" in changes:
        changes["do_sample"] = changes["temperature"] > 0 if "do_sample" not in changes else changes["do_sample"]
        if changes["temperature"] <= 0:
            del changes["temperature"]
    return dataclasses.replace(settings, **changes)


def describe(loaded: LoadedModel) -> str:
    """One line naming what is loaded (shown by every front end)."""
    prefix = f" + prefix {loaded.checkpoint}" if loaded.checkpoint else " (no prefix)"
    return f"{loaded.base_path}{prefix}"
