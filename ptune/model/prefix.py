"""P-tuning v2: trainable key/value prefixes for every attention layer of a frozen causal LM.

Why not PEFT's prefix tuning: it feeds the prefix in as a past-key-value cache, so (1) gradient checkpointing
is refused (the cache would be written twice on the backward replay), (2) every real token's position is shifted
by the prefix length, which changes the function and breaks the original ChatGLM2 P-tuning checkpoints, and (3)
with a projection only the projected table is saved, so such a run cannot resume.

Here the prefix enters at attention time instead: a custom entry in transformers' ``AttentionInterface``
(``ptune_sdpa``) prepends the layer's prefix keys/values to the real ones just before scaled-dot-product
attention. The model never sees the prefix as a cache, so real tokens keep positions 0, 1, 2, ..., the prefix
keys carry no rotary embedding, the KV cache of ``generate`` holds only real tokens, and the attention call is a
pure function (safe to recompute under gradient checkpointing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from ptune.model.chunked_loss import linear_cross_entropy

ATTN_IMPLEMENTATION = "ptune_sdpa"
# Causal LMs whose logits are exactly ``lm_head(decoder(...).last_hidden_state)`` (no soft-capping or scaling):
# their loss goes through ptune.model.chunked_loss. Others keep transformers' head and loss on the labelled positions.
CHUNKED_LOSS_MODELS = frozenset({"glm", "glm4", "llama", "mistral", "qwen2", "qwen3"})


@dataclass(frozen=True)
class PrefixShape:
    """Sizes of the key/value prefix, read from the base model's config (works for MQA and GQA)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> PrefixShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(num_layers=config.num_hidden_layers, num_kv_heads=kv_heads, head_dim=head_dim)

    @property
    def kv_size(self) -> int:
        """Width of one prefix row: every layer's key and value for every key/value head."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim


class PrefixEncoder(nn.Module):
    """The trainable prefix table, optionally reparametrised by a two-layer MLP (``projection``).

    Parameter names and the row layout (layer, then key/value, then head, then channel) are those of the original
    ChatGLM2 ``PrefixEncoder``, so its checkpoints load without any numeric transformation.
    """

    def __init__(
        self,
        shape: PrefixShape,
        length: int,
        projection: bool = False,
        projection_hidden_size: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if length < 1:
            raise ValueError(f"prefix.length must be at least 1, got {length}")
        if projection and projection_hidden_size < 1:
            raise ValueError("prefix.projection_hidden_size must be at least 1 when prefix.projection=true")
        self.shape = shape
        self.length = length
        self.embedding = nn.Embedding(length, shape.kv_size)
        self.trans = (
            nn.Sequential(
                nn.Linear(shape.kv_size, projection_hidden_size),
                nn.Tanh(),
                nn.Linear(projection_hidden_size, shape.kv_size),
            )
            if projection
            else None
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self) -> torch.Tensor:
        """Return the prefix as ``[num_layers, 2 (key, value), num_kv_heads, length, head_dim]``."""
        table = self.embedding.weight
        if self.trans is not None:
            table = self.trans(table)
        s = self.shape
        table = self.dropout(table.view(self.length, s.num_layers, 2, s.num_kv_heads, s.head_dim))
        return table.permute(1, 2, 3, 0, 4)


class _ActivePrefix:
    """Holds the prefix computed for the current forward pass; every attention module of the base reads it.

    It stays set after the forward returns on purpose: gradient checkpointing recomputes the attention during the
    backward pass and must see the very same tensor.
    """

    def __init__(self) -> None:
        self.kv: torch.Tensor | None = None


def _prepend_prefix(
    prefix: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate one layer's ``[2, heads, length, dim]`` prefix before the real keys/values; widen the mask."""
    batch, length = key.shape[0], prefix.shape[2]
    prefix = prefix.to(key.dtype).unsqueeze(1).expand(-1, batch, -1, -1, -1)
    key = torch.cat([prefix[0], key], dim=2)
    value = torch.cat([prefix[1], value], dim=2)
    if attention_mask is None:
        # transformers drops the mask when plain causal attention suffices; rebuild it (bottom-right aligned,
        # as during cached decoding the queries are the last tokens) since the prefix makes it non-square.
        q_len, kv_len = query.shape[2], key.shape[2] - length
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=key.device)
        attention_mask = attention_mask.tril(kv_len - q_len)[None, None]
    visible = True if attention_mask.dtype == torch.bool else 0.0
    prefix_columns = attention_mask.new_full((*attention_mask.shape[:-1], length), visible)
    return key, value, torch.cat([prefix_columns, attention_mask], dim=-1)


