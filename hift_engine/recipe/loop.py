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
import time
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..errors import CheckpointError, ConfigError
from ..memory import memory_bytes
from ..optimizer import HiFTOptimizer
from .config import RunConfig
from .data import Batches, ByteTokenizer, encode_examples, load_examples

__all__ = ["train", "build_model", "plot_training"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA GPU is visible; use cpu or auto")
    return torch.device(name)


def build_model(cfg: RunConfig, device: torch.device):
    """(model, tokenizer): the built-in tiny byte-level LLaMA, or a local Hugging Face model directory."""
    dtype = _DTYPES[cfg.model.dtype]
    if cfg.model.path == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = ByteTokenizer()
        heads = max(1, cfg.model.tiny_hidden // 32)
        mcfg = LlamaConfig(
            vocab_size=tok.vocab_size, hidden_size=cfg.model.tiny_hidden, intermediate_size=2 * cfg.model.tiny_hidden,
            num_hidden_layers=cfg.model.tiny_layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=max(64, cfg.data.max_length), pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
        )
        torch.manual_seed(cfg.train.seed)
        return LlamaForCausalLM(mcfg).to(device=device, dtype=dtype), tok
    path = Path(cfg.model.path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path={cfg.model.path!r} is not 'tiny' nor a local Hugging Face model directory (no config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
    model.config.use_cache = False
    return model, tok


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


def train(cfg: RunConfig, resume: bool | str = False, progress: bool = True) -> dict[str, Any]:
    """Run training as configured. ``resume``: True for the latest checkpoint in the output directory, or a path."""
    from tqdm.auto import tqdm

    device = _device(cfg.train.device)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
    model, tok = build_model(cfg, device)
    encoded = encode_examples(load_examples(cfg.data, cfg.train.seed), tok, cfg.data.max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = Batches(encoded, cfg.train.batch_size, cfg.train.grad_accum, pad, cfg.train.seed)
    opt = HiFTOptimizer.from_config(model, cfg.optimizer)
    sched = opt.cycle_scheduler(
        cfg.schedule.schedule, total_steps=cfg.train.steps, warmup_steps=cfg.schedule.warmup_steps,
        per_step=cfg.schedule.per_step, min_lr_ratio=cfg.schedule.min_lr_ratio,
    )
    ckpt_root = out / "checkpoints"
    start = 0
    log_path = out / "log.jsonl"
    if resume:
        target = latest_checkpoint(ckpt_root, verify=True) if resume is True else Path(resume)
        if target is None:
            raise CheckpointError(f"--resume: no complete checkpoint under {ckpt_root}")
        start = load_checkpoint(target, model, opt, sched)["step"]
        if log_path.exists():  # drop log lines written after the checkpoint (the crashed tail)
            kept = [l for l in log_path.read_text().splitlines() if l.strip() and json.loads(l)["step"] < start]
            log_path.write_text("".join(k + "\n" for k in kept))
    elif log_path.exists():
        log_path.unlink()

    bar = tqdm(total=cfg.train.steps, initial=start, disable=not progress, dynamic_ncols=True, desc="hift train")
    window_tokens, window_start = 0, time.perf_counter()
    losses: list[float] = []
    model.train()
    with open(log_path, "a") as log:
        for step in range(start, cfg.train.steps):
            group, lr = opt.active_group, opt.param_groups[0]["lr"]
            step_loss = 0.0
            for micro in range(cfg.train.grad_accum):
                batch = batches.get(step, micro, device)
                loss = model(**batch).loss / cfg.train.grad_accum
                loss.backward()
                step_loss += loss.item()
                window_tokens += int(batch["attention_mask"].sum())
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(step_loss)
            done = step + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.steps or step == start:
                elapsed = time.perf_counter() - window_start
                row = {
                    "step": step, "loss": step_loss, "group": group, "lr": lr, "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                    "memory_mib": memory_bytes(device) / 2**20, "time": time.time(),
                }
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{step_loss:.4f}", group=f"{group}/{opt.num_groups - 1}", lr=f"{lr:.2e}",
                                tok_s=f"{row['tokens_per_s']:.0f}", mem=f"{row['memory_mib']:.0f}MiB")
                window_tokens, window_start = 0, time.perf_counter()
            bar.update(1)
            if cfg.train.save_every and done % cfg.train.save_every == 0 and done != cfg.train.steps:
                save_checkpoint(ckpt_root, model, opt, sched, step=done, keep_last=cfg.train.keep_last)
    bar.close()
    final_ckpt = save_checkpoint(ckpt_root, model, opt, sched, step=cfg.train.steps, keep_last=cfg.train.keep_last)
    model.save_pretrained(out / "final")
    if hasattr(tok, "save_pretrained"):
        tok.save_pretrained(out / "final")
    plot = plot_training(log_path, out / "training.png") if cfg.train.plot else None
    summary = {
        "steps": cfg.train.steps, "resumed_from": start, "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None, "num_groups": opt.num_groups, "checkpoint": str(final_ckpt),
        "plot": str(plot) if plot else None, "log": str(log_path), "skipped_steps": opt.nonfinite_skips,
    }
    opt.close()
    return summary
