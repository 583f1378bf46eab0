"""Dataset evaluation runner (``segcal evaluate``; docs/evaluation.md).

For each case the runner reads prediction and label (:mod:`segcal.io`), computes per-class metrics and the
mergeable bin sums with the metric core (:mod:`segcal.functional`) on the chosen region, and commits the
result to the run's :class:`~segcal.evaluation.store.ResultStore` as soon as the case is done. Cases stream
one by one (constant memory: at most ``2 × workers`` cases in flight), on local worker processes
(:class:`concurrent.futures.ProcessPoolExecutor`, ``forkserver``/``spawn``) or on an existing Dask distributed
cluster. A failing case is recorded with its error and the run goes on.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import os
import resource
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from segcal.evaluation.folders import (
    SPACING_OPTION,
    ClassNames,
    FolderSpacing,
    check_class_count,
    folder_spacing,
    read_folder_infos,
    resolve_class_names,
)
from segcal.evaluation.grouping import Grouping, resolve_grouping
from segcal.evaluation.lock import RunLock
from segcal.evaluation.store import CaseResult, ResultStore, input_fingerprint, same_inputs
from segcal.functional.binning import check_num_bins
from segcal.functional.regions import BOUNDARIES, boundary_band_mask, dilated_bbox_mask
from segcal.functional.scoring import CaseStatistics, TargetError, case_statistics
from segcal.functional.surface import check_surface_metrics, check_tolerances
from segcal.io import Case, CaseError, CaseFiles, check_output_outside_inputs, load_case, match_cases
from segcal.io.matching import SegmentedCaseFiles, match_ensemble, read_case_segmentation, with_segmentations
from segcal.io.nnunet import (
    DATASET_JSON,
    read_nnunet_file_ending,
    read_nnunet_ignore_label,
    read_nnunet_regions,
)

__all__ = [
    "WORKER_DIED",
    "DaskClusterError",
    "EvalConfig",
    "RunResult",
    "compute_case",
    "evaluate_case_files",
    "run_evaluation",
]

#: version of what a stored case holds (:class:`~segcal.evaluation.store.CaseResult`); part of the run
#: configuration, so a store written by another version is never resumed
STATISTICS_VERSION = 3


@dataclass(frozen=True)
class EvalConfig:
    """What is computed for every case (its hash guards resumed runs).

    ``spacing`` (``segcal evaluate --spacing``) is the voxel size in mm of the cases whose files and folder
    sidecars state none; it never overrides a stated geometry (a contradiction is an error). Class names are
    not part of it: they label the outputs (:func:`run_evaluation` ``class_names``) and never change a number.
    """

    fmt: Literal["nifti", "npy", "nnunet"] = "nifti"
    num_bins: int = 20
    region_names: tuple[str, ...] | None = None
    regions: tuple[tuple[int, ...], ...] | None = None
    include_background: bool = False
    region: Literal["whole", "bbox", "mask", "band"] = "whole"
    bbox_margin_mm: tuple[float, ...] = (8.0, 8.0, 4.0)
    hd95: bool = True
    soft_reference: bool = False
    spacing: tuple[float, ...] | None = None
    #: the prediction channels are nnU-Net region-based sigmoid outputs, one per region of ``regions`` (read from
    #: the prediction folder's ``dataset.json`` by :func:`run_evaluation` when ``regions`` is None), scored in
    #: multilabel mode against multi-hot region targets built from the label map
    nnunet_regions: bool = False
    #: ``region="band"``: the voxels within ``band_mm`` mm of the boundary of the reference (``band_boundary``
    #: ``"reference"``), of the predicted (argmax) label map (``"prediction"``) or of either (``"union"``)
    band_mm: float = 2.0
    band_boundary: Literal["reference", "prediction", "union"] = "reference"
    #: also compute the metrics of the peers (the schema's ``"peers"`` group: class-wise ECE, root Brier score,
    #: equal-mass ECE from ``fine_bins`` fine bins with its bound, case-level uncertainty scores and, in the
    #: summary, AURC / E-AURC of those scores against 1 - Dice)
    peer_metrics: bool = False
    fine_bins: int = 1000
    #: the overlap metrics (Dice, IoU, precision, recall, HD95) score nnU-Net's exported segmentation
    #: ``case<file_ending>`` beside each ``case.npz`` (possibly post-processed), not the argmax of the
    #: probabilities; the calibration metrics (and top-label accuracy) keep the probabilities
    nnunet_segmentations: bool = False
    #: a label value whose voxels are excluded from scoring (nnU-Net's ``ignore`` label, read from the prediction
    #: folder's ``dataset.json`` when it has one): every statistic but the surface metrics is restricted to the
    #: other voxels, and the predicted surfaces leave them out too (ignored voxels count as background /
    #: outside every region); with exclusive classes it must not be one of the prediction's classes
    ignore_label: int | None = None
    #: surface metrics computed besides ``hd95`` (``"hd95"``, ``"hd"``, ``"assd"``, ``"nsd"``; whole image, mm;
    #: :mod:`segcal.functional.surface`), and the NSD tolerance in mm: one value for every scored class, or one
    #: per scored class
    surface: tuple[str, ...] = ()
    nsd_tolerance_mm: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if self.region not in ("whole", "bbox", "mask", "band"):
            raise ValueError(f"region must be whole, bbox, mask or band, got {self.region!r}")
        if not (isinstance(self.band_mm, int | float) and math.isfinite(self.band_mm) and self.band_mm >= 0):
            raise ValueError(f"band_mm must be a non-negative number of mm, got {self.band_mm!r}")
        if self.band_boundary not in BOUNDARIES:
            raise ValueError(f"band_boundary must be one of {', '.join(BOUNDARIES)}, got {self.band_boundary!r}")
        if self.region == "band" and self.nnunet_regions and self.band_boundary != "reference":
            raise ValueError("band_boundary 'prediction' / 'union' needs exclusive classes, not nnunet_regions")
        check_num_bins(self.fine_bins)
        if (self.regions is None) != (self.region_names is None):
            raise ValueError("regions and region_names go together")
        if self.nnunet_regions and self.soft_reference:
            raise ValueError("nnunet_regions does not take a soft reference")
        if self.ignore_label is not None and (isinstance(self.ignore_label, bool) or self.ignore_label < 0):
            raise ValueError(f"ignore_label must be a label value >= 0, got {self.ignore_label!r}")
        if self.nnunet_segmentations and self.fmt != "nnunet":
            raise ValueError(f"nnunet_segmentations reads nnU-Net prediction folders (fmt='nnunet'), got {self.fmt!r}")
        check_num_bins(self.num_bins)
        if self.spacing is not None and not (
            1 <= len(self.spacing) <= 3 and all(math.isfinite(s) and s > 0 for s in self.spacing)
        ):
            raise ValueError(f"spacing must be 1 to 3 positive voxel sizes in mm, got {self.spacing!r}")
        object.__setattr__(self, "surface", check_surface_metrics(self.surface))
        tol = tuple(float(t) for t in self.nsd_tolerance_mm)
        if not tol:
            raise ValueError("nsd_tolerance_mm needs at least one tolerance in mm")
        object.__setattr__(self, "nsd_tolerance_mm", check_tolerances(tol, len(tol)))

    @property
    def surface_metrics(self) -> tuple[str, ...]:
        """Every surface metric the run computes (``hd95`` with ``hd95=True``), in schema order."""
        return check_surface_metrics([*(["hd95"] if self.hd95 else []), *self.surface])

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for option in ("nnunet_regions", "nnunet_segmentations", "ignore_label"):
            if d[option] in (False, None):  # the configuration (and its hash) of runs written before the option
                del d[option]
        if self.region != "band":  # (idem: the band's options enter the hash only with the band)
            del d["band_mm"], d["band_boundary"]
        if not self.peer_metrics:  # (idem)
            del d["peer_metrics"], d["fine_bins"]
        if not d["surface"]:  # (idem: a run without extra surface metrics keeps its hash)
            del d["surface"], d["nsd_tolerance_mm"]
        elif "nsd" not in d["surface"]:
            del d["nsd_tolerance_mm"]
        return d


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
    #: stored cases recomputed because an input file changed
    stale: list[str] = field(default_factory=list)
    #: stored cases dropped because their input files vanished
    vanished: list[str] = field(default_factory=list)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _region_mask(
    case: Case,
    config: EvalConfig,
    label: torch.Tensor,
    spacing: tuple[float, ...],
    path: str | None,
    probs: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The region every statistic but HD95 is restricted to: ``(1, *S)`` bool, or None for the whole image."""
    if config.region == "whole":
        return None
    if config.region == "band":
        pred = probs[0].argmax(0) if probs is not None and config.band_boundary != "reference" else None
        return boundary_band_mask(label[0], spacing, config.band_mm, prediction=pred, boundary=config.band_boundary)[
            None
        ]
    if config.region == "mask":
        if case.mask is None:
            raise CaseError(path, "region='mask' but no mask file was given for this case")
        return torch.from_numpy(case.mask)[None]
    margin = tuple(config.bbox_margin_mm)
    n_sp = label.ndim - 1
    if len(margin) != n_sp:
        margin = (margin + margin[-1:] * n_sp)[:n_sp]
    return dilated_bbox_mask(label[0], spacing, margin)[None]


