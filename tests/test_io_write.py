"""Writers of segcal.io: every read/write pair round-trips, and a writer that fails midway leaves neither a
file under the final name nor a temporary file."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import segcal.io._atomic as atomic_mod
from segcal.io import (
    CaseError,
    atomic_write,
    copy_file,
    copy_nnunet_side_files,
    read_nifti,
    read_nifti_probabilities,
    read_nnunet_probabilities,
    read_npz,
    read_numpy,
    read_numpy_logits,
    read_numpy_probabilities,
    read_prediction,
    write_bytes,
    write_nifti,
    write_nifti_probabilities,
    write_nnunet_probabilities,
    write_npz,
    write_numpy,
    write_numpy_logits,
    write_numpy_probabilities,
    write_prediction_file,
    write_text,
)
from segcal.io.runs import (
    read_bins_npz,
    read_case_metrics,
    read_cases_csv,
    read_failed_csv,
    read_run,
    read_summary_json,
    write_bins_npz,
    write_cases_csv,
    write_csv,
    write_failed_csv,
    write_json,
    write_summary_json,
)

AFFINE = np.array([[0.8, 0, 0, -10.0], [0, 0.9, 0, 5.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1]])


def _probs(shape: tuple[int, ...], c: int = 3, seed: int = 0, dtype: type = np.float32) -> np.ndarray:
    x = np.random.default_rng(seed).random((c, *shape)) + 0.1
    return (x / x.sum(0, keepdims=True)).astype(dtype)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii"])
def test_nifti_roundtrip_keeps_data_spacing_affine(tmp_path: Path, name: str) -> None:
    data = np.random.default_rng(1).random((5, 6, 7)).astype(np.float32)
    write_nifti(tmp_path / name, data, AFFINE)
    back, spacing, affine = read_nifti(tmp_path / name)
    np.testing.assert_array_equal(back, data)
    assert back.dtype == np.float32
    assert spacing == pytest.approx((0.8, 0.9, 2.5))
    np.testing.assert_allclose(affine, AFFINE)
    # spacing only: the affine is diag(spacing, 1)
    labels = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    write_nifti(tmp_path / name, labels, spacing=(1.5, 2.0, 3.0))
    back, spacing, affine = read_nifti(tmp_path / name)
    np.testing.assert_array_equal(back, labels)
    assert spacing == pytest.approx((1.5, 2.0, 3.0))
    np.testing.assert_allclose(affine, np.diag([1.5, 2.0, 3.0, 1.0]))
    assert _names(tmp_path) == [name]


def test_nifti_gz_matches_nibabel_bytes(tmp_path: Path) -> None:
    data = np.random.default_rng(2).random((4, 5, 6, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "ref.nii.gz")
    write_nifti(tmp_path / "ours.nii.gz", data, AFFINE)
    assert (tmp_path / "ours.nii.gz").read_bytes() == (tmp_path / "ref.nii.gz").read_bytes()


def test_nifti_with_header_keeps_it_without_scaling(tmp_path: Path) -> None:
    src = nib.Nifti2Image(np.zeros((4, 5, 6), np.int16), AFFINE)
    src.header.set_slope_inter(2.0, 1.0)
    src.header["descrip"] = b"segcal test"
    probs = _probs((4, 5, 6))
    write_nifti_probabilities(tmp_path / "p.nii.gz", probs, AFFINE, header=src.header)
    img = nib.load(tmp_path / "p.nii.gz")
    assert isinstance(img, nib.Nifti2Image) and img.header["descrip"].tobytes().rstrip(b"\0") == b"segcal test"
    assert img.get_data_dtype() == np.float32 and img.shape == (4, 5, 6, 3)
    back, spacing, affine = read_nifti_probabilities([tmp_path / "p.nii.gz"])
    np.testing.assert_array_equal(back, probs)
    assert spacing == pytest.approx((0.8, 0.9, 2.5))
    np.testing.assert_allclose(affine, AFFINE)


@pytest.mark.parametrize("name", ["p.npy", "p.npz"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_probabilities_roundtrip(tmp_path: Path, name: str, dtype: type) -> None:
    probs = _probs((6, 5, 4), dtype=dtype)
    write_numpy_probabilities(tmp_path / name, probs)
    back = read_numpy_probabilities(tmp_path / name)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, probs)
    if name.endswith(".npz"):
        with np.load(tmp_path / name, allow_pickle=False) as z:
            assert z.files == ["probabilities"]


@pytest.mark.parametrize("name", ["z.npy", "z.npz"])
def test_numpy_logits_roundtrip(tmp_path: Path, name: str) -> None:
    logits = np.random.default_rng(3).standard_normal((3, 6, 5)).astype(np.float32)
    write_numpy_logits(tmp_path / name, logits, compressed=False)
    np.testing.assert_array_equal(read_numpy_logits(tmp_path / name), logits)
    if name.endswith(".npz"):
        assert list(read_npz(tmp_path / name)) == ["logits"]


def test_numpy_generic_roundtrip_and_refusals(tmp_path: Path) -> None:
    labels = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    write_numpy(tmp_path / "l.npy", labels)
    np.testing.assert_array_equal(read_numpy(tmp_path / "l.npy"), labels)
    write_numpy(tmp_path / "l.npz", labels)  # no key: NumPy's arr_0, read back as the only array
    np.testing.assert_array_equal(read_numpy(tmp_path / "l.npz"), labels)
    arrays = {"image": np.ones((1, 4, 4), np.float32), "label": np.zeros((4, 4), np.int16)}
    write_npz(tmp_path / "case.npz", arrays, compressed=False)
    back = read_npz(tmp_path / "case.npz")
    assert list(back) == ["image", "label"]
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)
        assert back[k].dtype == v.dtype
    with pytest.raises(CaseError, match=r"case\.npz: missing key 'logits'"):
        read_npz(tmp_path / "case.npz", ["image", "logits"])
    with pytest.raises(ValueError, match="never writes pickles"):
        write_numpy(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="never writes pickles"):
        write_npz(tmp_path / "o.npz", {"a": np.array([None], dtype=object)})
    with pytest.raises(ValueError, match=r"expected \.npy or \.npz"):
        write_numpy(tmp_path / "x.txt", labels)
    assert _names(tmp_path) == ["case.npz", "l.npy", "l.npz"]


@pytest.mark.parametrize("shape", [(6, 5, 4), (6, 5)])
def test_nnunet_axis_order_roundtrip(tmp_path: Path, shape: tuple[int, ...]) -> None:
    probs = _probs(shape)  # label order (C, x, y[, z])
    write_nnunet_probabilities(tmp_path / "case.npz", probs)
    with np.load(tmp_path / "case.npz", allow_pickle=False) as z:
        stored = z["probabilities"]
    assert stored.shape == (3, *shape[::-1]) and stored.dtype == np.float32
    np.testing.assert_array_equal(stored, np.transpose(probs, (0, *range(len(shape), 0, -1))))
    np.testing.assert_array_equal(read_nnunet_probabilities(tmp_path / "case.npz"), probs)


def test_nnunet_side_files_are_copied_pickles_never(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (src / "plans.json").write_text('{"plans": 1}')
    (src / "dataset.json").write_text('{"labels": {}}')
    (src / "case.pkl").write_bytes(b"pickle")
    assert copy_nnunet_side_files(src, out) == ["plans.json", "dataset.json"]
    assert _names(out) == ["dataset.json", "plans.json"]
    assert (out / "plans.json").read_text() == '{"plans": 1}'


@pytest.mark.parametrize("fmt", ["npy", "nifti", "nnunet"])
def test_prediction_file_roundtrip_in_every_format(tmp_path: Path, fmt: str) -> None:
    probs = _probs((6, 5, 4))
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    if fmt == "nifti":
        path = write_nifti_probabilities(src / "case.nii.gz", probs, AFFINE)
    elif fmt == "nnunet":
        path = write_nnunet_probabilities(src / "case.npz", probs)
    else:
        path = write_numpy_logits(src / "case.npz", np.log(probs))
    pred = read_prediction(path, fmt, prefer="logits")  # type: ignore[arg-type]
    assert pred.kind == ("logits" if fmt == "npy" else "probabilities")
    np.testing.assert_allclose(pred.values, np.log(probs) if fmt == "npy" else probs, rtol=1e-6)
    mark = "segcal calibrated: calibrate --method ts"
    written = write_prediction_file(path, out, probs, fmt, pred.meta, calibration=mark)  # type: ignore[arg-type]
    assert written == out / path.name
    again = read_prediction(written, fmt)  # type: ignore[arg-type]
    assert again.kind == "probabilities" and again.declared_by is not None
    assert again.calibration == mark
    np.testing.assert_array_equal(again.values, probs)
    if fmt == "nifti":
        np.testing.assert_allclose(nib.load(written).affine, AFFINE)


def test_run_files_roundtrip(tmp_path: Path) -> None:
    columns = ["case_id", "class", "status", "dice", "ace", "tp", "error"]
    rows = [
        {"case_id": "c1", "class": "a", "status": "ok", "dice": 0.5, "ace": 0.125, "tp": 3, "error": ""},
        {"case_id": "c1", "class": "b", "status": "ok", "dice": float("nan"), "ace": 0.25, "tp": 0, "error": ""},
        {"case_id": "c2", "class": "", "status": "failed", "error": "c2.npz: corrupt"},
    ]
    write_cases_csv(tmp_path / "cases.csv", rows, columns)
    got = read_cases_csv(tmp_path / "cases.csv", ["dice", "ace"])
    assert [r["case_id"] for r in got] == ["c1", "c1", "c2"] and got[2]["status"] == "failed"
    assert got[0]["dice"] == 0.5 and math.isnan(got[1]["dice"]) and math.isnan(got[2]["ace"])
    assert got[0]["tp"] == "3"  # not a float column: kept as text
    metrics = read_case_metrics(tmp_path / "cases.csv")
    assert list(metrics) == [("c1", "a"), ("c1", "b")]
    assert metrics[("c1", "a")] == {"dice": 0.5, "ace": 0.125, "tp": 3.0}

    write_failed_csv(tmp_path / "failed.csv", [("c2", "c2.npz: corrupt, truncated")])
    assert read_failed_csv(tmp_path / "failed.csv") == [("c2", "c2.npz: corrupt, truncated")]

    stats = np.random.default_rng(4).integers(0, 9, (2, 3, 3, 5)).astype(np.float64)
    write_bins_npz(tmp_path / "bins.npz", ["c1", "c3"], stats, ["a", "b", "c"])
    bins = read_bins_npz(tmp_path / "bins.npz")
    assert bins.case_ids == ["c1", "c3"] and bins.class_names == ["a", "b", "c"]
    np.testing.assert_array_equal(bins.bin_stats, stats)
    write_bins_npz(tmp_path / "empty.npz", [], np.zeros((0, 2, 3, 4)), ["a", "b"])
    assert read_bins_npz(tmp_path / "empty.npz").bin_stats.shape == (0, 2, 3, 4)

    summary = {"n_cases": 2, "macro": {"dice": {"a": {"mean": float("nan"), "ci": (0.1, float("inf"))}}}}
    write_summary_json(tmp_path / "summary.json", summary)
    assert json.loads((tmp_path / "summary.json").read_text()) == {
        "n_cases": 2,
        "macro": {"dice": {"a": {"mean": None, "ci": [0.1, None]}}},
    }
    assert read_summary_json(tmp_path / "summary.json") == json.loads((tmp_path / "summary.json").read_text())
    assert read_summary_json(tmp_path / "missing.json") is None

    run = read_run(tmp_path, ["dice", "ace"])
    assert json.dumps(run.cases) == json.dumps(got)  # (NaN != NaN: compared as text)
    assert run.summary is not None and run.bins is not None
    assert run.bins.case_ids == ["c1", "c3"]


def test_generic_table_writers(tmp_path: Path) -> None:
    write_csv(tmp_path / "empty.csv", [], [])
    assert (tmp_path / "empty.csv").read_bytes() == b""
    write_csv(tmp_path / "t.csv", [{"a": 1, "b": "x,y"}], ["a", "b"])
    assert (tmp_path / "t.csv").read_bytes() == b'a,b\r\n1,"x,y"\r\n'
    write_json(tmp_path / "t.json", [1.5, float("-inf")])
    assert json.loads((tmp_path / "t.json").read_text()) == [1.5, None]
    write_text(tmp_path / "t.txt", "é\n")
    assert (tmp_path / "t.txt").read_bytes() == "é\n".encode()
    write_bytes(tmp_path / "t.bin", b"\0\1")
    copy_file(tmp_path / "t.bin", tmp_path / "u.bin")
    assert (tmp_path / "u.bin").read_bytes() == b"\0\1"
    assert _names(tmp_path) == ["empty.csv", "t.bin", "t.csv", "t.json", "t.txt", "u.bin"]


# -------------------------------------------------------------------------------------- atomic writes


def test_atomic_write_moves_into_place_with_plain_permissions(tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"")
    with atomic_write(tmp_path / "f.bin") as fh:
        fh.write(b"abc")
        (tmp_name,) = [n for n in _names(tmp_path) if n not in ("plain",)]
        assert tmp_name.startswith(".f.bin.") and tmp_name.endswith(".tmp")  # hidden, no data suffix
        assert not (tmp_path / "f.bin").exists()
    assert (tmp_path / "f.bin").read_bytes() == b"abc"
    assert _names(tmp_path) == ["f.bin", "plain"]
    assert (tmp_path / "f.bin").stat().st_mode == (tmp_path / "plain").stat().st_mode
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "g", "a"):  # type: ignore[arg-type]
            pass


def test_atomic_write_failure_keeps_previous_file_and_removes_temp(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(tmp_path / "f.txt", "w") as fh:
            fh.write("new, but only hal")
            raise RuntimeError("boom")
    assert _names(tmp_path) == ["f.txt"] and (tmp_path / "f.txt").read_text() == "old"


def _failing_writers(tmp_path: Path) -> dict[str, object]:
    probs = _probs((6, 5, 4))
    (tmp_path / "src.bin").write_bytes(b"x" * 100)
    return {
        "numpy.npy": lambda: write_numpy(tmp_path / "a.npy", probs),
        "numpy.npz": lambda: write_numpy_probabilities(tmp_path / "a.npz", probs),
        "npz": lambda: write_npz(tmp_path / "a.npz", {"x": probs}, compressed=False),
        "nifti.gz": lambda: write_nifti(tmp_path / "a.nii.gz", probs[0], AFFINE),
        "nifti": lambda: write_nifti_probabilities(tmp_path / "a.nii", probs, AFFINE),
        "nnunet": lambda: write_nnunet_probabilities(tmp_path / "a.npz", probs),
        "cases.csv": lambda: write_cases_csv(
            tmp_path / "cases.csv", [{"case_id": "c", "class": "a"}], ["case_id", "class"]
        ),
        "failed.csv": lambda: write_failed_csv(tmp_path / "failed.csv", [("c", "e")]),
        "bins.npz": lambda: write_bins_npz(tmp_path / "bins.npz", ["c"], np.zeros((1, 1, 3, 2)), ["a"]),
        "summary.json": lambda: write_summary_json(tmp_path / "summary.json", {"a": 1.0}),
        "text": lambda: write_text(tmp_path / "r.html", "<html>"),
        "copy": lambda: copy_file(tmp_path / "src.bin", tmp_path / "dst.bin"),
    }


@pytest.mark.parametrize(
    "writer",
    [
        "numpy.npy",
        "numpy.npz",
        "npz",
        "nifti.gz",
        "nifti",
        "nnunet",
        "cases.csv",
        "failed.csv",
        "bins.npz",
        "summary.json",
        "text",
        "copy",
    ],
)
def test_every_writer_leaves_nothing_when_the_disk_fills_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    """The data are written, then flushing them to disk fails (ENOSPC): no final file, no temp file."""
    call = _failing_writers(tmp_path)[writer]

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_mod.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        call()  # type: ignore[operator]
    assert _names(tmp_path) == ["src.bin"]


def test_writer_failing_inside_the_library_call_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A library writer that dies halfway through its output (here: after the first bytes)."""

    def half_savez(fh, **arrays) -> None:
        fh.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", half_savez)
    with pytest.raises(OSError, match="No space left"):
        write_nnunet_probabilities(tmp_path / "case.npz", _probs((4, 4, 4)))
    rows = ({"case_id": f"c{i}", "class": "a"} if i < 3 else 1 / 0 for i in range(5))
    with pytest.raises(ZeroDivisionError):
        write_cases_csv(tmp_path / "cases.csv", rows, ["case_id", "class"])
    assert _names(tmp_path) == []


