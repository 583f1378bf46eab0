"""HTML report: well-formed, self-contained, escaped; run-level builders on generated run folders."""

from __future__ import annotations

import base64
import csv
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import PNG_MAGIC as PNG
from segcal.functional import bin_statistics, confusion_counts, overlap_scores
from segcal.functional.calibration import calibration_errors
from segcal.plots import reliability_diagram
from segcal.report import (
    ReportFigure,
    Section,
    Table,
    build_comparison_report,
    build_evaluation_report,
    render_html,
)

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
CLASSES = ["liver", "tumour"]


class _Checker(HTMLParser):
    """Tags balance, collects <img> sources and every URL-valued attribute."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.imgs: list[str] = []
        self.urls: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        a = dict(attrs)
        for key in ("src", "href", "srcset", "action", "data"):
            if a.get(key):
                self.urls.append(a[key] or "")
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}>, open: {self.stack[-3:]}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def check_html(text: str) -> _Checker:
    assert text.startswith("<!DOCTYPE html>")
    p = _Checker()
    p.feed(text)
    p.close()
    assert not p.errors, p.errors
    assert not p.stack, f"unclosed tags: {p.stack}"
    assert "script" not in p.tags and "link" not in p.tags, "report must not load scripts or stylesheets"
    for url in p.urls:
        assert not re.match(r"(?i)\s*(https?:)?//", url), f"external reference {url[:80]}"
    assert not re.search(r"(?i)url\(\s*['\"]?(https?:)?//", text), "external CSS url()"
    assert "@import" not in text
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,"), src[:40]
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG
    return p


# ----------------------------------------------------------------------------------------------------
# generic renderer
# ----------------------------------------------------------------------------------------------------


def test_render_html_escapes_and_embeds() -> None:
    stats = bin_statistics(
        torch.rand(1, 1, 16, 16), (torch.rand(1, 1, 16, 16) > 0.5).float(), 10, mode="multilabel"
    )
    fig = reliability_diagram(stats, 0)
    evil = "<script>alert('x')</script> & \"quotes\""
    sections = [
        Section(
            evil,
            "First **bold** and `code` and *it*.\n\n- item <b>one</b>\n- item two",
            tables=[
                Table(
                    [
                        {
                            "name": evil,
                            "value": 0.123456789,
                            "n": 3,
                            "missing": None,
                            "voxels": np.int64(1234567),
                        }
                    ],
                    caption=evil,
                )
            ],
            figures=[ReportFigure(fig, caption=evil), (b"\x89PNG\r\n\x1a\n" + b"\x00" * 8, "raw bytes")],
        ),
        Section("Second", ["para one", "para <two>"], tables=[[{"a": 1, "b": float("nan")}]]),
    ]
    out = render_html("Title <&>", sections)
    p = check_html(out)
    assert "<script>" not in out and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in out
    assert "<strong>bold</strong>" in out and "<code>code</code>" in out and "<em>it</em>" in out
    assert "<li>item &lt;b&gt;one&lt;/b&gt;</li>" in out
    assert "0.1235" in out and "para &lt;two&gt;" in out and "<td>1234567</td>" in out
    assert len(p.imgs) == 2
    assert 'href="#s1"' in out and 'id="s2"' in out
    with pytest.raises(ValueError, match="PNG"):
        render_html("t", [Section("s", figures=[b"GIF89a"])])
    with pytest.raises(TypeError, match="list of dicts"):
        render_html("t", [Section("s", tables=[{"a": 1}])])


def test_render_html_dataframe() -> None:
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"metric": ["ece", "<ace>"], "value": [0.1, 0.2]})
    out = render_html("df", [Section("s", tables=[Table(df, caption="frame")])])
    check_html(out)
    assert "<th>metric</th>" in out and "&lt;ace&gt;" in out


# ----------------------------------------------------------------------------------------------------
# run folders
# ----------------------------------------------------------------------------------------------------


def make_run(run_dir: Path, noise: float, seed: int, n_cases: int = 5, failed: bool = True) -> None:
    """A run folder as `segcal evaluate` writes it, with metrics from the core functions."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(20), torch.arange(20), indexing="ij")
    labels = torch.zeros(n_cases, 20, 20, dtype=torch.int64)
    for b in range(n_cases):
        d2 = (yy - 10) ** 2 + (xx - 9 - b % 3) ** 2
        labels[b][d2 < (4 + b) ** 2] = 1
        labels[b][d2 < 4] = 2
    logits = 3.0 * torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    logits = logits + noise * torch.randn(logits.shape, generator=g)
    stats = bin_statistics(logits, labels, 10, activation="softmax", include_background=False)
    errs = calibration_errors(stats)
    ov = overlap_scores(confusion_counts(logits, labels, activation="softmax", include_background=False))
    ids = [f"case_{i:03d}" for i in range(n_cases)]
    run_dir.mkdir(parents=True)
    cols = [
        "case_id",
        "class",
        "status",
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
        "nll",
        "brier",
        "top_label_ece",
        "error",
    ]
    rows = []
    for b, cid in enumerate(ids):
        for c, name in enumerate(CLASSES):
            row = {
                "case_id": cid,
                "class": name,
                "status": "ok",
                "hd95": 1.5,
                "nll": 0.3,
                "brier": 0.1,
                "top_label_ece": 0.05,
                "error": "",
            }
            row.update({k: float(v[b, c]) for k, v in ov.items()})
            row.update({k: float(v[b, c]) for k, v in errs.items()})
            rows.append(row)
    if failed:
        for name in CLASSES:
            rows.append(
                {
                    "case_id": "case_bad",
                    "class": name,
                    "status": "failed",
                    "error": "case_bad.nii.gz: shape (20, 20) does not match label (21, 20) <bad>",
                }
            )
    with (run_dir / "cases.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    macro = {
        m: {
            name: {
                "mean": float(errs[m][:, c].mean()),
                "std": 0.01,
                "median": 0.02,
                "iqr": 0.03,
                "ci_low": 0.0,
                "ci_high": 0.5,
            }
            for c, name in enumerate(CLASSES)
        }
        for m in ("ece", "ace")
    }
    pooled = {
        m: {name: float(v[0, c]) for c, name in enumerate(CLASSES)}
        for m, v in calibration_errors(stats.pooled()).items()
    }
    (run_dir / "summary.json").write_text(json.dumps({"num_bins": 10, "macro": macro, "pooled": pooled}))
    np.savez(
        run_dir / "bins.npz", case_ids=np.array(ids), bin_stats=stats.numpy(), class_names=np.array(CLASSES)
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    make_run(root / "run_a", noise=2.5, seed=0)
    make_run(root / "run_b", noise=1.0, seed=1, failed=False)
    return root / "run_a", root / "run_b"


def test_build_evaluation_report(runs: tuple[Path, Path]) -> None:
    run_a, _ = runs
    path = build_evaluation_report(run_a)
    assert path == run_a / "report.html"
    text = path.read_text(encoding="utf-8")
    p = check_html(text)
    figs = sorted(f.name for f in (run_a / "figures").glob("*.png"))
    assert "dataset_reliability_histogram.png" in figs and "dice_vs_ace.png" in figs
    assert {f"subject_spread_{c}.png" for c in CLASSES} <= set(figs)
    # pooled + best, median, worst (5 distinct cases)
    assert sum(f.startswith("reliability_") for f in figs) == 4 and "reliability_pooled.png" in figs
    assert all((run_a / "figures" / f).read_bytes()[:8] == PNG for f in figs)
    assert len(p.imgs) == len(figs)
    # worst case by class-mean ACE, from the stored bins
    with np.load(run_a / "bins.npz", allow_pickle=False) as z:
        from segcal.functional.binning import BinStats

        ace = calibration_errors(BinStats.from_numpy(z["bin_stats"]))["ace"].numpy().mean(1)
        worst = str(z["case_ids"][int(np.argmax(ace))])
    assert any(f.startswith("reliability_worst_" + worst) for f in figs)
    body = " ".join(p.text)
    assert "case_bad.nii.gz: shape (20, 20) does not match label (21, 20) <bad>" in body  # listed, escaped
    assert "&lt;bad&gt;" in text
    for heading in (
        "Dataset summary",
        "Macro over the cases: per-class metrics",
        "Pooled (bin sums merged over cases): per-class metrics",
        "Failed cases",
        "How to read the metrics",
        "Statistical unit",
    ):
        assert heading in body
    # the glossary is a real list; no literal "- " bullet survives
    assert "<li><strong>ECE</strong>" in text and not re.search(r"<p>[^<]*- <strong>", text)
    # the statistical unit is stated: no grouping in this run folder
    assert "case (each case its own subject)" in body
    # no empty column: this run has no MAE / HD95-free columns with values only
    assert "<th>mae</th>" not in text
    for term in (
        "ECE",
        "ACE",
        "MCE",
        "Top-label ECE",
        "NLL",
        "Brier",
        "Dice",
        "IoU",
        "HD95",
        "pooled",
        "Bootstrap CI",
    ):
        assert term in body
    summary = json.loads((run_a / "summary.json").read_text())
    assert f"{summary['pooled']['ace']['tumour']:.4g}" in body


def test_build_evaluation_report_without_bins(tmp_path: Path) -> None:
    make_run(tmp_path / "r", noise=1.0, seed=3, n_cases=2)
    (tmp_path / "r" / "bins.npz").unlink()
    (tmp_path / "r" / "summary.json").unlink()
    check_html(build_evaluation_report(tmp_path / "r").read_text())
    with pytest.raises(FileNotFoundError, match=r"cases\.csv"):
        build_evaluation_report(tmp_path / "r" / "figures")
    (tmp_path / "r" / "bins.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"bins\.npz"):
        build_evaluation_report(tmp_path / "r")


def _row(metric: str, cls: str, rel: float, p_holm: float, **extra: float) -> dict:
    return {
        "metric": metric, "class": cls, "run_a": "noisy", "run_b": "clean", "unit": "subject", "n": 12,
        "mean_a": 0.2, "mean_b": 0.2 * (1 + rel), "rel_change": rel, "rel_ci_low": rel - 0.1,
        "rel_ci_high": rel + 0.1, "p_wilcoxon": p_holm / 2, "p_holm": p_holm, "effect_size": 0.5, **extra,
    }


def test_build_comparison_report(runs: tuple[Path, Path], tmp_path: Path) -> None:
    comparison = {
        "runs": [str(runs[0]), str(runs[1])],
        "unit": "subject",
        "grouping": {"unit": "subject", "n": 12, "description": "subjects from groups.csv"},
        "pairs": [{"run_a": str(runs[0]), "run_b": str(runs[1]), "unit": "subject", "n_units": 12}],
        "rows": [
            _row("ace", "mean", -0.5, 0.02),  # significant and large: coloured (better)
            _row("dice", "mean", 0.01, 0.4),  # not significant
            _row("ece", "mean", 0.5, 0.01),  # significant and large, worse
            _row("mce", "mean", 0.02, 0.001),  # significant but below 5 %: not coloured
            _row("ace", "tumour", -0.5, 0.02),  # per-class detail only
            _row("nll", "case", -0.2, 0.03),
        ],
    }
    for r in comparison["rows"]:
        r["run_a"], r["run_b"] = str(runs[0]), str(runs[1])
    path = build_comparison_report(list(runs), tmp_path / "cmp", comparison)
    text = path.read_text()
    p = check_html(text)
    body = " ".join(p.text)
    figs = sorted(f.name for f in (tmp_path / "cmp" / "figures").glob("*.png"))
    assert figs == [
        "dataset_reliability_difference.png",
        "dataset_reliability_side_by_side.png",
        "dice_vs_ace.png",
    ]
    assert len(p.imgs) == 3
    # the compact table leads: before the runs table, one row per class-average / per-case metric
    assert text.index("Comparison at a glance") < text.index("<h2>Runs</h2>")
    compact = text[text.index("Class average"):text.index("<details>")]
    assert compact.count("<tr>") == 1 + 5 and "tumour" not in compact
    assert "-50.0%" in compact and "[-60.0%, -40.0%]" in compact and "12 subjects" in compact
    # colour only where significant and large enough: ace (better) and ece (worse), nll (better)
    assert compact.count('class="better') == 2 * 2 and compact.count('class="worse') == 2
    assert "below 5%" in compact and "not significant" in compact
    # the per-class rows are folded
    detail = text[text.index("<details>"):text.index("</details>")]
    assert "tumour" in detail and "Every metric and class (6 rows" in detail
    # run names are the folder names, the full path a tooltip
    assert f'title="{runs[1]}"' in text and f">{runs[1].name}<" in text
    assert f">{runs[1]}<" not in text
    assert "Statistical unit: " in body and "12 subjects" in body
    with pytest.raises(ValueError, match="two run"):
        build_comparison_report([runs[0]], tmp_path / "x", comparison)


def test_comparison_report_of_many_runs_folds_figures_and_styles_every_run(tmp_path: Path) -> None:
    from segcal.plots._common import series_style

    dirs = []
    for i in range(5):
        make_run(tmp_path / f"run{i}", noise=1.0 + 0.3 * i, seed=i, failed=False)
        dirs.append(tmp_path / f"run{i}")
    path = build_comparison_report(dirs, tmp_path / "cmp", {"runs": [str(d) for d in dirs], "rows": []})
    text = path.read_text()
    check_html(text)
    figs = sorted(f.name for f in (tmp_path / "cmp" / "figures").glob("*.png"))
    assert sum(f.startswith("dataset_reliability_0") for f in figs) == 5  # one figure (colour bar) per run
    assert sum(f.startswith("dataset_reliability_difference_") for f in figs) == 4
    assert "segcal comparison: run0 (baseline) vs 4 runs" in text
    styles = {tuple(series_style(i).values()) for i in range(20)}
    assert len(styles) == 20 and len({s[0] for s in styles}) == 20


# ----------------------------------------------------------------------------------------------------
# real browser
# ----------------------------------------------------------------------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def _chromium_cmd(tmp_path: Path, *args: str) -> list[str]:
    return [
        str(_chromium()),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
        *args,
    ]


#: a test-only probe: after load, open every <details>, then write each image's decoded width and the page's
#: scroll width into the DOM
_PROBE = (
    "<script>window.addEventListener('load',function(){"
    "document.querySelectorAll('details').forEach(function(d){d.open=true;});"
    "var d=document.createElement('pre');d.id='probe';"
    "d.textContent='IMGS:'+Array.prototype.map.call(document.images,function(i){"
    "return i.complete+'/'+i.naturalWidth}).join(',')+':WIDTH:'+document.scrollingElement.scrollWidth+':END';"
    "document.body.appendChild(d);});</script>"
)


def _check_in_chromium(report: Path, tmp_path: Path, name: str) -> None:
    """``report`` loads in headless Chromium at 1400 px: every image decodes, nothing overflows horizontally
    (also with every folded block open), and a screenshot is taken."""
    n_imgs = report.read_text().count("<img ")
    probed = tmp_path / f"{name}_probed.html"
    probed.write_text(report.read_text().replace("</body>", _PROBE + "</body>"))
    res = subprocess.run(
        _chromium_cmd(tmp_path, "--window-size=1400,1000", "--dump-dom", probed.as_uri()),
        capture_output=True, text=True, timeout=180,
    )
    m = re.search(r'<pre id="probe">IMGS:(.*?):WIDTH:(\d+):END</pre>', res.stdout)
    assert m, f"chromium did not load {report} (rc={res.returncode}): {res.stderr[-2000:]}"
    entries = m.group(1).split(",")
    assert len(entries) == n_imgs > 0
    for e in entries:
        complete, width = e.split("/")
        assert complete == "true" and int(width) > 100, (name, e)
    assert int(m.group(2)) <= 1400, f"{name}: horizontal overflow, scrollWidth {m.group(2)} > 1400"
    shot = tmp_path / f"{name}.png"
    res = subprocess.run(
        _chromium_cmd(tmp_path, "--window-size=1400,2400", f"--screenshot={shot}", report.as_uri()),
        capture_output=True, text=True, timeout=180,
    )
    assert shot.is_file() and shot.read_bytes()[:8] == PNG, f"no screenshot of {name}: {res.stderr[-2000:]}"


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (Debian package `chromium`)")
def test_reports_render_in_headless_chromium(tmp_path: Path) -> None:
    """The evaluation report of a run of slices grouped into subjects and the comparison report of two such
    runs, in the real browser."""
    from _subject_data import subject_volume, write_slices
    from segcal.evaluation import EvalConfig, compare_runs, run_evaluation

    cfg = EvalConfig(fmt="npy", num_bins=10, hd95=True)
    dirs = []
    for name, sharpen in (("baseline_run_with_a_long_folder_name_" + "x" * 60, 1.0), ("sharper", 2.0)):
        vols = {f"sub-{i:02d}": subject_volume(np.random.default_rng(i), (12, 10, 4), sharpen=sharpen)
                for i in range(3)}
        pred, lab = write_slices(tmp_path / "data", vols, f"pred_{sharpen}")
        run_evaluation(pred, lab, tmp_path / name, cfg, group_by=r"^(sub-\d+)_", workers=0, progress=False)
        dirs.append(tmp_path / name)
    report = build_evaluation_report(dirs[0])
    assert "Per-subject metrics" in report.read_text()
    cmp = build_comparison_report(dirs, tmp_path / "cmp", compare_runs(dirs))
    assert "3 subjects" in cmp.read_text()
    _check_in_chromium(report, tmp_path, "evaluation")
    _check_in_chromium(cmp, tmp_path, "comparison")


def test_load_run_parses_every_metric_column_of_the_evaluation(tmp_path: Path) -> None:
    """The report reads cases.csv with the evaluation's own column list: every metric the runner writes
    (including MAE and top-label MCE) comes back as a float, missing values as NaN."""
    from segcal.functional.scoring import CASE_METRICS, CLASS_METRICS
    from segcal.report import load_run

    metrics = [*CLASS_METRICS, *CASE_METRICS]
    row = {"case_id": "c1", "class": "tumour", "status": "ok", "error": ""}
    row.update({m: f"{0.01 * (i + 1):.4f}" for i, m in enumerate(metrics)})
    row["mae"] = ""  # no soft reference for this case
    with (tmp_path / "cases.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(row))
        w.writeheader()
        w.writerow(row)
    (got,) = load_run(tmp_path).ok_rows
    for i, m in enumerate(metrics):
        assert isinstance(got[m], float), m
        if m != "mae":
            assert got[m] == pytest.approx(0.01 * (i + 1))
    assert math.isnan(got["mae"])
