"""Embedded demo data and synthetic test data (DATA.md).

* :mod:`segcal.data.phantoms`: 2D/3D phantoms whose labels are sampled from a known probability map.
* :mod:`segcal.data.mni152`: the offline MNI152 4-class brain-tissue task with pseudo-subjects and shift sets.
"""

from segcal.data.phantoms import Phantom, make_phantom, temper

__all__ = ["Phantom", "make_phantom", "temper"]
