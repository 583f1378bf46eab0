"""The ``segcal demo`` pipeline on the embedded MNI152 brain-tissue task (:mod:`segcal.data.mni152`).

Reference section (:func:`reference_predictors`): evaluate, on the test pseudo-subjects, the calibration of
probability predictors derived from the soft reference tissue maps — the reference itself, an over-confident
sharpened version and an under-confident smoothed version — against the hard labels and against the soft
reference. The full demo (:func:`run_full_demo`, docs/demo.md) trains and calibrates networks. Everything
printed or plotted is computed in the run.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from segcal.metrics import MetricResult, SegmentationCalibrationMetric

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


# Batch 4 (not 8): the number of optimizer steps, not epochs, is what the tiny task is short of. With batch 8
# and 15 epochs the quick models saw 60 steps and stayed under-confident (fitted T < 1 for every loss) and
# Dice + mL1-ACE had not left the "predict the class prior" plateau (see docs/demo.md).
FULL = DemoSize(n_subjects=14, split=(8, 3, 3), slices_per_subject=16, epochs=20, channels=(8, 16, 32, 64))
QUICK = DemoSize(n_subjects=6, split=(3, 1, 2), slices_per_subject=10, epochs=20, channels=(8, 16, 32, 64))


def _case_ids(split) -> list[str]:
    return [f"s{int(s):02d}_z{int(z):03d}" for s, z in zip(split.subjects, split.slices, strict=True)]


@torch.no_grad()
def _logits(model: torch.nn.Module, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Raw logits ``(N, C, H, W)`` of ``model`` on ``images (N, 1, H, W)`` (eval mode, whole slices)."""
    model.eval()
    return torch.cat([model(images[i : i + batch]) for i in range(0, images.shape[0], batch)])


def _write_predictions(folder: Path, probs: torch.Tensor, case_ids: list[str]) -> Path:
    import numpy as np

    from segcal.io import write_numpy_probabilities

    folder.mkdir(parents=True, exist_ok=True)
    arr = probs.to(torch.float32).numpy()
    for cid, p in zip(case_ids, arr, strict=True):
        p = p / p.sum(0, keepdims=True)
        write_numpy_probabilities(folder / f"{cid}.npz", p.astype(np.float32), compressed=False)
    return folder


def _write_labels(folder: Path, labels, case_ids: list[str]) -> Path:
    import numpy as np

    from segcal.io import write_numpy

    folder.mkdir(parents=True, exist_ok=True)
    for cid, y in zip(case_ids, labels, strict=True):
        write_numpy(folder / f"{cid}.npy", np.asarray(y, dtype=np.int64))
    return folder


def _mean_std(summary: dict, metric: str, classes: list[str]) -> dict[str, str]:
    """``mean ± std`` over test cases per class and for the per-case class average (papers' tables)."""
    d = summary["macro"].get(metric, {})
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


