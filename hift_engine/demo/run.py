"""Train the demo model with HiFT AdamW and report loss, accuracy, memory and time."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..memory import memory_bytes
from ..optimizer import HiFTOptimizer
from .task import VOCAB_SIZE, ArithmeticTask

__all__ = ["DemoResult", "run_demo", "tiny_llama", "nudge_weights"]


def tiny_llama(hidden: int = 128, layers: int = 2, heads: int = 4, seed: int = 0, device="cpu"):
    """A randomly initialised byte-level LlamaForCausalLM (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(device)


def nudge_weights(model, noise: float) -> None:
    """Multiply every weight by ``1 + noise * N(0, 1)``, the same noise every time (a fixed generator seed)."""
    gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + noise * torch.randn(p.shape, generator=gen).to(p.device))


@dataclass
class DemoResult:
    losses: list[float] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    accuracy_before: float = 0.0
    accuracy: float = 0.0
    seconds: float = 0.0
    num_groups: int = 0


def run_demo(
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 3e-3,
    layers_per_group: int = 1,
    strategy: str = "bottom2up",
    device: str = "cpu",
    seed: int = 0,
    eval_problems: int = 200,
    log_every: int = 100,
    printer: Callable[[str], None] | None = print,
    precision: str = "fp32",
    state_dtype: str = "fp32",
    init_noise: float = 0.0,
) -> DemoResult:
    """``init_noise`` > 0 multiplies every initial weight by ``1 + init_noise * N(0, 1)`` (noise of a fixed seed):
    a control for how sensitive the run is to tiny changes, against which a precision's effect can be judged."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    task = ArithmeticTask()
    model = tiny_llama(seed=seed, device=dev)
    if init_noise:
        nudge_weights(model, init_noise)
    # Under bf16-mixed/fp16-mixed the optimizer casts the fp32 model and keeps its fp32 weights as the masters,
    # so both precisions start from the same weights (init_noise included).
    opt = HiFTOptimizer(
        model, "adamw", lr=lr, weight_decay=0.0, layers_per_group=layers_per_group, strategy=strategy, seed=seed,
        precision=precision, state_dtype=state_dtype,
    )
    sched = opt.cycle_scheduler("cosine", total_steps=steps, warmup_steps=0)
    out = DemoResult(num_groups=opt.num_groups)
    say = printer or (lambda s: None)
    say(opt.describe())
    rng, eval_rng = random.Random(seed), random.Random(seed + 1)
    model.eval()
    out.accuracy_before = task.accuracy(model, random.Random(seed + 1), eval_problems, dev)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = task.batch(rng, batch_size, dev)
        loss = model(**batch).loss
        opt.scale_loss(loss).backward()
        group, lr_now = opt.active_group, opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad()
        out.losses.append(loss.item())
        out.groups.append(group)
        if step % log_every == 0 or step == steps - 1:
            say(
                f"step {step:4d}  loss {out.losses[-1]:.4f}  group {group}/{opt.num_groups - 1}  lr {lr_now:.2e}  "
                f"mem {memory_bytes(dev) / 2**20:.0f} MiB"
            )
    out.seconds = time.perf_counter() - start
    model.eval()
    out.accuracy = task.accuracy(model, eval_rng, eval_problems, dev)
    first = sum(out.losses[:20]) / min(20, len(out.losses))
    last = sum(out.losses[-20:]) / min(20, len(out.losses))
    say(
        f"summary: loss {first:.3f} -> {last:.3f} (mean of first/last 20 steps), accuracy {out.accuracy_before:.1%} -> "
        f"{out.accuracy:.1%} on {eval_problems} fresh problems, {steps} steps over {opt.num_groups} groups in "
        f"{out.seconds:.1f} s on {dev}"
    )
    opt.close()
    return out
