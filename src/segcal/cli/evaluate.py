"""``segcal evaluate`` and ``segcal compare`` (docs/evaluation.md)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from segcal.cli import app

console = Console(stderr=True)

#: exit code when some cases failed (their errors are in summary.json / failed.csv)
EXIT_FAILED_CASES = 2


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _numbers(text: str, option: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{option} must be numbers separated by commas, got {text!r}") from None
    if not all(math.isfinite(v) for v in vals):
        raise typer.BadParameter(f"{option} must be finite numbers, got {text!r}")
    return vals


def _surface_options(surface: str | None, tolerance: str | None) -> dict[str, Any]:
    """``EvalConfig`` arguments of ``--surface`` / ``--nsd-tolerance-mm`` (``typer.BadParameter`` naming the
    option and the problem)."""
    from segcal.functional.surface import check_surface_metrics

    names: tuple[str, ...] = ()
    if surface is not None:
        try:
            names = check_surface_metrics(x for x in surface.split(",") if x.strip())
        except ValueError as exc:
            raise typer.BadParameter(f"--surface: {exc}") from None
        if not names:
            raise typer.BadParameter("--surface needs at least one of hd95, hd, assd, nsd")
    if tolerance is None:
        return {"surface": names}
    if "nsd" not in names:
        raise typer.BadParameter("--nsd-tolerance-mm is the tolerance of NSD: add nsd to --surface")
    tol = _numbers(tolerance, "--nsd-tolerance-mm")
    if any(t < 0 for t in tol):
        raise typer.BadParameter(f"--nsd-tolerance-mm must be >= 0 mm, got {tolerance!r}")
    return {"surface": names, "nsd_tolerance_mm": tol}


def _margins(text: str) -> tuple[float, ...]:
    vals = _numbers(text, "--bbox-margin-mm")
    if not vals or any(v < 0 for v in vals):
        raise typer.BadParameter(f"--bbox-margin-mm must be non-negative, got {text!r}")
    return vals


def _spacing(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    vals = _numbers(text, "--spacing")
    if not 1 <= len(vals) <= 3 or any(v <= 0 for v in vals):
        raise typer.BadParameter(f"--spacing must be 1 to 3 positive voxel sizes in mm (e.g. 1,1,2.5), got {text!r}")
    return vals


def _class_names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(","))
    if any(not n for n in names):
        raise typer.BadParameter(f"--class-names must be names separated by commas, none empty, got {text!r}")
    return names


def _check_options(fmt: str, region: str, mask_dir: Path | None, group_by: str | None, groups: Path | None) -> None:
    if fmt not in ("auto", "nifti", "npy", "nnunet"):
        raise typer.BadParameter(f"--format must be auto, nifti, npy or nnunet, got {fmt!r}")
    if region not in ("whole", "bbox", "mask", "band"):
        raise typer.BadParameter(f"--region must be whole, bbox, mask or band, got {region!r}")
    if region == "mask" and mask_dir is None:
        raise typer.BadParameter("--region mask needs --mask-dir")
    if group_by is not None and groups is not None:
        raise typer.BadParameter("give --group-by or --groups, not both")


@app.command()
def evaluate(
    pred: Path = typer.Argument(
        ..., help="Folder of predicted probability maps.", exists=True, file_okay=False
    ),
    labels: Path = typer.Argument(
        ..., help="Folder of label maps (NIfTI or NumPy).", exists=True, file_okay=False
    ),
    out: Path = typer.Option(
        ..., "-o", "--out", help="Output folder (results.sqlite, cases.csv, summary.json...)."
    ),
    ensemble_with: list[Path] | None = typer.Option(
        None,
        "--ensemble-with",
        help="Another prediction folder of the same cases (repeat it: the folds of an nnU-Net model, PRED being "
        "the first); each case is scored on the voxel-wise mean of the folders' probability maps. A case missing "
        "in one folder fails naming it.",
        exists=True,
        file_okay=False,
    ),
    fmt: str = typer.Option(
        "auto", "--format", help="Prediction format: auto, nifti (4D or one file per class), npy, nnunet."
    ),
    bins: int = typer.Option(20, "--bins", min=1, help="Number of equal-width probability bins M."),
    regions: str | None = typer.Option(
        None, "--regions", help='Region channels from label sums, e.g. "ET=3;TC=1,3;WT=1,2,3" (BraTS).'
    ),
    nnunet_regions: bool = typer.Option(
        False,
        "--nnunet-regions",
        help="The predictions are nnU-Net region-based sigmoid outputs (one channel per region): score each "
        "channel against its region, read from the prediction folder's dataset.json (or from --regions).",
    ),
    nnunet_segmentations: bool = typer.Option(
        False,
        "--nnunet-segmentations",
        help="Score the overlap metrics (Dice, IoU, precision, recall, HD95) on the segmentations nnU-Net exported "
        "beside each case.npz (case.nii.gz, possibly post-processed) instead of the argmax of the probabilities; "
        "the calibration metrics keep the probabilities. nnU-Net folders only.",
    ),
    ignore_label: int | None = typer.Option(
        None,
        "--ignore-label",
        help="A label value of unknown class (nnU-Net's 'ignore' label, read from the prediction folder's "
        "dataset.json when it has one): its voxels are left out of every metric, and out of the predicted surfaces.",
    ),
    class_names: str | None = typer.Option(
        None,
        "--class-names",
        help="Names of the label values 0..C-1, background included, e.g. background,CSF,GM,WM (labels only: "
        "the class channels are scored as without names). Default: a segcal.json sidecar's class_names, else "
        "an nnU-Net dataset.json's labels.",
    ),
    group_by: str | None = typer.Option(
        None,
        "--group-by",
        help="Group the cases into subjects (the statistical unit) by a regular expression on the case id: its "
        "first capture group, or the whole match, is the subject, e.g. '^(sub-\\d+)_'. Writes subjects.csv and "
        "a subject-level summary. Default: each case is its own subject.",
    ),
    groups: Path | None = typer.Option(
        None, "--groups", help="Group the cases into subjects by a CSV file with the columns case_id,subject."
    ),
    include_background: bool = typer.Option(False, "--include-background", help="Also score class 0."),
    region: str = typer.Option(
        "whole", "--region", help="Where metrics are computed: whole, bbox, mask or band (near the boundary)."
    ),
    band_mm: float = typer.Option(
        2.0, "--band-mm", min=0.0, help="With --region band: the voxels within this many mm of the boundary."
    ),
    band_boundary: str = typer.Option(
        "reference",
        "--band-boundary",
        help="With --region band: the boundary of the reference, of the prediction (argmax) or their union.",
    ),
    peer_metrics: bool = typer.Option(
        False,
        "--peer-metrics",
        help="Also compute the metrics of the peers: class-wise ECE (cw_ece), root Brier score (rbs), smooth "
        "ECE, equal-mass ECE (adaptive_ece, with its error bound), mean entropy / confidence, and AURC / E-AURC "
        "in summary.json.",
    ),
    fine_bins: int = typer.Option(
        1000, "--fine-bins", min=1, help="With --peer-metrics: fine bins the equal-mass bins are formed from."
    ),
    bbox_margin_mm: str = typer.Option(
        "8,8,4", "--bbox-margin-mm", help="Bounding-box margins in mm per axis."
    ),
    spacing: str | None = typer.Option(
        None,
        "--spacing",
        help="Voxel size in mm per axis (e.g. 1,1,2.5) for files without geometry (NumPy) when no segcal.json "
        "sidecar states it; never overrides a file's own geometry (a contradiction fails the case).",
    ),
    mask_dir: Path | None = typer.Option(
        None, "--mask-dir", help="Folder of region masks (with --region mask)."
    ),
    soft_ref: Path | None = typer.Option(
        None,
        "--soft-ref",
        help="Folder of soft reference probability maps (calibration against them, plus MAE).",
    ),
    workers: int | None = typer.Option(
        None, "--workers", min=0, help="Local worker processes (default: all cores; 0 = in this process)."
    ),
    dask: str | None = typer.Option(
        None, "--dask", help="Address of an existing Dask scheduler (tcp://host:port)."
    ),
    no_hd95: bool = typer.Option(
        False, "--no-hd95", help="Skip the 95% Hausdorff distance (the slowest metric)."
    ),
    surface: str | None = typer.Option(
        None,
        "--surface",
        help="Surface metrics to compute besides HD95, comma-separated: hd95, hd (Hausdorff), assd (average "
        "symmetric surface distance), nsd (normalised surface Dice); whole image, mm.",
    ),
    nsd_tolerance_mm: str | None = typer.Option(
        None,
        "--nsd-tolerance-mm",
        help="NSD tolerance in mm: one value for every scored class, or one per scored class (comma-separated). "
        "Default 1.0; needs nsd in --surface.",
    ),
    no_report: bool = typer.Option(False, "--no-report", help="Do not build the HTML report."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Discard results of another configuration in OUT."
    ),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Recompute cases recorded as failed."),
    hash_inputs: bool = typer.Option(
        False,
        "--hash-inputs",
        help="Also fingerprint input files by content (SHA-256) when deciding what to resume; slower, catches "
        "a file rewritten with the same size and time.",
    ),
    dask_timeout: float = typer.Option(
        30.0, "--dask-timeout", min=0.1, help="Seconds to wait for the Dask scheduler and its first worker."
    ),
) -> None:
    """Evaluate a folder of predictions against labels: per-case CSV, summary JSON, bin sums, report.

    Resumable: rerunning the same command reuses the cases already in OUT whose configuration and input files
    are unchanged, recomputes changed ones and drops vanished ones. OUT is locked while the run uses it. Exit
    code 2 if any case failed or none matched, 1 if the run could not start.
    """
    from segcal.evaluation import (
        ConfigMismatchError,
        DaskClusterError,
        EvalConfig,
        RunLockedError,
        run_evaluation,
    )
    from segcal.functional.regions import parse_region_spec
    from segcal.io import CaseError, detect_format

    _check_options(fmt, region, mask_dir, group_by, groups)
    names = region_groups = None
    if regions:
        try:
            n, g = parse_region_spec(regions)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        names, region_groups = tuple(n), tuple(tuple(x) for x in g)
    resolved = detect_format(pred) if fmt == "auto" else fmt
    if nnunet_segmentations and resolved != "nnunet":
        raise typer.BadParameter(f"--nnunet-segmentations reads nnU-Net prediction folders; {pred} is {resolved}")
    try:
        config = EvalConfig(
            fmt=resolved,  # type: ignore[arg-type]
            num_bins=bins,
            region_names=names,
            regions=region_groups,
            include_background=include_background,
            region=region,  # type: ignore[arg-type]
            bbox_margin_mm=_margins(bbox_margin_mm),
            hd95=not no_hd95,
            soft_reference=soft_ref is not None,
            spacing=_spacing(spacing),
            nnunet_regions=nnunet_regions,
            band_mm=band_mm,
            band_boundary=band_boundary,  # type: ignore[arg-type]
            peer_metrics=peer_metrics,
            fine_bins=fine_bins,
            nnunet_segmentations=nnunet_segmentations,
            ignore_label=ignore_label,
            **_surface_options(surface, nsd_tolerance_mm),
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        res = run_evaluation(
            pred,
            labels,
            out,
            config,
            class_names=_class_names(class_names),
            group_by=group_by,
            groups=groups,
            reference_dir=soft_ref,
            mask_dir=mask_dir if region == "mask" else None,
            ensemble_dirs=ensemble_with or None,
            workers=workers,
            dask_address=dask,
            dask_timeout=dask_timeout,
            overwrite=overwrite,
            retry_failed=retry_failed,
            hash_inputs=hash_inputs,
        )
    except (ConfigMismatchError, RunLockedError, DaskClusterError, CaseError, ValueError) as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    for role, files in res.unmatched.items():
        console.print(f"[yellow]{len(files)} {role} file(s) without partner[/], e.g. {escape(str(files[0]))}")
    _print_summary(res.summary, res)
    warning = res.summary.get("geometry", {}).get("warning")
    if warning:
        console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    if not no_report:
        from segcal.report import build_evaluation_report

        path = build_evaluation_report(Path(out))
        console.print(f"report: {escape(str(path))}")
    if res.n_cases == 0:
        console.print(f"[red]no case matched[/] between {escape(str(pred))} and {escape(str(labels))}")
    if res.n_failed or res.n_cases == 0:
        raise typer.Exit(EXIT_FAILED_CASES)


def _macro_and_unit(summary: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The macro summary over the statistical unit (subjects when grouped, else cases) and its name."""
    sub = summary.get("subject_macro")
    if isinstance(sub, dict):
        return sub.get("metrics", {}), f"{sub.get('n')} subjects ({sub.get('n_cases')} cases)"
    return summary.get("macro", {}), f"{summary.get('n_ok', 0)} cases, each its own subject"


