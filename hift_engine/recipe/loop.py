"""The ``hift train`` loop: HiFT over a causal LM with a progress bar, JSON-lines logs, checkpoints, resume,
and a PNG of loss and memory at the end.

Output directory:
    config.json        the resolved config
    log.jsonl          one line per logged step: step, loss, group, lr, tokens/s, memory
    checkpoints/       ckpt-<step>/ (see hift_engine.checkpoint), the last ``keep_last`` kept
    final/             the trained model (save_pretrained) and tokenizer when it has one
    training.png       loss curve and memory over steps
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..checkpoint import load_checkpoint, model_weights, save_checkpoint
from ..memory import device_budget_bytes, memory_bytes
from ..auto_groups import measure_activation_gib
from ..optimizer import HiFTOptimizer
from .config import RunConfig
from .data import Batches, encode_examples, load_examples
from .ranks import Ranks, init_ranks
from ..head_loss import causal_lm_loss
from ..precision import compute_dtype, to_device_bf16
from .model import build_model, check_model_path, masters_from_host, resolve_device
from .rundir import check_output_dir, clear_previous_run, plan_resume

__all__ = ["train", "build_model", "plot_training", "TrainingInterrupted"]

log = logging.getLogger("hift_engine")


def plot_training(log_path: Path, out_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(steps, [r["loss"] for r in rows])
    a.set_xlabel("step")
    a.set_ylabel("loss")
    a.set_title("training loss")
    a.grid(alpha=0.3)
    b.plot(steps, [r["memory_mib"] for r in rows], color="tab:orange")
    b.set_xlabel("step")
    b.set_ylabel("MiB")
    b.set_title("memory (GPU allocated, or process RSS on CPU)")
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: ``step`` (steps done), ``checkpoint`` (the newest checkpoint of this run, or
    None) and ``output_dir``. No checkpoint is written on interrupt, so stopping is immediate."""

    def __init__(self, step: int, checkpoint: Path | None, output_dir: Path) -> None:
        super().__init__(f"interrupted after step {step}")
        self.step, self.checkpoint, self.output_dir = step, checkpoint, output_dir


