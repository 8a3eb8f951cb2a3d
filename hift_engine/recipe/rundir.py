"""The output directory of ``hift train``: one run per directory, and the checkpoint a ``--resume`` continues.

- A new run refuses a non-empty ``output_dir``: continue the old run with ``--resume``, or start over with
  ``--overwrite``, which deletes only the files ``hift train`` writes (RUN_FILES), after the new run has
  loaded its model, data and checkpoint.
- ``--resume`` takes the newest checkpoint and refuses it loudly when it does not load (a damaged file, a
  deleted manifest, another model); older ones are tried only with ``--resume-fallback``, and every skipped
  checkpoint is named in a warning.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from ..checkpoint import list_checkpoints
from ..errors import CheckpointError, ConfigError

__all__ = ["RUN_FILES", "check_output_dir", "clear_previous_run", "ResumePlan", "plan_resume"]

log = logging.getLogger("hift_engine")

# Everything hift train writes into output_dir (loop.py); --overwrite deletes these and nothing else.
RUN_FILES = ("config.json", "log.jsonl", "training.png", "checkpoints", "final")
_CKPT = re.compile(r"^ckpt-")
_TMP = re.compile(r"^\.tmp-")
_DIGITS = re.compile(r"(\d+)$")


def check_output_dir(out: Path, resume: bool | str, overwrite: bool) -> None:
    """Refuse to start a new run in a directory that holds anything (cheap; runs before any loading)."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in train.output_dir and --overwrite deletes it: pass one of them")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir={out} is a file, not a directory")
    if resume or overwrite or not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(
            f"train.output_dir={out} is not empty ({shown}): continue that run with --resume, start over with "
            f"--overwrite (deletes only the files hift train wrote there), or choose another --output_dir"
        )


def clear_previous_run(out: Path) -> list[str]:
    """Delete what a previous run wrote into ``out`` (RUN_FILES; in checkpoints/ only ckpt-* and .tmp-*
    entries). Other files stay. Returns the names deleted."""
    removed = []
    for name in RUN_FILES:
        p = out / name
        if name == "checkpoints" and p.is_dir():
            for child in p.iterdir():
                if _CKPT.match(child.name) or _TMP.match(child.name):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            if not any(p.iterdir()):
                p.rmdir()
            removed.append(name)
        elif p.is_dir():
            shutil.rmtree(p)
            removed.append(name)
        elif p.exists():
            p.unlink()
            removed.append(name)
    kept = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if removed:
        log.warning("--overwrite: deleted the previous run's %s in %s%s", ", ".join(removed), out,
                    f" (kept {', '.join(kept)})" if kept else "")
    return removed


def _unlisted(root: Path, listed: list[Path]) -> list[Path]:
    """ckpt-* directories that list_checkpoints does not list (no manifest: deleted, or not a checkpoint)."""
    if not root.is_dir():
        return []
    names = {p.name for p in listed}
    return sorted(p for p in root.iterdir() if p.is_dir() and _CKPT.match(p.name) and p.name not in names)


def _newer(a: Path, b: Path) -> bool:
    """Whether directory ``a`` looks newer than ``b``: a larger step number in its name, or a later mtime."""
    da, db = _DIGITS.search(a.name), _DIGITS.search(b.name)
    if da and db and int(da.group(1)) > int(db.group(1)):
        return True
    return a.stat().st_mtime > b.stat().st_mtime


class ResumePlan:
    """Checkpoints to try, newest first, and the manifest-less ckpt-* directories beside them."""

    def __init__(self, root: Path, candidates: list[Path], unlisted: list[Path], fallback: bool) -> None:
        self.root, self.candidates, self.unlisted, self.fallback = root, candidates, unlisted, fallback

    def load(self, loader: Callable[[Path], dict[str, Any]]) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
        """Load the newest checkpoint with ``loader``; returns (its info, [(skipped path, why)]).

        Without ``fallback`` any problem with the newest checkpoint is a CheckpointError naming it and the fix.
        """
        skipped: list[tuple[Path, str]] = []
        reported: set[Path] = set()
        for i, ckpt in enumerate(self.candidates):
            for d in self.unlisted:
                if d not in reported and _newer(d, ckpt):
                    reported.add(d)
                    skipped.append((d, f"{d}: no manifest.json (deleted, or the directory is not a checkpoint)"))
            if skipped and not self.fallback:
                self._refuse(skipped[0][0], skipped[0][1], ckpt)
            try:
                info = loader(ckpt)
            except CheckpointError as e:
                if not self.fallback:
                    self._refuse(ckpt, str(e), self.candidates[i + 1] if i + 1 < len(self.candidates) else None)
                skipped.append((ckpt, str(e)))
                continue
            for path, why in skipped:
                log.warning("--resume-fallback: skipped %s (%s); resuming from %s", path, why, ckpt)
            return info, skipped
        skipped += [(d, "no manifest.json") for d in self.unlisted if d not in reported]
        reasons = "; ".join(why for _, why in skipped) or "none found"
        raise CheckpointError(f"--resume: no checkpoint under {self.root} loads ({reasons})")

    def _refuse(self, bad: Path, why: str, older: Path | None) -> None:
        alternative = f" (the next older one is {older})" if older else ""
        raise CheckpointError(
            f"--resume: the newest checkpoint {bad} cannot be used: {why}. Older checkpoints are not used "
            f"silently: delete or repair {bad.name}, pass --resume PATH to choose one{alternative}, or add "
            f"--resume-fallback to resume from the newest checkpoint that loads"
        )


def plan_resume(resume: bool | str, default_root: Path, fallback: bool) -> ResumePlan:
    """What ``--resume`` (True: the latest under ``default_root``; a path: that checkpoint or a directory of
    checkpoints) will try. Raises CheckpointError when there is nothing to resume (before any loading)."""
    target = default_root if resume is True else Path(resume)
    if resume is not True and (target / "manifest.json").is_file():
        return ResumePlan(target, [target], [], fallback)
    listed = list_checkpoints(target)
    unlisted = _unlisted(target, listed)
    if not listed and not unlisted:
        if resume is not True and target.is_dir() and _CKPT.match(target.name):
            return ResumePlan(target, [target], [], fallback)  # load_checkpoint names what is missing
        raise CheckpointError(f"--resume: nothing to resume, no checkpoint under {target}")
    return ResumePlan(target, list(reversed(listed)), unlisted, fallback)
