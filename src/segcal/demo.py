"""The ``segcal demo`` pipeline on the embedded MNI152 brain-tissue task (:mod:`segcal.data.mni152`).

Reference section (:func:`reference_predictors`): evaluate, on the test pseudo-subjects, the calibration of
probability predictors derived from the soft reference tissue maps — the reference itself, an over-confident
sharpened version and an under-confident smoothed version — against the hard labels and against the soft
reference. The full demo (:func:`run_full_demo`, docs/demo.md) trains and calibrates networks. Everything
printed or plotted is computed in the run.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table as RichTable

from segcal.data.mni152 import TissueDataset, TissueSplit, load_tissue_dataset, make_shifted
from segcal.evaluation import EvalConfig, compare_runs, run_evaluation
from segcal.evaluation.compare import write_comparison
from segcal.functional.uncertainty import segment_mean_entropy
from segcal.io import write_numpy, write_numpy_probabilities, write_text
from segcal.io.runs import read_case_metrics
from segcal.io.sidecar import FolderInfo, PredictionKind, write_folder_info
from segcal.metrics import MetricResult, SegmentationCalibrationMetric
from segcal.plots import ensemble_size_curve, entropy_dice_scatter, quality_scatter
from segcal.posthoc import (
    AuxiliaryConvCalibrator,
    Calibrator,
    DirichletScaling,
    LocalTemperatureScaling,
    MatrixScaling,
    TemperatureScaling,
    VectorScaling,
    ensemble_probabilities,
    ensemble_size_study,
)
from segcal.posthoc.mc_dropout import insert_dropout_unet, mc_predict
from segcal.report import build_comparison_report
from segcal.report.html import ReportFigure, Section, Table, render_html
from segcal.training import TrainJob, TrainOutcome, train_many

TISSUE_CLASSES = ("background", "CSF", "GM", "WM")

__all__ = [
    "DemoPredictor",
    "compute_findings",
    "reference_predictors",
    "run_demo",
    "run_full_demo",
    "tempered",
]


@dataclass
class DemoPredictor:
    name: str
    description: str
    probs: torch.Tensor  # (N, C, H, W)


def tempered(probs: torch.Tensor, temperature: float, eps: float = 1e-6) -> torch.Tensor:
    """``softmax(log p / T)``: ``T < 1`` sharpens (over-confident), ``T > 1`` smooths (under-confident)."""
    return torch.softmax(torch.log(probs.clamp_min(eps)) / temperature, dim=1)


def reference_predictors(soft: torch.Tensor) -> list[DemoPredictor]:
    """The three predictors of the reference section, derived from soft reference maps ``(N, C, H, W)``."""
    return [
        DemoPredictor("reference", "the soft reference tissue maps themselves", soft),
        DemoPredictor("sharpened", "reference tempered with T = 0.5 (over-confident)", tempered(soft, 0.5)),
        DemoPredictor("smoothed", "reference tempered with T = 2 (under-confident)", tempered(soft, 2.0)),
    ]


def _evaluate(pred: DemoPredictor, target: torch.Tensor, case_ids: list[str], num_bins: int) -> MetricResult:
    metric = SegmentationCalibrationMetric(num_bins, class_names=list(TISSUE_CLASSES[1:]))
    metric.update(pred.probs, target, case_ids=case_ids)
    return metric.compute()


# ------------------------------------------------------------------------------------------------------------
# Full demo: train UNets with six losses, post-hoc calibration, ensembles, MC dropout, shift.
# ------------------------------------------------------------------------------------------------------------

#: (run name, loss string) of the trained models; "dice" is the baseline of every comparison.
LOSSES: tuple[tuple[str, str], ...] = (
    ("dice", "dice"),
    ("ce", "ce"),
    ("dice+ce", "dice+ce"),
    ("dice+hard_ace", "dice+ace"),
    ("dice+soft_ace", "dice+soft_ace"),
    ("dscpp", "dscpp"),
)


@dataclass
class DemoSize:
    """How big the demo task is (full vs ``--quick``)."""

    n_subjects: int
    split: tuple[int, int, int]
    slices_per_subject: int
    epochs: int
    channels: tuple[int, ...]
    batch_size: int = 4
    lr: float = 3e-3
    ensemble_members: int = 5
    mc_samples: int = 10
    schedule: str = "poly"
    #: training processes (``None``: one per CPU core)
    workers: int | None = None


# Batch 4 (not 8): the number of optimizer steps, not epochs, is what the tiny task is short of. With batch 8
# and 15 epochs the quick models saw 60 steps and stayed under-confident (fitted T < 1 for every loss) and
# Dice + mL1-ACE had not left the "predict the class prior" plateau (see docs/demo.md). Every loss gets the same
# steps and the same polynomial learning-rate decay, so each run ends converged. Ten test pseudo-subjects: the
# statistics are computed on subjects, not on their slices.
FULL = DemoSize(n_subjects=21, split=(8, 3, 10), slices_per_subject=12, epochs=30, channels=(8, 16, 32, 64))
QUICK = DemoSize(n_subjects=14, split=(3, 1, 10), slices_per_subject=10, epochs=20, channels=(8, 16, 32, 64))
#: the subject of a demo case id ``s<subject>_z<slice>``
SUBJECT_PATTERN = r"^(s\d+)_"


#: progress columns of every stage: what runs, bar, done/total, elapsed, ETA
_COLUMNS = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn())


@contextlib.contextmanager
def _stage_bar(console: Console | None, description: str, total: int) -> Iterator[Callable[[str], None]]:
    """A progress bar with ETA for one demo stage; yields ``step(label)``, called after each finished item
    (``console=None``: no bar)."""
    if console is None:
        yield lambda label: None
        return
    with Progress(*_COLUMNS, console=console) as bar:
        task = bar.add_task(description, total=total)
        yield lambda label: bar.update(task, advance=1, description=f"{description} ({label} done)")


def _case_ids(split: TissueSplit) -> list[str]:
    return [f"s{int(s):02d}_z{int(z):03d}" for s, z in zip(split.subjects, split.slices, strict=True)]


@torch.no_grad()
def _logits(model: torch.nn.Module, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Raw logits ``(N, C, H, W)`` of ``model`` on ``images (N, 1, H, W)`` (eval mode, whole slices)."""
    model.eval()
    return torch.cat([model(images[i : i + batch]) for i in range(0, images.shape[0], batch)])