def _loss(model, batch: dict, head_chunk_tokens: int):
    """The model's own loss, or with ``head_chunk_tokens`` the same loss without the full-vocabulary logits."""
    if not head_chunk_tokens:
        return model(**batch).loss
    return causal_lm_loss(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"), head_chunk_tokens)


def _same_world(path: Path, world: int) -> Path:
    """A run resumes on as many processes as it was saved with: each rank's slice of every global batch, and so
    the data position, depends on it. Checked before anything is loaded."""
    meta = Path(path) / "meta.json"
    saved = json.loads(meta.read_text()).get("extra", {}).get("world_size", 1) if meta.is_file() else world
    if saved != world:
        raise ConfigError(
            f"{path} was saved by a run of {saved} process(es), this one has {world}; resume with "
            f"torchrun --nproc-per-node {saved} (the data order and the batch per step depend on it)"
        )
    return path


def _pin_auto_groups(cfg: RunConfig, model, device) -> RunConfig:
    """layers_per_group='auto' in hift train: measure the activations on a full-length batch (batch_size x
    data.max_length) unless activation_gib is given, and fix memory_budget_gib to the device's now unless
    given, so both are in the run's config.json and the log: a resume that passes them gets the same groups."""
    import copy
    import dataclasses

    opt_cfg = cfg.optimizer
    if opt_cfg.layers_per_group != "auto" or device.type != "cuda":
        return cfg  # on the CPU the optimizer asks for activation_gib and memory_budget_gib itself
    changes = {}
    if opt_cfg.activation_gib is None:
        ids = torch.zeros(cfg.train.batch_size, cfg.data.max_length, dtype=torch.long, device=device)
        batch = {"input_ids": ids, "labels": ids}
        changes["activation_gib"] = [round(v, 4) for v in measure_activation_gib(
            model, batch, lambda m, b: _loss(m, b, cfg.train.head_chunk_tokens))]
    if opt_cfg.memory_budget_gib is None:
        changes["memory_budget_gib"] = round(device_budget_bytes(device) / 2**30, 3)
    cfg = copy.copy(cfg)  # the caller's config stays as given
    cfg.optimizer = dataclasses.replace(opt_cfg, **changes)
    log.info("layers_per_group=auto: activations at %d x %d tokens %s GiB, budget %s GiB (resume with --activation_gib "
             "'%s' --memory_budget_gib %s to keep the same groups)", cfg.train.batch_size, cfg.data.max_length,
             cfg.optimizer.activation_gib, cfg.optimizer.memory_budget_gib,
             json.dumps(cfg.optimizer.activation_gib), cfg.optimizer.memory_budget_gib)
    return cfg


def train(
    cfg: RunConfig, resume: bool | str = False, progress: bool = True, overwrite: bool = False,
    resume_fallback: bool = False,
) -> dict[str, Any]:
    """Run training as configured (see _train); under torchrun, one rank of a data-parallel run (ranks.py)."""
    ranks = init_ranks(cfg.train.device)
    try:
        return _train(cfg, ranks, resume, progress, overwrite, resume_fallback)
    finally:
        ranks.close()


def _train(
    cfg: RunConfig, ranks: Ranks, resume: bool | str = False, progress: bool = True, overwrite: bool = False,
    resume_fallback: bool = False,
) -> dict[str, Any]:
    """Run training as configured; returns a summary dict.

    ``resume``: True for the latest checkpoint in the output directory, or a checkpoint (or checkpoints
    directory) path; a damaged newest checkpoint is an error unless ``resume_fallback``. Without ``resume``,
    a non-empty output directory is refused unless ``overwrite`` (which deletes only the previous run's
    files, once the new run has loaded everything). Nothing is written before the model, the data and the
    resumed checkpoint have loaded. Ctrl-C raises TrainingInterrupted (a KeyboardInterrupt).
    """
    device = resolve_device(cfg.train.device)
    if ranks.world > 1:
        device = ranks.device(cfg.train.device)
        progress = progress and ranks.is_main
    out = Path(cfg.train.output_dir)
    ckpt_root = out / "checkpoints"
    log_path = out / "log.jsonl"
    # Cheap checks first: the output directory, what to resume, the data file, the model path.
    check_output_dir(out, resume, overwrite)
    plan = plan_resume(resume, ckpt_root, resume_fallback) if resume else None
    examples = load_examples(cfg.data, cfg.train.seed)
    check_model_path(cfg)
    model, tok = build_model(cfg, device)
    encoded = encode_examples(examples, tok, cfg.data.max_length, cfg.data.overlong)
    data_report = encoded.summary()
    if encoded.overlong or encoded.dropped:
        log.warning(
            "data: %d of %d examples longer than data.max_length=%d (data.overlong=%s): %d truncated, %d dropped; "
            "training on %d", encoded.overlong, encoded.total, cfg.data.max_length, cfg.data.overlong,
            encoded.truncated, encoded.dropped, len(encoded.rows),
        )
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = Batches(encoded.rows, cfg.train.batch_size, cfg.train.grad_accum, pad, cfg.train.seed, ranks.rank, ranks.world)
    masters = to_device_bf16(model, device, compute_dtype(cfg.optimizer.precision)) if masters_from_host(cfg) else None
    cfg = ranks.broadcast(_pin_auto_groups(cfg, model, device) if ranks.is_main else None)  # every rank plans alike
    opt = HiFTOptimizer(model, config=cfg.optimizer, initial_masters=masters)
    if opt.group_plan is not None:
        log.info("%s", opt.group_plan.describe())
    del masters  # the store holds them now
    try:
        sched = opt.cycle_scheduler(
            cfg.schedule.schedule, total_steps=cfg.train.steps, warmup_steps=cfg.schedule.warmup_steps,
            per_step=cfg.schedule.per_step, min_lr_ratio=cfg.schedule.min_lr_ratio,
        )
        start, last_ckpt, skipped = 0, None, []
        if plan is not None:
            info, skipped = plan.load(lambda path: load_checkpoint(_same_world(path, ranks.world), model, opt, sched))
            start, last_ckpt = info["step"], Path(info["path"])
        # The run really starts here: only now is anything in the output directory changed (by rank 0 alone).
        ranks.barrier()  # every rank has loaded what it resumes from before anything is cleared
        if ranks.is_main:
            if overwrite:
                clear_previous_run(out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "world_size": ranks.world}, indent=1, default=str))
            if plan is not None and log_path.exists():  # drop log lines written after the checkpoint
                kept = [l for l in log_path.read_text().splitlines() if l.strip() and json.loads(l)["step"] < start]
                log_path.write_text("".join(k + "\n" for k in kept))
            elif log_path.exists():
                log_path.unlink()
        ranks.barrier()
        losses = _run_steps(cfg, model, opt, sched, batches, device, start, out, last_ckpt, progress, ranks.is_main, ranks.world)
        final_ckpt = save_checkpoint(ckpt_root, model, opt, sched, step=cfg.train.steps, keep_last=cfg.train.keep_last,
                                     extra={"world_size": ranks.world})
        plot = None
        if ranks.is_main:
            model.save_pretrained(out / "final", state_dict=model_weights(model, opt))  # fp32 masters of a mixed run
            if hasattr(tok, "save_pretrained"):
                tok.save_pretrained(out / "final")
            plot = plot_training(log_path, out / "training.png") if cfg.train.plot else None
        ranks.barrier()
        return {
            "steps": cfg.train.steps, "resumed_from": start, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "num_groups": opt.num_groups, "checkpoint": str(final_ckpt),
            "plot": str(plot) if plot else None, "log": str(log_path), "skipped_steps": opt.nonfinite_skips,
            "data": data_report, "resume_skipped": [str(p) for p, _ in skipped], "rank": ranks.rank, "world_size": ranks.world,
        }
    finally:
        opt.close()


