"""An exclusive lock on a run's output folder, so two runs never write into one folder at the same time.

The lock is an advisory ``flock`` on ``OUT/.segcal.lock``, held by the process that runs the evaluation for as
long as it uses the folder. The operating system releases it when that process ends in any way (also
``SIGKILL`` or a crash), so a lock left by a killed run is taken over by the next run without any clean-up. The
file records the holder (pid, host, command, start time) so that a refused run can name it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError"]

LOCK_NAME = ".segcal.lock"


class RunLockedError(RuntimeError):
    """Another process is using the output folder."""


class RunLock:
    """``with RunLock(out_dir):`` holds the folder's lock, or raises :class:`RunLockedError` naming the holder."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by another segcal run ({holder}); wait for it to finish or choose "
                "another output folder"
            ) from None
        os.ftruncate(fd, 0)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: {info.get('command')}"