def _folder_info(spacing: tuple[float, ...], kind: PredictionKind | None = None) -> FolderInfo:
    """The ``segcal.json`` of a demo folder: the slices' voxel size and the tissue class names (NumPy files hold
    neither), so a plain ``segcal evaluate PRED LABELS`` scores them as the demo does."""
    return FolderInfo(kind=kind, spacing=tuple(float(s) for s in spacing), class_names=TISSUE_CLASSES)


def _write_predictions(folder: Path, probs: torch.Tensor, case_ids: list[str], spacing: tuple[float, ...]) -> Path:
    """``folder/<case>.npz`` probabilities ``(C, H, W)`` and the folder's sidecar."""
    folder.mkdir(parents=True, exist_ok=True)
    arr = probs.to(torch.float32).numpy()
    for cid, p in zip(case_ids, arr, strict=True):
        p = p / p.sum(0, keepdims=True)
        write_numpy_probabilities(folder / f"{cid}.npz", p.astype(np.float32), compressed=False)
    write_folder_info(folder, _folder_info(spacing, "probabilities"))
    return folder


def _write_labels(folder: Path, labels, case_ids: list[str], spacing: tuple[float, ...]) -> Path:
    """``folder/<case>.npy`` label maps ``(H, W)`` and the folder's sidecar."""
    folder.mkdir(parents=True, exist_ok=True)
    for cid, y in zip(case_ids, labels, strict=True):
        write_numpy(folder / f"{cid}.npy", np.asarray(y, dtype=np.int64))
    write_folder_info(folder, _folder_info(spacing))
    return folder


def _mean_std(summary: dict, metric: str, classes: list[str]) -> dict[str, str]:
    """``mean ± std`` over test subjects (each subject's slices pooled) per class and for the class average
    (papers' tables); over cases for a run without subjects."""
    d = summary.get("subject_macro", {}).get("metrics", summary["macro"]).get(metric, {})
    out = {}
    for key in [*classes, "mean", "case"]:
        if key in d and d[key].get("n", 0):
            out[key] = f"{d[key]['mean']:.3f} ± {d[key]['std']:.3f}"
    return out


def _row(comparison: dict, run_b: str, metric: str, cls: str = "mean") -> dict | None:
    for r in comparison["rows"]:
        if Path(r["run_b"]).name == run_b and r["metric"] == metric and r["class"] == cls:
            return r
    return None


def _pct(rel: float) -> str:
    return f"{100 * rel:+.0f}%"


def _effect(r: dict) -> str:
    """``a → b (change [95 % CI], Wilcoxon p, n units)`` of a comparison row (statistics over its unit)."""
    ci = f"[{_pct(r['rel_ci_low'])}, {_pct(r['rel_ci_high'])}]" if "rel_ci_low" in r else ""
    unit = r.get("unit", "case")
    return (f"{r['mean_a']:.4f} → {r['mean_b']:.4f} ({_pct(r['rel_change'])} {ci}, Wilcoxon p={r['p_wilcoxon']:.2g}, "
            f"n = {r.get('n', '?')} {unit}s)")


def _better(r: dict | None, lower: bool = True) -> bool:
    """Rule: a claimed change holds when it goes the claimed way and its Wilcoxon p over the unit is < 0.05."""
    if r is None:
        return False
    direction = r["mean_b"] < r["mean_a"] if lower else r["mean_b"] > r["mean_a"]
    return bool(direction and r["p_wilcoxon"] < 0.05)


