"""Fault injection for ``segcal evaluate``: stale and vanished inputs, concurrent runs, killed workers and a
killed parent, cases with other classes. Each test proves nothing is lost, stale or mixed."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from _eval_data import affine_for, make_case, write_nifti_dataset
from segcal.evaluation import EvalConfig, run_evaluation
from segcal.evaluation.lock import RunLock, RunLockedError
from segcal.evaluation.runner import WORKER_DIED

SRC = str(Path(__file__).resolve().parents[1] / "src")
FAULTY = str(Path(__file__).with_name("_faulty_cli.py"))
CFG = EvalConfig(fmt="nifti", hd95=False, num_bins=10)


def _run(pred: Path, lab: Path, out: Path, **kw):  # type: ignore[no-untyped-def]
    return run_evaluation(pred, lab, out, CFG, workers=0, progress=False, **kw)


def _csv(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(out / "cases.csv") as fh:
        return {(r["case_id"], r["class"]): r for r in csv.DictReader(fh)}


def _replace_prediction(pred: Path, cid: str, seed: int) -> None:
    probs, _ = make_case(np.random.default_rng(seed), (12, 10, 8), 4)
    nib.save(nib.Nifti1Image(np.moveaxis(probs, 0, -1), affine_for((1.0, 1.5, 2.5))), pred / f"{cid}.nii.gz")


def test_a_changed_input_is_recomputed_and_equals_a_fresh_run(tmp_path: Path) -> None:
    pred, lab, _ = write_nifti_dataset(tmp_path, 3)
    out = tmp_path / "out"
    _run(pred, lab, out)
    before = _csv(out)
    _replace_prediction(pred, "case001", seed=99)
    res = _run(pred, lab, out)
    assert (res.n_computed, res.n_skipped, res.stale) == (1, 2, ["case001"])
    after = _csv(out)
    assert after[("case001", "class_1")]["ace"] != before[("case001", "class_1")]["ace"]
    assert after[("case000", "class_1")] == before[("case000", "class_1")]
    fresh = tmp_path / "fresh"
    _run(pred, lab, fresh)
    assert (fresh / "cases.csv").read_text() == (out / "cases.csv").read_text()
    a = json.loads((fresh / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert a["macro"] == b["macro"] and a["pooled"] == b["pooled"]


def test_content_hash_catches_a_rewrite_with_the_same_size_and_time(tmp_path: Path) -> None:
    pred, lab = tmp_path / "pred", tmp_path / "labels"
    pred.mkdir()
    lab.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        probs, label = make_case(rng, (12, 10, 8), 4)
        np.save(pred / f"case{i}.npy", probs)
        np.save(lab / f"case{i}.npy", label)
    cfg = EvalConfig(fmt="npy", hd95=False, num_bins=10)
    out = tmp_path / "out"
    run_evaluation(pred, lab, out, cfg, workers=0, progress=False, hash_inputs=True)
    f = pred / "case0.npy"
    st = f.stat()
    np.save(f, make_case(np.random.default_rng(5), (12, 10, 8), 4)[0])  # same shape and dtype: same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size
    again = run_evaluation(pred, lab, out, cfg, workers=0, progress=False)
    assert again.n_computed == 0  # path, size and time alone: looks unchanged
    hashed = run_evaluation(pred, lab, out, cfg, workers=0, progress=False, hash_inputs=True)
    assert hashed.stale == ["case0"] and hashed.n_computed == 1


def test_a_vanished_case_is_dropped_from_every_output(tmp_path: Path) -> None:
    pred, lab, _ = write_nifti_dataset(tmp_path, 3)
    out = tmp_path / "out"
    _run(pred, lab, out)
    (pred / "case002.nii.gz").unlink()
    (lab / "case002.nii.gz").unlink()
    res = _run(pred, lab, out)
    assert res.vanished == ["case002"] and res.n_computed == 0
    assert {k[0] for k in _csv(out)} == {"case000", "case001"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 2
    assert np.load(out / "bins.npz")["case_ids"].tolist() == ["case000", "case001"]


def test_a_case_with_other_classes_fails_by_name_and_not_after_removal(tmp_path: Path) -> None:
    pred, lab, _ = write_nifti_dataset(tmp_path, 4)
    probs, label = make_case(np.random.default_rng(7), (12, 10, 8), 3)
    aff = affine_for((1.0, 1.5, 2.5))
    nib.save(nib.Nifti1Image(np.moveaxis(probs, 0, -1), aff), pred / "case003.nii.gz")
    nib.save(nib.Nifti1Image(label, aff), lab / "case003.nii.gz")
    res = _run(pred, lab, tmp_path / "out")
    assert (res.n_ok, res.n_failed) == (3, 1)
    (err,) = [f["error"] for f in res.summary["failed"]]
    assert err.startswith("case003:") and "2 classes" in err and "3 classes" in err
    assert res.summary["class_names"] == ["class_1", "class_2", "class_3"]
    (pred / "case003.nii.gz").unlink()
    (lab / "case003.nii.gz").unlink()
    res = _run(pred, lab, tmp_path / "out")
    assert (res.n_ok, res.n_failed, res.vanished) == (3, 0, ["case003"])


def test_rows_of_another_configuration_are_never_read(tmp_path: Path) -> None:
    pred, lab, _ = write_nifti_dataset(tmp_path, 2)
    out = tmp_path / "out"
    _run(pred, lab, out)
    other = EvalConfig(fmt="nifti", hd95=False, num_bins=7)
    res = run_evaluation(pred, lab, out, other, workers=0, progress=False, overwrite=True)
    assert res.n_computed == 2
    assert np.load(out / "bins.npz")["bin_stats"].shape[-1] == 7


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    pred, lab, _ = write_nifti_dataset(tmp_path, 2)
    out = tmp_path / "out"
    with RunLock(out), pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        _run(pred, lab, out)
    assert not (out / "cases.csv").exists()  # the refused run wrote nothing
    assert _run(pred, lab, out).n_ok == 2  # released: the folder is usable again


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, FAULTY, *args],
        env={**os.environ, "PYTHONPATH": SRC, **env},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _evaluate_args(pred: Path, lab: Path, out: Path, workers: int, *extra: str) -> list[str]:
    """``segcal evaluate`` arguments without HD95 (the slowest metric, irrelevant to these faults)."""
    return ["evaluate", str(pred), str(lab), "-o", str(out), "--workers", str(workers), "--no-hd95", *extra]


def _segcal(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m segcal.cli *args`` in a fresh process on this checkout."""
    return subprocess.run(
        [sys.executable, "-m", "segcal.cli", *args], env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True, text=True, timeout=timeout,
    )


