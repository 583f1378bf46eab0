"""Size checks made on a file's header before any of its data is allocated (see docs/evaluation.md, "Inputs").

A header states the shape and data type of an array; a corrupt or forged header can claim terabytes in a file of
a few bytes. Every reader of :mod:`segcal.io` compares the claim with what the file can hold *before* reading
the data, so such a file fails at once with a :class:`~segcal.io.case.CaseError` naming it instead of
allocating the claimed size:

* the bytes a file holds: a plain file its size on disk; a deflate stream (gzip, zip member) at most
  :data:`MAX_DEFLATE_RATIO` times its compressed size;
* the memory available (``MemAvailable`` of ``/proc/meminfo``, where the system has it): an array larger than
  that cannot be read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segcal.io.case import CaseError

__all__ = ["MAX_DEFLATE_RATIO", "check_fits_memory", "claim", "deflate_bound", "human_bytes", "memory_available"]

#: the largest ratio of uncompressed to compressed size the deflate format can reach (zlib's technical notes)
MAX_DEFLATE_RATIO = 1032
#: slack added to the deflate bound for headers and block overhead of very small streams
_DEFLATE_SLACK = 1024
_MEMINFO = Path("/proc/meminfo")


def human_bytes(n: int) -> str:
    """``n`` bytes in decimal units, e.g. ``"17.2 GB"``."""
    value = float(n)
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if value < 1000 or unit == "PB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def claim(shape: Sequence[int], dtype: np.dtype) -> tuple[int, str]:
    """``(nbytes, text)`` of a header's claim: the data size of ``shape`` x ``dtype`` and a description of it."""
    nbytes = math.prod(int(s) for s in shape) * int(dtype.itemsize)
    return nbytes, f"shape {tuple(int(s) for s in shape)} {dtype.name} ({human_bytes(nbytes)})"


def deflate_bound(compressed: int) -> int:
    """The most bytes a deflate stream of ``compressed`` bytes can expand to."""
    return MAX_DEFLATE_RATIO * compressed + _DEFLATE_SLACK


def memory_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes; ``None`` where the system does not report it."""
    try:
        text = _MEMINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            fields = line.split()
            return int(fields[1]) * 1024 if len(fields) > 1 and fields[1].isdigit() else None
    return None


def check_fits_memory(path: str | Path, nbytes: int, described: str) -> None:
    """:class:`CaseError` naming ``path`` when an array of ``nbytes`` exceeds the memory available (no check
    where the system does not report it)."""
    available = memory_available()
    if available is not None and nbytes > available:
        raise CaseError(
            path, f"header claims {described}, more than the {human_bytes(available)} of memory available"
        )
