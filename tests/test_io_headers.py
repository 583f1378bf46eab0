"""Headers that claim more data than their file holds fail at once, naming the file, before anything is
allocated (docs/evaluation.md, "Inputs"): each forged file is read in a subprocess whose address space is
limited to 2 GB, so a reader that trusted the header would die of a ``MemoryError`` instead."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from _eval_data import write_nifti_dataset
from segcal.io import CaseError, _sizes, read_nifti, read_numpy

SRC = str(Path(__file__).resolve().parents[1] / "src")
TESTS = str(Path(__file__).resolve().parent)
HUGE = (1024, 1024, 1024, 4)  # float32: 17.2 GB
GB = 1 << 30


def _npy_bytes(shape: tuple[int, ...], payload: bytes = b"\0" * 8) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


def _nifti_bytes(shape: tuple[int, ...], payload: bytes = b"\0" * 8) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    buf = io.BytesIO()
    header.write_to(buf)
    return buf.getvalue() + b"\0" * 4 + payload  # 348-byte header, 4-byte extension flag, then data


def forge(path: Path, shape: tuple[int, ...] = HUGE) -> Path:
    """A tiny file of ``path``'s format whose valid header claims ``shape`` float32, with 8 data bytes."""
    name = path.name
    if name.endswith(".npy"):
        path.write_bytes(_npy_bytes(shape))
    elif name.endswith(".npz"):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("probabilities.npy", _npy_bytes(shape))
    elif name.endswith(".nii.gz"):
        path.write_bytes(gzip.compress(_nifti_bytes(shape)))
    else:
        path.write_bytes(_nifti_bytes(shape))
    return path


_READ_LIMITED = textwrap.dedent(
    """
    import resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    from segcal.io import CaseError, read_nifti, read_numpy
    path = sys.argv[1]
    start = time.perf_counter()
    try:
        (read_nifti if ".nii" in path else read_numpy)(path)
    except CaseError as exc:
        print(f"{time.perf_counter() - start:.3f}", exc, sep="\\n")
        sys.exit(0)
    sys.exit(3)
    """
)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, TESTS]), "OPENBLAS_NUM_THREADS": "1"}


