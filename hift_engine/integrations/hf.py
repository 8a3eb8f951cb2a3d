"""transformers.Trainer support: build a HiFTOptimizer and its (delayed) scheduler from TrainingArguments.

    opt, sched = create_hift_optimizer_and_scheduler(model, args)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, sched))

Under ``torchrun`` / ``accelerate launch`` use ``HiFTTrainer`` in place of ``Trainer`` (same arguments): Trainer
would wrap the model in DistributedDataParallel, which all-reduces gradients in backward and cannot follow
HiFT's groups (DDP fixes the parameters it reduces when it wraps; HiFT switches which parameters train every
step). HiFTTrainer leaves the model unwrapped and lets HiFTOptimizer average the active group's gradients at
``step()`` (HiFTConfig.data_parallel), one group's bytes per step. Clip with HiFT's own ``max_grad_norm`` there
(the global norm, after averaging); Trainer's ``max_grad_norm`` would clip each rank's gradients before it.

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

__all__ = ["create_hift_optimizer_and_scheduler", "HiFTTrainer"]


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


class _Unreplicated(nn.Module):
    """Stands where Trainer would put DistributedDataParallel: forwards to the model, reduces nothing (the
    HiFTOptimizer averages the active group's gradients at step())."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _trainer_class():
    from transformers import Trainer

    class HiFTTrainer(Trainer):
        """transformers.Trainer for HiFTOptimizer under torch.distributed (torchrun, accelerate launch): the model
        is not wrapped in DistributedDataParallel; the optimizer averages the active group's gradients itself.
        Pass the optimizer and scheduler from create_hift_optimizer_and_scheduler as ``optimizers=``. In one
        process it is Trainer."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opt = self.optimizer
            self._hift_data_parallel = getattr(opt, "reducer", None) is not None
            if not isinstance(opt, HiFTOptimizer):
                raise ConfigError("HiFTTrainer needs optimizers=(HiFTOptimizer, scheduler) from "
                                  "create_hift_optimizer_and_scheduler(model, args)")
            if opt.shards is not None:
                raise ConfigError(
                    "HiFTTrainer with shard_state=True: Trainer (through accelerate) reads optimizer.state_dict(), "
                    "and no rank holds the whole sharded state. Use shard_state=False with Trainer, or your own loop "
                    "(or hift train) with save_checkpoint/load_checkpoint for sharded state"
                )
            if opt.reducer is not None and self.args.max_grad_norm:
                raise ConfigError(
                    f"HiFTTrainer under data parallelism: TrainingArguments.max_grad_norm={self.args.max_grad_norm} "
                    "would clip each rank's own gradients before they are averaged. Set max_grad_norm=0 there and "
                    "pass max_grad_norm to create_hift_optimizer_and_scheduler (clipped on the global norm)"
                )

        def _wrap_model(self, model, training=True, dataloader=None):
            if not training or not self._hift_data_parallel:
                return super()._wrap_model(model, training, dataloader)
            return model if isinstance(model, _Unreplicated) else _Unreplicated(model)

    return HiFTTrainer


def __getattr__(name: str):
    if name == "HiFTTrainer":  # built on first use: transformers is only needed by those who use it
        cls = _trainer_class()
        globals()["HiFTTrainer"] = cls
        return cls
    raise AttributeError(name)