def _run_steps(cfg, model, opt, sched, batches, device, start, out, last_ckpt, progress, writes_log=True, world=1) -> list[float]:
    """Steps ``start`` .. train.steps-1 with logging (``writes_log``: rank 0) and periodic checkpoints; returns
    the step losses (this rank's)."""
    from tqdm.auto import tqdm

    log_path, ckpt_root = out / "log.jsonl", out / "checkpoints"
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not progress, dynamic_ncols=True, desc="hift train")
    window_tokens, window_start = 0, time.perf_counter()
    losses: list[float] = []
    done = start
    model.train()
    try:
        with open(log_path if writes_log else os.devnull, "a") as log_file:
            for step in range(start, cfg.train.steps):
                group, lr = opt.active_group, opt.param_groups[0]["lr"]
                step_loss = 0.0
                for micro in range(cfg.train.grad_accum):
                    batch = batches.get(step, micro, device)
                    loss = _loss(model, batch, cfg.train.head_chunk_tokens) / cfg.train.grad_accum
                    opt.scale_loss(loss).backward()  # the loss scale under fp16-mixed; the loss itself otherwise
                    step_loss += loss.item()
                    window_tokens += int(batch["attention_mask"].sum())
                opt.step()
                sched.step()
                opt.zero_grad()
                losses.append(step_loss)
                done = step + 1
                if done % cfg.train.log_every == 0 or done == cfg.train.steps or step == start:
                    elapsed = time.perf_counter() - window_start
                    logged_loss, tokens = step_loss, window_tokens
                    if world > 1:  # every rank logs at the same steps: the mean loss and all ranks' tokens
                        import torch.distributed as dist

                        both = torch.tensor([step_loss / world, float(window_tokens)], device=device)
                        dist.all_reduce(both)
                        logged_loss, tokens = both[0].item(), both[1].item()
                    row = {
                        "step": step, "loss": logged_loss, "group": group, "lr": lr,
                        "tokens_per_s": tokens / max(elapsed, 1e-9),
                        "memory_mib": memory_bytes(device) / 2**20, "time": time.time(),
                    }
                    log_file.write(json.dumps(row) + "\n")
                    log_file.flush()
                    bar.set_postfix(loss=f"{logged_loss:.4f}", group=f"{group}/{opt.num_groups - 1}", lr=f"{lr:.2e}",
                                    tok_s=f"{row['tokens_per_s']:.0f}", mem=f"{row['memory_mib']:.0f}MiB")
                    window_tokens, window_start = 0, time.perf_counter()
                bar.update(1)
                if cfg.train.save_every and done % cfg.train.save_every == 0 and done != cfg.train.steps:
                    last_ckpt = save_checkpoint(ckpt_root, model, opt, sched, step=done, keep_last=cfg.train.keep_last,
                                                extra={"world_size": world})
    except KeyboardInterrupt:
        raise TrainingInterrupted(done, last_ckpt, out) from None
    finally:
        bar.close()
    return losses
