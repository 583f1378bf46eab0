"""Atomic file writes: every file that segcal writes goes through :func:`atomic_write`.

The data are written to a hidden temporary file in the target directory (``.NAME.<random>.tmp``, a name that no
reader of :mod:`segcal.io` takes for a data file), flushed and ``fsync``-ed, then moved onto the final name
with :func:`os.replace`. A crash, a full disk or an exception in the middle of writing therefore never leaves a
truncated file under the final name: the name holds either the previous file or the complete new one. On
failure the temporary file is removed and the error re-raised (see docs/evaluation.md, "Inputs").
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

__all__ = ["OutputError", "atomic_write", "copy_file", "prepare_output_dir", "write_bytes", "write_text"]

#: longest final-name part kept in a temporary file name (file names are limited to 255 bytes)
_MAX_NAME = 200


class OutputError(OSError):
    """A folder or file segcal cannot write (no permission, not a folder, disk full): ``path`` names it and
    ``problem`` says why; the message is ``"PATH: PROBLEM"``."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def check_output_outside_inputs(output: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an output folder equal to or inside an input folder (``inputs``: option name -> folder): writing
    there would overwrite or mix the inputs, and a rerun would read its own outputs as inputs. ``ValueError``
    naming both folders and the option."""
    out = Path(output).resolve()
    for option, folder in inputs.items():
        if folder is None:
            continue
        src = Path(folder).resolve()
        if out == src or src in out.parents:
            where = "is" if out == src else "is inside"
            raise ValueError(
                f"the output folder {out} {where} the input folder {src} ({option}); choose an output folder "
                "outside every input folder, so no input is overwritten or read back as input"
            )


def prepare_output_dir(folder: str | Path) -> Path:
    """Create ``folder`` (with its parents) and check that a file can be created in it, before any work is done;
    :class:`OutputError` naming the folder otherwise (a path under a regular file, no write permission, ...)."""
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise OutputError(p, "cannot write into the output folder: it is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = _temp_path(p / ".write-probe")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(p, f"cannot write into the output folder: {exc.strerror or exc}") from None
    return p


def _temp_path(final: Path) -> Path:
    return final.parent / f".{final.name[:_MAX_NAME]}.{secrets.token_hex(6)}.tmp"


@contextlib.contextmanager
def atomic_write(
    path: str | Path, mode: Literal["wb", "w"] = "wb", *, encoding: str = "utf-8", newline: str | None = None
) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on success move it onto ``path`` atomically.

    ``mode`` is ``"wb"`` (bytes) or ``"w"`` (text, with ``encoding`` and ``newline`` as for :func:`open`).
    The temporary file gets the permissions a plain :func:`open` would give (``0o666`` less the umask). If the
    body of the ``with`` block (or the final flush) raises, the temporary file is deleted, ``path`` is left as
    it was, and the exception propagates.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    final = Path(path)
    tmp = _temp_path(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        if mode == "wb":
            fh: IO[Any] = os.fdopen(fd, "wb")
        else:
            fh = os.fdopen(fd, "w", encoding=encoding, newline=newline)
    except BaseException:
        os.close(fd)
        _remove(tmp)
        raise
    try:
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (``encoding``, newlines as given); returns ``path``."""
    with atomic_write(path, "w", encoding=encoding, newline="") as fh:
        fh.write(text)
    return Path(path)


def copy_file(src: str | Path, dst: str | Path) -> Path:
    """Copy the bytes of ``src`` to ``dst`` atomically (like :func:`shutil.copyfile`); returns ``dst``."""
    with open(src, "rb") as fin, atomic_write(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    return Path(dst)