def compute_findings(results: dict) -> list[dict]:
    """The papers' qualitative findings, each measured from ``results`` (built by :func:`run_full_demo`).

    A claimed difference between two runs *holds* when it goes the claimed way and its paired Wilcoxon test over
    the statistical unit of the comparison (the test pseudo-subjects in the demo) gives p < 0.05; the text gives
    both means, the relative change with its 95 % bootstrap interval over subjects, p and n. Returns one dict
    per finding: ``key``, ``claim``, ``held`` (bool) and ``text`` (numbers of this run).
    """
    cmp_test = results["comparison_test"]
    temps = results["temperatures"]
    findings: list[dict] = []

    def add(key: str, claim: str, held: bool, text: str) -> None:
        findings.append({"key": key, "claim": claim, "held": bool(held), "text": text})

    # 1. Dice-only more over-confident than CE: higher ACE and fitted temperature > 1
    r = _row(cmp_test, "ce", "ace")
    t_dice, t_ce = temps["dice"], temps["ce"]
    add(
        "dice_overconfident",
        "Dice-only training is more over-confident than CE (higher ACE, fitted temperature > 1)",
        _better(r) and t_dice > 1.0 and t_dice > t_ce,
        f"ACE (class mean) Dice → CE {_effect(r)}; fitted temperature Dice T={t_dice:.2f}, CE T={t_ce:.2f}"
        if r else "CE run missing",
    )
    # 2. Dice + mL1-ACE lowers marginal ACE vs Dice (hard and soft), at what Dice cost
    for name, label in (("dice+hard_ace", "hard"), ("dice+soft_ace", "soft")):
        r = _row(cmp_test, name, "ace")
        rd = _row(cmp_test, name, "dice")
        if r is None or rd is None:
            continue
        add(
            f"{label}_ace_lowers_ace",
            f"Adding {label} mL1-ACE to Dice lowers marginal ACE",
            _better(r),
            f"ACE Dice → Dice+{label} ACE {_effect(r)}; Dice changed by {100 * (rd['mean_b'] - rd['mean_a']):+.1f} pt "
            f"({_effect(rd)})",
        )
    # 3. DSC++ lowers NLL vs Dice
    r = _row(cmp_test, "dscpp", "nll", "case")
    if r is not None:
        add("dscpp_lowers_nll", "DSC++ lowers NLL vs Dice", _better(r), f"NLL Dice → DSC++ {_effect(r)}")
    # 4. ensembling lowers NLL as M grows
    study = results["ensemble_study"]
    sizes = sorted(int(m) for m in study)
    nll = [study[m]["nll"][0] for m in sizes]
    # non-increasing up to 0.5 % (the subsets of a size are resampled), and M = max clearly below M = 1
    monotone = all(b <= a * 1.005 for a, b in itertools.pairwise(nll))
    add(
        "ensemble_nll",
        "Ensembling lowers NLL as the number of members M grows",
        monotone and nll[-1] < nll[0],
        "NLL by M: " + ", ".join(f"M={m}: {v:.4f}" for m, v in zip(sizes, nll, strict=True))
        + " (mean over random member subsets)",
    )
    # 5. shift: calibration worse, segment entropy higher
    r = _row(results["comparison_shift"], "dice_shifted", "ace")
    ent = results["entropy"]
    add(
        "shift_calibration",
        "Calibration is worse on the shifted set",
        _better(r, lower=False),
        f"Dice model ACE test → shifted {_effect(r)}" if r else "shifted run missing",
    )
    add(
        "shift_entropy",
        "Segment entropy rises on the shifted set",
        ent["shifted"] > ent["test"],
        f"mean foreground segment entropy (Dice model) test {ent['test']:.4f} → shifted {ent['shifted']:.4f}",
    )
    return findings


@dataclass
class DemoData:
    """The demo's slices: the train / val / test splits, the shifted copy of the test split, test case ids."""

    dataset: TissueDataset
    shifted: TissueSplit
    ids: list[str]

    @property
    def x_test(self) -> torch.Tensor:
        return torch.as_tensor(self.dataset.test.images)

    @property
    def y_test(self) -> torch.Tensor:
        return torch.as_tensor(self.dataset.test.labels)

    @property
    def x_shifted(self) -> torch.Tensor:
        return torch.as_tensor(self.shifted.images)


@dataclass
class TrainedModels:
    """The demo's networks (best validation checkpoint, eval mode, CPU) and one log entry per training run."""

    models: dict[str, torch.nn.Module]
    log: dict[str, dict[str, Any]]


@dataclass
class DemoPredictions:
    """Test (and shifted) probability maps of every evaluated predictor, in evaluation order, and what was
    measured while making them: fitted temperatures, the ensemble-size study, segment entropies."""

    probs: dict[str, torch.Tensor]
    temperatures: dict[str, float]
    study: dict[int, dict[str, tuple[float, float, float]]]
    entropy: dict[str, float]
    seg_ent: dict[str, np.ndarray]


@dataclass
class DemoEvaluations:
    """The evaluation run folder and summary of every predictor."""

    run_dirs: dict[str, Path]
    summaries: dict[str, dict[str, Any]]


@dataclass
class DemoComparisons:
    """Every test predictor vs the Dice model, and the Dice model on test vs shifted."""

    test: dict[str, Any]
    shift: dict[str, Any]


