"""The demo's second task: next-byte prediction on real text, Python's own ``email`` package source.

Why a second task: the arithmetic task has 100 problems, and which of them a short run happens to learn is decided by
chance (a one-in-a-million change to the initial weights moves its final loss by 5-95%), so it cannot tell a 2%
difference between two precisions from luck. Language modelling averages over many thousands of byte contexts that
are learned gradually; there the same nudge moves the held-out loss by well under 1% (README, "Demo: quality of
bf16-mixed"), which is what makes a comparison of precisions on it mean something.

The text ships with Python (nothing to download; ``hift_engine.bench.text_corpus`` explains the choice): training
windows come from the ``email`` package except every fifth file, which is held out for the evaluation. Tokens are
bytes (vocabulary 256).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..bench.text_corpus import Corpus, load_corpus
from ..errors import ConfigError
from .base import TaskDefaults

__all__ = ["TextTask", "TEXT_VOCAB_SIZE"]

TEXT_VOCAB_SIZE = 256
EVAL_ROWS = 16  # held-out windows per evaluation batch


def _email_corpus() -> Corpus:
    try:
        return load_corpus(include_pretrain=False)
    except RuntimeError as e:
        raise ConfigError(f"the text demo task needs Python's email package source: {e}. Run the arithmetic task "
                          "instead (hift demo --task arithmetic, run_demo(task='arithmetic'))") from e


@dataclass
class TextTask:
    # Windows of 64 bytes: the demo model's position table (tiny_llama's max_position_embeddings) is 64 long.
    seq_len: int = 64
    corpus: Corpus = field(default_factory=_email_corpus)

    name: ClassVar[str] = "text"
    vocab_size: ClassVar[int] = TEXT_VOCAB_SIZE
    # Ordinary small-LM fine-tuning settings: short warm-up, clipping at 1.
    defaults: ClassVar[TaskDefaults] = TaskDefaults(steps=800, batch_size=16, lr=1e-3, warmup_fraction=0.05,
                                                    max_grad_norm=1.0)

    def make_rng(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def batch(self, rng: torch.Generator, size: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """``size`` random windows of the training text; the model shifts the labels itself."""
        ids = self.corpus.batches("finetune", size, self.seq_len, rng).to(device)
        return {"input_ids": ids, "labels": ids}

    @torch.no_grad()
    def evaluate(self, model, device: torch.device | str = "cpu") -> tuple[float | None, float]:
        """(held-out loss, next-byte accuracy) over every whole held-out batch: the same bytes for every run."""
        count = self.corpus.heldout.numel() // (EVAL_ROWS * self.seq_len)
        losses, correct, total = [], 0, 0
        for ids in self.corpus.eval_batches(EVAL_ROWS, self.seq_len, count):
            ids = ids.to(device)
            out = model(input_ids=ids, labels=ids)
            losses.append(float(out.loss))
            guess = out.logits[:, :-1].argmax(-1)
            correct += int((guess == ids[:, 1:]).sum())
            total += guess.numel()
        return sum(losses) / len(losses), correct / total

    def summary(self, before: tuple[float | None, float], after: tuple[float | None, float]) -> str:
        return (f"held-out loss {before[0]:.3f} -> {after[0]:.3f}, next-byte accuracy {before[1]:.1%} -> "
                f"{after[1]:.1%}")