def _region_targets(label: torch.Tensor, channels: int, config: EvalConfig, path: str | None) -> torch.Tensor:
    """Multi-hot targets ``(1, R, *S)`` of nnU-Net's regions: channel ``r`` is 1 where the label is one of the
    values of region ``r``; :class:`CaseError` when the prediction does not have one channel per region."""
    regions = config.regions or ()
    if channels != len(regions):
        raise CaseError(
            path, f"{channels} prediction channels but {len(regions)} regions ({', '.join(config.region_names or ())}"
            "): region-based nnU-Net writes one sigmoid channel per region, no background channel"
        )
    return torch.stack([torch.isin(label[0], torch.tensor(r, dtype=label.dtype)) for r in regions])[None]


def _segmentation_scores(
    seg: np.ndarray, probs: torch.Tensor, target: torch.Tensor, config: EvalConfig, mask: torch.Tensor | None,
    spacing: tuple[float, ...], path: str | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(counts (1, K, 3), {surface metric: (1, K)})`` of the hard segmentation ``seg`` ``(*S)`` against
    ``target``: the overlap functions of the metric core on its one-hot (or, for nnU-Net regions, multi-hot
    region) map, whose argmax (threshold) is ``seg`` itself; the same channels, region, surface metrics and
    settings as the probabilities'."""
    from segcal.functional.overlap import confusion_counts, surface_scores

    c = probs.shape[1]
    labels = torch.from_numpy(np.ascontiguousarray(seg)).to(torch.int64)[None]
    mode = "exclusive"
    if config.nnunet_regions:
        hard = _region_targets(labels, c, config, path).to(torch.float32)
        mode = "multilabel"
    else:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= c:
            raise CaseError(path, f"segmentation labels must lie in [0, {c - 1}] for {c} classes, found [{lo}, {hi}]")
        hard = torch.nn.functional.one_hot(labels, c).movedim(-1, 1).to(torch.float32)
    regions = None if config.nnunet_regions or config.regions is None else [list(r) for r in config.regions]
    kw = {"include_background": config.include_background, "mode": mode, "regions": regions, "check": False}
    counts = confusion_counts(hard, target, mask=mask, **kw)  # type: ignore[arg-type]
    wanted = check_surface_metrics([*(["hd95"] if config.hd95 else []), *config.surface])
    dist: dict[str, torch.Tensor] = {}
    if wanted:
        tol = config.nsd_tolerance_mm
        dist = surface_scores(hard, target, spacing=spacing, metrics=wanted,  # type: ignore[arg-type]
                              nsd_tolerance_mm=tol[0] if len(tol) == 1 else tol, **kw)
    return counts.to(torch.float64), {k: v.to(torch.float64) for k, v in dist.items()}


def _with_segmentation(
    stats: CaseStatistics,
    segmentation: np.ndarray | None,
    case: Case,
    config: EvalConfig,
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    spacing: tuple[float, ...],
) -> CaseStatistics:
    """``stats`` with the overlap counts and surface metrics of nnU-Net's exported ``segmentation`` (ignored
    voxels, where ``known`` is False, set to background like the probabilities); ``tensors``: ``(probs, target,
    mask, known)`` as scored."""
    probs, target, mask, known = tensors
    seg_path = case.paths.get("segmentation", [None])[0]
    if segmentation is None:
        raise CaseError(seg_path or case.paths.get("prediction", [None])[0],
                        "nnunet_segmentations: no exported segmentation was read")
    if known is not None:
        segmentation = np.where(known[0].numpy(), segmentation, 0)
    counts, dist = _segmentation_scores(segmentation, probs, target, config, mask, spacing, seg_path)
    return replace(stats, counts=counts, **dist)


def _without_ignored(
    probs: torch.Tensor,
    label: torch.Tensor,
    mask: torch.Tensor | None,
    known: torch.Tensor,
    config: EvalConfig,
    pred_path: Path | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(probs, target, mask)`` without the voxels of the ignore label (``known`` False): out of the scored
    region, and out of the predicted surfaces. Region-based: predicted outside every region (the probabilities
    zeroed there). Exclusive classes: predicted and labelled background there (the probabilities stay a
    distribution); the ignore label must then lie above every class, as nnU-Net requires."""
    mask = known if mask is None else mask & known
    if config.nnunet_regions:
        return probs * known[:, None], label, mask
    if config.ignore_label is not None and config.ignore_label < probs.shape[1]:
        raise CaseError(pred_path, f"the ignore label {config.ignore_label} is one of the prediction's "
                        f"{probs.shape[1]} classes (nnU-Net's ignore label lies above every class)")
    background = torch.zeros_like(probs)
    background[:, 0] = 1.0
    return torch.where(known[:, None], probs, background), label * known, mask


def compute_case(case: Case, config: EvalConfig, segmentation: np.ndarray | None = None) -> CaseResult:
    """The statistics of every metric of one case (raises :class:`CaseError` naming the file on bad input).

    Shapes: ``case.probabilities`` ``(C, *S)``, ``case.label`` ``(*S)``; the core
    (:func:`segcal.functional.scoring.case_statistics`) gets ``(1, C, *S)``. Calibration metrics, Brier, NLL,
    MAE and overlap counts use the region (whole / mask / dilated bbox / boundary band); HD95 and the other
    surface metrics (``config.surface``) are computed on the whole image (distances between surfaces, in mm with
    the case's spacing; from boolean crops around each class's masks, :mod:`segcal.functional.surface`). A case
    without geometry (an empty ``case.spacing``: :func:`~segcal.io.matching.load_case` with ``assume_1mm=False``)
    is scored with 1 mm voxels and its result says so (``metrics["spacing_assumed"]``).

    ``segmentation`` (``config.nnunet_segmentations``): nnU-Net's exported segmentation ``(*S)`` of the case;
    the overlap counts and the surface metrics are then those of this segmentation (:func:`_segmentation_scores`),
    every other statistic stays the probabilities'.
    """
    pred_path = case.paths.get("prediction", [None])[0]
    label_path = case.paths.get("label", [None])[0]
    t0 = time.perf_counter()
    p = case.probabilities
    if p.dtype != np.float64:
        p = p.astype(np.float32, copy=False)
    probs = torch.from_numpy(np.ascontiguousarray(p))[None]
    if case.label is None:
        raise CaseError(pred_path, "no label map")
    label = torch.from_numpy(np.ascontiguousarray(case.label))[None]
    if label.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
        label = label.to(torch.int64)
    ref = None
    if case.reference is not None:
        ref = torch.from_numpy(np.ascontiguousarray(case.reference.astype(np.float32, copy=False)))[None]
    if config.soft_reference and ref is None:
        raise CaseError(pred_path, "a soft reference map is required (--soft-ref) but none was read")
    assumed = len(case.spacing) == 0
    spacing = (1.0,) * case.label.ndim if assumed else tuple(case.spacing)
    known = None if config.ignore_label is None else label != config.ignore_label
    mask = _region_mask(case, config, label if known is None else label * known, spacing, pred_path, probs)
    target, mode, regions = label, "exclusive", config.regions
    if known is not None:
        probs, target, mask = _without_ignored(probs, label, mask, known, config, pred_path)
    if config.nnunet_regions:
        target, mode, regions = _region_targets(label, probs.shape[1], config, pred_path), "multilabel", None
    try:
        stats = case_statistics(
            probs,
            target,
            config.num_bins,
            mode=mode,  # type: ignore[arg-type]
            include_background=config.include_background,
            regions=[list(r) for r in regions] if regions is not None else None,
            mask=mask,
            reference=ref,
            hd95=config.hd95,
            spacing=spacing,
            fine_bins=config.fine_bins if config.peer_metrics else None,
            surface=config.surface,
            nsd_tolerance_mm=tol[0] if len(tol := config.nsd_tolerance_mm) == 1 else tol,
        )
    except TargetError as exc:
        raise CaseError(label_path, str(exc)) from None
    except ValueError as exc:
        raise CaseError(pred_path, str(exc)) from None
    if config.nnunet_segmentations:
        stats = _with_segmentation(stats, segmentation, case, config, (probs, target, mask, known), spacing)
    first = 0 if config.include_background or config.regions is not None else 1
    if config.region_names is not None:
        names = list(config.region_names)
    else:
        names = [f"class_{k}" for k in range(first, first + stats.bins.shape[1])]
    return CaseResult.from_statistics(
        case.case_id, names, stats, shape=list(case.label.shape), spacing=list(spacing),
        num_classes=int(probs.shape[1]), spacing_assumed=assumed, seconds=time.perf_counter() - t0,
        peak_rss_mb=_peak_rss_mb(),
    )


def evaluate_case_files(files: CaseFiles, config: EvalConfig, geometry: FolderSpacing | None = None) -> CaseResult:
    """Read and evaluate one case; any error becomes a ``failed`` result with a message naming the file.

    ``geometry``: the run's folder spacing (a sidecar's, else ``config.spacing``; see
    :func:`segcal.evaluation.folders.folder_spacing`) for files without geometry of their own; a case with
    neither is scored with 1 mm voxels and flagged.
    """
    t0 = time.perf_counter()
    if geometry is None:
        geometry = FolderSpacing(config.spacing, SPACING_OPTION if config.spacing is not None else None)
    try:
        case = load_case(
            files, config.fmt, spacing=geometry.spacing, spacing_from=geometry.source or "", assume_1mm=False
        )
        if case.probabilities.dtype not in (np.float32, np.float64):  # e.g. float16 as stored: converted here, so
            case.probabilities = case.probabilities.astype(np.float32)  # the stored copy is freed before computing
        segmentation = None
        if isinstance(files, SegmentedCaseFiles):
            segmentation = read_case_segmentation(files, case)
            case.paths["segmentation"] = [files.segmentation]
        res = compute_case(case, config, segmentation)
    except CaseError as exc:
        res = CaseResult(files.case_id, "failed", str(exc))
    except (ValueError, TypeError) as exc:
        res = CaseResult(files.case_id, "failed", f"{files.prediction[0]}: {exc}")
    except MemoryError:
        res = CaseResult(files.case_id, "failed", f"{files.prediction[0]}: out of memory")
    res.seconds = time.perf_counter() - t0
    res.peak_rss_mb = _peak_rss_mb()
    return res


#: why a case is failed when the process evaluating it died (a crash, a kill, the out-of-memory killer)
WORKER_DIED = (
    "the worker process died while evaluating this case, also when retried alone (likely out of memory, or "
    "killed)"
)


def _init_worker(threads: int, parent_pid: int) -> None:
    from segcal.functional._kernels import set_threads

    torch.set_num_threads(threads)
    set_threads(threads)
    threading.Thread(target=_exit_with_parent, args=(parent_pid, os.getppid()), daemon=True).start()


def _exit_with_parent(parent_pid: int, ppid: int) -> None:
    """Ends this worker once the run's process is gone (killed with ``SIGKILL`` it cannot stop its workers;
    the fork server that started this worker exits with it, which changes our parent too)."""
    while True:
        time.sleep(0.5)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(1)
        if os.getppid() != ppid:
            os._exit(1)


def _pool(workers: int) -> ProcessPoolExecutor:
    threads = max(1, (os.cpu_count() or 1) // workers)
    # forkserver: workers start from a clean single-threaded server (torch / numba thread pools are not
    # fork-safe), each with the parent's sys.path; they import segcal on their first case
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(
        workers, mp_context=mp.get_context(method), initializer=_init_worker, initargs=(threads, os.getpid())
    )


def _iter_local(
    todo: list[CaseFiles], config: EvalConfig, geometry: FolderSpacing, workers: int
) -> Iterator[CaseResult]:
    """Results of ``todo`` in completion order, at most ``2 x workers`` cases in flight. When a worker dies, the
    pool is restarted; each case that was in flight is then retried alone, so that only a case that kills its
    worker again is recorded as failed (:data:`WORKER_DIED`) and every other case is computed."""
    if workers <= 0:  # in-process (debugging, tests)
        for f in todo:
            yield evaluate_case_files(f, config, geometry)
        return
    queue = deque(todo)
    while queue:
        suspects = yield from _run_pool(queue, config, geometry, workers)
        for f in suspects:
            yield from _run_alone(f, config, geometry)


def _run_pool(
    queue: deque[CaseFiles], config: EvalConfig, geometry: FolderSpacing, workers: int
) -> Generator[CaseResult, None, list]:
    """Runs cases from ``queue`` on a pool until it is empty (returns ``[]``) or a worker dies (returns the cases
    that were in flight, to retry)."""
    with _pool(workers) as ex:
        in_flight: dict[Future, CaseFiles] = {}
        while queue or in_flight:
            while queue and len(in_flight) < 2 * workers:
                f = queue.popleft()
                in_flight[ex.submit(evaluate_case_files, f, config, geometry)] = f
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            broken = False
            for fut in done:
                f = in_flight.pop(fut)
                try:
                    yield fut.result()
                except BrokenProcessPool:
                    broken = True
                    in_flight[fut] = f
            if broken:
                ex.shutdown(wait=True, cancel_futures=True)
                return list(in_flight.values())
    return []


def _run_alone(files: CaseFiles, config: EvalConfig, geometry: FolderSpacing) -> Iterator[CaseResult]:
    with _pool(1) as ex:
        try:
            yield ex.submit(evaluate_case_files, files, config, geometry).result()
        except BrokenProcessPool:
            yield CaseResult(files.case_id, "failed", f"{files.prediction[0]}: {WORKER_DIED}")


class DaskClusterError(RuntimeError):
    """The Dask scheduler cannot be reached, or no worker joined it in time."""


def _dask_client(address: str, timeout: float) -> Any:
    """A client of the scheduler at ``address`` with at least one worker, or one clear :class:`DaskClusterError`."""
    from distributed import Client

    try:
        client = Client(address, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise DaskClusterError(
            f"cannot reach the Dask scheduler at {address} within {timeout:g} s ({type(exc).__name__}); is it "
            "running, and is the address (tcp://host:port) right?"
        ) from None
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (OSError, TimeoutError):
        client.close()
        raise DaskClusterError(
            f"no worker joined the Dask scheduler at {address} within {timeout:g} s; start workers with "
            f"`dask worker {address}`"
        ) from None
    return client


def _iter_dask(
    todo: list[CaseFiles],
    config: EvalConfig,
    geometry: FolderSpacing,
    address: str,
    window: int,
    timeout: float = 30.0,
) -> Iterator[CaseResult]:
    """Results of ``todo`` evaluated on a Dask cluster, at most ``window`` (or twice the worker threads) in
    flight. Dask retries a case whose worker was lost, but blames every case the worker held; so a case that
    ends with ``KilledWorker`` is retried once more alone at the end, and recorded as failed
    (:data:`WORKER_DIED`) only if it kills its worker again. An error raised on a worker fails its case."""
    from distributed import as_completed

    with _dask_client(address, timeout) as client:
        n = max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info().get("workers", {}).values()))
        it = iter(todo)
        by_key: dict[str, CaseFiles] = {}

        def submit(f: CaseFiles) -> Any:
            fut = client.submit(evaluate_case_files, f, config, geometry, pure=False)
            by_key[fut.key] = f
            return fut

        suspects: list[CaseFiles] = []
        ac = as_completed([submit(f) for f in itertools.islice(it, max(window, 2 * n))])
        for fut in ac:
            files = by_key.pop(fut.key)
            res = _dask_result(fut, files)
            if res is None:
                suspects.append(files)
            else:
                yield res
            nxt = next(it, None)
            if nxt is not None:
                ac.add(submit(nxt))
        for files in suspects:  # alone on the cluster: only a case that kills its worker again is failed
            fut = submit(files)
            res = _dask_result(fut, by_key.pop(fut.key))
            yield res if res is not None else CaseResult(
                files.case_id, "failed", f"{files.prediction[0]}: {WORKER_DIED}"
            )


def _dask_result(fut: Any, files: CaseFiles) -> CaseResult | None:
    """The case's result; None when its worker was lost too often (``KilledWorker``); a failed result for an
    error raised on the worker."""
    try:
        return fut.result()
    except Exception as exc:  # KilledWorker, or an error on the worker
        if type(exc).__name__ == "KilledWorker":
            return None
        return CaseResult(files.case_id, "failed", f"{files.prediction[0]}: {type(exc).__name__}: {exc}")
    finally:
        fut.release()


@dataclass
class _Plan:
    """What a run has to do: the cases to compute (new, changed inputs, failed ones to retry), their input
    fingerprints, and the stored cases whose inputs vanished."""

    todo: list[CaseFiles]
    fingerprints: dict[str, str]
    n_resumed: int
    stale: list[str]
    vanished: list[str]


def _case_paths(files: CaseFiles) -> list[str]:
    seg = [files.segmentation] if isinstance(files, SegmentedCaseFiles) else []
    return [*files.prediction, files.label, *(files.reference or []), *([files.mask] if files.mask else []), *seg]


def _plan(
    cases: list[CaseFiles], store: ResultStore, retry_failed: bool, hash_inputs: bool, extra: str = ""
) -> _Plan:
    prints = {c.case_id: input_fingerprint(_case_paths(c), content=hash_inputs, extra=extra) for c in cases}
    stored = store.fingerprints(include_failed=not retry_failed)
    stale = sorted(cid for cid, fp in stored.items() if cid in prints and not same_inputs(fp, prints[cid]))
    vanished = sorted(set(store.fingerprints()) - set(prints))
    todo = [c for c in cases if not same_inputs(stored.get(c.case_id), prints[c.case_id])]
    return _Plan(todo, prints, len(cases) - len(todo), stale, vanished)


def _with_nnunet_dataset(config: EvalConfig, pred_dir: Path) -> EvalConfig:
    """The prediction folder's ``dataset.json``, where it has one: its ``ignore`` label unless given
    (:func:`segcal.io.nnunet.read_nnunet_ignore_label`), and with ``nnunet_regions`` its regions unless given
    (:func:`segcal.io.nnunet.read_nnunet_regions`; :class:`CaseError` naming it when it is missing or not
    region-based)."""
    path = pred_dir / DATASET_JSON
    if config.nnunet_regions and config.regions is None:
        if not path.is_file():
            raise CaseError(
                path, "not found: --nnunet-regions reads the regions from the prediction folder's dataset.json"
            )
        names, regions = read_nnunet_regions(path)
        config = replace(config, region_names=names, regions=regions)
    if config.ignore_label is None and path.is_file():
        config = replace(config, ignore_label=read_nnunet_ignore_label(path))
    return config


def _members(pred_dir: Path, ensemble_dirs: list[Path]) -> list[Path]:
    """The ensemble's member folders, ``pred_dir`` first; a folder given twice is a ``ValueError``."""
    members = [pred_dir, *ensemble_dirs]
    twice = next((d for i, d in enumerate(members) if d in members[:i]), None)
    if twice is not None:
        raise ValueError(f"the ensemble member folder {twice} is given twice (--ensemble-with)")
    return members


