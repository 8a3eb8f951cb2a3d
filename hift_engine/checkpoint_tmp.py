"""Temporary directories of checkpoint saves: made, locked while in use, and cleared once abandoned.

A save writes into ``.tmp-ckpt-<step>-<pid>-<n>@<host>`` and renames it into place when complete; readers ignore
the name. A process killed half-way leaves the directory behind (as much as a whole model and optimizer state),
so the next save clears abandoned ones. "Abandoned" must never catch a save in progress, and a process id cannot
tell: containers share hostnames but not process-id namespaces, and a restarted container's trainer gets its
old id back. The saver therefore holds an exclusive lock (``flock``) on the directory's ``.lock`` file for as
long as it uses the directory; the kernel (or the NFS lock service) drops it when the process dies. A directory
is cleared only if it was made on this host, nothing in it changed for a minute, it is not one of this process's
own saves, and its lock can be taken. A filesystem without locks gives neither side a lock, and then nothing is cleared.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so nothing is ever judged abandoned
    fcntl = None

from .errors import CheckpointError

__all__ = ["SaveDir", "clear_abandoned", "HOST", "MIN_AGE_S", "LOCK_NAME"]

HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
MIN_AGE_S = 60.0
LOCK_NAME = ".lock"  # inside the temporary directory; removed just before the rename, never in a manifest
_NAME = re.compile(r"^\.tmp-ckpt-\d+-\d+-\d+@(?P<host>.+)$")
_HELD = errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES
# This process's saves in progress. NFS emulates flock with POSIX record locks, which never conflict within one
# process, so a second thread's save could take a first thread's lock: it checks this set instead.
_OWN: set[str] = set()
_OWN_LOCK = threading.Lock()


def _lock(lock_file: Path, create: bool) -> tuple[int | None, bool]:
    """(descriptor holding the exclusive lock, or None; whether someone else holds it)."""
    if fcntl is None:
        return None, False
    try:
        fd = os.open(lock_file, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except OSError:
        return None, False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        return None, e.errno in _HELD
    return fd, False


class SaveDir:
    """A fresh temporary directory for one save (with ``optim/``), locked until ``release()``."""

    ATTEMPTS = 5

    def __init__(self, root: Path, step: int) -> None:
        self._fd = None
        for _ in range(self.ATTEMPTS):
            self.path = root / f".tmp-ckpt-{step:08d}-{os.getpid()}-{time.monotonic_ns()}@{HOST}"
            with _OWN_LOCK:  # before it exists, so no thread of this process ever sees it unowned
                _OWN.add(self.path.name)
            try:
                self.path.mkdir()
            except BaseException:
                self._forget()
                raise
            try:
                self._fd, held = _lock(self.path / LOCK_NAME, create=True)
                if held:  # a clear_abandoned took it in the instant before us (clock skew): it will delete it
                    self._forget()
                    continue
                (self.path / "optim").mkdir()
                return
            except BaseException:
                self.release()
                shutil.rmtree(self.path, ignore_errors=True)
                raise
        raise CheckpointError(f"save_checkpoint: could not lock a temporary directory under {root} in "
                              f"{self.ATTEMPTS} attempts (another process clearing them?); nothing was saved")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._forget()

    def _forget(self) -> None:
        with _OWN_LOCK:
            _OWN.discard(self.path.name)


def _newest_mtime(path: Path) -> float:
    """The latest modification time of the directory and anything in it: a save writing files is never idle
    for a minute, so this also guards where locks are local to each machine."""
    newest = path.stat().st_mtime
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                pass
    return newest


def clear_abandoned(root: Path, now: float | None = None) -> list[Path]:
    """Delete the temporary directories under ``root`` that killed saves left (see the module's docstring);
    returns them. Anything that may be in use (another host's, a young one, this process's, a locked one, one
    without a lock file) is left alone."""
    now = time.time() if now is None else now
    cleared = []
    for path in root.glob(".tmp-ckpt-*"):
        m = _NAME.match(path.name)
        if m is None or m["host"] != HOST:
            continue
        with _OWN_LOCK:
            if path.name in _OWN:
                continue
        try:
            if now - _newest_mtime(path) < MIN_AGE_S:
                continue
        except (OSError, RecursionError):
            continue  # renamed into place or cleared meanwhile (or too deep to judge): leave it
        fd, _ = _lock(path / LOCK_NAME, create=False)
        if fd is None:
            continue
        try:  # holding the lock: no save can be using it
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)  # NFS keeps an open, deleted .lock as .nfs*: gone once closed
        if not path.exists():
            cleared.append(path)
    return cleared
