"""What a run's input folders say about their cases, beyond the files: the voxel geometry and the class names
(docs/evaluation.md, "Geometry" and "Class names").

* **Geometry.** A case's voxel spacing is its files' own (NIfTI header, ``.npz`` key ``spacing``; read by
  :func:`segcal.io.matching.load_case`), else the folder spacing resolved here once per run: the
  ``segcal.json`` sidecar of the prediction or the label folder (:mod:`segcal.io.sidecar`), else
  ``segcal evaluate --spacing``. Two stated spacings that differ are an error, never a silent choice. A case
  with none of them is scored with 1 mm voxels and listed (:func:`geometry_summary`).
* **Class names.** The names of the label values ``0 .. C-1`` (background included): the given names
  (``--class-names``), else the sidecars' ``class_names``, else the ``labels`` of an nnU-Net v2
  ``dataset.json`` (in the prediction folder of an ``nnunet`` run, or in the label folder). They are labels of
  the outputs only: the statistics are stored per channel index and the names applied when the outputs are
  written (:func:`scored_names`), so renaming never changes a number and never leaves an old name behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segcal.io.case import GEOMETRY_ATOL
from segcal.io.nnunet import DATASET_JSON, read_nnunet_class_names
from segcal.io.sidecar import SIDECAR_NAME, FolderInfo, read_folder_info

__all__ = [
    "RESERVED_NAMES",
    "SPACING_OPTION",
    "ClassNames",
    "ClassNamesError",
    "FolderSpacing",
    "GeometryConflictError",
    "check_class_count",
    "check_class_names",
    "folder_spacing",
    "geometry_summary",
    "read_folder_infos",
    "resolve_class_names",
    "scored_names",
]

#: keys of ``summary.json`` that sit next to the class names (the class average, the per-case metrics)
RESERVED_NAMES = ("mean", "case")
#: where given class names come from, in messages
GIVEN = "--class-names"
#: where ``segcal evaluate --spacing`` comes from, in messages
SPACING_OPTION = "--spacing"


class GeometryConflictError(ValueError):
    """Two sources state different voxel spacings for the same cases."""


class ClassNamesError(ValueError):
    """Class names that cannot label the run's classes (count, duplicates, reserved names, conflicts)."""


@dataclass(frozen=True)
class FolderSpacing:
    """The voxel spacing stated for every case of a run, and where it comes from (``None``: not stated)."""

    spacing: tuple[float, ...] | None = None
    source: str | None = None


@dataclass(frozen=True)
class ClassNames:
    """The names of label values ``0 .. C-1`` and where they come from (``None``: the generic ``class_k``)."""

    names: tuple[str, ...] | None = None
    source: str | None = None


def read_folder_infos(pred_dir: Path, label_dir: Path) -> dict[str, tuple[Path, FolderInfo]]:
    """``{"prediction": (sidecar path, info), "label": ...}`` of the two folders (an empty info without a
    sidecar); :class:`~segcal.io.case.CaseError` naming an invalid sidecar."""
    return {
        role: (Path(folder) / SIDECAR_NAME, read_folder_info(folder))
        for role, folder in (("prediction", pred_dir), ("label", label_dir))
    }


def _fmt_spacing(sp: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(s):g}" for s in sp) + ")"


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(float(x) - float(y)) <= GEOMETRY_ATOL for x, y in zip(a, b, strict=True))


def folder_spacing(
    infos: dict[str, tuple[Path, FolderInfo]], option: Sequence[float] | None
) -> FolderSpacing:
    """The run's folder spacing: a sidecar's (prediction or label folder), else ``option`` (``--spacing``).
    :class:`GeometryConflictError` when the two sidecars, or a sidecar and ``option``, state different
    spacings."""
    stated = [(str(path), info.spacing) for path, info in infos.values() if info.spacing is not None]
    if len(stated) == 2 and not _same(stated[0][1], stated[1][1]):
        raise GeometryConflictError(
            f"the sidecars state different voxel spacings: {_fmt_spacing(stated[0][1])} in {stated[0][0]} and "
            f"{_fmt_spacing(stated[1][1])} in {stated[1][0]}; correct one of them"
        )
    if stated:
        source, spacing = stated[0]
        if option is not None and not _same(option, spacing):
            raise GeometryConflictError(
                f"{SPACING_OPTION} {_fmt_spacing(option)} contradicts the voxel spacing {_fmt_spacing(spacing)} "
                f"stated in {source}; drop {SPACING_OPTION} or correct the sidecar"
            )
        return FolderSpacing(tuple(spacing), source)
    if option is not None:
        return FolderSpacing(tuple(float(s) for s in option), SPACING_OPTION)
    return FolderSpacing()


def check_class_names(names: Sequence[str], source: str) -> tuple[str, ...]:
    """``names`` as a tuple, or :class:`ClassNamesError` naming ``source`` when one is empty, repeated or a
    reserved key of ``summary.json`` (:data:`RESERVED_NAMES`)."""
    names = tuple(str(n) for n in names)
    if not names or any(not n.strip() for n in names):
        raise ClassNamesError(f"class names from {source} must be non-empty, got {list(names)}")
    if len(set(names)) != len(names):
        raise ClassNamesError(f"class names from {source} must be unique, got {list(names)}")
    reserved = sorted(set(names) & set(RESERVED_NAMES))
    if reserved:
        raise ClassNamesError(
            f"class names from {source} may not be {reserved} (summary.json keys for the class average and the "
            "per-case metrics)"
        )
    return names


