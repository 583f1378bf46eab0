"""Embedded demo data and synthetic test data (docs/data.md).

* :mod:`segcal.data.phantoms`: 2D/3D phantoms whose labels are sampled from a known probability map.
* :mod:`segcal.data.mni152`: the offline MNI152 4-class brain-tissue task (soft reference labels,
  pseudo-subjects split by subject, shifted sets with exact labels), cached under :func:`default_cache_dir`.
"""

from segcal.data.mni152 import (
    CLASS_NAMES,
    SHIFT_KINDS,
    TissueDataset,
    TissueSplit,
    default_cache_dir,
    load_tissue_dataset,
    load_tissue_volumes,
    make_shifted,
    shift_images,
)
from segcal.data.phantoms import Phantom, make_phantom, temper

__all__ = [
    "CLASS_NAMES",
    "SHIFT_KINDS",
    "Phantom",
    "TissueDataset",
    "TissueSplit",
    "default_cache_dir",
    "load_tissue_dataset",
    "load_tissue_volumes",
    "make_phantom",
    "make_shifted",
    "shift_images",
    "temper",
]
