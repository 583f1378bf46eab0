"""Fixtures shared by several test files (plain helpers live in ``tests/_helpers.py``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

# As the segcal command line does (cli.main), before torch is imported: idle OpenMP threads sleep instead of
# spin-waiting, so torch's and numba's pools do not steal each other's cores on small CI machines.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

# Without a GPU, segcal's Triton kernels run in Triton's interpreter (on CPU tensors, with NumPy), so their
# tests compare them with the CPU kernels everywhere. The switch must precede the first import of triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run the test with one torch thread (small models are faster and steadier so), then restore the count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
