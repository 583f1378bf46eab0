"""MNI152 tissue task: shapes, soft references, determinism, cache behaviour, shifted sets, no network."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from segcal.data import mni152
from segcal.data.mni152 import (
    SHIFT_KINDS,
    load_tissue_dataset,
    load_tissue_volumes,
    make_shifted,
    shift_images,
)

SMALL = {"n_subjects": 3, "split": (1, 1, 1), "slices_per_subject": 4}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("segcal_cache")


@pytest.fixture(scope="module")
def small(cache: Path) -> mni152.TissueDataset:
    return load_tissue_dataset(**SMALL, seed=0, cache_dir=cache)


def test_no_network_while_building(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mni152.reference_maps.cache_clear()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    ds = load_tissue_dataset(n_subjects=3, split=(1, 1, 1), slices_per_subject=2, cache_dir=tmp_path)
    assert len(ds.train) == 2


def test_shapes_and_split_by_subject(small: mni152.TissueDataset) -> None:
    assert small.num_classes == 4 and small.class_names == ("background", "CSF", "GM", "WM")
    assert small.spacing == (2.0, 2.0)
    seen = set()
    for name in ("train", "val", "test"):
        sp = small[name]
        assert sp.images.shape == (4, 1, 112, 96) and sp.images.dtype == np.float32
        assert sp.labels.shape == (4, 112, 96) and sp.labels.dtype == np.int64
        assert sp.soft.shape == (4, 4, 112, 96) and sp.soft.dtype == np.float32
        assert sp.subjects.shape == (4,) and sp.slices.shape == (4,)
        subjects = set(sp.subjects.tolist())
        assert len(subjects) == 1 and not subjects & seen  # no subject in two splits
        seen |= subjects
        assert np.isfinite(sp.images).all() and sp.images.min() >= 0 and 0.5 < sp.images.max() < 2
    with pytest.raises(KeyError):
        small["holdout"]


def test_soft_reference(small: mni152.TissueDataset) -> None:
    sp = small.train
    np.testing.assert_allclose(sp.soft.sum(1), 1.0, atol=1e-5)
    assert sp.soft.min() >= 0 and sp.soft.max() <= 1
    np.testing.assert_array_equal(sp.labels, sp.soft.argmax(1))
    assert set(np.unique(sp.labels).tolist()) == {0, 1, 2, 3}
    brain = sp.labels > 0
    assert (brain.sum((1, 2)) > 500).all()  # every slice contains brain
    frac_soft = float((sp.soft.max(1)[brain] < 0.9).mean())
    assert frac_soft > 0.6, frac_soft  # most brain voxels have an uncertain reference (docs/data.md)
    # T1 contrast: WM brighter than GM brighter than CSF
    means = [float(sp.images[:, 0][sp.labels == c].mean()) for c in (1, 2, 3)]
    assert means[0] < means[1] < means[2], means


def test_default_split_and_validation(cache: Path) -> None:
    with pytest.raises(ValueError, match="add up"):
        load_tissue_dataset(n_subjects=3, split=(2, 2, 2), cache_dir=cache)
    with pytest.raises(ValueError, match="at least one"):
        load_tissue_dataset(n_subjects=3, split=(3, 0, 0), cache_dir=cache)
    with pytest.raises(ValueError, match="n_subjects"):
        load_tissue_dataset(n_subjects=2, split=None, cache_dir=cache)
    ds = load_tissue_dataset(n_subjects=5, split=None, slices_per_subject=1, cache_dir=cache)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (3, 1, 1)


def test_cache_hit_and_determinism(small: mni152.TissueDataset, cache: Path) -> None:
    before = mni152.build_count()
    again = load_tissue_dataset(**SMALL, seed=0, cache_dir=cache)
    assert again.from_cache and mni152.build_count() == before
    fresh = load_tissue_dataset(**SMALL, seed=0, use_cache=False)
    assert not fresh.from_cache and mni152.build_count() == before + 1
    for name in ("train", "test"):
        for key in ("images", "labels", "soft", "subjects", "slices"):
            np.testing.assert_array_equal(getattr(again[name], key), getattr(small[name], key))
            np.testing.assert_array_equal(getattr(fresh[name], key), getattr(small[name], key))
    other = load_tissue_dataset(**SMALL, seed=1, cache_dir=cache)
    assert not other.from_cache and other.cache_path != small.cache_path
    assert not np.array_equal(other.train.labels, small.train.labels)


def test_subject_independent_of_subject_count(small: mni152.TissueDataset, cache: Path) -> None:
    bigger = load_tissue_dataset(n_subjects=4, split=(2, 1, 1), slices_per_subject=4, cache_dir=cache)
    np.testing.assert_array_equal(bigger.train.soft[:4], small.train.soft)  # subject 0 in both


def test_corrupt_or_mismatched_cache_regenerates(small: mni152.TissueDataset, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    ds = load_tissue_dataset(**SMALL, seed=0, cache_dir=cache)
    path = ds.cache_path
    assert path is not None and path.is_file()
    path.write_bytes(b"not a zip file")  # corrupt
    before = mni152.build_count()
    ds2 = load_tissue_dataset(**SMALL, seed=0, cache_dir=cache)
    assert not ds2.from_cache and mni152.build_count() == before + 1
    np.testing.assert_array_equal(ds2.test.soft, small.test.soft)
    assert load_tissue_dataset(**SMALL, seed=0, cache_dir=cache).from_cache  # rewritten and valid again
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    assert not load_tissue_dataset(**SMALL, seed=0, cache_dir=cache).from_cache
    # a valid file written for other parameters under this key's name is not trusted
    other = load_tissue_dataset(n_subjects=3, split=(1, 1, 1), slices_per_subject=2, seed=0, cache_dir=cache)
    shutil.copyfile(other.cache_path, path)
    ds3 = load_tissue_dataset(**SMALL, seed=0, cache_dir=cache)
    assert not ds3.from_cache and len(ds3.train) == 4


def test_cache_dir_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEGCAL_CACHE", str(tmp_path / "a"))
    assert mni152.default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("SEGCAL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert mni152.default_cache_dir() == tmp_path / "x" / "segcal"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert mni152.default_cache_dir() == Path.home() / ".cache" / "segcal"


def test_volumes_match_slices(small: mni152.TissueDataset, cache: Path) -> None:
    vol = load_tissue_volumes(n_subjects=3, split=(1, 1, 1), cache_dir=cache)
    assert vol.spacing == (2.0, 2.0, 2.0)
    assert vol.train.images.shape == (1, 1, 112, 96, 80) and vol.train.soft.shape == (1, 4, 112, 96, 80)
    np.testing.assert_array_equal(vol.train.labels, vol.train.soft.argmax(1))
    for i, z in enumerate(small.train.slices):
        np.testing.assert_array_equal(vol.train.soft[0, ..., z], small.train.soft[i])
        np.testing.assert_array_equal(vol.train.labels[0, ..., z], small.train.labels[i])


@pytest.mark.parametrize("kind", SHIFT_KINDS)
def test_shifted_sets_keep_labels(small: mni152.TissueDataset, kind: str) -> None:
    src = small.test
    diffs = []
    for severity in (1, 3, 5):
        sh = make_shifted(src, kind, severity, seed=0)  # type: ignore[arg-type]
        assert sh.name == f"test/{kind}{severity}"
        assert sh.images.shape == src.images.shape and sh.images.dtype == np.float32
        assert np.isfinite(sh.images).all() and sh.images.min() >= 0
        assert sh.labels is src.labels and sh.soft is src.soft  # anatomy unchanged: labels stay exact
        diffs.append(float(np.abs(sh.images - src.images).mean()))
    assert diffs[0] > 1e-3 and diffs[0] < diffs[1] < diffs[2], diffs
    again = make_shifted(src, kind, 3, seed=0)  # type: ignore[arg-type]
    np.testing.assert_array_equal(again.images, make_shifted(src, kind, 3, seed=0).images)  # type: ignore[arg-type]


def test_thick_slice_acts_along_last_axis_only() -> None:
    rng = np.random.default_rng(0)
    along_h = np.repeat(rng.random((2, 1, 16, 1)), 12, axis=3).astype(np.float32)  # constant along last axis
    np.testing.assert_allclose(shift_images(along_h, "thick_slice", 5), along_h, atol=1e-6)
    assert np.abs(shift_images(along_h, "blur", 5) - along_h).max() > 0.01
    along_w = np.swapaxes(along_h, 2, 3).copy()
    assert np.abs(shift_images(along_w, "thick_slice", 5) - along_w).max() > 0.01
    vol = rng.random((1, 1, 6, 6, 20)).astype(np.float32)
    assert shift_images(vol, "thick_slice", 3).shape == vol.shape


def test_shift_bad_input(small: mni152.TissueDataset) -> None:
    with pytest.raises(ValueError, match="kind"):
        make_shifted(small.test, "motion", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="severity"):
        make_shifted(small.test, "noise", 6)
    with pytest.raises(ValueError, match="severity"):
        make_shifted(small.test, "noise", 0)
    with pytest.raises(ValueError, match="images"):
        shift_images(np.zeros((2, 3, 8, 8), np.float32), "noise")