def compute_findings(results: dict) -> list[dict]:
    """The papers' qualitative findings, each measured from ``results`` (built by :func:`run_full_demo`).

    Returns one dict per finding: ``key``, ``claim``, ``held`` (bool) and ``text`` (numbers of this run).
    """
    cmp_test = results["comparison_test"]
    temps = results["temperatures"]
    findings: list[dict] = []

    def add(key: str, claim: str, held: bool, text: str) -> None:
        findings.append({"key": key, "claim": claim, "held": bool(held), "text": text})

    # 1. Dice-only more over-confident than CE: higher ACE and fitted temperature > 1
    r = _row(cmp_test, "ce", "ace")
    ace_dice, ace_ce = (r["mean_a"], r["mean_b"]) if r else (float("nan"), float("nan"))
    t_dice, t_ce = temps["dice"], temps["ce"]
    add(
        "dice_overconfident",
        "Dice-only training is more over-confident than CE (higher ACE, fitted temperature > 1)",
        ace_dice > ace_ce and t_dice > 1.0 and t_dice > t_ce,
        f"ACE (class mean) Dice {ace_dice:.4f} vs CE {ace_ce:.4f} (Wilcoxon p={r['p_wilcoxon']:.3g}); fitted "
        f"temperature Dice T={t_dice:.2f}, CE T={t_ce:.2f}" if r else "CE run missing",
    )
    # 2. Dice + mL1-ACE lowers marginal ACE vs Dice (hard and soft)
    for name, label in (("dice+hard_ace", "hard"), ("dice+soft_ace", "soft")):
        r = _row(cmp_test, name, "ace")
        rd = _row(cmp_test, name, "dice")
        if r is None or rd is None:
            continue
        add(
            f"{label}_ace_lowers_ace",
            f"Adding {label} mL1-ACE to Dice lowers marginal ACE",
            r["mean_b"] < r["mean_a"],
            f"Dice+{label} ACE changed ACE by {_pct(r['rel_change'])} vs Dice "
            f"({r['mean_a']:.4f} → {r['mean_b']:.4f}, p={r['p_wilcoxon']:.3g}); Dice changed by "
            f"{100 * (rd['mean_b'] - rd['mean_a']):+.1f} pt",
        )
    # 3. DSC++ lowers NLL vs Dice
    r = _row(cmp_test, "dscpp", "nll", "case")
    if r is not None:
        add(
            "dscpp_lowers_nll",
            "DSC++ lowers NLL vs Dice",
            r["mean_b"] < r["mean_a"],
            f"NLL Dice {r['mean_a']:.4f} → DSC++ {r['mean_b']:.4f} ({_pct(r['rel_change'])}, "
            f"p={r['p_wilcoxon']:.3g})",
        )
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
        "NLL by M: " + ", ".join(f"M={m}: {v:.4f}" for m, v in zip(sizes, nll, strict=True)),
    )
    # 5. shift: calibration worse, segment entropy higher
    r = _row(results["comparison_shift"], "dice_shifted", "ace")
    ent = results["entropy"]
    add(
        "shift_calibration",
        "Calibration is worse on the shifted set",
        r is not None and r["mean_b"] > r["mean_a"],
        f"Dice model ACE test {r['mean_a']:.4f} → shifted {r['mean_b']:.4f} ({_pct(r['rel_change'])}, "
        f"p={r['p_wilcoxon']:.3g})" if r else "shifted run missing",
    )
    add(
        "shift_entropy",
        "Segment entropy rises on the shifted set",
        ent["shifted"] > ent["test"],
        f"mean foreground segment entropy (Dice model) test {ent['test']:.4f} → shifted {ent['shifted']:.4f}",
    )
    return findings


