"""A scoreable task generated on the fly: "a+b=" -> "c" (or a-b, a*b), byte-level tokens.

Tokens are raw bytes (vocab 128: ASCII), so no tokenizer download is needed. The loss covers only the answer
and its terminator (prompt-masked), and accuracy is exact match of the greedy answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import TaskDefaults

__all__ = ["ArithmeticTask", "VOCAB_SIZE", "PAD", "EOS"]

VOCAB_SIZE = 128
PAD = 0
EOS = ord(";")
IGNORE = -100


@dataclass
class ArithmeticTask:
    max_operand: int = 9
    ops: str = "+"
    seq_len: int = 8
    eval_problems: int = 200  # evaluate(): this many fresh problems, drawn from Random(eval_seed) every time
    eval_seed: int = 1

    name: ClassVar[str] = "arithmetic"
    vocab_size: ClassVar[int] = VOCAB_SIZE
    # The settings the demo has always had (no warm-up, no clipping).
    defaults: ClassVar[TaskDefaults] = TaskDefaults(steps=1500, batch_size=64, lr=3e-3, warmup_fraction=0.0,
                                                    max_grad_norm=None)

    def make_rng(self, seed: int) -> random.Random:
        return random.Random(seed)

    def sample(self, rng: random.Random) -> tuple[str, str]:
        a, b, op = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand), rng.choice(self.ops)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return f"{a}{op}{b}=", f"{value};"

    def encode(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        ids = list((prompt + answer).encode("ascii"))
        labels = [IGNORE] * len(prompt) + ids[len(prompt):]
        if len(ids) > self.seq_len:
            raise ValueError(f"example {prompt + answer!r} longer than seq_len={self.seq_len}")
        pad = self.seq_len - len(ids)
        return ids + [PAD] * pad, labels + [IGNORE] * pad

    def batch(self, rng: random.Random, size: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        rows = [self.encode(*self.sample(rng)) for _ in range(size)]
        ids = torch.tensor([r[0] for r in rows], device=device)
        labels = torch.tensor([r[1] for r in rows], device=device)
        # Causal LMs shift labels inside the loss: label[t] is predicted from position t-1.
        return {"input_ids": ids, "labels": labels, "attention_mask": (ids != PAD).long()}

    @torch.no_grad()
    def accuracy(self, model, rng: random.Random, n: int = 200, device: torch.device | str = "cpu") -> float:
        """Exact-match accuracy of greedy decoding on ``n`` fresh problems."""
        correct = 0
        for _ in range(n):
            prompt, answer = self.sample(rng)
            ids = list(prompt.encode("ascii"))
            for _ in range(len(answer) + 1):
                logits = model(input_ids=torch.tensor([ids], device=device)).logits
                nxt = int(logits[0, -1].argmax())
                ids.append(nxt)
                if nxt == EOS:
                    break
            correct += bytes(ids[len(prompt):]).decode("ascii", "replace") == answer
        return correct / n

    def evaluate(self, model, device: torch.device | str = "cpu") -> tuple[float | None, float]:
        """(None, exact-match accuracy on ``eval_problems`` fresh problems): no loss, the same problems every call."""
        return None, self.accuracy(model, random.Random(self.eval_seed), self.eval_problems, device)

    def summary(self, before: tuple[float | None, float], after: tuple[float | None, float]) -> str:
        return f"accuracy {before[1]:.1%} -> {after[1]:.1%} on {self.eval_problems} fresh problems"
