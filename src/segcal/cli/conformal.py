"""``segcal conformal fit`` / ``apply`` / ``evaluate``: conformal risk control of the false-negative rate
(docs/conformal.md), thin over :class:`segcal.posthoc.ConformalRiskControl`.

A command group of its own rather than ``segcal calibrate --method crc``: ``calibrate`` fits a map from logits to
probabilities and writes calibrated probability maps in the input's format, marked as calibrated; conformal risk
control fits one threshold per class and writes binary masks, and its point is a guarantee that one checks on a
labelled test folder. Fitting once (``fit``, a calibrator file), applying to any folder later (``apply``) and
measuring the risk (``evaluate``) are three steps that each need different folders.

Folders use the formats of ``segcal calibrate`` (``--format auto`` detects each one); prediction files hold
probabilities or logits under the prediction-file contract (logits go through softmax, or sigmoid with
``--mode multilabel``); labels are label maps, or multi-hot ``(C, *S)`` for ``--mode multilabel``. Reading lives
in :mod:`segcal.posthoc.conformal` and :mod:`segcal.io`; the mask files are written by :mod:`segcal.io` writers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from segcal.cli import app
from segcal.cli.calibrate import InputFormat, PredKind, list_apply_cases, resolve_format

if TYPE_CHECKING:  # the computing layers are imported when a command runs, so `--help` stays instant

    from segcal.io import CaseFiles, FolderFormat
    from segcal.posthoc import ConformalReport, ConformalRiskControl

T = TypeVar("T")

console = Console()

conformal_app = typer.Typer(
    name="conformal",
    help="Conformal risk control: per-class masks whose expected false-negative (or false-discovery) rate is at "
    "most alpha "
    "(docs/conformal.md).",
    no_args_is_help=True,
)
app.add_typer(conformal_app, name="conformal")

#: the file written next to the masks: what they are and how they were made
MASKS_RECORD = "conformal.json"


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(1)


def _run(step: Callable[[], T]) -> T:
    """``step()``, printing its warnings; a ``ValueError`` / ``TypeError`` (a :class:`segcal.io.CaseError` names
    its file) or a missing file exits with code 1 and one message."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = step()
        except (ValueError, TypeError, FileNotFoundError) as exc:
            raise _fail(str(exc)) from None
    for w in caught:
        console.print(f"[yellow]warning:[/yellow] {escape(str(w.message))}", soft_wrap=True)
    return out


def _mode(mode: str) -> str:
    if mode not in ("exclusive", "multilabel"):
        raise typer.BadParameter(f"--mode must be exclusive or multilabel, got {mode!r}")
    return mode


def _match(pred: Path, labels: Path, fmt: FolderFormat, pred_option: str) -> list[CaseFiles]:
    """Cases of ``pred`` paired with ``labels`` (:func:`segcal.io.match_cases`); a prediction without a label is a
    bad parameter, and so is a folder without cases."""
    from segcal.io import CaseError, match_cases

    try:
        cases, unmatched = match_cases(pred, labels, fmt)
    except CaseError as exc:
        raise typer.BadParameter(str(exc)) from None
    if unmatched.get("prediction"):
        names = [Path(p).name for p in unmatched["prediction"][:5]]
        raise typer.BadParameter(f"labels missing in {labels} for prediction files {names} of {pred_option}")
    if not cases:
        raise typer.BadParameter(f"no cases found in {pred} ({pred_option}, format {fmt})")
    return cases


def _fmt(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.4f}"


def _load(crc_file: Path) -> ConformalRiskControl:
    from segcal.posthoc import ConformalRiskControl

    crc = _run(lambda: ConformalRiskControl.load(crc_file))
    crc.activation = None  # the commands hand it probabilities (logits files are converted when read)
    return crc  # type: ignore[return-value]