def _read_limited(path: Path) -> tuple[float, str]:
    """``(seconds, message)`` of the CaseError raised when ``path`` is read under a 2 GB address space."""
    proc = subprocess.run(
        [sys.executable, "-c", _READ_LIMITED, str(path)], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    seconds, message = proc.stdout.strip().split("\n", 1)
    return float(seconds), message


@pytest.mark.parametrize("name", ["big.npy", "big.npz", "big.nii", "big.nii.gz"])
def test_a_header_claiming_17_gb_fails_at_once_under_a_2_gb_limit(tmp_path: Path, name: str) -> None:
    path = forge(tmp_path / name)
    assert path.stat().st_size < 1000
    seconds, message = _read_limited(path)
    assert message.startswith(f"{path}: ") and "header claims shape (1024, 1024, 1024, 4) float32 (17.2 GB)" in message
    assert "corrupt or truncated" in message
    assert seconds < 5


def test_messages_say_what_the_file_holds(tmp_path: Path) -> None:
    with pytest.raises(CaseError, match=r"17\.2 GB\) but the file holds 8 bytes of data"):
        read_numpy(forge(tmp_path / "a.npy"))
    with pytest.raises(CaseError, match=r"array 'probabilities'.*but the archive holds 8 bytes of data for it"):
        read_numpy(forge(tmp_path / "a.npz"))
    with pytest.raises(CaseError, match=r"at offset 352 but the file holds 364 bytes"):
        read_nifti(forge(tmp_path / "a.nii"))
    with pytest.raises(CaseError, match=r"but a gzip file of \d+ bytes cannot hold more than"):
        read_nifti(forge(tmp_path / "a.nii.gz"))


def test_a_gzip_trailer_that_disagrees_is_checked_by_counting(tmp_path: Path) -> None:
    """Incompressible data: deflate could hold the claim, the trailer's ISIZE disagrees, the stream is counted."""
    raw = _nifti_bytes((64, 64, 64, 4), np.random.default_rng(0).bytes(1 << 20))  # claims 4.2 MB, holds 1 MB
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(CaseError, match=r"short\.nii\.gz: .*\(4\.2 MB\) at offset 352 but the file holds 1\.0 MB"):
        read_nifti(tmp_path / "short.nii.gz")


def test_a_multi_member_gzip_nifti_still_reads(tmp_path: Path) -> None:
    """A valid file whose last gzip member's ISIZE is not the total (as block-gzip tools write) is counted and
    accepted."""
    data = np.random.default_rng(1).random((9, 8, 7, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "one.nii.gz")
    raw = gzip.decompress((tmp_path / "one.nii.gz").read_bytes())
    (tmp_path / "two.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    np.testing.assert_array_equal(read_nifti(tmp_path / "two.nii.gz")[0], data)


def test_a_zip_member_size_beyond_what_deflate_can_hold_is_refused(tmp_path: Path) -> None:
    """Header and the zip directory both claim 2 GB; the member's few compressed bytes cannot hold it."""
    shape = (512, 1024, 1024)
    member = _npy_bytes(shape, b"")
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("probabilities.npy", member)
    raw = bytearray(path.read_bytes())
    claimed = len(member) + 512 * 1024 * 1024 * 4
    central = raw.index(b"PK\x01\x02")
    raw[22:26] = claimed.to_bytes(4, "little")  # local header: uncompressed size
    raw[central + 24 : central + 28] = claimed.to_bytes(4, "little")  # central directory: uncompressed size
    path.write_bytes(bytes(raw))
    _, message = _read_limited(path)
    assert message.startswith(f"{path}: ") and "the archive claims 2.1 GB" in message and "compressed" in message


def test_data_larger_than_the_memory_available_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    np.save(tmp_path / "a.npy", np.zeros((64, 64, 64), np.float32))  # 1 MB
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 64), np.float32), np.eye(4)), tmp_path / "a.nii.gz")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  4000 kB\nMemAvailable:  500 kB\n")
    monkeypatch.setattr(_sizes, "_MEMINFO", meminfo)
    with pytest.raises(CaseError, match=r"a\.npy: header claims .*1\.0 MB\), more than the 512\.0 kB of memory"):
        read_numpy(tmp_path / "a.npy")
    with pytest.raises(CaseError, match=r"a\.nii\.gz: header claims .*more than the 512\.0 kB of memory available"):
        read_nifti(tmp_path / "a.nii.gz")
    monkeypatch.setattr(_sizes, "_MEMINFO", tmp_path / "absent")  # no /proc/meminfo: that part is skipped
    assert read_numpy(tmp_path / "a.npy").shape == (64, 64, 64)
    assert read_nifti(tmp_path / "a.nii.gz")[0].shape == (64, 64, 64)


_EVALUATE_LIMITED = textwrap.dedent(
    """
    import json, resource, shutil, sys
    from pathlib import Path
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    from segcal.evaluation import EvalConfig, run_evaluation
    pred, lab, out = (Path(a) for a in sys.argv[1:4])
    res = run_evaluation(pred, lab, out, EvalConfig(fmt="nifti", hd95=False, num_bins=10), workers=0, progress=False)
    print(json.dumps({"n_ok": res.n_ok, "failed": res.summary["failed"]}))
    """
)


def test_a_dataset_run_records_the_forged_case_as_failed_and_finishes(tmp_path: Path) -> None:
    pred, lab, _ = write_nifti_dataset(tmp_path, 3)
    forge(pred / "case001.nii.gz")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", _EVALUATE_LIMITED, str(pred), str(lab), str(out)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n_ok"] == 2
    (failed,) = result["failed"]
    assert failed["case_id"] == "case001"
    assert failed["error"].startswith(f"{pred / 'case001.nii.gz'}: ")
    assert "header claims shape (1024, 1024, 1024, 4)" in failed["error"]
    assert (out / "cases.csv").is_file()
