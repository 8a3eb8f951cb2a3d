"""Checkpoints: atomic on disk, verified on load, exact on resume.

Layout of one checkpoint, ``<root>/ckpt-<step:08d>/``:
    model.safetensors          model weights (tied weights stored once)
    optim/group-<g>.safetensors  group g's optimizer state: "steps" and the flat "state" tensor, written from
                               the store's host memory after its write-back finished (no copy of the 50 GiB)
    meta.json                  step, hyper-parameters, group order position, skip counts, Python RNG, extra
    rng.safetensors            torch CPU (and CUDA) generator states
    scheduler.pt               the LR scheduler's state_dict (torch.save; read with weights_only=True)
    manifest.json              written last: every file's size and SHA-256
Files go to a temporary directory, are fsynced, the manifest is written, then the directory is renamed into
place, so a checkpoint directory is either complete or absent (a crash leaves only ``.tmp-*`` directories,
which readers ignore). A reader verifies the manifest and names the first bad file. Nothing is unpickled
except the scheduler state, under ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import CheckpointError, ConfigError

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "verify_checkpoint"]

FORMAT = "hift_engine.checkpoint/1"
_NAME = re.compile(r"^ckpt-(\d{8,})$")


def _fsync(fd: int) -> None:
    os.fsync(fd)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        _fsync(f.fileno())


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    _fsync_path(path)


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete-looking checkpoint directories under ``root`` (with a manifest), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _NAME.match(d.name)
        if m and d.is_dir() and (d / "manifest.json").is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(root: str | os.PathLike, verify: bool = False) -> Path | None:
    """The newest checkpoint that verifies (sizes only unless ``verify``), or None."""
    for d in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(d, full=verify)
            return d
        except CheckpointError:
            continue
    return None


def verify_checkpoint(path: str | os.PathLike, full: bool = True) -> dict:
    """Check the manifest and every file it lists (size; SHA-256 if ``full``). Returns the manifest."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no manifest.json, so the checkpoint is partial or not a checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"unknown format {manifest.get('format')!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from None
    for rel, info in files.items():
        f = path / rel
        if not isinstance(info, dict) or not f.is_file():
            raise CheckpointError(f"{f}: listed in the manifest but missing")
        if f.stat().st_size != info.get("size"):
            raise CheckpointError(f"{f}: size {f.stat().st_size} bytes, the manifest says {info.get('size')} (truncated?)")
        if full and _sha256(f) != info.get("sha256"):
            raise CheckpointError(f"{f}: checksum mismatch, the file is corrupted")
    return manifest


def _rng_state() -> tuple[dict[str, torch.Tensor], Any]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    state = random.getstate()
    return tensors, [state[0], list(state[1]), state[2]]


def _set_rng_state(tensors: Mapping[str, torch.Tensor], python_state: Any) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_keys = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    if python_state is not None:
        random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))