def prefix_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, with the layer's prefix keys/values in front of the real ones. A caller that
    lays out its own cache passes its attention as the forward's ``ptune_attention`` keyword (the decoder's packed
    steps, ``ptune.inference.slots``); it then gets the query and what its cache's ``update`` returned."""
    attend = kwargs.pop("ptune_attention", None)
    if attend is not None:
        return attend(module, query, key, value, **kwargs)
    active: _ActivePrefix | None = getattr(module, "_ptune_prefix", None)
    if active is not None and active.kv is not None:
        key, value, attention_mask = _prepend_prefix(active.kv[module.layer_idx], query, key, value, attention_mask)
        kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_sdpa_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _attention_modules(model: PreTrainedModel) -> list[nn.Module]:
    """The self-attention module of every layer, found by the ``layer_idx`` + ``head_dim`` attributes."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "head_dim")]
    expected = model.config.num_hidden_layers
    if sorted(m.layer_idx for m in found) != list(range(expected)):
        raise ValueError(
            f"{type(model).__name__}: found {len(found)} attention modules with a layer_idx, expected one for each "
            f"of its {expected} layers. ptune supports transformers models whose attention goes through "
            "AttentionInterface (Llama, Qwen2, GLM, GLM-4, ...)."
        )
    return found


class PrefixTunedModel(nn.Module):
    """A frozen base causal LM plus a trainable :class:`PrefixEncoder`; only the prefix has gradients."""

    def __init__(self, base: PreTrainedModel, prefix: PrefixEncoder, logits_multiple_of: int = 1) -> None:
        super().__init__()
        if PrefixShape.from_config(base.config) != prefix.shape:
            raise ValueError(
                f"the prefix was built for {prefix.shape} but the base model has "
                f"{PrefixShape.from_config(base.config)}: it belongs to another model"
            )
        base.requires_grad_(False)
        base.set_attn_implementation(ATTN_IMPLEMENTATION)
        self.base = base
        self.prefix = prefix
        self._active = _ActivePrefix()
        for module in _attention_modules(base):
            module._ptune_prefix = self._active
        base.register_forward_pre_hook(self._compute_prefix)
        self._keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        self.logits_multiple_of = logits_multiple_of
        self._inference_kv: tuple[tuple, torch.Tensor] | None = None  # (weights' identity, the prefix they give)
        self._kv_in_cache = False

    @property
    def config(self):
        return self.base.config

    def _compute_prefix(self, _module: nn.Module, _args: tuple) -> None:
        if self._kv_in_cache:
            self._active.kv = None
        elif self.training or torch.is_grad_enabled():
            self._active.kv = self.prefix()
        else:
            self._active.kv = self.inference_prefix()

    def inference_prefix(self) -> torch.Tensor:
        """The prefix for inference (no gradients, eval mode): input-independent, so it is computed once per set of
        weights rather than on every forward pass (every decode step). The parameters' version counters change
        whenever weights are loaded or trained in place, which computes it anew."""
        params = list(self.prefix.parameters())
        identity = tuple((p.data_ptr(), p._version) for p in params)
        if self._inference_kv is None or self._inference_kv[0] != identity:
            with torch.inference_mode():
                self._inference_kv = (identity, self.prefix())
        return self._inference_kv[1]

    @contextlib.contextmanager
    def prefix_in_cache(self) -> Iterator[None]:
        """Within this, forward passes do not prepend the prefix: the caller
        (``ptune.inference.generation.BatchDecoder``) has put ``inference_prefix()`` at the front of the KV cache, so
        each decode step reads it from there instead of concatenating it in front of every layer's keys/values. Real
        tokens' positions are the caller's to give (0 at the first real token, as here)."""
        self._kv_in_cache = True
        try:
            yield
        finally:
            self._kv_in_cache = False

    def forward(self, *args, labels: torch.Tensor | None = None, **kwargs):
        """The base's forward. With labels, the output layer and the loss run only where a label is predicted (for
        AdvertiseGen ~60% of the tokens): the prompt's logits are never used, and with a 65k vocabulary they are
        most of the compute and activation memory. For decoders whose head is a plain linear layer
        (:data:`CHUNKED_LOSS_MODELS`), the labelled positions' hidden states go through the output layer and the
        loss in chunks (:mod:`ptune.model.chunked_loss`) and ``logits`` is None; for others the base computes the logits
        from the first labelled position on. Either way the count is rounded up to a multiple of
        ``logits_multiple_of`` (training sets it to dataset.pad_to_multiple_of): fewer distinct shapes, which on
        CPU keeps resident memory from growing. The loss equals the base's own loss function's."""
        if labels is None or "logits_to_keep" in kwargs:
            return self.base(*args, labels=labels, **kwargs)
        if self.config.model_type in CHUNKED_LOSS_MODELS:
            return self._chunked_loss_forward(*args, labels=labels, **kwargs)
        if not self._keeps_logits:
            return self.base(*args, labels=labels, **kwargs)
        seq = labels.shape[1]
        # position t predicts token t + 1: the first position to keep is one before the first label
        labelled = (labels[:, 1:] != -100).any(dim=0).nonzero()
        if labelled.numel() == 0:
            return self.base(*args, labels=labels, **kwargs)
        needed = seq - int(labelled[0])
        keep = min(seq, -(-needed // self.logits_multiple_of) * self.logits_multiple_of)
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch",) if k in kwargs}
        # as an index tensor, not the int ``keep``: transformers then slices a strided view, which the output
        # layer's matmul (and its backward) turns into a batched matmul copying the whole weight (2x slower on CPU)
        positions = torch.arange(seq - keep, seq, device=labels.device)
        out = self.base(*args, logits_to_keep=positions, **kwargs)
        # targets of the kept positions seq-keep .. seq-1: tokens seq-keep+1 .. seq, the last one beyond the row
        targets = nn.functional.pad(labels[:, seq - keep + 1 :], (0, 1), value=-100)
        loss = self.base.loss_function(
            logits=out.logits, labels=None, shift_labels=targets, vocab_size=self.config.vocab_size, **loss_kwargs
        )
        return dataclasses.replace(out, loss=loss)

    def _chunked_loss_forward(self, *args, labels: torch.Tensor, **kwargs) -> CausalLMOutputWithPast:
        """Decoder -> hidden states of the positions that predict a label -> chunked output layer and loss."""
        num_items = kwargs.pop("num_items_in_batch", None)
        self._compute_prefix(self.base, ())  # the decoder is called directly, so the base's pre-hook does not run
        # no cache: training needs none, and a cache would also turn off transformers' packed-row masks
        out = self.base.get_decoder()(*args, **{**kwargs, "use_cache": False})
        targets = nn.functional.pad(labels[:, 1:], (0, 1), value=-100).flatten()  # position t predicts t + 1
        where = (targets != -100).nonzero().squeeze(1)
        extra = -where.numel() % self.logits_multiple_of  # padded with ignored rows: fewer distinct shapes
        selected_targets = nn.functional.pad(targets[where], (0, extra), value=-100)
        where = torch.cat([where, where[-1:].expand(extra)]) if extra else where
        hidden = out.last_hidden_state.flatten(0, 1)[where]
        loss = linear_cross_entropy(hidden, self.base.get_output_embeddings(), selected_targets, num_items)
        return CausalLMOutputWithPast(loss=loss, hidden_states=out.hidden_states, attentions=out.attentions)

    def generate(self, *args, **kwargs):
        return self.base.generate(*args, **kwargs)

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Gradient (activation) checkpointing of the base's layers. Always non-reentrant: the prefix reaches each
        layer through the attention function, not as a layer input, and only non-reentrant checkpointing sends
        gradients to it."""
        kwargs = {**(activation_checkpointing_kwargs or {}), "use_reentrant": False}
        self.base.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers, offload=offload
        )

    def activation_checkpointing_disable(self) -> None:
        self.base.activation_checkpointing_disable()
