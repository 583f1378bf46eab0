"""Several small trainings at once: one process per job, one torch thread each (see docs/training.md,
"Training several models").

A small UNet on a CPU does not keep two cores busy: its convolutions are too small to split well, so most of a
second core idles. :func:`train_many` runs independent :func:`~segcal.training.train` jobs side by side in
``workers`` processes (``spawn``), each with one torch thread, and reports each finished epoch to the caller.
Every job is seeded by its own config, and one thread per process makes its arithmetic independent of which
worker runs it, so the results do not depend on ``workers``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["TrainJob", "TrainOutcome", "train_many"]

ArrayPair = tuple[np.ndarray, np.ndarray]


@dataclass
class TrainJob:
    """One training: a name and its :func:`~segcal.training.train` config (dict form)."""

    name: str
    config: dict[str, Any]


@dataclass
class TrainOutcome:
    """A finished job: the network with its best-validation weights (eval mode, CPU) and its record."""

    name: str
    model: nn.Module
    best_dice: float
    best_epoch: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def _run_job(job: TrainJob, train_data: ArrayPair, val_data: ArrayPair | None, events: Any) -> dict[str, Any]:
    """Train ``job`` in this process (one torch thread); returns the best checkpoint's weights and the record."""
    from segcal.training.trainer import load_checkpoint, train

    torch.set_num_threads(1)
    t0 = time.perf_counter()

    def tell(epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        events.put((job.name, epoch))

    res = train(job.config, train_data, val_data, resume=False, on_epoch_end=tell)
    best = load_checkpoint(res.output_dir / "best.pt")
    return {"name": job.name, "state": best["model"], "best_dice": float(res.best_dice),
            "best_epoch": int(res.best_epoch), "seconds": time.perf_counter() - t0, "history": res.history}


def _outcome(job: TrainJob, record: dict[str, Any]) -> TrainOutcome:
    from segcal.training.trainer import build_model

    model = build_model(job.config.get("model", {}))
    model.load_state_dict(record["state"])
    return TrainOutcome(job.name, model.cpu().eval(), record["best_dice"], record["best_epoch"],
                        round(record["seconds"], 1), record["history"])


def _drain(events: Any, on_epoch: Callable[[str, int], None] | None) -> None:
    while True:
        try:
            name, epoch = events.get_nowait()
        except queue_mod.Empty:
            return
        if on_epoch is not None:
            on_epoch(name, epoch)


def train_many(
    jobs: Sequence[TrainJob],
    train_data: ArrayPair,
    val_data: ArrayPair | None = None,
    *,
    workers: int | None = None,
    on_epoch: Callable[[str, int], None] | None = None,
    on_done: Callable[[TrainOutcome], None] | None = None,
) -> dict[str, TrainOutcome]:
    """Train every job of ``jobs`` on the same data, ``workers`` at a time (default: the CPU count, at most the
    number of jobs); returns the outcomes by name, in job order.

    ``on_epoch(name, finished_epochs)`` is called (in this process) after each epoch of any job, ``on_done`` when
    a job has finished. With ``workers=1`` the jobs run one after another in this process (one torch thread).
    A job that fails raises its error here.
    """
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names must be unique, got {names}")
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    by_name = {j.name: j for j in jobs}
    outcomes: dict[str, TrainOutcome] = {}

    def finish(name: str, record: dict[str, Any]) -> None:
        outcomes[name] = _outcome(by_name[name], record)
        if on_done is not None:
            on_done(outcomes[name])

    if workers == 1:
        threads = torch.get_num_threads()
        try:
            for job in jobs:
                finish(job.name, _run_job(job, train_data, val_data, _Direct(on_epoch)))
        finally:
            torch.set_num_threads(threads)
        return {name: outcomes[name] for name in names}
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        events = manager.Queue()
        pending: dict[Future, str] = {
            pool.submit(_run_job, job, train_data, val_data, events): job.name for job in jobs
        }
        while pending:
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            _drain(events, on_epoch)
            for fut in done:
                finish(pending.pop(fut), fut.result())
        _drain(events, on_epoch)
    return {name: outcomes[name] for name in names}


class _Direct:
    """The event queue of an in-process job: ``put`` calls ``on_epoch`` at once."""

    def __init__(self, on_epoch: Callable[[str, int], None] | None) -> None:
        self.on_epoch = on_epoch

    def put(self, event: tuple[str, int]) -> None:
        if self.on_epoch is not None:
            self.on_epoch(*event)
