"""Data for ``hift train``: examples from JSON lines / plain text / the built-in task, tokenised with
prompt-masked labels, served as deterministic batches (a pure function of the step, so resuming is exact)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .config import DataSection

__all__ = ["ByteTokenizer", "load_examples", "encode_examples", "Encoded", "Batches", "IGNORE"]

IGNORE = -100


class ByteTokenizer:
    """UTF-8 bytes as tokens (0..255), plus pad (256) and end-of-sequence (257): no download needed."""

    vocab_size = 258
    pad_token_id = 256
    eos_token_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


def _hf_encode(tok, text: str, special: bool) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


def load_examples(cfg: DataSection, seed: int = 0) -> list[dict[str, str]]:
    """[{"prompt", "response"}] or [{"text"}] from ``cfg.data``."""
    source = cfg.data
    if source == "builtin:arithmetic":
        from ..demo.task import ArithmeticTask

        rng, task = random.Random(seed), ArithmeticTask()
        return [dict(zip(("prompt", "response"), task.sample(rng))) for _ in range(4096)]
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist (use a .jsonl or .txt file, or builtin:arithmetic)")
    if path.suffix == ".jsonl":
        examples = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{lineno}: each line must be a JSON object")
            if cfg.prompt_key in row and cfg.response_key in row:
                examples.append({"prompt": str(row[cfg.prompt_key]), "response": str(row[cfg.response_key])})
            elif cfg.text_key in row:
                examples.append({"text": str(row[cfg.text_key])})
            else:
                raise ConfigError(
                    f"{path}:{lineno}: needs {cfg.prompt_key!r} and {cfg.response_key!r}, or {cfg.text_key!r} "
                    f"(set data.prompt_key / response_key / text_key); found keys {sorted(row)}"
                )
    elif path.suffix in (".txt", ".text", ".md"):
        examples = [{"text": p.strip()} for p in path.read_text().split("\n\n") if p.strip()]
    else:
        raise ConfigError(f"data file {path}: use .jsonl (prompt/response or text) or .txt (paragraphs)")
    if not examples:
        raise ConfigError(f"data file {path} holds no examples")
    return examples


@dataclass
class Encoded:
    """Tokenised examples and what happened to those longer than ``max_length``."""

    rows: list[tuple[list[int], list[int]]]  # (input_ids, labels) of every example kept
    total: int  # examples read
    overlong: int  # examples longer than max_length
    truncated: int  # overlong examples cut to max_length and kept
    dropped: int  # examples not kept (overlong with overlong="drop", or nothing left to learn after the cut)

    def summary(self) -> dict[str, int]:
        return {"examples": self.total, "used": len(self.rows), "overlong": self.overlong,
                "truncated": self.truncated, "dropped": self.dropped}


def encode_examples(
    examples: list[dict[str, str]], tokenizer: Any, max_length: int, overlong: str = "truncate"
) -> Encoded:
    """(input_ids, labels) per example; prompt tokens are masked out of the loss (IGNORE).

    ``overlong``: what to do with an example longer than ``max_length`` tokens: "truncate" (keep its first
    ``max_length`` tokens; dropped if no response token is left), "drop", or "error" (ConfigError).
    """
    byte_level = isinstance(tokenizer, ByteTokenizer)
    eos = tokenizer.eos_token_id
    rows, n_overlong, truncated = [], 0, 0
    for index, ex in enumerate(examples, 1):
        if "text" in ex:
            ids = (tokenizer.encode(ex["text"]) if byte_level else _hf_encode(tokenizer, ex["text"], True)) + [eos]
            labels = list(ids)
        else:
            p = tokenizer.encode(ex["prompt"]) if byte_level else _hf_encode(tokenizer, ex["prompt"], True)
            r = (tokenizer.encode(ex["response"]) if byte_level else _hf_encode(tokenizer, ex["response"], False)) + [eos]
            ids, labels = p + r, [IGNORE] * len(p) + r
        if len(ids) > max_length:
            n_overlong += 1
            if overlong == "error":
                raise ConfigError(
                    f"example {index} is {len(ids)} tokens, longer than data.max_length={max_length} "
                    f"(data.overlong=error); raise data.max_length, or set data.overlong to truncate or drop"
                )
            if overlong == "drop":
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            if not any(label != IGNORE for label in labels[1:]):
                continue  # nothing to learn after the cut: counted as dropped
            truncated += 1
        if any(label != IGNORE for label in labels[1:]):
            rows.append((ids, labels))
    out = Encoded(rows, len(examples), n_overlong, truncated, len(examples) - len(rows))
    if not rows:
        raise ConfigError(
            f"no example keeps a response token within data.max_length={max_length} "
            f"({out.overlong} of {out.total} longer, data.overlong={overlong}); raise data.max_length"
        )
    return out


class Batches:
    """Batch for (step, micro-batch): examples in a fresh seeded permutation per epoch, padded on the right."""

    def __init__(self, encoded, batch_size: int, grad_accum: int, pad_id: int, seed: int, rank: int = 0, world: int = 1) -> None:
        """Under data parallelism each of ``world`` ranks takes its own ``batch_size`` slice of every global
        batch (``world`` x ``batch_size`` examples, the same stream as one process with that batch size)."""
        self.encoded, self.batch_size, self.grad_accum = encoded, batch_size, grad_accum
        self.pad_id, self.seed, self.rank, self.world = pad_id, seed, rank, world
        self._perm: dict[int, list[int]] = {}

    def _index(self, position: int) -> int:
        n = len(self.encoded)
        epoch, offset = divmod(position, n)
        if epoch not in self._perm:
            self._perm = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch)).tolist()}
        return self._perm[epoch][offset]

    def get(self, step: int, micro: int, device) -> dict[str, torch.Tensor]:
        start = ((step * self.grad_accum + micro) * self.world + self.rank) * self.batch_size
        rows = [self.encoded[self._index(start + i)] for i in range(self.batch_size)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
            mask[i, : len(x)] = 1
        return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}