@conformal_app.command("fit")
def fit_command(
    cal_pred: Path = typer.Option(..., "--cal-pred", help="Folder of calibration predictions (probs or logits)."),
    cal_labels: Path = typer.Option(..., "--cal-labels", "--labels", help="Folder of the calibration labels."),
    alpha: float = typer.Option(0.1, "--alpha", help="Target false-negative rate, in (0, 1)."),
    output: Path = typer.Option(..., "-o", "--output", help="Calibrator file to write (e.g. crc.pt)."),
    mode: str = typer.Option("exclusive", help="exclusive (softmax classes) or multilabel (sigmoid regions)."),
    include_background: bool = typer.Option(
        False, "--include-background", help="Exclusive mode: also calibrate class 0."
    ),
    absent: str = typer.Option(
        "zero", help="Cases without the structure: zero (loss 0, counted) or skip (left out of the bound)."
    ),
    resolution: int = typer.Option(1 << 16, help="Grid of lambda: K steps (a power of two)."),
    loss: str = typer.Option("fnr", "--loss", help="fnr (false-negative rate) or fdr (false-discovery rate)."),
    fmt: InputFormat = typer.Option(InputFormat.auto, "--format", help="auto, nifti, npy or nnunet."),
    pred_kind: PredKind = typer.Option(PredKind.auto, "--pred-kind", help="What undeclared prediction files hold."),
) -> None:
    """Fit the per-class thresholds lambda_hat on calibration cases and save them (one case in memory at a time).

    Exit codes: 0 done; 1 a file is unusable or the options do not fit the data (the message says which);
    2 bad options or folders.
    """
    from segcal.functional.conformal import check_alpha, check_resolution
    from segcal.posthoc import ConformalRiskControl
    from segcal.posthoc.conformal import ConformalVolumes

    try:
        check_alpha(alpha, "--alpha")
        check_resolution(resolution)
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(str(exc).replace("resolution must", "--resolution must")) from None
    if absent not in ("zero", "skip"):
        raise typer.BadParameter(f"--absent must be zero or skip, got {absent!r}")
    if loss not in ("fnr", "fdr"):
        raise typer.BadParameter(f"--loss must be fnr or fdr, got {loss!r}")
    val_fmt = resolve_format(cal_pred, fmt)
    cases = _match(cal_pred, cal_labels, val_fmt, "--cal-pred")
    crc = ConformalRiskControl(
        alpha, mode=_mode(mode), include_background=include_background, absent=absent,  # type: ignore[arg-type]
        resolution=resolution, loss=loss,  # type: ignore[arg-type]
    )
    volumes = ConformalVolumes(cases, val_fmt, kind=pred_kind.value, mode=mode)  # type: ignore[arg-type]
    _run(lambda: crc.fit(volumes))
    _run(lambda: crc.save(output))
    table = Table(title=f"segcal conformal fit ({loss.upper()}, alpha={alpha}, {len(cases)} {val_fmt} cases)")
    for col in ("channel", "lambda_hat", "mask: p >=", "cases in bound", f"calibration {loss.upper()}", "bound met"):
        table.add_column(col)
    for j, ch in enumerate(crc.channels_):
        table.add_row(str(ch), f"{float(crc.lambdas_[j]):.5f}", f"{float(crc.thresholds_[j]):.5f}",
                      str(int(crc.n_[j])), _fmt(float(crc.calibration_risk_[j])),
                      "yes" if bool(crc.achievable_[j]) else "no")
    console.print(table)
    console.print(f"calibrator: {output}", soft_wrap=True)


def _mask_layout(n_channels: int) -> str:
    if n_channels == 1:
        return "one binary label map (*S) per case"
    return f"multi-hot (K, *S) per case (npz key 'label'; NIfTI (x, y, z, K)), K = {n_channels} channels in order"


