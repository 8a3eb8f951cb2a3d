"""Train the demo model with HiFT AdamW on a built-in task and report loss, accuracy, memory and time."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..memory import memory_bytes
from ..optimizer import HiFTOptimizer
from .task import VOCAB_SIZE, ArithmeticTask
from .text import TEXT_VOCAB_SIZE, TextTask

__all__ = ["DemoResult", "run_demo", "tiny_llama", "nudge_weights", "TASKS", "TASK_DEFAULTS"]


def tiny_llama(hidden: int = 128, layers: int = 2, heads: int = 4, seed: int = 0, device="cpu",
               vocab_size: int = VOCAB_SIZE):
    """A randomly initialised byte-level LlamaForCausalLM (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
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
    accuracy_before: float = 0.0  # arithmetic: exact-match answers; text: held-out next-byte accuracy
    accuracy: float = 0.0
    eval_loss_before: float | None = None  # text only: held-out loss before and after training
    eval_loss: float | None = None
    seconds: float = 0.0
    num_groups: int = 0
    task: str = "arithmetic"


@dataclass(frozen=True)
class TaskDefaults:
    steps: int
    batch_size: int
    lr: float
    warmup_fraction: float  # of the steps, rounded
    max_grad_norm: float | None


# Each task's defaults, used for any of steps/batch_size/lr not given. The arithmetic task keeps the settings the demo
# always had; the text task's are ordinary small-LM fine-tuning settings (short warmup, clipping at 1).
TASK_DEFAULTS = {
    "arithmetic": TaskDefaults(steps=1500, batch_size=64, lr=3e-3, warmup_fraction=0.0, max_grad_norm=None),
    "text": TaskDefaults(steps=800, batch_size=16, lr=1e-3, warmup_fraction=0.05, max_grad_norm=1.0),
}
TASKS = tuple(TASK_DEFAULTS)


def run_demo(
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
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
    task: str = "arithmetic",
) -> DemoResult:
    """Train the tiny model on ``task`` ("arithmetic": the "a+b=" problems, scored by exact-match accuracy on
    ``eval_problems`` fresh ones; "text": next-byte prediction on Python's email package source, scored by held-out
    loss and next-byte accuracy). ``steps``, ``batch_size`` and ``lr`` default to the task's (``TASK_DEFAULTS``).

    ``init_noise`` > 0 multiplies every initial weight by ``1 + init_noise * N(0, 1)`` (noise of a fixed seed):
    a control for how sensitive the run is to tiny changes, against which a precision's effect can be judged."""
    if task not in TASK_DEFAULTS:
        raise ValueError(f"run_demo: task must be one of {TASKS}, got {task!r}")
    defaults = TASK_DEFAULTS[task]
    steps = defaults.steps if steps is None else steps
    batch_size = defaults.batch_size if batch_size is None else batch_size
    lr = defaults.lr if lr is None else lr
    if steps < 1 or batch_size < 1:
        raise ValueError(f"run_demo: steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    dev = torch.device(device)
    torch.manual_seed(seed)
    if task == "text":
        data = TextTask()
        model = tiny_llama(seed=seed, device=dev, vocab_size=TEXT_VOCAB_SIZE)
    else:
        data = ArithmeticTask()
        model = tiny_llama(seed=seed, device=dev)
    if init_noise:
        nudge_weights(model, init_noise)
    # Under bf16-mixed/fp16-mixed the optimizer casts the fp32 model and keeps its fp32 weights as the masters,
    # so both precisions start from the same weights (init_noise included).
    opt = HiFTOptimizer(
        model, "adamw", lr=lr, weight_decay=0.0, layers_per_group=layers_per_group, strategy=strategy, seed=seed,
        precision=precision, state_dtype=state_dtype, max_grad_norm=defaults.max_grad_norm,
    )
    sched = opt.cycle_scheduler("cosine", total_steps=steps, warmup_steps=round(defaults.warmup_fraction * steps))
    out = DemoResult(num_groups=opt.num_groups, task=task)
    say = printer or (lambda s: None)
    say(opt.describe())

    def evaluate() -> None:
        model.eval()
        if task == "text":
            out.eval_loss, out.accuracy = data.evaluate(model, dev)
        else:
            out.accuracy = data.accuracy(model, random.Random(seed + 1), eval_problems, dev)
        model.train()

    evaluate()
    out.eval_loss_before, out.accuracy_before = out.eval_loss, out.accuracy
    rng = torch.Generator().manual_seed(seed) if task == "text" else random.Random(seed)
    start = time.perf_counter()
    for step in range(steps):
        batch = data.batch(rng, batch_size, dev)
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
    evaluate()
    first = sum(out.losses[:20]) / min(20, len(out.losses))
    last = sum(out.losses[-20:]) / min(20, len(out.losses))
    if task == "text":
        scored = (f"held-out loss {out.eval_loss_before:.3f} -> {out.eval_loss:.3f}, next-byte accuracy "
                  f"{out.accuracy_before:.1%} -> {out.accuracy:.1%}")
    else:
        scored = f"accuracy {out.accuracy_before:.1%} -> {out.accuracy:.1%} on {eval_problems} fresh problems"
    say(
        f"summary: loss {first:.3f} -> {last:.3f} (mean of first/last 20 steps), {scored}, {steps} steps over "
        f"{opt.num_groups} groups in {out.seconds:.1f} s on {dev}"
    )
    opt.close()
    return out