def load_demo_data(console: Console, size: DemoSize, seed: int, shift: tuple[str, int]) -> DemoData:
    """The embedded MNI152 tissue slices (cached after the first run) and the shifted test set."""
    with console.status("building the embedded MNI152 tissue data (cached after the first run)"):
        ds = load_tissue_dataset(
            n_subjects=size.n_subjects, split=size.split, seed=seed, slices_per_subject=size.slices_per_subject
        )
    shifted = make_shifted(ds.test, shift[0], shift[1], seed=seed)
    return DemoData(dataset=ds, shifted=shifted, ids=_case_ids(ds.test))


def _train_config(output: Path, size: DemoSize, n_epochs: int, name: str, loss: str, model_seed: int) -> dict:
    """The :func:`segcal.training.train` config of one demo model."""
    return {
        "loss": loss,
        "epochs": n_epochs,
        "seed": model_seed,
        "output_dir": str(output / "models" / name),
        "progress": False,
        "model": {"channels": list(size.channels), "strides": [2] * (len(size.channels) - 1),
                  "num_res_units": 1, "out_channels": 4},
        "data": {"batch_size": size.batch_size},
        "optim": {"lr": size.lr, "schedule": size.schedule},
    }


def train_models(
    console: Console, data: DemoData, output: Path, size: DemoSize, n_epochs: int, seed: int
) -> TrainedModels:
    """One UNet per loss of :data:`LOSSES` (seed ``seed``) and the Dice ensemble's other members, trained side by
    side (:func:`segcal.training.train_many`: one process per core, one torch thread each), with a progress bar
    over all their epochs."""
    ds = data.dataset
    specs = [(name, loss, seed) for name, loss in LOSSES]
    specs += [(f"dice_member{k}", "dice", seed + k) for k in range(1, size.ensemble_members)]
    jobs = [TrainJob(name, _train_config(output, size, n_epochs, name, loss, s)) for name, loss, s in specs]
    losses = {name: (loss, s) for name, loss, s in specs}
    trained = TrainedModels(models={}, log={})
    with Progress(*_COLUMNS, console=console) as bar:
        task = bar.add_task(f"training {len(jobs)} models ({size.workers or 'all'} workers)",
                            total=len(jobs) * n_epochs)

        def done(out: TrainOutcome) -> None:
            trained.log[out.name] = {"loss": losses[out.name][0], "seed": losses[out.name][1],
                                     "best_val_dice": out.best_dice, "best_epoch": out.best_epoch,
                                     "seconds": out.seconds, "converged": converged(out.history)}
            bar.console.print(f"  trained {out.name:<16} loss={losses[out.name][0]:<14} val Dice "
                              f"{out.best_dice:.3f} at epoch {out.best_epoch} ({out.seconds} s)")

        outcomes = train_many(jobs, (ds.train.images, ds.train.labels), (ds.val.images, ds.val.labels),
                              workers=size.workers, on_epoch=lambda name, epoch: bar.advance(task), on_done=done)
    trained.models = {name: out.model for name, out in outcomes.items()}
    trained.log = {name: trained.log[name] for name in outcomes}
    return trained


def converged(history: list[dict[str, float]], tail: float = 0.25, tol: float = 0.005) -> bool:
    """Whether a run's validation Dice stopped improving: its best over the last ``tail`` of the epochs is at most
    ``tol`` above its best before them."""
    dice = [h["val_dice"] for h in history]
    k = max(1, round(len(dice) * (1 - tail)))
    return len(dice) > k and max(dice[k:]) <= max(dice[:k]) + tol


def _softmax_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.softmax(_logits(model, images), 1)


def _member_probs(
    models: dict[str, torch.nn.Module], first: torch.Tensor, images: torch.Tensor, n: int
) -> list[torch.Tensor]:
    """``first`` (the Dice model's probabilities) and those of ``dice_member1 .. dice_member{n-1}``."""
    return [first] + [_softmax_logits(models[f"dice_member{k}"], images) for k in range(1, n)]


#: the post-hoc calibrators ``segcal demo --calibrators`` fits on the Dice model's validation logits, next to the
#: temperature scaling of every model (docs/posthoc.md); each becomes a run ``dice+<name>`` of the comparison
DEMO_CALIBRATORS: dict[str, type[Calibrator]] = {
    "vector": VectorScaling,
    "matrix": MatrixScaling,
    "dirichlet": DirichletScaling,
    "aux": AuxiliaryConvCalibrator,
    "lts": LocalTemperatureScaling,
}