@dataclass
class _RunInputs:
    """What a run reads before computing: the matched cases, the files without partner, the configuration
    stored with every case, the folder spacing, the class names and the grouping of the cases into subjects."""

    cases: list[CaseFiles]
    unmatched: dict[str, list[str]]
    run_cfg: dict[str, Any]
    geometry: FolderSpacing
    names: ClassNames
    grouping: Grouping


def _run_inputs(
    pred_dir: Path,
    label_dir: Path,
    out: Path,
    config: EvalConfig,
    reference_dir: Path | None,
    mask_dir: Path | None,
    class_names: Sequence[str] | None,
    grouping: dict[str, Any],
    ensemble_dirs: list[Path],
) -> _RunInputs:
    check_output_outside_inputs(
        out,
        {
            "predictions": pred_dir,
            "labels": label_dir,
            "--soft-ref": reference_dir,
            "--mask-dir": mask_dir,
            **{f"--ensemble-with {d}": d for d in ensemble_dirs},
        },
    )
    infos = read_folder_infos(pred_dir, label_dir)
    geometry = folder_spacing(infos, config.spacing)
    names = resolve_class_names(
        class_names, infos, pred_dir, label_dir, config.fmt, regions=config.regions is not None
    )
    cases: list[CaseFiles]
    if ensemble_dirs:
        cases, unmatched = match_ensemble(  # type: ignore[assignment]
            _members(pred_dir, ensemble_dirs), label_dir, config.fmt, reference_dir=reference_dir, mask_dir=mask_dir
        )
    else:
        cases, unmatched = match_cases(
            pred_dir, label_dir, config.fmt, reference_dir=reference_dir, mask_dir=mask_dir
        )
    if config.nnunet_segmentations:
        if ensemble_dirs:
            raise ValueError("nnunet_segmentations (--nnunet-segmentations) scores one folder's exported "
                             "segmentations; an ensemble (--ensemble-with) has none: give nnU-Net's ensembled folder")
        cases = with_segmentations(cases, read_nnunet_file_ending(pred_dir))  # type: ignore[assignment]
    subjects = resolve_grouping([c.case_id for c in cases], **grouping)
    if config.region == "mask" and mask_dir is None:
        raise ValueError("region='mask' needs mask_dir (--mask-dir)")
    if config.soft_reference and reference_dir is None:
        raise ValueError("soft_reference needs reference_dir (--soft-ref)")
    run_cfg = {
        **config.as_dict(),
        "statistics": STATISTICS_VERSION,
        "pred_dir": str(pred_dir),
        "label_dir": str(label_dir),
        "reference_dir": str(reference_dir) if reference_dir else None,
        "mask_dir": str(mask_dir) if mask_dir else None,
    }
    if ensemble_dirs:  # only then: a run without members keeps the configuration hash it always had
        run_cfg["ensemble_dirs"] = [str(d) for d in ensemble_dirs]
    return _RunInputs(cases, unmatched, run_cfg, geometry, names, subjects)


