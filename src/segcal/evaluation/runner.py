"""Dataset evaluation runner (``segcal evaluate``; docs/evaluation.md).

For each case the runner reads prediction and label (:mod:`segcal.io`), computes per-class metrics and the
mergeable bin sums with the metric core (:mod:`segcal.functional`) on the chosen region, and commits the
result to the run's :class:`~segcal.evaluation.store.ResultStore` as soon as the case is done. Cases stream
one by one (constant memory: at most ``2 × workers`` cases in flight), on local worker processes
(:class:`concurrent.futures.ProcessPoolExecutor`, ``forkserver``/``spawn``) or on an existing Dask distributed
cluster. A failing case is recorded with its error and the run goes on.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from segcal.evaluation._fast import HAVE_NUMBA, fused_case_pass
from segcal.evaluation.store import CaseResult, ResultStore
from segcal.functional.calibration import EPS
from segcal.functional.inputs import PROB_ATOL
from segcal.io import Case, CaseError, CaseFiles, load_case, match_cases

__all__ = [
    "CASE_METRICS",
    "CLASS_METRICS",
    "EvalConfig",
    "RunResult",
    "compute_case",
    "evaluate_case_files",
    "run_evaluation",
]

#: per-class metric columns (in cases.csv order)
CLASS_METRICS = (
    "dice",
    "iou",
    "precision",
    "recall",
    "hd95",
    "ece",
    "ace",
    "mce",
    "ece_l2",
    "ace_l2",
    "brier",
    "mae",
)
#: per-case metrics (one value per case, repeated on each class row of cases.csv)
CASE_METRICS = ("nll", "top_label_ece", "top_label_mce")

#: test hook: seconds to sleep after each case (lets fault-injection tests kill a run midway)
_DELAY_ENV = "SEGCAL_EVAL_CASE_DELAY"


@dataclass(frozen=True)
class EvalConfig:
    """What is computed for every case (its hash guards resumed runs)."""

    fmt: Literal["nifti", "npy", "nnunet"] = "nifti"
    num_bins: int = 20
    region_names: tuple[str, ...] | None = None
    regions: tuple[tuple[int, ...], ...] | None = None
    include_background: bool = False
    region: Literal["whole", "bbox", "mask"] = "whole"
    bbox_margin_mm: tuple[float, ...] = (8.0, 8.0, 4.0)
    hd95: bool = True
    soft_reference: bool = False

    def __post_init__(self) -> None:
        if self.region not in ("whole", "bbox", "mask"):
            raise ValueError(f"region must be whole, bbox or mask, got {self.region!r}")
        if (self.regions is None) != (self.region_names is None):
            raise ValueError("regions and region_names go together")
        if not isinstance(self.num_bins, int) or self.num_bins < 1:
            raise ValueError(f"num_bins must be a positive integer, got {self.num_bins!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunResult:
    """Outcome of :func:`run_evaluation`."""

    out_dir: Path
    n_cases: int
    n_ok: int
    n_failed: int
    n_skipped: int
    n_computed: int
    unmatched: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _nan_list(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.reshape(-1).tolist()]


def compute_case(case: Case, config: EvalConfig) -> CaseResult:
    """All metrics and bin sums of one case (raises ``ValueError`` / :class:`CaseError` on bad input).

    Shapes: ``case.probabilities`` ``(C, *S)``, ``case.label`` ``(*S)``; the core gets ``(1, C, *S)``.
    Calibration metrics, Brier, NLL, MAE and overlap counts use the region (whole / mask / dilated bbox); HD95
    is computed on the whole image (a distance between surfaces, in mm with the case's spacing).
    """
    from segcal.functional import (
        BinStats,
        bin_statistics,
        brier_score,
        calibration_errors,
        confusion_counts,
        hausdorff_distance_95,
        mean_absolute_error,
        negative_log_likelihood,
        overlap_scores,
        region_probabilities,
        region_targets,
        top_label_statistics,
    )
    from segcal.functional.inputs import check_target
    from segcal.functional.regions import dilated_bbox_mask

    path = case.paths.get("prediction", [None])[0]
    t0 = time.perf_counter()
    p = case.probabilities
    if p.dtype != np.float64:
        p = p.astype(np.float32, copy=False)
    probs = torch.from_numpy(np.ascontiguousarray(p))[None]
    if case.label is None:
        raise CaseError(path, "no label map")
    label = torch.from_numpy(np.ascontiguousarray(case.label))[None]
    if label.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
        label = label.to(torch.int64)
    c = probs.shape[1]
    ref = None
    if case.reference is not None:
        ref = torch.from_numpy(np.ascontiguousarray(case.reference.astype(np.float32, copy=False)))[None]
    if config.soft_reference and ref is None:
        raise CaseError(path, "a soft reference map is required (--soft-ref) but none was read")
    fast = HAVE_NUMBA and ref is None and config.regions is None and c > 1
    if not fast:
        try:
            check_target(label, probs.shape, "exclusive", name="label")
        except ValueError as exc:
            raise CaseError(case.paths.get("label", [None])[0], str(exc)) from None

    if config.region == "whole":
        mask = None
    elif config.region == "mask":
        if case.mask is None:
            raise CaseError(path, "region='mask' but no mask file was given for this case")
        mask = torch.from_numpy(case.mask)[None]
    else:
        margin = tuple(config.bbox_margin_mm)
        n_sp = label.ndim - 1
        if len(margin) != n_sp:
            margin = (margin + margin[-1:] * n_sp)[:n_sp]
        mask = dilated_bbox_mask(label[0], case.spacing, margin)[None]

    regions = [list(r) for r in config.regions] if config.regions is not None else None
    ib = config.include_background
    target = ref if ref is not None else label
    first = 0 if ib else 1
    fused = None
    if fast:
        mask_np = mask[0].numpy() if mask is not None else None
        fused = fused_case_pass(
            probs[0].numpy(), case.label, mask_np, EPS, config.num_bins, sum_tol=PROB_ATOL * max(1, c)
        )
        if fused is None:  # a bin count the fused kernels do not cover: the separate core functions
            try:
                check_target(label, probs.shape, "exclusive", name="label")
            except ValueError as exc:
                raise CaseError(case.paths.get("label", [None])[0], str(exc)) from None
    if fused is not None:
        counts_np, sq, top_np, info = fused
        _raise_invalid(info, c, path, case.paths.get("label", [None])[0])
        stats = bin_statistics(probs, label, config.num_bins, include_background=ib, mask=mask, check=False)
        top = BinStats(*torch.from_numpy(top_np)[None, None].unbind(2))
        n_in = info["n_in_mask"]
        counts = torch.from_numpy(counts_np[first:])[None]
        brier = torch.from_numpy(sq[first:] / n_in if n_in > 0 else np.full(c - first, np.nan))[None]
        nll = torch.tensor([info["nll_sum"] / n_in if n_in > 0 else float("nan")], dtype=torch.float64)
    else:
        try:
            stats = bin_statistics(
                probs, target, config.num_bins, include_background=ib, mask=mask, regions=regions
            )
        except ValueError as exc:
            raise CaseError(path, str(exc)) from None
        kw = {"mask": mask, "regions": regions, "check": False}
        counts = confusion_counts(probs, label, include_background=ib, **kw)  # type: ignore[arg-type]
        brier = brier_score(probs, target, include_background=ib, **kw)  # type: ignore[arg-type]
        nll = negative_log_likelihood(probs, target, **kw)  # type: ignore[arg-type]
        top = top_label_statistics(probs, label, config.num_bins, mask=mask, check=False)
    ce = calibration_errors(stats)
    ov = overlap_scores(counts)
    top_ce = calibration_errors(top)
    n_out = stats.num_channels
    nan = torch.full((1, n_out), float("nan"), dtype=torch.float64)
    if config.hd95:
        hd = hausdorff_distance_95(
            probs, label, include_background=ib, spacing=case.spacing, regions=regions, check=False
        )
    else:
        hd = nan
    if ref is not None:
        if regions is not None:
            mae = mean_absolute_error(
                region_probabilities(probs, regions),
                region_targets(ref, regions, c),
                mode="multilabel",
                mask=mask,
                check=False,
            )
        else:
            mae = mean_absolute_error(probs, ref, include_background=ib, mask=mask, check=False)
    else:
        mae = nan
    if config.region_names is not None:
        names = list(config.region_names)
    else:
        names = [f"class_{k}" for k in range(first, c)]
    per_class = {
        "dice": ov["dice"],
        "iou": ov["iou"],
        "precision": ov["precision"],
        "recall": ov["recall"],
        "hd95": hd,
        **ce,
        "brier": brier,
        "mae": mae,
    }
    metrics = {
        "per_class": {k: _nan_list(v) for k, v in per_class.items()},
        "per_case": {
            "nll": float(nll[0]),
            "top_label_ece": float(top_ce["ece"][0, 0]),
            "top_label_mce": float(top_ce["mce"][0, 0]),
        },
        "counts": counts[0].tolist(),
        "n_voxels": _nan_list(stats.count.sum(-1)),
        "shape": list(case.label.shape),
        "spacing": list(case.spacing),
    }
    return CaseResult(
        case.case_id, "ok", None, names, metrics, stats.numpy()[0], time.perf_counter() - t0, _peak_rss_mb()
    )


def _raise_invalid(info: dict[str, float], c: int, pred_path: str | None, label_path: str | None) -> None:
    """The core's input validation from the fused pass's statistics, with segcal.functional's messages.
    The probability checks run only when the pass flagged voxels (``n_flagged``; it then adds the precise
    statistics); a borderline flag that the precise checks clear raises nothing."""
    if info["n_flagged"] > 0 and info["n_nonfinite"] > 0:
        raise CaseError(pred_path, f"prediction contains {int(info['n_nonfinite'])} NaN/Inf values")
    lo, hi = info.get("p_min", 0.0), info.get("p_max", 1.0)
    if lo < -PROB_ATOL or hi > 1 + PROB_ATOL:
        raise CaseError(
            pred_path, f"prediction must hold probabilities in [0, 1] but spans [{lo:.4g}, {hi:.4g}]"
        )
    if info.get("max_sum_dev", 0.0) > PROB_ATOL * max(1, c):
        raise CaseError(
            pred_path,
            "prediction: exclusive mode needs class probabilities that sum to 1 over the channel axis, "
            f"max deviation is {info['max_sum_dev']:.4g}",
        )
    l_lo, l_hi = int(info["label_min"]), int(info["label_max"])
    if l_lo < 0 or l_hi >= c:
        raise CaseError(
            label_path,
            f"label: labels must lie in [0, {c - 1}] for {c} classes, found values in [{l_lo}, {l_hi}]",
        )


def evaluate_case_files(files: CaseFiles, config: EvalConfig) -> CaseResult:
    """Read and evaluate one case; any error becomes a ``failed`` result with a message naming the file."""
    t0 = time.perf_counter()
    try:
        case = load_case(files, config.fmt)
        res = compute_case(case, config)
    except CaseError as exc:
        res = CaseResult(files.case_id, "failed", str(exc))
    except (ValueError, TypeError) as exc:
        res = CaseResult(files.case_id, "failed", f"{files.prediction[0]}: {exc}")
    except MemoryError:
        res = CaseResult(files.case_id, "failed", f"{files.prediction[0]}: out of memory")
    res.seconds = time.perf_counter() - t0
    res.peak_rss_mb = _peak_rss_mb()
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)
    return res


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except Exception:  # numba missing or already initialised with fewer threads
        pass


def _iter_local(todo: list[CaseFiles], config: EvalConfig, workers: int) -> Iterator[CaseResult]:
    if workers <= 0:  # in-process (debugging, tests)
        for f in todo:
            yield evaluate_case_files(f, config)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if (
        method == "forkserver"
    ):  # import torch, numba kernels and the metric core once, fork the workers from it
        ctx.set_forkserver_preload(["segcal.evaluation.runner"])
    # the fork server imports the preloaded modules before it learns our sys.path (CPython < 3.12), so it gets
    # the parent's sys.path through PYTHONPATH while it starts
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        with ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)
        ) as ex:
            futures = _bounded(lambda f: ex.submit(evaluate_case_files, f, config), todo, 2 * workers, wait)
            first = next(futures, None)
            _restore_env("PYTHONPATH", old)
            if first is not None:
                yield first
            yield from futures
    finally:
        _restore_env("PYTHONPATH", old)


def _restore_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def _bounded(
    submit: Callable[[CaseFiles], Any], todo: list[CaseFiles], window: int, waiter: Callable
) -> Iterator[Any]:
    it = iter(todo)
    pending = set()
    for f in it:
        pending.add(submit(f))
        if len(pending) >= window:
            break
    while pending:
        done, pending = waiter(pending, return_when=FIRST_COMPLETED)
        for fut in done:
            yield fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.add(submit(nxt))


def _iter_dask(todo: list[CaseFiles], config: EvalConfig, address: str, window: int) -> Iterator[CaseResult]:
    from distributed import Client, as_completed

    with Client(address, timeout=30) as client:
        n = max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info().get("workers", {}).values()))
        it = iter(todo)
        first = [next(it) for _ in range(min(len(todo), max(window, 2 * n)))]
        ac = as_completed([client.submit(evaluate_case_files, f, config, pure=False) for f in first])
        for fut in ac:
            res = fut.result()
            fut.release()
            yield res
            nxt = next(it, None)
            if nxt is not None:
                ac.add(client.submit(evaluate_case_files, nxt, config, pure=False))


def run_evaluation(
    pred_dir: str | Path,
    label_dir: str | Path,
    out_dir: str | Path,
    config: EvalConfig,
    *,
    reference_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
    workers: int | None = None,
    dask_address: str | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    progress: bool = True,
    on_result: Callable[[CaseResult], None] | None = None,
) -> RunResult:
    """Evaluate every matched case of a dataset into ``out_dir`` (resumable; see module docstring).

    ``workers``: local processes (default: all cores; 0 = in this process). ``dask_address``: evaluate on that
    Dask scheduler instead. Writes ``results.sqlite``, ``cases.csv``, ``bins.npz`` and ``summary.json``.
    """
    from segcal.evaluation.outputs import write_outputs

    out = Path(out_dir)
    cases, unmatched = match_cases(
        pred_dir, label_dir, config.fmt, reference_dir=reference_dir, mask_dir=mask_dir
    )
    if config.region == "mask" and mask_dir is None:
        raise ValueError("region='mask' needs mask_dir (--mask-dir)")
    if config.soft_reference and reference_dir is None:
        raise ValueError("soft_reference needs reference_dir (--soft-ref)")
    run_cfg = {
        **config.as_dict(),
        "pred_dir": str(Path(pred_dir).resolve()),
        "label_dir": str(Path(label_dir).resolve()),
        "reference_dir": str(Path(reference_dir).resolve()) if reference_dir else None,
        "mask_dir": str(Path(mask_dir).resolve()) if mask_dir else None,
    }
    workers = (os.cpu_count() or 1) if workers is None else workers
    with ResultStore(out, run_cfg, overwrite=overwrite) as store:
        done = store.finished(include_failed=not retry_failed)
        todo = [c for c in cases if c.case_id not in done]
        n_computed = 0
        results: Iterable[CaseResult]
        if dask_address:
            results = _iter_dask(todo, config, dask_address, 2 * max(1, workers))
        else:
            results = _iter_local(todo, config, workers)
        with _progress(progress, len(cases), len(cases) - len(todo)) as advance:
            for res in results:
                store.put(res)
                n_computed += 1
                advance(res)
                if on_result is not None:
                    on_result(res)
        files, summary = write_outputs(store, out, run_cfg, unmatched)
        all_res = store.results()
    n_ok = sum(r.status == "ok" for r in all_res)
    return RunResult(
        out,
        len(cases),
        n_ok,
        len(all_res) - n_ok,
        len(cases) - len(todo),
        n_computed,
        unmatched,
        files,
        summary,
    )


class _progress:
    """Rich progress bar with ETA (no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, completed: int) -> None:
        self.enabled, self.total, self.completed = enabled, total, completed
        self.failed = 0

    def __enter__(self) -> Callable[[CaseResult], None]:
        if not self.enabled:
            return lambda res: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]evaluate[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.bar.__enter__()
        self.task = self.bar.add_task("cases", total=self.total, completed=self.completed, info="")

        def advance(res: CaseResult) -> None:
            self.failed += res.status != "ok"
            info = f"{res.case_id}" + (f" [red]{self.failed} failed[/]" if self.failed else "")
            self.bar.update(self.task, advance=1, info=info)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)
