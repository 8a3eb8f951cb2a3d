"""Real text for the convergence benchmark: the Python standard library's own source, as bytes.

Why this text: it ships with every Python installation (nothing to download, the device has no network), no one
on this project wrote it, and it is large (tens of MB), varied (prose docstrings, comments and code) and
licensed for redistribution (PSF). Byte-level tokens (vocabulary 256) keep it free of any tokenizer download.

The split is by file, so no held-out line was seen in fine-tuning:
  pretrain   the top-level modules of the standard library (``Lib/*.py``)
  finetune   the ``email`` package, a different distribution (one domain, its own vocabulary and style)
             except every fifth file (sorted by name), which is
  heldout    the evaluation text
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Corpus", "load_corpus"]


@dataclass
class Corpus:
    pretrain: torch.Tensor  # uint8 byte streams
    finetune: torch.Tensor
    heldout: torch.Tensor
    source: dict  # where it came from: paths, file counts, bytes, sha256 (results are comparable only on equal text)

    def batches(self, which: str, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
        """A [batch, seq] int64 tensor of random windows of ``which``."""
        data = getattr(self, which)
        starts = torch.randint(0, data.numel() - seq, (batch,), generator=generator)
        return torch.stack([data[s: s + seq] for s in starts.tolist()]).long()

    def eval_batches(self, batch: int, seq: int, count: int) -> list[torch.Tensor]:
        """``count`` fixed batches of consecutive held-out windows (the same for every method)."""
        need = batch * seq
        step = max(need, (self.heldout.numel() - need) // max(1, count))
        out = []
        for i in range(count):
            chunk = self.heldout[i * step: i * step + need]
            if chunk.numel() < need:
                break
            out.append(chunk.view(batch, seq).long())
        if not out:
            raise ValueError(f"held-out text ({self.heldout.numel()} bytes) is shorter than one {batch} x {seq} batch")
        return out


def _read(files: list[Path]) -> torch.Tensor:
    data = b"\n".join(f.read_bytes() for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def load_corpus(max_pretrain_bytes: int = 4 << 20, include_pretrain: bool = True) -> Corpus:
    """The three splits; ``include_pretrain=False`` leaves the pretrain split empty (the demo needs only the email
    package's files, so it neither reads nor requires the top-level modules)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    top = sorted(p for p in lib.glob("*.py") if p.is_file()) if include_pretrain else []
    email = sorted(p for p in (lib / "email").rglob("*.py") if p.is_file())
    if (include_pretrain and not top) or len(email) < 5:
        raise RuntimeError(f"found no Python source of the standard library in {lib} (this Python install ships "
                           "without its .py files, as some minimal images do); the text corpus is built from them")
    held = email[::5]
    tune = [p for p in email if p not in held]
    pretrain = _read(top)[:max_pretrain_bytes] if top else torch.empty(0, dtype=torch.uint8)
    finetune, heldout = _read(tune), _read(held)
    digest = hashlib.sha256()
    for t in (pretrain, finetune, heldout):
        digest.update(t.numpy().tobytes())
    source = {
        "stdlib": str(lib), "pretrain_files": len(top), "finetune_files": len(tune), "heldout_files": len(held),
        "bytes": {"pretrain": pretrain.numel(), "finetune": finetune.numel(), "heldout": heldout.numel()},
        "sha256": digest.hexdigest(),
    }
    return Corpus(pretrain, finetune, heldout, source)