def run_evaluation(
    pred_dir: str | Path,
    label_dir: str | Path,
    out_dir: str | Path,
    config: EvalConfig,
    *,
    class_names: Sequence[str] | None = None,
    group_by: str | None = None,
    groups: str | Path | Mapping[str, str] | None = None,
    reference_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
    ensemble_dirs: Sequence[str | Path] | None = None,
    workers: int | None = None,
    dask_address: str | None = None,
    dask_timeout: float = 30.0,
    overwrite: bool = False,
    retry_failed: bool = False,
    hash_inputs: bool = False,
    progress: bool = True,
    on_result: Callable[[CaseResult], None] | None = None,
) -> RunResult:
    """Evaluate every matched case of a dataset into ``out_dir`` (resumable; see module docstring).

    ``workers``: local processes (default: all cores; 0 = in this process). ``dask_address``: evaluate on that
    Dask scheduler instead (:class:`DaskClusterError` when it cannot be reached, or no worker joins it, within
    ``dask_timeout`` seconds). Writes ``results.sqlite``, ``cases.csv``, ``bins.npz`` and ``summary.json``.

    Geometry: each case's files' own, else a ``segcal.json`` sidecar's ``spacing`` (prediction or label folder),
    else ``config.spacing``; a case with none is scored with 1 mm voxels and listed in ``summary["geometry"]``
    (:mod:`segcal.evaluation.folders`). ``class_names``: the names of label values ``0 .. C-1`` (background
    included; else the sidecars' ``class_names``, else an nnU-Net ``dataset.json``'s ``labels``); output labels
    only, applied when the outputs are written, so a rerun with other names recomputes nothing and leaves no
    old name in any output. A name count that is not ``C`` is a
    :class:`~segcal.evaluation.folders.ClassNamesError` (a ``ValueError``) naming the source, raised after the
    first case computed (the computed cases stay stored).

    Subjects: ``group_by`` (a regular expression on the case id; its first capture group, or the whole match,
    names the subject) or ``groups`` (a CSV file with the columns ``case_id, subject``, or a mapping) group the
    cases into subjects, the statistical unit (:mod:`segcal.evaluation.grouping`): ``subjects.csv`` and
    ``summary["subject_macro"]`` then hold per-subject values pooled from the subjects' sums. A case without a
    subject stops the run before anything is computed (:class:`~segcal.evaluation.grouping.GroupingError`, a
    ``ValueError``). Like class names, the grouping labels the outputs only: a rerun with another grouping
    recomputes nothing. Without one each case is its own subject, and ``summary["grouping"]`` says so.

    Ensembles: ``ensemble_dirs`` (``--ensemble-with``) are further prediction folders of the same cases (the
    folds of an nnU-Net model, ``pred_dir`` being the first); each case is scored on the voxel-wise arithmetic
    mean of the members' probability maps (:func:`segcal.io.matching.match_ensemble`). A case that a member
    lacks, or whose member differs in shape or classes or declares logits, is a failed case naming the member's
    file. The member folders are part of the configuration, and every member file of the input fingerprint.

    Resume: a stored case is reused only if it was computed under the same configuration from the same input
    files (path, size and modification time; with ``hash_inputs`` also their contents) and the same sidecar
    spacing; a changed input is recomputed and a stored case whose files vanished is dropped. The folder is
    locked for the whole run (:class:`~segcal.evaluation.lock.RunLock`): a second run into it is refused with
    the holder's name.
    """
    from segcal.evaluation.outputs import write_outputs

    out = Path(out_dir)
    config = _with_nnunet_dataset(config, Path(pred_dir))
    # absolute paths: the cases may be read by workers started in another directory (Dask)
    inputs = _run_inputs(
        Path(pred_dir).resolve(),
        Path(label_dir).resolve(),
        out,
        config,
        Path(reference_dir).resolve() if reference_dir else None,
        Path(mask_dir).resolve() if mask_dir else None,
        class_names,
        {"group_by": group_by, "groups": groups},
        [Path(d).resolve() for d in ensemble_dirs or ()],
    )
    # a sidecar's spacing is input data: a changed one recomputes the cases (--spacing is configuration)
    sidecar = inputs.geometry.source not in (None, SPACING_OPTION)
    extra = repr(inputs.geometry.spacing) if sidecar else ""
    workers = (os.cpu_count() or 1) if workers is None else workers
    with RunLock(out), ResultStore(out, inputs.run_cfg, overwrite=overwrite) as store:
        plan = _plan(inputs.cases, store, retry_failed, hash_inputs, extra)
        store.drop(plan.vanished)
        results: Iterable[CaseResult]
        if dask_address:
            results = _iter_dask(plan.todo, config, inputs.geometry, dask_address, 2 * max(1, workers), dask_timeout)
        else:
            results = _iter_local(plan.todo, config, inputs.geometry, workers)
        n_computed = _store_results(results, store, plan, inputs.names, progress, on_result)
        files, summary = write_outputs(
            store,
            out,
            inputs.run_cfg,
            inputs.unmatched,
            class_names=inputs.names,
            geometry=inputs.geometry,
            grouping=inputs.grouping,
        )
        all_res = store.results()
    n_ok = sum(r.status == "ok" for r in all_res)
    return RunResult(
        out,
        len(inputs.cases),
        n_ok,
        len(all_res) - n_ok,
        plan.n_resumed,
        n_computed,
        inputs.unmatched,
        files,
        summary,
        stale=plan.stale,
        vanished=plan.vanished,
    )