@conformal_app.command("apply")
def apply_command(
    crc_file: Path = typer.Option(..., "--crc", help="Calibrator file written by `segcal conformal fit`."),
    pred: Path = typer.Option(..., "--pred", help="Folder of predictions to turn into conformal masks."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder for the masks."),
    fmt: InputFormat = typer.Option(InputFormat.auto, "--format", help="auto, nifti, npy or nnunet."),
    pred_kind: PredKind = typer.Option(PredKind.auto, "--pred-kind", help="What undeclared prediction files hold."),
) -> None:
    """Write the conformal masks (p_c >= threshold_c per calibrated class) of every prediction file, as label
    files with the prediction's geometry, and conformal.json describing them.

    Exit codes: 0 done; 1 a file is unusable (the message names it); 2 bad options or folders.
    """
    import torch

    from segcal.io import check_output_outside_inputs, prepare_output_dir
    from segcal.io.runs import write_json
    from segcal.io.volumes import write_mask_file
    from segcal.posthoc.conformal import read_probability_file

    try:
        check_output_outside_inputs(output, {"--pred": pred})
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    apply_fmt = resolve_format(pred, fmt)
    targets = list_apply_cases(pred, apply_fmt)
    crc = _load(crc_file)
    _run(lambda: prepare_output_dir(output))
    note = f"segcal conformal mask alpha={crc.alpha}"
    for paths in targets.values():
        path = paths[0]
        probs, p = _run(lambda f=path: read_probability_file(f, apply_fmt, kind=pred_kind.value, mode=crc.mode))
        masks = _run(lambda pr=probs: crc.predict_masks(torch.from_numpy(pr)[None])[0].numpy())
        _run(lambda f=path, m=masks, pp=p: write_mask_file(f, output, m, apply_fmt, pp, note))
    record: dict[str, Any] = {
        "method": "crc", "alpha": float(crc.alpha), "channels": list(crc.channels_),
        "loss": crc.loss, "thresholds": [float(v) for v in crc.thresholds_], "mode": crc.mode, "absent": crc.absent,
        "layout": _mask_layout(len(crc.channels_)), "calibrator": str(crc_file.resolve()),
        "pred": str(pred.resolve()), "cases": len(targets),
    }
    write_json(output / MASKS_RECORD, record)
    console.print(f"{len(targets)} conformal masks ({_mask_layout(len(crc.channels_))}) in {output}", soft_wrap=True)


def _report_table(rep: ConformalReport, n_cases: int) -> Table:
    name = rep.loss.upper()
    table = Table(title=f"segcal conformal evaluate ({name}, alpha={rep.alpha}, {n_cases} test cases)")
    for col in ("channel", "mask: p >=", "cases", "with structure", f"mean {name}", f"alpha - mean {name}",
                f"{name} (with structure)", "mask fraction"):
        table.add_column(col)
    for r in rep.rows():
        table.add_row(str(r["channel"]), f"{r['threshold']:.5f}", str(r["cases"]), str(r["cases_with_structure"]),
                      _fmt(r["mean_risk"]), _fmt(r["alpha"] - r["mean_risk"]), _fmt(r["mean_risk_with_structure"]),
                      _fmt(r["mean_mask_fraction"]))
    return table


@conformal_app.command("evaluate")
def evaluate_command(
    crc_file: Path = typer.Option(..., "--crc", help="Calibrator file written by `segcal conformal fit`."),
    test_pred: Path = typer.Option(..., "--test-pred", help="Folder of test predictions."),
    test_labels: Path = typer.Option(..., "--test-labels", help="Folder of the test labels."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Also write the report as JSON to this file."),
    fmt: InputFormat = typer.Option(InputFormat.auto, "--format", help="auto, nifti, npy or nnunet."),
    pred_kind: PredKind = typer.Option(PredKind.auto, "--pred-kind", help="What undeclared prediction files hold."),
) -> None:
    """Measure the empirical risk (FNR or FDR) of the conformal masks per class on a labelled test folder (the
    guarantee is on its expectation: compare the mean with alpha, allowing for the spread over cases).

    Exit codes: 0 done; 1 a file is unusable (the message names it); 2 bad options or folders.
    """
    from segcal.io.runs import write_json
    from segcal.posthoc.conformal import ConformalVolumes

    test_fmt = resolve_format(test_pred, fmt)
    cases = _match(test_pred, test_labels, test_fmt, "--test-pred")
    crc = _load(crc_file)
    volumes = ConformalVolumes(cases, test_fmt, kind=pred_kind.value, mode=crc.mode)  # type: ignore[arg-type]
    rep = _run(lambda: crc.report(volumes))
    console.print(_report_table(rep, len(cases)))
    if output is not None:
        per_case = [
            {"case": c.case_id, **{f"{rep.loss}_{ch}": float(rep.risk[i, j]) for j, ch in enumerate(rep.channels)}}
            for i, c in enumerate(cases)
        ]
        _run(lambda: write_json(output, {"alpha": rep.alpha, "absent": rep.absent, "channels": rep.rows(),
                                         "cases": per_case}))
        console.print(f"report: {output}", soft_wrap=True)