_RLIMIT_SCRIPT = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    import numpy as np
    from segcal.io import write_nifti, write_npz, write_numpy
    out = Path(sys.argv[1])
    big = np.ones((64, 64, 64), np.float32)  # 1 MiB, four times the file size limit
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    for name, call in [
        ("a.npy", lambda: write_numpy(out / "a.npy", big)),
        ("a.npz", lambda: write_npz(out / "a.npz", {"probabilities": big}, compressed=False)),
        ("a.nii", lambda: write_nifti(out / "a.nii", big)),
        ("small.npy", lambda: write_numpy(out / "small.npy", big[:2])),
    ]:
        try:
            call()
            print(name, "written")
        except OSError as exc:
            print(name, "failed", type(exc).__name__)  # EFBIG (np.save re-raises it without errno)
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="needs RLIMIT_FSIZE and SIGXFSZ (Linux)")
def test_writers_under_a_file_size_limit_leave_no_truncated_file(tmp_path: Path) -> None:
    """A real partial write: the process may write at most 256 KiB per file (RLIMIT_FSIZE)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run(
        [sys.executable, "-c", _RLIMIT_SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr
    expected = ["a.npy failed OSError", "a.npz failed OSError", "a.nii failed OSError", "small.npy written"]
    assert res.stdout.split("\n")[:4] == expected, res.stdout
    assert _names(tmp_path) == ["small.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "small.npy"), np.ones((2, 64, 64), np.float32))


def test_torch_file_round_trip_and_errors(tmp_path):
    import torch

    from segcal.io import CaseError
    from segcal.io.torchfile import read_torch_file, write_torch_file

    path = write_torch_file(tmp_path / "c.pt", {"w": torch.arange(3.0), "epoch": 2})
    back = read_torch_file(path, "checkpoint")
    assert back["epoch"] == 2 and torch.equal(back["w"], torch.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CaseError, match=r"list\.pt: not a segcal checkpoint"):
        read_torch_file(tmp_path / "list.pt", "checkpoint")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_torch_file(tmp_path / "none.pt", "checkpoint")