def run_full_demo(
    output: Path,
    *,
    quick: bool = False,
    seed: int = 0,
    num_bins: int = 20,
    epochs: int | None = None,
    shift: tuple[str, int] = ("noise", 3),
) -> dict:
    """The full ``segcal demo``: train, calibrate, ensemble, evaluate, compare, report (see docs/demo.md).

    Writes into ``output``: ``models/<name>/`` (trainer outputs), ``predictions/<run>/`` and ``labels/``,
    ``runs/<run>/`` (evaluation runs), ``compare/report.html`` (test comparison vs Dice),
    ``compare_shift/report.html``, ``report.html`` (the demo report with findings), ``summary.json``.
    Returns the summary dict.
    """
    import numpy as np
    from rich.console import Console

    from segcal.data.mni152 import load_tissue_dataset, make_shifted
    from segcal.evaluation import EvalConfig, compare_runs, run_evaluation
    from segcal.evaluation.compare import write_comparison
    from segcal.functional.uncertainty import segment_mean_entropy
    from segcal.posthoc import TemperatureScaling, ensemble_probabilities, ensemble_size_study
    from segcal.posthoc.mc_dropout import insert_dropout_unet, mc_predict
    from segcal.report import build_comparison_report
    from segcal.training import load_checkpoint, train

    console = Console()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    size = QUICK if quick else FULL
    n_epochs = int(epochs) if epochs is not None else size.epochs
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    with console.status("building the embedded MNI152 tissue data (cached after the first run)"):
        ds = load_tissue_dataset(
            n_subjects=size.n_subjects, split=size.split, seed=seed, slices_per_subject=size.slices_per_subject
        )
    shifted = make_shifted(ds.test, shift[0], shift[1], seed=seed)
    x_tr, y_tr = ds.train.images, ds.train.labels
    x_va, y_va = ds.val.images, ds.val.labels
    x_te = torch.as_tensor(ds.test.images)
    x_sh = torch.as_tensor(shifted.images)
    y_te = torch.as_tensor(ds.test.labels)
    ids = _case_ids(ds.test)
    console.print(
        f"[bold]segcal demo[/bold]{' --quick' if quick else ''}: train {len(x_tr)} / val {len(x_va)} / test "
        f"{len(ids)} slices of {tuple(x_te.shape[2:])}; shifted set = test with {shift[0]} severity {shift[1]}; "
        f"{n_epochs} epochs, UNet {'-'.join(map(str, size.channels))}"
    )
    timings["data"] = time.perf_counter() - t0

    def config(name: str, loss: str, model_seed: int) -> dict:
        return {
            "loss": loss,
            "epochs": n_epochs,
            "seed": model_seed,
            "output_dir": str(output / "models" / name),
            "progress": False,
            "model": {"channels": list(size.channels), "strides": [2] * (len(size.channels) - 1),
                      "num_res_units": 1, "out_channels": 4},
            "data": {"batch_size": size.batch_size},
            "optim": {"lr": size.lr},
        }

    models: dict[str, torch.nn.Module] = {}
    train_log: dict[str, dict] = {}
    jobs = [(name, loss, seed) for name, loss in LOSSES]
    jobs += [(f"dice_member{k}", "dice", seed + k) for k in range(1, size.ensemble_members)]
    t = time.perf_counter()
    for name, loss, model_seed in jobs:
        ts = time.perf_counter()
        res = train(config(name, loss, model_seed), (x_tr, y_tr), (x_va, y_va), resume=False)
        # the best validation Dice checkpoint (train() returns the last epoch's weights)
        best = load_checkpoint(res.output_dir / "best.pt")
        res.model.load_state_dict(best["model"])
        models[name] = res.model.cpu().eval()
        train_log[name] = {"loss": loss, "seed": model_seed, "best_val_dice": float(res.best_dice),
                           "best_epoch": int(res.best_epoch), "seconds": round(time.perf_counter() - ts, 1)}
        console.print(f"  trained {name:<16} loss={loss:<14} val Dice {res.best_dice:.3f} "
                      f"({train_log[name]['seconds']} s)")
    timings["training"] = time.perf_counter() - t

    # --- predictions ------------------------------------------------------------------------------------
    t = time.perf_counter()
    probs: dict[str, torch.Tensor] = {}
    temperatures: dict[str, float] = {}
    for name, _ in LOSSES:
        lg = _logits(models[name], x_te)
        probs[name] = torch.softmax(lg, 1)
        ts_model = TemperatureScaling(max_voxels_per_volume=4000, seed=seed)
        ts_model.fit(_logits(models[name], torch.as_tensor(x_va)), torch.as_tensor(y_va))
        temperatures[name] = float(ts_model.temperature_)
        probs[f"{name}+ts"] = ts_model.transform(lg)
    members = [probs["dice"]] + [
        torch.softmax(_logits(models[f"dice_member{k}"], x_te), 1) for k in range(1, size.ensemble_members)
    ]
    probs[f"dice_ensemble{size.ensemble_members}"] = ensemble_probabilities(members)
    study = ensemble_size_study(members, y_te, sizes=list(range(1, size.ensemble_members + 1)),
                                n_resamples=10, seed=seed)
    import copy

    dropout_net = copy.deepcopy(models["dice"])
    insert_dropout_unet(dropout_net, "decoder", p=0.2)
    probs["dice_mc_dropout"] = mc_predict(dropout_net, x_te, n_samples=size.mc_samples, seed=seed)["mean"]
    probs["dice_shifted"] = torch.softmax(_logits(models["dice"], x_sh), 1)
    shifted_members = [probs["dice_shifted"]] + [
        torch.softmax(_logits(models[f"dice_member{k}"], x_sh), 1) for k in range(1, size.ensemble_members)
    ]
    probs[f"dice_ensemble{size.ensemble_members}_shifted"] = ensemble_probabilities(shifted_members)
    probs["dice+hard_ace_shifted"] = torch.softmax(_logits(models["dice+hard_ace"], x_sh), 1)
    entropy = {
        "test": float(np.nanmean(segment_mean_entropy(probs["dice"]).numpy())),
        "shifted": float(np.nanmean(segment_mean_entropy(probs["dice_shifted"]).numpy())),
    }
    seg_ent = {k: segment_mean_entropy(probs[k]).numpy() for k in ("dice", "dice_shifted")}
    timings["prediction"] = time.perf_counter() - t

    # --- evaluation runs (segcal.evaluation) -------------------------------------------------------------
    t = time.perf_counter()
    label_dir = _write_labels(output / "labels", ds.test.labels, ids)
    cfg = EvalConfig(fmt="npy", num_bins=num_bins, hd95=False, region_names=("CSF", "GM", "WM"),
                     regions=((1,), (2,), (3,)))
    run_dirs: dict[str, Path] = {}
    summaries: dict[str, dict] = {}
    for name, p in probs.items():
        pred_dir = _write_predictions(output / "predictions" / name, p, ids)
        res = run_evaluation(pred_dir, label_dir, output / "runs" / name, cfg, workers=0, overwrite=True,
                             progress=False)
        run_dirs[name] = output / "runs" / name
        summaries[name] = res.summary
    timings["evaluation"] = time.perf_counter() - t

    # --- comparisons and reports -------------------------------------------------------------------------
    t = time.perf_counter()
    test_runs = [n for n in probs if not n.endswith("_shifted")]
    comparison_test = compare_runs([run_dirs[n] for n in test_runs])
    write_comparison(comparison_test, output / "compare")
    comparison_test_named = {**comparison_test, "runs": test_runs}
    build_comparison_report([run_dirs[n] for n in test_runs], output / "compare", comparison_test_named)
    shift_pairs = ["dice", "dice_shifted"]
    comparison_shift = compare_runs([run_dirs[n] for n in shift_pairs])
    write_comparison(comparison_shift, output / "compare_shift")
    build_comparison_report([run_dirs[n] for n in shift_pairs], output / "compare_shift",
                            {**comparison_shift, "runs": shift_pairs})
    results = {
        "comparison_test": comparison_test,
        "comparison_shift": comparison_shift,
        "temperatures": temperatures,
        "ensemble_study": study,
        "entropy": entropy,
    }
    findings = compute_findings(results)
    classes = list(summaries["dice"]["macro"]["dice"].keys())
    classes = [c for c in classes if c not in ("mean", "case")]
    tables = {
        name: {m: _mean_std(s, m, classes) for m in ("dice", "ece", "ace", "mce", "brier", "nll")}
        for name, s in summaries.items()
    }
    summary = {
        "quick": quick,
        "seed": seed,
        "num_bins": num_bins,
        "epochs": n_epochs,
        "size": size.__dict__ | {"epochs": n_epochs},
        "shift": list(shift),
        "classes": classes,
        "training": train_log,
        "temperatures": temperatures,
        "ensemble_study": {str(m): v for m, v in study.items()},
        "segment_entropy": entropy,
        "findings": findings,
        "tables": tables,
        "runs": {n: str(d) for n, d in run_dirs.items()},
    }
    _write_demo_report(output, summary, summaries, study, seg_ent, ds, probs, x_te, ids)
    timings["reports"] = time.perf_counter() - t

    # the reference section's predictors (scored against hard labels and the soft reference)
    t = time.perf_counter()
    summary["reference_predictors"] = _reference_section(ds.test, num_bins)
    timings["reference_predictors"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    summary["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    (output / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    _print_findings(console, findings, summary)
    console.print(f"wrote {output / 'report.html'}, {output / 'compare' / 'report.html'} and "
                  f"{output / 'summary.json'} ({summary['seconds']['total']} s)")
    return summary


def _reference_section(test, num_bins: int) -> dict:
    soft = torch.as_tensor(test.soft, dtype=torch.float64)
    labels = torch.as_tensor(test.labels)
    case_ids = _case_ids(test)
    out: dict = {}
    for pred in reference_predictors(soft):
        entry: dict = {"description": pred.description}
        for against, target in (("hard labels", labels), ("soft reference", soft)):
            res = _evaluate(pred, target, case_ids, num_bins)
            entry[against] = {
                k: {name: float(v) for name, v in zip(res.class_names, res.macro[k].tolist(), strict=False)}
                for k in ("ece", "ace", "mce", "brier", "dice")
            }
            entry[against]["nll"] = float(res.macro["nll"][0])
        out[pred.name] = entry
    return out


def _print_findings(console, findings: list[dict], summary: dict) -> None:
    from rich.table import Table

    table = Table(title="Findings measured by this run")
    table.add_column("finding")
    table.add_column("held")
    table.add_column("numbers")
    for f in findings:
        table.add_row(f["claim"], "yes" if f["held"] else "[red]no[/red]", f["text"])
    console.print(table)


def _write_demo_report(output: Path, summary: dict, summaries: dict, study: dict, seg_ent: dict, ds,
                       probs: dict, x_te: torch.Tensor, ids: list[str]) -> Path:
    """``output/report.html``: findings, papers-style tables, temperatures, ensemble curve, entropy scatter."""
    import numpy as np

    from segcal.plots import ensemble_size_curve, entropy_dice_scatter, quality_scatter
    from segcal.report.html import ReportFigure, Section, Table, render_html

    classes = summary["classes"]
    sections = []
    text = "\n".join(
        f"- **{'held' if f['held'] else 'did NOT hold'}**: {f['claim']}. {f['text']}." for f in summary["findings"]
    )
    sections.append(Section(
        "Findings (generated from this run's numbers)",
        text="Every number below was measured by this run (seed "
        f"{summary['seed']}, {summary['epochs']} epochs{', --quick' if summary['quick'] else ''}).\n\n" + text,
    ))
    for metric, title in (("dice", "Dice"), ("ace", "ACE"), ("ece", "ECE"), ("mce", "MCE"), ("brier", "Brier"),
                          ("nll", "NLL")):
        rows = []
        for name in summaries:
            cells = summary["tables"][name][metric]
            row = {"model": name}
            if metric == "nll":
                row["per case"] = cells.get("case", "")
            else:
                row.update({c: cells.get(c, "") for c in classes})
                row["average"] = cells.get("mean", "")
            rows.append(row)
        sections.append(Section(f"{title} on the test set (mean ± std over test slices)",
                                tables=[Table(rows, caption=f"{title}: mean ± std per class and class average")]))
    sections.append(Section(
        "Training and temperature scaling",
        text="Temperature fitted on the validation slices by minimising the NLL (T > 1: the model was "
        "over-confident).",
        tables=[Table([{"model": n, **{k: v for k, v in log.items()},
                        "fitted T": round(summary["temperatures"].get(n, float("nan")), 3)}
                       for n, log in summary["training"].items()], caption="training runs")],
    ))
    sizes = sorted(study)
    figs = []
    for metric in ("nll", "dice"):
        figs.append(ReportFigure(ensemble_size_curve(
            sizes, [study[m][metric][0] for m in sizes], [study[m][metric][1] for m in sizes],
            [study[m][metric][2] for m in sizes], metric.upper()), f"ensemble of M Dice models: {metric}"))
    sections.append(Section("Deep ensemble of Dice models", figures=figs))
    ent = np.concatenate([seg_ent["dice"], seg_ent["dice_shifted"]])
    dice_case = []
    for name in ("dice", "dice_shifted"):
        from segcal.io.runs import read_case_metrics

        cases = read_case_metrics(Path(summary["runs"][name]) / "cases.csv")
        dice_case.append(np.array([[cases[(cid, c)]["dice"] for c in classes] for cid in ids]))
    dice_all = np.concatenate(dice_case)
    groups = ["test"] * (len(ids) * len(classes)) + ["shifted"] * (len(ids) * len(classes))
    ok = np.isfinite(ent.reshape(-1)) & np.isfinite(dice_all.reshape(-1))
    fig = entropy_dice_scatter(ent.reshape(-1)[ok], dice_all.reshape(-1)[ok],
                               groups=[g for g, k in zip(groups, ok, strict=True) if k])
    sections.append(Section("Segment entropy vs Dice, test and shifted", figures=[ReportFigure(fig, "")]))
    test_names = [n for n in summaries if not n.endswith("_shifted")]
    fig = quality_scatter([summaries[n]["macro"]["dice"]["mean"]["mean"] for n in test_names],
                          [summaries[n]["macro"]["ace"]["mean"]["mean"] for n in test_names], test_names)
    sections.append(Section("Dice vs ACE (class means)", figures=[ReportFigure(fig, "")]))
    ref = summary.get("reference_predictors")
    if ref:
        rows = [{"predictor": n, "against": a, "class": c, "ACE": e[a]["ace"][c], "NLL": e[a]["nll"]}
                for n, e in ref.items() for a in ("hard labels", "soft reference") for c in e[a]["ace"]]
        sections.append(Section("Reference predictors (soft reference maps, tempered)", tables=[Table(rows)]))
    sections.append(Section(
        "More",
        text="Statistics tables and dataset reliability figures of every model: `compare/report.html`; "
        "Dice model on test vs shifted: `compare_shift/report.html`; per-run reports: `runs/<name>/`.",
    ))
    html = render_html("segcal demo", sections)
    path = output / "report.html"
    path.write_text(html, encoding="utf-8")
    return path
def run_demo(
    output: Path, *, quick: bool = False, seed: int = 0, num_bins: int = 20, epochs: int | None = None
) -> dict:
    """``segcal demo``: the full pipeline (:func:`run_full_demo`)."""
    return run_full_demo(output, quick=quick, seed=seed, num_bins=num_bins, epochs=epochs)