def _print_summary(summary: dict[str, Any], res: Any) -> None:
    macro, unit = _macro_and_unit(summary)
    table = Table(
        title=escape(str(res.out_dir)), caption=escape(f"macro: mean [bootstrap 95% CI] over {unit}")
    )
    table.add_column("class")
    cols = [
        ("dice", "macro"),
        ("hd95", "macro"),
        ("ece", "macro"),
        ("ace", "macro"),
        ("mce", "macro"),
        ("ace", "pooled"),
        ("ece", "pooled"),
    ]
    surface = (summary.get("config") or {}).get("surface") or ()
    cols[2:2] = [(m, "macro") for m in ("hd", "assd", "nsd") if m in surface]
    for m, kind in cols:
        table.add_column(f"{m.upper()} ({kind})", justify="right")
    pooled = summary.get("pooled", {})
    for cls in [*summary.get("class_names", []), "mean"]:
        cells = []
        for m, kind in cols:
            if kind == "macro":
                s = macro.get(m, {}).get(cls)
                cells.append(
                    "n/a"
                    if s is None
                    else f"{_fmt(s['mean'])} [{_fmt(s['ci_low'], 3)}, {_fmt(s['ci_high'], 3)}]"
                )
            else:
                cells.append(_fmt(pooled.get(m, {}).get(cls)))
        table.add_row(escape(cls), *cells)
    Console().print(table)
    grouping = summary.get("grouping") or {}
    if grouping.get("unit") == "subject":
        console.print(
            f"statistical unit: subject ({grouping.get('n')} subjects, {escape(str(grouping.get('description')))}); "
            "per-subject values in subjects.csv",
            soft_wrap=True,
        )
    elif grouping:
        console.print(f"[yellow]statistical unit: case[/] ({escape(str(grouping.get('note')))})", soft_wrap=True)
    if summary.get("class_names_from"):
        console.print(f"class names from {escape(summary['class_names_from'])}", soft_wrap=True)
    for f in summary.get("failed", [])[:10]:
        console.print(f"[red]failed[/] {escape(f['case_id'])}: {escape(f['error'])}", soft_wrap=True)
    extra = f", {len(res.stale)} recomputed (inputs changed)" if res.stale else ""
    extra += f", {len(res.vanished)} dropped (inputs gone)" if res.vanished else ""
    console.print(
        f"{res.n_ok} ok, {res.n_failed} failed, {res.n_skipped} resumed, {res.n_computed} computed{extra}",
        soft_wrap=True,
    )