def _one_source(found: list[tuple[str, tuple[str, ...]]], what: str) -> ClassNames:
    """The names of the first of ``found`` (source, names); :class:`ClassNamesError` when two disagree."""
    if not found:
        return ClassNames()
    if len(found) == 2 and found[0][1] != found[1][1]:
        raise ClassNamesError(
            f"the {what} name the classes differently: {list(found[0][1])} in {found[0][0]} and "
            f"{list(found[1][1])} in {found[1][0]}; correct one of them or pass {GIVEN}"
        )
    source, names = found[0]
    return ClassNames(check_class_names(names, source), source)


def _dataset_json_files(pred_dir: Path, label_dir: Path, fmt: str) -> list[Path]:
    """nnU-Net ``dataset.json`` files that name the classes: the prediction folder's (``nnunet`` runs), the
    label folder's."""
    folders = ([Path(pred_dir)] if fmt == "nnunet" else []) + [Path(label_dir)]
    return [f / DATASET_JSON for f in folders if (f / DATASET_JSON).is_file()]


def resolve_class_names(
    given: Sequence[str] | None,
    infos: dict[str, tuple[Path, FolderInfo]],
    pred_dir: Path,
    label_dir: Path,
    fmt: str,
    *,
    regions: bool = False,
) -> ClassNames:
    """The run's class names: ``given``, else the sidecars' ``class_names``, else an nnU-Net ``dataset.json``
    (:func:`_dataset_json_files`); none with ``regions`` (region channels carry their own names; ``given``
    names with regions are a :class:`ClassNamesError`)."""
    if regions:
        if given is not None:
            raise ClassNamesError(
                f"{GIVEN} names the class channels (the argmax classes); with --regions the scored channels are "
                "the region channels, named in --regions: use one or the other"
            )
        return ClassNames()
    if given is not None:
        return ClassNames(check_class_names(given, GIVEN), GIVEN)
    sidecars = [(str(path), info.class_names) for path, info in infos.values() if info.class_names is not None]
    if sidecars:
        return _one_source(sidecars, "sidecars")
    found = [(str(p), read_nnunet_class_names(p)) for p in _dataset_json_files(pred_dir, label_dir, fmt)]
    return _one_source(found, "nnU-Net dataset.json files")


def check_class_count(names: ClassNames, num_classes: int | None) -> None:
    """:class:`ClassNamesError` naming the source when ``names`` does not give one name per class (label values
    ``0 .. num_classes - 1``, background included); nothing to check without names or class count."""
    if names.names is None or num_classes is None or len(names.names) == num_classes:
        return
    raise ClassNamesError(
        f"{len(names.names)} class names from {names.source} ({list(names.names)}) but the predictions have "
        f"{num_classes} classes (label values 0..{num_classes - 1}); give one name per label value, background "
        "included"
    )


def scored_names(names: ClassNames, stored: Sequence[str], num_classes: int | None, first: int) -> list[str]:
    """The names of the scored channels: ``stored`` (``class_k`` / region names) without class names, else the
    names of label values ``first .. first + len(stored) - 1`` (``first`` is 1 when the background is not
    scored)."""
    if names.names is None:
        return list(stored)
    check_class_count(names, num_classes)
    return list(names.names[first : first + len(stored)])


def _mm_metrics(run_config: dict[str, Any]) -> list[str]:
    out = ["HD95"] if run_config.get("hd95") else []
    out += [m.upper() for m in run_config.get("surface") or () if m != "hd95" or not run_config.get("hd95")]
    return out + (["bbox margins"] if run_config.get("region") == "bbox" else [])


def geometry_summary(
    assumed: list[str], run_config: dict[str, Any], spacing: FolderSpacing | None
) -> dict[str, Any]:
    """The ``summary.json`` entry ``geometry``: the folder spacing and its source, the mm-based metrics of the
    run, the cases scored with an assumed 1 mm voxel size (``assumed``: no geometry in their files, no sidecar
    spacing, no ``--spacing``) and, when some mm metric depended on that assumption, the ``warning`` the CLI
    prints and the report shows (else ``None``)."""
    spacing = spacing or FolderSpacing()
    mm = _mm_metrics(run_config)
    warning = None
    if assumed and mm:
        verb = "assumes" if len(mm) == 1 else "assume"
        warning = (
            f"{len(assumed)} case{'s have' if len(assumed) != 1 else ' has'} no voxel geometry; "
            f"{' and '.join(mm)} {verb} 1 mm voxels; pass {SPACING_OPTION} or state 'spacing' in a {SIDECAR_NAME} "
            "sidecar of the prediction or label folder (or store it in the files: NIfTI, or an .npz key 'spacing')"
        )
    return {
        "folder_spacing": list(spacing.spacing) if spacing.spacing is not None else None,
        "folder_spacing_from": spacing.source,
        "mm_metrics": mm,
        "assumed_1mm": list(assumed),
        "warning": warning,
    }