def check_demo_calibrators(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple, each one of :data:`DEMO_CALIBRATORS` (else a ``ValueError`` naming the valid ones)."""
    unknown = [n for n in names if n not in DEMO_CALIBRATORS]
    if unknown:
        raise ValueError(f"unknown calibrator(s) {', '.join(unknown)}; choose from {', '.join(DEMO_CALIBRATORS)}")
    return tuple(dict.fromkeys(names))


def predict_all(
    models: dict[str, torch.nn.Module],
    data: DemoData,
    size: DemoSize,
    seed: int,
    console: Console | None = None,
    calibrators: Sequence[str] = (),
) -> DemoPredictions:
    """Probabilities of every predictor, in this order: each loss and its temperature-scaled version, the Dice
    model calibrated by each of ``calibrators`` (:data:`DEMO_CALIBRATORS`, fitted on its validation logits), the
    Dice ensemble, MC dropout, then on the shifted set the Dice model, its ensemble and Dice + hard mL1-ACE."""
    x_te, x_sh, val = data.x_test, data.x_shifted, data.dataset.val
    probs: dict[str, torch.Tensor] = {}
    temperatures: dict[str, float] = {}
    calibrators = check_demo_calibrators(calibrators)
    with _stage_bar(console, "predicting and fitting temperatures", len(LOSSES) + len(calibrators) + 3) as step:
        for name, _ in LOSSES:
            lg = _logits(models[name], x_te)
            probs[name] = torch.softmax(lg, 1)
            ts_model = TemperatureScaling(max_voxels_per_volume=4000, seed=seed)
            ts_model.fit(_logits(models[name], torch.as_tensor(val.images)), torch.as_tensor(val.labels))
            temperatures[name] = float(ts_model.temperature_)
            probs[f"{name}+ts"] = ts_model.transform(lg)
            step(name)
        if calibrators:
            val_logits = _logits(models["dice"], torch.as_tensor(val.images))
            test_logits = _logits(models["dice"], x_te)
        for method in calibrators:
            cal = DEMO_CALIBRATORS[method](seed=seed).fit(val_logits, torch.as_tensor(val.labels))  # type: ignore[call-arg]
            probs[f"dice+{method}"] = cal.transform(test_logits)
            step(f"dice+{method}")
        m = size.ensemble_members
        members = _member_probs(models, probs["dice"], x_te, m)
        probs[f"dice_ensemble{m}"] = ensemble_probabilities(members)
        study = ensemble_size_study(members, data.y_test, sizes=list(range(1, m + 1)), n_resamples=10, seed=seed)
        step("ensemble")
        dropout_net = copy.deepcopy(models["dice"])
        insert_dropout_unet(dropout_net, "decoder", p=0.2)
        probs["dice_mc_dropout"] = mc_predict(dropout_net, x_te, n_samples=size.mc_samples, seed=seed)["mean"]
        step("MC dropout")
        probs["dice_shifted"] = _softmax_logits(models["dice"], x_sh)
        probs[f"dice_ensemble{m}_shifted"] = ensemble_probabilities(
            _member_probs(models, probs["dice_shifted"], x_sh, m))
        probs["dice+hard_ace_shifted"] = _softmax_logits(models["dice+hard_ace"], x_sh)
        step("shifted set")
    seg_ent = {k: segment_mean_entropy(probs[k]).numpy() for k in ("dice", "dice_shifted")}
    entropy = {"test": float(np.nanmean(seg_ent["dice"])), "shifted": float(np.nanmean(seg_ent["dice_shifted"]))}
    return DemoPredictions(probs=probs, temperatures=temperatures, study=study, entropy=entropy, seg_ent=seg_ent)


def evaluate_all(
    probs: dict[str, torch.Tensor], data: DemoData, output: Path, num_bins: int, console: Console | None = None
) -> DemoEvaluations:
    """One :func:`segcal.evaluation.run_evaluation` run per predictor under ``output/runs/<name>``: the class
    channels CSF, GM, WM (named by the folders' ``segcal.json``, as for a plain ``segcal evaluate PRED
    LABELS``; no HD95)."""
    spacing = tuple(data.dataset.test.spacing)
    label_dir = _write_labels(output / "labels", data.dataset.test.labels, data.ids, spacing)
    cfg = EvalConfig(fmt="npy", num_bins=num_bins, hd95=False)
    evals = DemoEvaluations(run_dirs={}, summaries={})
    with _stage_bar(console, f"evaluating {len(probs)} runs", len(probs)) as step:
        for name, p in probs.items():
            pred_dir = _write_predictions(output / "predictions" / name, p, data.ids, spacing)
            res = run_evaluation(pred_dir, label_dir, output / "runs" / name, cfg, workers=0, overwrite=True,
                                 progress=False, group_by=SUBJECT_PATTERN)
            evals.run_dirs[name] = output / "runs" / name
            evals.summaries[name] = res.summary
            step(name)
    return evals


def _compare(run_dirs: dict[str, Path], names: list[str], out: Path) -> dict[str, Any]:
    """``segcal compare`` of ``names`` (the first is the baseline) into ``out`` (tables and report)."""
    comparison = compare_runs([run_dirs[n] for n in names], group_by=SUBJECT_PATTERN)
    write_comparison(comparison, out)
    build_comparison_report([run_dirs[n] for n in names], out, {**comparison, "runs": names})
    return comparison


def compare_all(run_dirs: dict[str, Path], output: Path, console: Console | None = None) -> DemoComparisons:
    """Every test predictor vs Dice (``output/compare``) and Dice on test vs shifted (``output/compare_shift``)."""
    test_runs = [n for n in run_dirs if not n.endswith("_shifted")]
    with _stage_bar(console, "comparing runs and writing their reports", 2) as step:
        test = _compare(run_dirs, test_runs, output / "compare")
        step("test vs dice")
        shift = _compare(run_dirs, ["dice", "dice_shifted"], output / "compare_shift")
        step("test vs shifted")
    return DemoComparisons(test=test, shift=shift)


def build_summary(
    settings: dict[str, Any],
    trained: TrainedModels,
    preds: DemoPredictions,
    evals: DemoEvaluations,
    comparisons: DemoComparisons,
) -> dict[str, Any]:
    """``summary.json`` (without the reference predictors and timings): ``settings`` (quick, seed, num_bins,
    epochs, size, shift), the findings, papers-style ``mean ± std`` tables and where each run is."""
    findings = compute_findings({
        "comparison_test": comparisons.test,
        "comparison_shift": comparisons.shift,
        "temperatures": preds.temperatures,
        "ensemble_study": preds.study,
        "entropy": preds.entropy,
    })
    classes = [c for c in evals.summaries["dice"]["macro"]["dice"] if c not in ("mean", "case")]
    tables = {
        name: {m: _mean_std(s, m, classes) for m in ("dice", "ece", "ace", "mce", "brier", "nll")}
        for name, s in evals.summaries.items()
    }
    return {
        **settings,
        "classes": classes,
        "unit": {"unit": comparisons.test.get("unit", "case"),
                 "n": evals.summaries["dice"].get("subject_macro", {}).get("n")},
        "dice_change": _dice_changes(comparisons.test),
        "training": trained.log,
        "temperatures": preds.temperatures,
        "ensemble_study": {str(m): v for m, v in preds.study.items()},
        "segment_entropy": preds.entropy,
        "findings": findings,
        "tables": tables,
        "runs": {n: str(d) for n, d in evals.run_dirs.items()},
    }


def _dice_changes(comparison: dict) -> dict[str, dict[str, float]]:
    """Each test run's Dice (class mean) vs the Dice model: both means, the change in points, the relative change
    with its paired 95 % bootstrap interval over the unit, Wilcoxon and Holm p, n."""
    out = {}
    for r in comparison["rows"]:
        if r["metric"] == "dice" and r["class"] == "mean":
            out[Path(r["run_b"]).name] = {
                "dice_a": r["mean_a"], "dice_b": r["mean_b"], "change_pt": 100 * (r["mean_b"] - r["mean_a"]),
                "rel_change": r["rel_change"], "rel_ci": [r.get("rel_ci_low"), r.get("rel_ci_high")],
                "p_wilcoxon": r["p_wilcoxon"], "p_holm": r.get("p_holm"), "n": r.get("n"), "unit": r.get("unit"),
            }
    return out


class _Stopwatch:
    """Seconds per named stage, and the total since construction."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in {**self.seconds, "total": time.perf_counter() - self.t0}.items()}


def run_full_demo(
    output: Path,
    *,
    quick: bool = False,
    seed: int = 0,
    num_bins: int = 20,
    epochs: int | None = None,
    shift: tuple[str, int] = ("noise", 3),
    calibrators: Sequence[str] = (),
) -> dict:
    """The full ``segcal demo``: train, calibrate, ensemble, evaluate, compare, report (see docs/demo.md).

    Writes into ``output``: ``models/<name>/`` (trainer outputs), ``predictions/<run>/`` and ``labels/``,
    ``runs/<run>/`` (evaluation runs), ``compare/report.html`` (test comparison vs Dice),
    ``compare_shift/report.html``, ``report.html`` (the demo report with findings), ``summary.json``.
    Returns the summary dict.

    Stages: :func:`load_demo_data`, :func:`train_models`, :func:`predict_all`, :func:`evaluate_all`,
    :func:`compare_all`, :func:`build_summary` and the report, then the reference predictors.
    """
    console = Console()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    size = QUICK if quick else FULL
    n_epochs = int(epochs) if epochs is not None else size.epochs
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    clock = _Stopwatch()
    with clock.stage("data"):
        data = load_demo_data(console, size, seed, shift)
        ds = data.dataset
        console.print(
            f"[bold]segcal demo[/bold]{' --quick' if quick else ''}: train {len(ds.train.images)} / val "
            f"{len(ds.val.images)} / test {len(data.ids)} slices of {tuple(data.x_test.shape[2:])}; shifted set = "
            f"test with {shift[0]} severity {shift[1]}; {n_epochs} epochs, UNet {'-'.join(map(str, size.channels))}"
        )
    with clock.stage("training"):
        trained = train_models(console, data, output, size, n_epochs, seed)
    with clock.stage("prediction"):
        preds = predict_all(trained.models, data, size, seed, console, calibrators)
    with clock.stage("evaluation"):
        evals = evaluate_all(preds.probs, data, output, num_bins, console)
    with clock.stage("reports"):
        comparisons = compare_all(evals.run_dirs, output, console)
        settings = {"quick": quick, "seed": seed, "num_bins": num_bins, "epochs": n_epochs,
                    "size": size.__dict__ | {"epochs": n_epochs}, "shift": list(shift),
                    "calibrators": list(calibrators)}
        summary = build_summary(settings, trained, preds, evals, comparisons)
    # the reference section's predictors (scored against hard labels and the soft reference), in the report
    with clock.stage("reference_predictors"):
        summary["reference_predictors"] = _reference_section(ds.test, num_bins, console)
    with clock.stage("report"):
        _write_demo_report(output, summary, evals.summaries, preds.study, preds.seg_ent, data.ids)
    summary["seconds"] = clock.rounded()
    write_text(output / "summary.json", json.dumps(summary, indent=2, default=float))
    _print_findings(console, summary["findings"])
    console.print(f"wrote {output / 'report.html'}, {output / 'compare' / 'report.html'} and "
                  f"{output / 'summary.json'} ({summary['seconds']['total']} s)")
    return summary


def _reference_section(test: TissueSplit, num_bins: int, console: Console | None = None) -> dict:
    soft = torch.as_tensor(test.soft, dtype=torch.float64)
    labels = torch.as_tensor(test.labels)
    case_ids = _case_ids(test)
    out: dict = {}
    predictors = reference_predictors(soft)
    with _stage_bar(console, "scoring the reference predictors", len(predictors)) as step:
        for pred in predictors:
            out[pred.name] = _reference_entry(pred, labels, soft, case_ids, num_bins)
            step(pred.name)
    return out


def _reference_entry(pred: DemoPredictor, labels: torch.Tensor, soft: torch.Tensor, case_ids: list[str],
                     num_bins: int) -> dict:
    """One reference predictor scored against the hard labels and against the soft reference."""
    entry: dict = {"description": pred.description}
    for against, target in (("hard labels", labels), ("soft reference", soft)):
        res = _evaluate(pred, target, case_ids, num_bins)
        entry[against] = {
            k: {name: float(v) for name, v in zip(res.class_names, res.macro[k].tolist(), strict=False)}
            for k in ("ece", "ace", "mce", "brier", "dice")
        }
        entry[against]["nll"] = float(res.macro["nll"][0])
    return entry


def _print_findings(console: Console, findings: list[dict]) -> None:
    table = RichTable(title="Findings measured by this run")
    table.add_column("finding")
    table.add_column("held")
    table.add_column("numbers")
    for f in findings:
        table.add_row(f["claim"], "yes" if f["held"] else "[red]no[/red]", f["text"])
    console.print(table)


# ------------------------------------------------------------------------------------------------------------
# The demo report: one function per section.
# ------------------------------------------------------------------------------------------------------------


def _findings_section(summary: dict) -> Section:
    text = "\n".join(
        f"- **{'held' if f['held'] else 'did NOT hold'}**: {f['claim']}. {f['text']}." for f in summary["findings"]
    )
    return Section(
        "Findings (generated from this run's numbers)",
        text="Every number below was measured by this run (seed "
        f"{summary['seed']}, {summary['epochs']} epochs{', --quick' if summary['quick'] else ''}).\n\n" + text,
    )


def _metric_sections(summary: dict, names: list[str]) -> list[Section]:
    """One ``mean ± std`` table per metric, a row per model of ``names``."""
    classes = summary["classes"]
    sections = []
    for metric, title in (("dice", "Dice"), ("ace", "ACE"), ("ece", "ECE"), ("mce", "MCE"), ("brier", "Brier"),
                          ("nll", "NLL")):
        rows = []
        for name in names:
            cells = summary["tables"][name][metric]
            row = {"model": name}
            if metric == "nll":
                row["per case"] = cells.get("case", "")
            else:
                row.update({c: cells.get(c, "") for c in classes})
                row["average"] = cells.get("mean", "")
            rows.append(row)
        caption = (
            "NLL: mean ± std over test subjects of each subject's categorical NLL (one value per subject, all "
            "classes, its slices pooled)"
            if metric == "nll" else f"{title}: mean ± std over test subjects (each subject's slices pooled), per "
            "class and the class average"
        )
        sections.append(Section(f"{title} on the test set (mean ± std over test subjects)",
                                tables=[Table(rows, caption=caption)]))
    return sections


def _dice_change_section(summary: dict) -> Section:
    """The Dice cost (or gain) of each model vs the Dice model, with its interval over subjects."""
    rows = [{"model": n, "Dice (dice)": f"{d['dice_a']:.3f}", "Dice (model)": f"{d['dice_b']:.3f}",
             "change": f"{d['change_pt']:+.1f} pt", "relative [95 % CI]":
             f"{_pct(d['rel_change'])} [{_pct(d['rel_ci'][0])}, {_pct(d['rel_ci'][1])}]",
             "Holm p": f"{d['p_holm']:.2g}", "n": f"{d['n']} {d['unit']}s"}
            for n, d in summary["dice_change"].items() if d["rel_ci"][0] is not None]
    return Section("Dice vs the Dice model (class mean)", text="Paired over test subjects (each subject's slices "
                   "pooled); the interval is a paired bootstrap over subjects.", tables=[Table(rows)])


def _training_section(summary: dict) -> Section:
    return Section(
        "Training and temperature scaling",
        text="Temperature fitted on the validation slices by minimising the NLL (T > 1: the model was "
        "over-confident).",
        tables=[Table([{"model": n, **{k: v for k, v in log.items()},
                        "fitted T": round(summary["temperatures"].get(n, float("nan")), 3)}
                       for n, log in summary["training"].items()], caption="training runs")],
    )


def _ensemble_section(study: dict) -> Section:
    sizes = sorted(study)
    figs = []
    for metric in ("nll", "dice"):
        figs.append(ReportFigure(ensemble_size_curve(
            sizes, [study[m][metric][0] for m in sizes], [study[m][metric][1] for m in sizes],
            [study[m][metric][2] for m in sizes], metric.upper()), f"ensemble of M Dice models: {metric}"))
    return Section(
        "Deep ensemble of Dice models",
        text="Each point is the mean over random subsets of M of the Dice models (band: the spread over "
        "subsets) of the same per-slice categorical NLL and foreground Dice as the tables. M = 1 averages single "
        "members drawn at random, so it is close to, not equal to, the `dice` row of the tables.",
        figures=figs,
    )


def _entropy_section(summary: dict, seg_ent: dict[str, np.ndarray], ids: list[str]) -> Section:
    """Per-case, per-class segment entropy vs Dice of the Dice model on the test and the shifted set."""
    classes = summary["classes"]
    ent = np.concatenate([seg_ent["dice"], seg_ent["dice_shifted"]])
    dice_case = []
    for name in ("dice", "dice_shifted"):
        cases = read_case_metrics(Path(summary["runs"][name]) / "cases.csv")
        dice_case.append(np.array([[cases[(cid, c)]["dice"] for c in classes] for cid in ids]))
    dice_all = np.concatenate(dice_case)
    groups = ["test"] * (len(ids) * len(classes)) + ["shifted"] * (len(ids) * len(classes))
    # the unit of the correlation: a subject on one set (its slices and classes averaged)
    subjects = [f"{g}:{re.match(SUBJECT_PATTERN, cid).group(1)}"  # type: ignore[union-attr]
                for g in ("test", "shifted") for cid in ids for _ in classes]
    ok = np.isfinite(ent.reshape(-1)) & np.isfinite(dice_all.reshape(-1))
    fig = entropy_dice_scatter(ent.reshape(-1)[ok], dice_all.reshape(-1)[ok],
                               groups=[g for g, k in zip(groups, ok, strict=True) if k],
                               subjects=[u for u, k in zip(subjects, ok, strict=True) if k])
    return Section("Segment entropy vs Dice, test and shifted", text="Points: slices × classes; r and p are "
                   "computed on subject means (one point per subject and set).", figures=[ReportFigure(fig, "")])


def _quality_section(summaries: dict[str, dict]) -> Section:
    test_names = [n for n in summaries if not n.endswith("_shifted")]
    fig = quality_scatter([summaries[n]["macro"]["dice"]["mean"]["mean"] for n in test_names],
                          [summaries[n]["macro"]["ace"]["mean"]["mean"] for n in test_names], test_names)
    return Section("Dice vs ACE (class means)", figures=[ReportFigure(fig, "")])


def _reference_predictors_section(summary: dict) -> list[Section]:
    """The reference predictors' table when ``summary`` has them (empty list otherwise)."""
    ref = summary.get("reference_predictors")
    if not ref:
        return []
    rows = [{"predictor": n, "against": a, "class": c, "ACE": e[a]["ace"][c], "NLL": e[a]["nll"]}
            for n, e in ref.items() for a in ("hard labels", "soft reference") for c in e[a]["ace"]]
    return [Section("Reference predictors (soft reference maps, tempered)", tables=[Table(rows)])]


def _more_section() -> Section:
    return Section(
        "More",
        text="Statistics tables and dataset reliability figures of every model: `compare/report.html`; the Dice "
        "model on test vs shifted: `compare_shift/report.html`; each model's per-slice numbers: "
        "`runs/<name>/cases.csv` and `runs/<name>/summary.json`; its probability maps: `predictions/<name>/` "
        "(score them again with `segcal evaluate predictions/<name> labels -o OUT`).",
    )


def _write_demo_report(output: Path, summary: dict, summaries: dict[str, dict], study: dict,
                       seg_ent: dict[str, np.ndarray], ids: list[str]) -> Path:
    """``output/report.html``: findings, papers-style tables, temperatures, ensemble curve, entropy scatter."""
    sections = [
        _findings_section(summary),
        _dice_change_section(summary),
        *_metric_sections(summary, list(summaries)),
        _training_section(summary),
        _ensemble_section(study),
        _entropy_section(summary, seg_ent, ids),
        _quality_section(summaries),
        *_reference_predictors_section(summary),
        _more_section(),
    ]
    html = render_html("segcal demo", sections)
    path = output / "report.html"
    write_text(path, html)
    return path


def run_demo(
    output: Path,
    *,
    quick: bool = False,
    seed: int = 0,
    num_bins: int = 20,
    epochs: int | None = None,
    calibrators: Sequence[str] = (),
) -> dict:
    """``segcal demo``: the full pipeline (:func:`run_full_demo`)."""
    return run_full_demo(output, quick=quick, seed=seed, num_bins=num_bins, epochs=epochs, calibrators=calibrators)
