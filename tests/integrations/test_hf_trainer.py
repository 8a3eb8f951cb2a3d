"""transformers.Trainer with HiFTOptimizer: one group per optimizer step (also under gradient accumulation),
delayed LR by cycle, and training that works."""

import pytest
import torch

from hift_engine import ConfigError
from hift_engine.integrations.hf import create_hift_optimizer_and_scheduler
from tests.helpers import tiny_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class Repeat(torch.utils.data.Dataset):
    """Eight fixed sequences over and over: learnable in a few dozen steps."""

    def __len__(self):
        return 512

    def __getitem__(self, i):
        ids = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(i % 8))
        return {"input_ids": ids, "labels": ids}


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-2, lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, max_grad_norm=1.0, weight_decay=0.0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_trainer_trains_one_group_per_optimizer_step(tmp_path):
    model = tiny_llama()
    args = _args(tmp_path)
    opt, sched = create_hift_optimizer_and_scheduler(model, args, layers_per_group=1)
    record = []

    class Watch(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
            self.group, self.lr = opt.active_group, opt.param_groups[0]["lr"]

        def on_step_end(self, args, state, control, **kw):
            changed = {n for n, p in model.named_parameters() if not torch.equal(p, self.before[n])}
            record.append((self.group, changed, self.lr))

    trainer = transformers.Trainer(model=model, args=args, train_dataset=Repeat(), optimizers=(opt, sched), callbacks=[Watch()])
    trainer.train()
    k = opt.num_groups
    assert len(record) == 30 and opt.global_step == 30  # one switch per optimizer step, not per micro-batch
    for step, (group, changed, _) in enumerate(record):
        assert group == step % k
        assert changed == set(opt.layouts[group].names), f"step {step}: {sorted(changed)[:3]}"
    lrs = [lr for _, _, lr in record]
    for c in range(0, 30, k):  # the delayed LR is constant within a cycle and decays across cycles
        assert len(set(lrs[c : c + k])) == 1
    assert lrs[0] > lrs[-1]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_trainer_checkpoint_save_and_resume(tmp_path):
    model = tiny_llama()
    args = _args(tmp_path, max_steps=10, save_strategy="steps", save_steps=5, gradient_accumulation_steps=1)
    opt, sched = create_hift_optimizer_and_scheduler(model, args)
    transformers.Trainer(model=model, args=args, train_dataset=Repeat(), optimizers=(opt, sched)).train()
    ckpt = tmp_path / "checkpoint-5"
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "scheduler.pt").is_file()
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)  # Trainer loads it this way too
    assert state["hift"]["global_step"] == 5 and state["hift"]["order"]["position"] == 5 % opt.num_groups
    model2 = tiny_llama()
    args2 = _args(tmp_path, max_steps=10, save_strategy="no", gradient_accumulation_steps=1)
    opt2, sched2 = create_hift_optimizer_and_scheduler(model2, args2)
    transformers.Trainer(model=model2, args=args2, train_dataset=Repeat(), optimizers=(opt2, sched2)).train(
        resume_from_checkpoint=str(ckpt)
    )
    assert opt2.global_step == 10


def test_max_steps_is_required(tmp_path):
    args = _args(tmp_path, max_steps=-1, num_train_epochs=1)
    with pytest.raises(ConfigError, match="max_steps"):
        create_hift_optimizer_and_scheduler(tiny_llama(), args)


def _torchrun_trainer(tmp_path, which):
    import os
    import subprocess
    import sys

    out = tmp_path / which
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "tests.integrations.trainer_worker",
           str(out), which]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return done, [torch.load(out / f"rank-{r}.pt") for r in range(2) if (out / f"rank-{r}.pt").exists()]


def test_hift_trainer_under_torchrun_keeps_ranks_identical_without_ddp(tmp_path):
    """Two gloo processes: HiFTTrainer leaves the model unwrapped (no DistributedDataParallel), the optimizer
    averages one group's gradients per step, and both ranks end with the same trained weights."""
    done, (r0, r1) = _torchrun_trainer(tmp_path, "hift")
    assert done.returncode == 0 and "error" not in r0 and "error" not in r1, (r0.get("error"), done.stderr[-2000:])
    assert r0["wrapped"] == r1["wrapped"] == "_Unreplicated" and r0["steps"] == r1["steps"] == 12
    assert r0["reduced"] > 0
    fresh = dict(tiny_llama().named_parameters())
    assert any(not torch.equal(w, fresh[n]) for n, w in r0["weights"].items())  # it trained
    for n, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][n]), n


def test_hift_trainer_refuses_trainer_clipping_under_data_parallel(tmp_path):
    """Without the subclass Trainer wraps the model in DDP; with it, TrainingArguments.max_grad_norm would clip
    each rank's gradients before averaging: refused with what to do."""
    from hift_engine.integrations.hf import HiFTTrainer

    model = tiny_llama()
    args = _args(tmp_path)
    opt, sched = create_hift_optimizer_and_scheduler(model, args)
    opt.reducer = object()  # stands for an initialised process group (the torchrun test covers the real one)
    with pytest.raises(ConfigError, match="Set max_grad_norm=0 there"):
        HiFTTrainer(model=model, args=args, train_dataset=Repeat(), optimizers=(opt, sched))
    opt.shards = object()  # stands for shard_state=True: accelerate reads state_dict(), which no rank has
    with pytest.raises(ConfigError, match="HiFTTrainer with shard_state=True"):
        HiFTTrainer(model=model, args=args, train_dataset=Repeat(), optimizers=(opt, sched))
    with pytest.raises(ConfigError, match="HiFTTrainer needs optimizers"):
        HiFTTrainer(model=model, args=args, train_dataset=Repeat())


def test_plain_trainer_under_torchrun_breaks_on_hift_which_is_why_hift_trainer_exists(tmp_path):
    """Trainer wraps the model in DDP, whose reducer fixed at wrap time cannot follow HiFT's switching groups:
    training fails (today: "Expected to mark a variable ready only once"). If this starts passing, the
    HiFTTrainer notes in hf.py and the README need another look."""
    _, ranks = _torchrun_trainer(tmp_path, "plain")
    assert ranks and all("error" in r for r in ranks), [r.get("wrapped") for r in ranks]
