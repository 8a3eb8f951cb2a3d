"""Run under torchrun by test_hf_trainer.py: HiFTTrainer (or plain Trainer) on a tiny LLaMA with gloo on CPUs.
Each rank writes what it ended with to OUT/rank-<r>.pt (or the error it raised)."""

import os
import sys

import torch
import transformers

from hift_engine.integrations.hf import HiFTTrainer, create_hift_optimizer_and_scheduler
from tests.helpers import tiny_llama
from tests.integrations.test_hf_trainer import Repeat


def main(out: str, which: str) -> None:
    rank = int(os.environ["RANK"])
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=12, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, max_grad_norm=0.0, weight_decay=0.0, ddp_backend="gloo", seed=0,
    )
    model = tiny_llama()
    opt, sched = create_hift_optimizer_and_scheduler(model, args, layers_per_group=1, max_grad_norm=1.0)
    cls = HiFTTrainer if which == "hift" else transformers.Trainer
    result = {}
    try:
        trainer = cls(model=model, args=args, train_dataset=Repeat(), optimizers=(opt, sched))
        trainer.train()
        result = {"weights": {n: p.detach().clone() for n, p in model.named_parameters()},
                  "wrapped": type(trainer.model_wrapped).__name__, "steps": opt.global_step,
                  "reduced": opt.reducer.bytes_reduced if opt.reducer else 0}
    except Exception as e:  # noqa: BLE001 - the test reads it
        result = {"error": f"{type(e).__name__}: {e}"}
    torch.save(result, f"{out}/rank-{rank}.pt")
    sys.stdout.flush()
    os._exit(0)  # a failed rank must not wait for its peer in a collective at exit


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