def save_checkpoint(
    root: str | os.PathLike,
    model: nn.Module,
    optimizer,
    scheduler=None,
    step: int | None = None,
    extra: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write a checkpoint of ``model`` and a HiFTOptimizer (and scheduler) to ``root/ckpt-<step>``.

    ``step`` defaults to ``optimizer.global_step``; ``extra`` is any JSON-serialisable dict (e.g. the data
    position) returned by load_checkpoint; ``keep_last`` deletes older checkpoints beyond that many.
    """
    from safetensors.torch import save_model

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    step = optimizer.global_step if step is None else int(step)
    final = root / f"ckpt-{step:08d}"
    tmp = root / f".tmp-ckpt-{step:08d}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "model.safetensors"))
        _fsync_path(tmp / "model.safetensors")
        (tmp / "optim").mkdir()
        generic_values = {}
        for gid in range(optimizer.num_groups):
            tensors, values = optimizer.group_tensors(gid)  # waits for the group's write-back
            _save_tensors(tmp / "optim" / f"group-{gid:04d}.safetensors", tensors)
            if values:
                generic_values[str(gid)] = values
        rng_tensors, python_rng = _rng_state()
        _save_tensors(tmp / "rng.safetensors", rng_tensors)
        if scheduler is not None:
            with open(tmp / "scheduler.pt", "wb") as f:
                torch.save(scheduler.state_dict(), f)
                f.flush()
                _fsync(f.fileno())
        meta = {
            "step": step,
            "hift": optimizer.hift_meta(),
            "hyperparameters": optimizer.hyperparameters(),
            "generic_values": generic_values,
            "python_rng": python_rng,
            "extra": dict(extra or {}),
            "torch": torch.__version__,
        }
        try:
            _write_json(tmp / "meta.json", meta)
        except TypeError as e:
            raise CheckpointError(f"save_checkpoint: extra must be JSON-serialisable ({e})") from None
        files = {
            str(f.relative_to(tmp)): {"size": f.stat().st_size, "sha256": _sha256(f)}
            for f in sorted(tmp.rglob("*"))
            if f.is_file()
        }
        _write_json(tmp / "manifest.json", {"format": FORMAT, "step": step, "files": files})
        _fsync_path(tmp / "optim")
        _fsync_path(tmp)
        if final.exists():  # re-saving a step (a resumed run reaching it again): swap, then remove the old one
            trash = root / f".tmp-old-{final.name}-{time.monotonic_ns()}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        if keep_last < 1:
            raise ConfigError(f"keep_last must be >= 1, got {keep_last}")
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer=None,
    scheduler=None,
    verify: bool = True,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint written by save_checkpoint; returns {"step", "extra"}.

    Refuses (CheckpointError) a partial or corrupted checkpoint, naming the bad file, and one written for a
    different model, optimizer or group layout. ``path`` may be a checkpoint or a root (its latest is used).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    path = Path(path)
    if not (path / "manifest.json").exists() and list_checkpoints(path):
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path}: no checkpoint under it verifies")
        path = latest
    verify_checkpoint(path, full=verify)
    try:
        meta = json.loads((path / "meta.json").read_text())
        hift, hyper = meta["hift"], meta["hyperparameters"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / 'meta.json'}: unreadable ({e})") from None
    if optimizer is not None:
        try:
            optimizer.check_compatible(hift, str(path))
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        if len(hyper) != len(optimizer.param_groups):
            raise CheckpointError(f"{path}: saved {len(hyper)} param_groups, this optimizer has {len(optimizer.param_groups)}")
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{path / 'model.safetensors'}: cannot load into this model ({e})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path / 'model.safetensors'}: does not match this model (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )
    if optimizer is not None:
        values = meta.get("generic_values", {})
        for gid in range(optimizer.num_groups):
            f = path / "optim" / f"group-{gid:04d}.safetensors"
            try:
                tensors = load_file(str(f))
                optimizer.load_group_tensors(gid, tensors, values.get(str(gid), {}))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{f}: unreadable ({e})") from None
            except ConfigError as e:
                raise CheckpointError(f"{f}: {e}") from None
        optimizer.load_meta(hyper, hift)
    if scheduler is not None:
        f = path / "scheduler.pt"
        if not f.is_file():
            raise CheckpointError(f"{path}: saved without a scheduler, but one was given to restore")
        try:
            scheduler.load_state_dict(torch.load(f, weights_only=True))
        except Exception as e:  # noqa: BLE001 - any unpickling/shape problem is a bad checkpoint
            raise CheckpointError(f"{f}: cannot restore the scheduler ({type(e).__name__}: {e})") from None
    if restore_rng:
        try:
            _set_rng_state(load_file(str(path / "rng.safetensors")), meta.get("python_rng"))
        except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path / 'rng.safetensors'}: cannot restore RNG state ({e})") from None
    return {"step": int(meta.get("step", 0)), "extra": meta.get("extra", {}), "path": str(path)}