def _wait_for(predicate, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _processes() -> list[tuple[int, list[str]]]:
    """``(pid, fields of /proc/pid/stat after the command name)`` of every process: state, ppid, pgrp, session."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out.append((int(d.name), (d / "stat").read_text().rsplit(")", 1)[1].split()))
            except OSError:
                continue
    return out


def _session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    return [pid for pid, f in _processes() if int(f[3]) == sid and f[0] != "Z"]


def _children(pid: int) -> list[int]:
    return [child for child, f in _processes() if int(f[1]) == pid]


@pytest.mark.slow
def test_a_concurrent_cli_run_is_refused_and_a_killed_holder_is_taken_over(tmp_path: Path) -> None:
    pred, lab, _ = write_nifti_dataset(tmp_path, 30, shape=(6, 5, 4))
    out = tmp_path / "out"
    args = _evaluate_args(pred, lab, out, 0, "--no-report")
    first = _start(args, {"FAULT_CASE_DELAY": "1.0"})  # 30 s: still running when the second one starts
    _wait_for(lambda: (out / "results.sqlite").exists() and (out / ".segcal.lock").stat().st_size > 0)
    second = _segcal([*args, "--bins", "7", "--overwrite"])
    assert second.returncode == 1
    assert f"pid {first.pid}" in second.stderr.replace("\n", "") and "Traceback" not in second.stderr
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    third = _segcal(args)
    assert third.returncode == 0, third.stderr[-2000:]
    rows = _csv(out)
    assert len({k[0] for k in rows}) == 30 and all(r["status"] == "ok" for r in rows.values())


@pytest.mark.slow
def test_a_case_that_kills_its_worker_is_recorded_and_the_run_finishes(tmp_path: Path) -> None:
    pred, lab, _ = write_nifti_dataset(tmp_path, 6, shape=(6, 5, 4))
    out = tmp_path / "out"
    args = _evaluate_args(pred, lab, out, 2, "--no-report")
    proc = _start(args, {"FAULT_KILL_CASE": "case002"})
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err[-3000:]  # some case failed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_ok"] == 5 and summary["n_failed"] == 1
    (failed,) = summary["failed"]
    assert failed["case_id"] == "case002" and WORKER_DIED in failed["error"]
    assert "case002.nii.gz" in failed["error"]


@pytest.mark.slow
def test_sigkill_of_a_worker_midway_loses_nothing(tmp_path: Path) -> None:
    pred, lab, _ = write_nifti_dataset(tmp_path, 16, shape=(6, 5, 4))
    out = tmp_path / "out"
    args = _evaluate_args(pred, lab, out, 2, "--no-report")
    proc = _start(args, {"FAULT_CASE_DELAY": "0.3"})
    db = out / "results.sqlite"
    _wait_for(lambda: db.exists() and db.stat().st_size > 0 and len(_workers(proc.pid)) >= 2)
    os.kill(_workers(proc.pid)[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]  # the killed worker's cases were retried and computed
    rows = _csv(out)
    assert len({k[0] for k in rows}) == 16 and all(r["status"] == "ok" for r in rows.values())


def _workers(parent: int) -> list[int]:
    """The evaluation workers: grandchildren of the run through the fork server (or children with spawn)."""
    found = []
    for child in _children(parent):
        grand = _children(child)
        found += grand if grand else []
    return sorted(found)


@pytest.mark.slow
def test_sigkill_of_the_parent_leaves_no_process_behind(tmp_path: Path) -> None:
    pred, lab, _ = write_nifti_dataset(tmp_path, 30, shape=(6, 5, 4))
    out = tmp_path / "out"
    args = _evaluate_args(pred, lab, out, 2, "--no-report")
    proc = _start(args, {"FAULT_CASE_DELAY": "0.5"})
    _wait_for(lambda: len(_workers(proc.pid)) >= 2)
    assert len(_session_pids(proc.pid)) >= 3
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _wait_for(lambda: _session_pids(proc.pid) == [], timeout=30)


def _dask_worker(address: str, env: dict[str, str]) -> subprocess.Popen:
    """A real ``dask worker`` process started in another directory (``/``), with a nanny that restarts it."""
    tests = str(Path(__file__).parent)
    return subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-dashboard"],
        cwd="/",
        env={**os.environ, "PYTHONPATH": os.pathsep.join([SRC, tests]), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def test_dask_unreachable_scheduler_is_one_clear_error(tmp_path: Path) -> None:
    from segcal.evaluation import DaskClusterError

    pred, lab, _ = write_nifti_dataset(tmp_path, 1, shape=(6, 5, 4))
    t0 = time.time()
    with pytest.raises(DaskClusterError, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0\.1:9"):
        run_evaluation(pred, lab, tmp_path / "o", CFG, dask_address="tcp://127.0.0.1:9", dask_timeout=2)
    assert time.time() - t0 < 60


@pytest.mark.slow
def test_dask_workers_elsewhere_no_worker_and_a_case_that_kills_its_worker(tmp_path: Path, monkeypatch) -> None:
    import dask
    import distributed

    import _faulty_cli
    import segcal.evaluation.runner as runner
    from segcal.evaluation import DaskClusterError

    pred, lab, _ = write_nifti_dataset(tmp_path, 4, shape=(6, 5, 4))
    run_evaluation(pred, lab, tmp_path / "ref", CFG, workers=0, progress=False)
    monkeypatch.setattr(runner, "evaluate_case_files", _faulty_cli._faulty)  # what the workers run
    monkeypatch.chdir(tmp_path)  # relative folders: workers started in "/" must get absolute paths
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}), distributed.LocalCluster(
        n_workers=0, processes=False, protocol="tcp://", host="127.0.0.1", dashboard_address=":0"
    ) as cluster:
        with pytest.raises(DaskClusterError, match="no worker joined"):
            run_evaluation("pred", "labels", "out", CFG, dask_address=cluster.scheduler_address, dask_timeout=2,
                           progress=False)
        worker = _dask_worker(cluster.scheduler_address, {"FAULT_KILL_CASE": "case002"})
        try:
            res = run_evaluation("pred", "labels", "out", CFG, dask_address=cluster.scheduler_address,
                                 dask_timeout=120, progress=False)
        finally:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    assert (res.n_ok, res.n_failed) == (3, 1)
    (failed,) = res.summary["failed"]
    assert failed["case_id"] == "case002" and WORKER_DIED in failed["error"]
    ref, got = _csv(tmp_path / "ref"), _csv(tmp_path / "out")
    assert {k: v for k, v in ref.items() if k[0] != "case002"} == {k: v for k, v in got.items() if k[0] != "case002"}


_FSIZE_RUN = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
from segcal.cli import main
sys.argv = ["segcal", *sys.argv[2:]]
main()
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="needs RLIMIT_FSIZE and SIGXFSZ (Linux)")
def test_a_file_size_limit_while_writing_outputs_leaves_no_truncated_file(tmp_path: Path) -> None:
    """The report (embedded figures, larger than the limit) cannot be written: no report.html is left as if
    complete, nor a temporary file; the rerun without the limit gives exactly a clean run's outputs."""
    pred, lab, _ = write_nifti_dataset(tmp_path, 4)
    out = tmp_path / "out"
    args = _evaluate_args(pred, lab, out, 0, "--bins", "10")
    limited = subprocess.run(
        [sys.executable, "-c", _FSIZE_RUN, str(96 * 1024), *args],
        env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True, timeout=600,
    )
    assert limited.returncode != 0
    assert not (out / "report.html").exists()
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    for name in ("cases.csv", "summary.json", "bins.npz"):  # small enough: complete, or absent
        if (out / name).exists():
            assert (out / name).stat().st_size < 96 * 1024
    if (out / "summary.json").exists():
        json.loads((out / "summary.json").read_text())  # complete: parses
    again = _segcal(args, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    clean = tmp_path / "clean"
    assert _segcal(_evaluate_args(pred, lab, clean, 0, "--bins", "10"), timeout=600).returncode == 0
    assert (out / "cases.csv").read_text() == (clean / "cases.csv").read_text()
    np.testing.assert_array_equal(np.load(out / "bins.npz")["bin_stats"], np.load(clean / "bins.npz")["bin_stats"])
    a, b = json.loads((out / "summary.json").read_text()), json.loads((clean / "summary.json").read_text())
    assert a["macro"] == b["macro"] and a["pooled"] == b["pooled"]
    assert (out / "report.html").stat().st_size > 96 * 1024
