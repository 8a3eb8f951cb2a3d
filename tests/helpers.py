"""Tiny models and training loops shared by the tests."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import threading

import torch
from torch import nn


def tiny_llama(layers: int = 3, hidden: int = 32, vocab: int = 64, seed: int = 0, tie: bool = False, device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).to(device)


class MLPStack(nn.Module):
    """A non-HF model: embedding, a ModuleList of blocks, a head (the generic grouping rule)."""

    def __init__(self, dim: int = 16, depth: int = 4, vocab: int = 32, bias: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim, bias=bias), nn.GELU()) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab, bias=bias)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b(h)
        return self.out(self.norm(h))


def lm_batch(vocab: int = 64, batch: int = 4, seq: int = 12, seed: int = 0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


def mlp_loss(model, seed: int, vocab: int = 32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (4, 6), generator=g).to(device)
    logits = model(ids)
    return nn.functional.cross_entropy(logits.reshape(-1, vocab), ids.reshape(-1))


def twin(model):
    return copy.deepcopy(model)


def params_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def max_diff(a, b) -> float:
    return max((x.detach().double() - y.detach().double()).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


def page_rounded_bytes(numels) -> int:
    """Host bytes of the native store's fp32 buffers for ``numels``: each is whole 4 KiB pages."""
    return sum(-(-n * 4 // 4096) * 4096 for n in numels)


def returns_within(call, seconds: float = 30) -> bool:
    """Whether call() returned within `seconds` (run in a thread: a hang fails the test instead of stalling it)."""
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(timeout=seconds)
    return not worker.is_alive()


def run_child(script: str, **env) -> subprocess.CompletedProcess:
    """Run ``script`` in a child process (it sets its own address-space limit, which would hurt this one)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


# The child's address space is capped just above what it has: a 1 GiB group cannot be reserved, small ones can.
CAPPED_CHILD = """
    import resource, torch
    from hift_engine import _native
    native = _native.load()
    def cap(extra_mib):
        vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + (extra_mib << 20), resource.RLIM_INFINITY))
"""