def _store_results(
    results: Iterable[CaseResult],
    store: ResultStore,
    plan: _Plan,
    names: ClassNames,
    progress: bool,
    on_result: Callable[[CaseResult], None] | None,
) -> int:
    """Commit each result as it comes (progress bar, ``on_result``); the class names are checked against the
    first ok case (:func:`~segcal.evaluation.folders.check_class_count`). Returns the number of results."""
    n_computed = 0
    checked = names.names is None
    with _progress(progress, len(plan.fingerprints), plan.n_resumed) as advance:
        for res in results:
            store.put(res, plan.fingerprints[res.case_id])
            n_computed += 1
            advance(res)
            if on_result is not None:
                on_result(res)
            if not checked and res.status == "ok" and res.metrics is not None:
                check_class_count(names, res.metrics.get("num_classes"))
                checked = True
    return n_computed


class _progress:
    """Rich progress bar with ETA (no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, completed: int) -> None:
        self.enabled, self.total, self.completed = enabled, total, completed
        self.failed = 0

    def __enter__(self) -> Callable[[CaseResult], None]:
        if not self.enabled:
            return lambda res: None
        from rich.markup import escape
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
            info = escape(res.case_id) + (f" [red]{self.failed} failed[/]" if self.failed else "")
            self.bar.update(self.task, advance=1, info=info)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)