#: the metrics of the terminal comparison table (comparison.csv has them all)
_TABLE_METRICS = ("dice", "hd95", "nsd", "ece", "ace", "mce", "brier", "nll", "top_label_ece")


def _comparison_table(comp: dict[str, Any]) -> Table:
    """The terminal table: the table metrics' rows, each with its unit and n next to the p-values."""
    from segcal.evaluation.compare import format_change

    grouping = comp.get("grouping") or {}
    unit = comp.get("unit", "case")
    title = f"comparison (B vs baseline A); statistical unit: {unit}"
    if unit == "subject":
        title += f" ({grouping.get('n')} subjects)"
    table = Table(title=escape(title))
    for col in ("run B", "metric", "class", "mean A", "mean B", "change", "95% CI", "p Wilcoxon", "p Holm", "n"):
        table.add_column(col, justify="right" if col not in ("run B", "metric", "class") else "left")
    for r in comp["rows"]:
        if r["metric"] not in _TABLE_METRICS:
            continue
        ci = f"[{format_change(r.get('rel_ci_low', math.nan))}, {format_change(r.get('rel_ci_high', math.nan))}]"
        table.add_row(
            escape(Path(r["run_b"]).name),
            r["metric"],
            escape(r["class"]),
            _fmt(r["mean_a"]),
            _fmt(r["mean_b"]),
            format_change(r["rel_change"]),
            ci,
            _fmt(r["p_wilcoxon"], 3),
            _fmt(r["p_holm"], 3),
            f"{r['n']} {r.get('unit', 'case')}s",
        )
    return table


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="Evaluated run folders; the first is the baseline."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (comparison.csv, comparison.json)."),
    intersection: bool = typer.Option(
        False, "--intersection", help="Compare only the cases common to all runs."
    ),
    group_by: str | None = typer.Option(
        None,
        "--group-by",
        help="Pair the runs by subject: a regular expression on the case id whose first capture group (or whole "
        "match) is the subject, applied to every run. Default: the grouping the runs were evaluated with (it "
        "must be the same), else each case is its own subject.",
    ),
    groups: Path | None = typer.Option(
        None, "--groups", help="Pair the runs by subject from a CSV file with the columns case_id,subject."
    ),
    min_change: float = typer.Option(
        5.0,
        "--min-change",
        min=0.0,
        help="The report colours a change only if its Holm p < 0.05 and |relative change| >= this many percent.",
    ),
    no_report: bool = typer.Option(False, "--no-report", help="Do not build the HTML comparison report."),
) -> None:
    """Paired statistics (Wilcoxon, rank-sum, effect sizes, Holm, bootstrap CIs) of runs 2..n against run 1,
    over subjects when the cases are grouped into subjects, else over cases."""
    from segcal.evaluation.compare import compare_runs, write_comparison

    if group_by is not None and groups is not None:
        raise typer.BadParameter("give --group-by or --groups, not both")
    try:
        comp = compare_runs(list(runs), intersection=intersection, group_by=group_by, groups=groups)
    except ValueError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    files = write_comparison(comp, out)
    Console().print(_comparison_table(comp))
    if comp.get("unit") != "subject":
        note = (comp.get("grouping") or {}).get("note", "")
        console.print(f"[yellow]statistical unit: case[/] ({escape(note)})", soft_wrap=True)
    console.print(f"written: {escape(str(files['csv']))}, {escape(str(files['json']))}")
    if not no_report:
        from segcal.report import build_comparison_report

        path = build_comparison_report([Path(r) for r in runs], Path(out), comp, min_change=min_change / 100)
        console.print(f"report: {escape(str(path))}")
