"""Causal-LM loss without the full-vocabulary logits: the LM head and cross-entropy fused, chunk by chunk.

At 16k tokens x 32k vocabulary the fp32 logits take 2 GiB and their gradient as much again. Here the logits of
``chunk_tokens`` tokens exist at a time: forward keeps only each token's log-sum-exp, backward recomputes the
chunk's logits and turns them into the gradients of the hidden states and (when the head trains) of the head's
weight. Loss and gradients are those of ``cross_entropy(hidden @ weight.T, labels)`` (mean over the tokens whose
label is not ``ignore_index``), in fp32 whatever the hidden states' dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import ConfigError

__all__ = ["linear_cross_entropy", "causal_lm_loss"]

IGNORE_INDEX = -100  # transformers' label for tokens without a loss (padding, prompts)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # backward recomputes in the same dtypes
            return _LinearCrossEntropy._forward(ctx, hidden, weight, labels, chunk)

    @staticmethod
    def _forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        total = hidden.new_zeros((), dtype=torch.float32)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        safe = labels.clamp(min=0)
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s : s + chunk] @ weight.t()).float()
            lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[s : s + chunk, None]).squeeze(1)
            total += ((lse[s : s + chunk] - picked) * valid[s : s + chunk]).sum()
        ctx.save_for_backward(hidden, weight, safe, valid, lse, count)
        ctx.chunk = chunk
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _LinearCrossEntropy._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor):
        hidden, weight, safe, valid, lse, count = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        scale = grad_out / count
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s : s + ctx.chunk]
            g = torch.exp((h @ weight.t()).float() - lse[s : s + ctx.chunk, None])  # softmax
            g.scatter_add_(1, safe[s : s + ctx.chunk, None], -torch.ones_like(g[:, :1]))
            g *= (valid[s : s + ctx.chunk, None] * scale).to(g.dtype)
            if need_h:
                grad_h[s : s + ctx.chunk] = (g @ weight.float()).to(hidden.dtype)
            if need_w:
                grad_w += g.t() @ h.float()
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int = 4096) -> Tensor:
    """``cross_entropy(hidden @ weight.T, labels, ignore_index=-100)`` with at most ``chunk_tokens`` rows of
    logits alive. hidden: [N, H]; weight: [V, H]; labels: [N] int64 in [0, V) or -100 (not checked: that would
    wait for the device). With every label -100 the loss is 0 (torch gives nan). Autocast is off inside."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy: hidden [N, H], weight [V, H], labels [N]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ConfigError(f"chunk_tokens must be an integer >= 1, got {chunk_tokens!r}")
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens)


def causal_lm_loss(model: nn.Module, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
                   chunk_tokens: int = 4096) -> Tensor:
    """The loss ``model(input_ids, labels=labels).loss`` of a transformers causal LM (next-token prediction,
    mean over labelled tokens), computed from the decoder's hidden states without materialising the logits.
    Works for models whose head is a bias-free ``nn.Linear`` whose logits are used as they are (LLaMA, Mistral,
    Qwen2, GPT-NeoX, OPT, ...); models that scale or soft-cap their logits (Cohere, Granite, Gemma 2/3) are
    refused."""
    cfg = getattr(model, "config", None)
    transforms = {k: getattr(cfg, k, None) for k in ("logit_scale", "logits_scaling", "final_logit_softcapping")}
    transforms = {k: v for k, v in transforms.items() if v not in (None, 0, 0.0, 1, 1.0)}
    if transforms:
        raise ConfigError(
            f"causal_lm_loss: {type(model).__name__} transforms its logits after the head ({transforms}); the chunked "
            "loss would train a different objective. Use the model's own loss (head_chunk_tokens: 0)"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(head, nn.Linear) or head.bias is not None or decoder is None:
        raise ConfigError(
            f"causal_lm_loss: {type(model).__name__} needs a bias-free nn.Linear output head and a base model "
            f"attribute ({getattr(model, 'base_model_prefix', None)!r}); compute the loss with model(..., labels=...)"
        )
    # use_cache=False: a recomputed block must not append to a KV cache a second time
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # predict token t+1 at position t
    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, shifted.reshape(-1), chunk_tokens)
