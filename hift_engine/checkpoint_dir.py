"""What a checkpoint root holds on disk: directory names, manifests, the save order, and verification.

``ckpt-<step:08d>`` (``ckpt-<step>-r<n>`` when the step was saved before) holds a ``manifest.json`` written
last, with every file's size and SHA-256, a save sequence number (``seq``: "latest" means most recently saved,
not the highest step) and the SHA-256 of the manifest's own content, so any change to it is caught.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from .errors import CheckpointError

__all__ = ["FORMAT", "list_checkpoints", "latest_checkpoint", "verify_checkpoint", "read_manifest", "saved_checkpoints", "free_name", "manifest_digest", "sha256"]

FORMAT = "hift_engine.checkpoint/2"
_OLD_FORMAT = "hift_engine.checkpoint/1"  # no sequence number nor manifest checksum; still readable
_NAME = re.compile(r"^ckpt-(\d{8,})(?:-r(\d+))?$")

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(path: Path) -> dict:
    """The verified manifest of checkpoint ``path`` (its own checksum checked); CheckpointError otherwise."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no manifest.json, so the checkpoint is partial or not a checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") not in (FORMAT, _OLD_FORMAT) or not isinstance(files, dict):
            raise ValueError(f"unknown format {manifest.get('format')!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from None
    if manifest["format"] == FORMAT and manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise CheckpointError(f"{manifest_path}: the manifest's own checksum does not match its content (corrupted)")
    return manifest


def _sequence(manifest: Mapping[str, Any]) -> int:
    seq = manifest.get("seq")
    return seq if isinstance(seq, int) else -1


def saved_checkpoints(root: Path) -> list[tuple[int, int, Path]]:
    """(save sequence, step, dir) of every checkpoint directory under ``root`` whose manifest reads."""
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = _NAME.match(d.name)
            if m and d.is_dir() and (d / "manifest.json").is_file():
                try:
                    seq = _sequence(read_manifest(d))
                except CheckpointError:
                    seq = -2  # unreadable: oldest; verification names the problem when it is asked for
                found.append((seq, int(m.group(1)), d))
    return sorted(found, key=lambda t: (t[0], t[1], t[2].name))


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete-looking checkpoint directories under ``root`` (with a manifest), oldest first: in the order
    they were saved (checkpoints of the old format, without a sequence number, first, by step)."""
    return [d for _, _, d in saved_checkpoints(Path(root))]


def latest_checkpoint(root: str | os.PathLike, verify: bool = False) -> Path | None:
    """The most recently saved checkpoint that verifies (sizes only unless ``verify``), or None."""
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
    manifest = read_manifest(path)
    for rel, info in manifest["files"].items():
        f = path / rel
        if not isinstance(info, dict) or not f.is_file():
            raise CheckpointError(f"{f}: listed in the manifest but missing")
        if f.stat().st_size != info.get("size"):
            raise CheckpointError(f"{f}: size {f.stat().st_size} bytes, the manifest says {info.get('size')} (truncated?)")
        if full and sha256(f) != info.get("sha256"):
            raise CheckpointError(f"{f}: checksum mismatch, the file is corrupted")
    return manifest


def free_name(root: Path, step: int) -> Path:
    """``ckpt-<step>``, or ``ckpt-<step>-r<n>`` when that step is already on disk (a resumed run saving it again)."""
    base = root / f"ckpt-{step:08d}"
    if not base.exists():
        return base
    taken = [int(m.group(2) or 0) for d in root.iterdir() if (m := _NAME.match(d.name)) and int(m.group(1)) == step]
    return root / f"{base.name}-r{max(taken) + 1}"
