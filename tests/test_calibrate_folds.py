"""``segcal calibrate`` on ensembles of folds (``--val-ensemble-with`` / ``--apply-ensemble-with``, and the
Python API ``match_ensemble`` + ``FolderVolumes``, ``read_ensemble_logits``): each case is the voxel-wise mean of
the members' probabilities (not of their logits), the fit and the output equal a fit and a transform of that mean
by hand, the sidecar names every member, and members with other cases or shapes are refused naming the folder,
the case or the file."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from _helpers import invoke_cli
from segcal.io.matching import match_ensemble
from segcal.posthoc import TemperatureScaling, load_calibrator
from segcal.posthoc.folders import FolderVolumes, probabilities_to_logits, read_ensemble_logits

SHAPE = (10, 8, 6)  # x != y != z
C = 3
N_FOLDS = 3
AFFINE = np.diag([0.9, 1.1, 2.0, 1.0])


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(0, keepdims=True))
    return (e / e.sum(0, keepdims=True)).astype(np.float32)


def _case(rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """Over-confident members (each fold its own noise and sharpness) and a label sampled from a softer truth."""
    z = rng.normal(0, 1.0, (C, *SHAPE)).astype(np.float32)
    z[:, 2:8, 2:6, 1:5] += np.array([0.0, 2.0, 0.5], np.float32)[:, None, None, None]
    truth = _softmax(z).reshape(C, -1)
    y = np.array([rng.choice(C, p=truth[:, i] / truth[:, i].sum()) for i in range(truth.shape[1])], np.int16)
    members = [_softmax((2.0 + k) * (z + rng.normal(0, 0.4, z.shape))) for k in range(N_FOLDS)]
    return members, y.reshape(SHAPE)


def _write_nnunet(folder: Path, cid: str, probs: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / f"{cid}.npz", probabilities=probs.transpose(0, 3, 2, 1))  # (C, z, y, x)
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2}}))
    (folder / "plans.json").write_text("{}")


@pytest.fixture
def folds(tmp_path: Path) -> dict:
    """``val/fold_k`` (4 cases) with labels and ``test/fold_k`` (2 cases), nnU-Net folders of 3 folds."""
    rng = np.random.default_rng(5)
    d: dict = {"val": [tmp_path / "val" / f"fold_{k}" for k in range(N_FOLDS)],
               "test": [tmp_path / "test" / f"fold_{k}" for k in range(N_FOLDS)], "labels": tmp_path / "labels",
               "val_data": {}, "test_data": {}}  # fmt: skip
    d["labels"].mkdir()
    for split, n in (("val", 4), ("test", 2)):
        for i in range(n):
            cid = f"{split}{i}"
            members, y = _case(rng)
            for folder, p in zip(d[split], members, strict=True):
                _write_nnunet(folder, cid, p)
            if split == "val":
                nib.save(nib.Nifti1Image(y, AFFINE), d["labels"] / f"{cid}.nii.gz")
            d[f"{split}_data"][cid] = (members, y)
    return d


def _args(d: dict, out: Path, *extra: str, val: list[Path] | None = None, test: list[Path] | None = None) -> list:
    val, test = val or d["val"], test or d["test"]
    args = ["calibrate", "--method", "ts", "--val-pred", str(val[0]), "--val-labels", str(d["labels"]),
            "--apply-to", str(test[0]), "-o", str(out), "--max-voxels", "0", *extra]  # fmt: skip
    for f in val[1:]:
        args += ["--val-ensemble-with", str(f)]
    for f in test[1:]:
        args += ["--apply-ensemble-with", str(f)]
    return args


def _mean(members: list[np.ndarray]) -> np.ndarray:
    return np.mean(np.stack([m.astype(np.float64) for m in members]), 0).astype(np.float32)


def _flat(text: str) -> str:
    return "".join(text.replace("│", "").split())  # Rich wraps long lines and paths, in a box for usage errors


def test_fit_and_outputs_equal_the_mean_of_probabilities_by_hand(folds: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = invoke_cli(_args(folds, out, "--save-calibrator", str(tmp_path / "cal.pt")))
    assert res.exit_code == 0, res.output
    temperature = load_calibrator(tmp_path / "cal.pt").temperature_
    # by hand: temperature scaling fitted on log of the mean probabilities of the folds
    cids = sorted(folds["val_data"])
    z = torch.from_numpy(np.stack([probabilities_to_logits(_mean(folds["val_data"][c][0])) for c in cids]))
    y = torch.from_numpy(np.stack([folds["val_data"][c][1] for c in cids])).long()
    ref = TemperatureScaling().fit(z, y)
    assert temperature == pytest.approx(ref.temperature_, rel=1e-4)
    # not the mean of the logits (another ensemble), which fits another temperature
    z_logit_mean = torch.from_numpy(np.stack([
        np.mean([probabilities_to_logits(m) for m in folds["val_data"][c][0]], 0) for c in cids
    ]))  # fmt: skip
    assert abs(TemperatureScaling().fit(z_logit_mean, y).temperature_ - temperature) > 1e-2
    # one output per case, named as in --apply-to: softmax(log(mean) / T), marked, in nnU-Net's axis order
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "plans.json", "segcal.json", "test0.npz",
                                                      "test1.npz"]  # fmt: skip
    for cid, (members, _) in folds["test_data"].items():
        with np.load(out / f"{cid}.npz", allow_pickle=False) as f:
            q = f["probabilities"].transpose(0, 3, 2, 1)
            mark = str(f["segcal_calibration"])
        want = torch.softmax(torch.from_numpy(probabilities_to_logits(_mean(members))) / temperature, 0).numpy()
        assert np.allclose(q, want, atol=2e-6)
        assert f"mean of {N_FOLDS}" in mark
    record = json.loads((out / "segcal.json").read_text())["calibration"]
    assert record["val_ensemble"] == [str(f.resolve()) for f in folds["val"]]
    assert record["apply_ensemble"] == [str(f.resolve()) for f in folds["test"]]
    assert record["ensemble_average"] == "probabilities"
    # the Python API gives the same fit and the same mean
    cases, unmatched = match_ensemble(folds["val"], folds["labels"], "nnunet")
    assert unmatched == {} and [c.case_id for c in cases] == cids
    api = TemperatureScaling().fit(FolderVolumes(cases, "nnunet"))
    assert api.temperature_ == pytest.approx(temperature, rel=1e-6)
    logits, _, _ = read_ensemble_logits([f / "test0.npz" for f in folds["test"]], "nnunet")
    assert np.allclose(logits, probabilities_to_logits(_mean(folds["test_data"]["test0"][0])), atol=1e-6)


def test_without_ensemble_options_the_sidecar_record_is_unchanged(folds: dict, tmp_path: Path) -> None:
    res = invoke_cli(_args(folds, tmp_path / "out", val=folds["val"][:1], test=folds["test"][:1]))
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "out" / "segcal.json").read_text())["calibration"]
    assert set(record) == {"method", "temperature", "val_pred", "apply_to"}


def test_a_member_holding_logits_is_averaged_as_its_probabilities(tmp_path: Path) -> None:
    """npy members: fold 1 stores logits (softmax(z) = its probabilities, shifted by a constant per voxel): the
    calibration equals the one where it stores the probabilities."""
    rng = np.random.default_rng(2)
    data = {f"c{i}": _case(rng) for i in range(3)}
    lab = tmp_path / "lab"
    lab.mkdir()
    for name in ("probs", "logits"):
        for cid, (members, y) in data.items():
            for k, p in enumerate(members[:2]):
                folder = tmp_path / name / f"fold_{k}"
                folder.mkdir(parents=True, exist_ok=True)
                if name == "logits" and k == 1:
                    np.savez(folder / f"{cid}.npz", logits=np.log(p) + rng.normal(0, 2, SHAPE).astype(np.float32))
                else:
                    np.savez(folder / f"{cid}.npz", probabilities=p)
            np.save(lab / f"{cid}.npy", y)
    outs = {}
    for name in ("probs", "logits"):
        f0, f1 = tmp_path / name / "fold_0", tmp_path / name / "fold_1"
        res = invoke_cli([
            "calibrate", "--val-pred", str(f0), "--val-ensemble-with", str(f1), "--val-labels", str(lab),
            "--apply-to", str(f0), "--apply-ensemble-with", str(f1), "-o", str(tmp_path / f"out_{name}"),
            "--max-voxels", "0", "--save-calibrator", str(tmp_path / f"{name}.pt"),
        ])  # fmt: skip
        assert res.exit_code == 0, res.output
        outs[name] = load_calibrator(tmp_path / f"{name}.pt").temperature_
    assert outs["logits"] == pytest.approx(outs["probs"], rel=1e-4)
    with np.load(tmp_path / "out_logits" / "c0.npz") as a, np.load(tmp_path / "out_probs" / "c0.npz") as b:
        assert np.allclose(a["probabilities"], b["probabilities"], atol=1e-4)


def test_a_case_missing_in_a_validation_fold_is_refused_naming_fold_and_case(folds: dict, tmp_path: Path) -> None:
    (folds["val"][2] / "val1.npz").unlink()
    res = invoke_cli(_args(folds, tmp_path / "out"))
    assert res.exit_code == 2, res.output
    text = _flat(res.output)
    assert _flat(f"ensemble member {folds['val'][2]}") in text and "caseval1" in text
    assert not (tmp_path / "out").exists()


def test_a_case_missing_in_an_apply_fold_is_refused_naming_fold_and_case(folds: dict, tmp_path: Path) -> None:
    (folds["test"][1] / "test0.npz").unlink()
    res = invoke_cli(_args(folds, tmp_path / "out"))
    assert res.exit_code == 2, res.output
    text = _flat(res.output)
    assert _flat(str(folds["test"][1] / "test0.npz")) in text and "casetest0" in text


def test_a_member_of_another_shape_is_refused_naming_its_file(folds: dict, tmp_path: Path) -> None:
    members, _ = folds["test_data"]["test1"]
    two = members[2][:2] / members[2][:2].sum(0, keepdims=True)
    _write_nnunet(folds["test"][2], "test1", two)  # 2 classes instead of 3
    res = invoke_cli(_args(folds, tmp_path / "out"))
    assert res.exit_code == 1, res.output
    text = _flat(res.output)
    assert _flat(str(folds["test"][2] / "test1.npz")) in text and "sameclassesandshape" in text


def test_a_member_given_twice_or_holding_the_output_is_refused(folds: dict, tmp_path: Path) -> None:
    twice = invoke_cli(_args(folds, tmp_path / "out", val=[*folds["val"], folds["val"][1]]))
    assert twice.exit_code == 2 and "giventwice" in _flat(twice.output)
    inside = invoke_cli(_args(folds, folds["test"][2] / "out"))
    assert inside.exit_code == 2 and "--apply-ensemble-with" in inside.output
