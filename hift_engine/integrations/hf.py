"""transformers.Trainer support: build a HiFTOptimizer and its (delayed) scheduler from TrainingArguments.

    opt, sched = create_hift_optimizer_and_scheduler(model, args)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, sched))

The group switches per optimizer step (Trainer calls ``optimizer.step()`` once per gradient-accumulation
window), the learning-rate schedule advances once per cycle of k steps (HiFT's delayed LR, built for
ceil(max_steps / k) cycles), and Trainer's own clipping (``max_grad_norm``) sees only the active group's
gradients, which is HiFT's clipping rule; HiFTOptimizer's own clipping stays off so nothing clips twice.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError
from ..optimizer import HiFTOptimizer

__all__ = ["create_hift_optimizer_and_scheduler"]


def create_hift_optimizer_and_scheduler(
    model: nn.Module, args, num_training_steps: int | None = None, **hift_options: Any
):
    """(HiFTOptimizer, scheduler) for ``transformers.Trainer(optimizers=...)``.

    lr, weight decay, Adam betas/epsilon and the scheduler type/warmup come from ``args``
    (TrainingArguments); ``hift_options`` are HiFTOptimizer options (layers_per_group, strategy, ...).
    ``num_training_steps`` defaults to ``args.max_steps``.
    """
    total = num_training_steps if num_training_steps is not None else args.max_steps
    if not isinstance(total, int) or total < 1:
        raise ConfigError(
            "create_hift_optimizer_and_scheduler: set TrainingArguments.max_steps (or pass num_training_steps); "
            "HiFT's delayed LR needs the number of optimizer steps up front"
        )
    options: dict[str, Any] = {"optimizer": "adamw", "lr": args.learning_rate, "weight_decay": args.weight_decay}
    options.update(hift_options)
    if options.get("precision") == "fp16-mixed":
        raise ConfigError(
            "precision='fp16-mixed' needs opt.scale_loss(loss) before backward, which transformers.Trainer does not "
            "call; use precision='bf16-mixed' with Trainer"
        )
    if options["optimizer"] == "adamw":
        options.setdefault("betas", (args.adam_beta1, args.adam_beta2))
        options.setdefault("eps", args.adam_epsilon)
    optimizer = options.pop("optimizer")
    opt = HiFTOptimizer(model, optimizer, **options)
    kind = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    warmup = args.get_warmup_steps(total)
    sched = opt.transformers_scheduler(kind, total, warmup, **(args.lr_scheduler_kwargs or {}))
    return opt, sched
