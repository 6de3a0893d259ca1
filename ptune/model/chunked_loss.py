"""The output layer and the cross-entropy over labelled positions, in chunks: no full-vocabulary logits at once.

With a 65k vocabulary the logits of the labelled tokens are the largest activation of a training step (tokens x
65,024 in the model's dtype, their fp32 copy and the fp32 log-softmax autograd keeps): for 16 rows of ChatGLM2's
recipe ~2,000 answer tokens, ~1.3 GB. The base is frozen, so the output layer needs no weight gradient and the
gradient of the loss with respect to the hidden states can be computed chunk by chunk during the forward pass:
per chunk, logits -> fp32 -> log-sum-exp -> loss, and (softmax - one-hot) @ W, the chunk's input gradient. Only
that gradient (tokens x hidden, ~1/16 of the logits for ChatGLM2) is kept for backward, nothing is recomputed, and
the FLOPs are those of the plain path. The numbers are those of transformers' loss (``ForCausalLMLoss``): logits in
the model's dtype cast to fp32, summed cross-entropy divided by ``num_items_in_batch`` (or the mean).

Written here rather than taken from a library: the fused kernels that do this (e.g. Liger's) are Triton, GPU only,
and train the output layer too; this is a few lines of torch that run on CPU and GPU alike.
"""

from __future__ import annotations

import torch
from torch import nn


def chunk_tokens(vocab_size: int, elements: int = 1 << 22, multiple_of: int = 32) -> int:
    """Tokens per chunk: about ``elements`` logits (4M: 16 MB in fp32) at a time, a multiple of ``multiple_of``."""
    return max(multiple_of, elements // vocab_size // multiple_of * multiple_of)


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of fp32 ``logits`` (targets -100 ignored), as ``ForCausalLMLoss`` computes it."""
    return nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T (+ bias)``, chunked; the input gradient is made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):  # noqa: ANN001 (autograd signature)
        total = hidden.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = nn.functional.linear(h, weight, bias).float()
            valid = t != -100
            rows, picked = valid.nonzero().squeeze(1), t[valid]
            target_logits = logits[rows, picked]
            # d(sum CE)/d logits = softmax - one-hot, zero on ignored rows, computed in place in the one fp32 buffer
            # of the chunk: exp(logits - max) / sum, whose sum also gives the log-sum-exp (one exp per logit, no
            # second buffer: logsumexp() then exp(logits - lse) allocated one more and took the exp twice)
            top = logits.amax(-1, keepdim=True)
            d_logits = logits.sub_(top).exp_()
            norm = d_logits.sum(-1, keepdim=True)
            total += (top[rows, 0] + norm[rows, 0].log() - target_logits).sum()
            d_logits.div_(norm)
            d_logits[rows, picked] -= 1
            ignored = (~valid).nonzero().squeeze(1)
            if ignored.numel():  # only those rows: a mask over the whole chunk would be one more full pass
                d_logits.index_fill_(0, ignored, 0.0)
            # then back through the frozen layer in the model's dtype, as autograd does after the fp32 cast
            grad[start : start + chunk] = d_logits.to(hidden.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):  # noqa: ANN001
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    layer: nn.Linear,
    targets: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``layer(hidden)`` against ``targets`` ([tokens, hidden] and [tokens]), ``chunk`` rows at a
    time; the sum divided by ``num_items_in_batch`` when given, else the mean over non-ignored targets."""
    if layer.weight.requires_grad or (layer.bias is not None and layer.bias.requires_grad):
        raise ValueError("linear_cross_entropy is for a frozen output layer (it computes no weight gradient)")
    chunk = chunk or chunk_tokens(layer.out_features)
    if torch.is_grad_enabled() and hidden.requires_grad:
        total = _LinearCrossEntropy.apply(hidden, layer.weight, layer.bias, targets, chunk)
    else:
        with torch.no_grad():
            total = sum(
                _chunk_loss(layer(hidden[s : s + chunk]).float(), targets[s : s + chunk])
                for s in range(0, hidden.shape[0], chunk)
            )
    if num_items_in_batch is None:
        return total / (targets != -100).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
