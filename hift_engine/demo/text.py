"""The demo's second task: next-byte prediction on real text, Python's own ``email`` package source.

Why a second task: the arithmetic task has 100 problems, and which of them a short run happens to learn is decided by
chance (a one-in-a-million change to the initial weights moves its final loss by 5-95%), so it cannot tell a 2%
difference between two precisions from luck. Language modelling averages over many thousands of byte contexts that
are learned gradually; there the same nudge moves the held-out loss by well under 1% (README, "Demo"), which is what
makes a comparison of precisions on it mean something.

The text ships with Python (nothing to download; ``hift_engine.bench.text_corpus`` explains the choice and the split
by file): training windows come from the ``email`` package except every fifth file, which is held out for the
evaluation. Tokens are bytes (vocabulary 256).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..bench.text_corpus import Corpus, load_corpus

__all__ = ["TextTask", "TEXT_VOCAB_SIZE"]

TEXT_VOCAB_SIZE = 256


@dataclass
class TextTask:
    seq_len: int = 64
    eval_batches: int = 8  # fixed held-out batches of 16 x seq_len bytes
    corpus: Corpus = field(default_factory=lambda: load_corpus(max_pretrain_bytes=0))

    def batch(self, generator: torch.Generator, size: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """``size`` random windows of the training text; the model shifts the labels itself."""
        ids = self.corpus.batches("finetune", size, self.seq_len, generator).to(device)
        return {"input_ids": ids, "labels": ids}

    @torch.no_grad()
    def evaluate(self, model, device: torch.device | str = "cpu") -> tuple[float, float]:
        """Held-out (loss, next-byte accuracy): the mean over the same fixed batches for every run."""
        losses, correct, total = [], 0, 0
        for ids in self.corpus.eval_batches(16, self.seq_len, self.eval_batches):
            ids = ids.to(device)
            out = model(input_ids=ids, labels=ids)
            losses.append(float(out.loss))
            guess = out.logits[:, :-1].argmax(-1)
            correct += int((guess == ids[:, 1:]).sum())
            total += guess.numel()
        return sum(losses) / len(losses), correct / total
