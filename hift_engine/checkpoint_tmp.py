"""Temporary directories of checkpoint saves: made, locked while in use, and cleared once abandoned.

A save writes into ``.tmp-ckpt-<step>-<pid>-<n>@<host>`` and renames it into place when complete; readers ignore
the name. A process killed half-way leaves the directory behind (as much as a whole model and optimizer state),
so the next save clears abandoned ones. "Abandoned" must never catch a save in progress, and a process id cannot
tell: containers share hostnames but not process-id namespaces, and a restarted container's trainer gets its
old id back. The saver therefore holds an advisory lock (``flock``) on its directory for as long as it uses it;
the kernel drops it when the process dies. A directory is cleared only if it was made on this host, is over a
minute old (so one just made and not yet locked is safe) and its lock can be taken. Where the filesystem has no
such locks (some network filesystems), neither side gets one and nothing is cleared.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so nothing is ever judged abandoned
    fcntl = None

__all__ = ["SaveDir", "clear_abandoned", "HOST", "MIN_AGE_S"]

HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
MIN_AGE_S = 60.0
_NAME = re.compile(r"^\.tmp-ckpt-\d+-\d+-\d+@(?P<host>.+)$")


def _try_lock(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock, or None (held elsewhere, or no locks here)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


class SaveDir:
    """A fresh temporary directory for one save (with ``optim/``), locked until ``release()``."""

    def __init__(self, root: Path, step: int) -> None:
        self.path = root / f".tmp-ckpt-{step:08d}-{os.getpid()}-{time.monotonic_ns()}@{HOST}"
        self.path.mkdir()
        self._fd = _try_lock(self.path)  # follows the directory through its rename into place
        (self.path / "optim").mkdir()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def clear_abandoned(root: Path, now: float | None = None) -> list[Path]:
    """Delete the temporary directories under ``root`` that killed saves left (see the module's docstring);
    returns them. Anything that may be in use (another host's, a young one, a locked one) is left alone."""
    now = time.time() if now is None else now
    cleared = []
    for path in root.glob(".tmp-ckpt-*"):
        m = _NAME.match(path.name)
        if m is None or m["host"] != HOST:
            continue
        try:
            if now - path.stat().st_mtime < MIN_AGE_S:
                continue
        except OSError:
            continue  # renamed into place or cleared meanwhile
        fd = _try_lock(path)
        if fd is None:
            continue
        try:  # holding the lock: no save can be using it
            shutil.rmtree(path, ignore_errors=True)
            cleared.append(path)
        finally:
            os.close(fd)
    return cleared
