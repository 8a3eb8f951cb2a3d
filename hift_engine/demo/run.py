"""Train the demo model with HiFT AdamW on a built-in task and report loss, accuracy, memory and time."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..memory import memory_bytes
from ..optimizer import HiFTOptimizer
from ..errors import ConfigError
from .base import DemoTask
from .task import VOCAB_SIZE, ArithmeticTask
from .text import TextTask

__all__ = ["DemoResult", "run_demo", "make_task", "tiny_llama", "nudge_weights", "TASKS", "TASK_DEFAULTS"]


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
    # The task's accuracy before and after training: exact-match answers (arithmetic), held-out next-byte
    # predictions (text).
    accuracy_before: float = 0.0
    accuracy: float = 0.0
    eval_loss_before: float | None = None  # held-out loss before and after training (text; None for arithmetic)
    eval_loss: float | None = None
    seconds: float = 0.0
    num_groups: int = 0
    task: str = "arithmetic"


TASK_TYPES = {task.name: task for task in (ArithmeticTask, TextTask)}
TASKS = tuple(TASK_TYPES)
TASK_DEFAULTS = {name: task.defaults for name, task in TASK_TYPES.items()}


def make_task(name: str, eval_problems: int = 200, seed: int = 0) -> DemoTask:
    """The task called ``name``; the arithmetic task scores ``eval_problems`` fresh problems drawn with seed + 1."""
    if name not in TASK_TYPES:
        raise ConfigError(f"run_demo: task must be one of {TASKS}, got {name!r}")
    if name == "arithmetic":
        return ArithmeticTask(eval_problems=eval_problems, eval_seed=seed + 1)
    return TASK_TYPES[name]()


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
    """Train the tiny model on ``task`` and score it before and after.

    Tasks: "arithmetic" ("a+b=" problems, scored by exact-match accuracy on ``eval_problems`` fresh ones) and "text"
    (next-byte prediction on Python's email package source, scored by held-out loss and next-byte accuracy;
    ``eval_problems`` does not apply). ``steps``, ``batch_size`` and ``lr`` default to the task's
    (``TASK_DEFAULTS``); its warm-up fraction and gradient clipping are always the task's.

    ``init_noise`` > 0 multiplies every initial weight by ``1 + init_noise * N(0, 1)`` (noise of a fixed seed):
    a control for how sensitive the run is to tiny changes, against which a precision's effect can be judged."""
    data = make_task(task, eval_problems, seed)
    defaults = data.defaults
    steps = defaults.steps if steps is None else steps
    batch_size = defaults.batch_size if batch_size is None else batch_size
    lr = defaults.lr if lr is None else lr
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"run_demo: steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = tiny_llama(seed=seed, device=dev, vocab_size=data.vocab_size)
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

    def evaluate() -> tuple[float | None, float]:
        model.eval()
        try:
            return data.evaluate(model, dev)
        finally:
            model.train()

    out.eval_loss_before, out.accuracy_before = evaluate()
    rng = data.make_rng(seed)
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
    out.eval_loss, out.accuracy = evaluate()
    first = sum(out.losses[:20]) / min(20, len(out.losses))
    last = sum(out.losses[-20:]) / min(20, len(out.losses))
    scored = data.summary((out.eval_loss_before, out.accuracy_before), (out.eval_loss, out.accuracy))
    say(
        f"summary: loss {first:.3f} -> {last:.3f} (mean of first/last 20 steps), {scored}, {steps} steps over "
        f"{opt.num_groups} groups in {out.seconds:.1f} s on {dev}"
    )
    opt.close()
    return out
