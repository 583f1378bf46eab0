"""Build times of the embedded data: phantoms and the MNI152 tissue task (fresh build and cache hit).

Run: ``PYTHONPATH=src python benchmarks/bench_data.py`` (uses a temporary cache directory).
"""

from __future__ import annotations

import os
import tempfile
import time

import torch


def _time(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    from segcal.data import load_tissue_dataset, load_tissue_volumes, make_phantom, make_shifted, mni152

    print(f"torch threads: {torch.get_num_threads()}, cpus: {os.cpu_count()}")
    make_phantom((16, 16), 3, 1)
    for shape, c, mode in [
        ((64, 64), 3, "exclusive"),
        ((64, 64, 32), 3, "exclusive"),
        ((64, 64, 32), 3, "multilabel"),
    ]:
        t = _time(lambda s=shape, c=c, m=mode: make_phantom(s, c, batch=2, seed=0, mode=m), repeat=5)
        print(f"make_phantom {shape} C={c} B=2 {mode}: {t * 1e3:.1f} ms (best of 5)")
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        mni152.reference_maps()
        print(f"nilearn import + template load: {time.perf_counter() - t0:.2f} s")
        t = _time(lambda: load_tissue_dataset(cache_dir=d, use_cache=False))
        print(f"load_tissue_dataset(20 subjects, 24 slices) fresh build (template in memory): {t:.2f} s")
        t = _time(lambda: load_tissue_dataset(cache_dir=d))
        print(f"load_tissue_dataset first call incl. cache write: {t:.2f} s")
        t = _time(lambda: load_tissue_dataset(cache_dir=d), repeat=3)
        print(f"load_tissue_dataset cache hit: {t:.2f} s")
        ds = load_tissue_dataset(cache_dir=d)
        for name in ("noise", "blur", "thick_slice", "contrast", "bias_field"):
            t = _time(lambda name=name: make_shifted(ds.test, name, 3))  # type: ignore[arg-type]
            print(f"make_shifted(test[{len(ds.test)}], {name}, 3): {t * 1e3:.0f} ms")
        t = _time(lambda: load_tissue_volumes(cache_dir=d))
        print(f"load_tissue_volumes(20 subjects) first call incl. cache write: {t:.2f} s")
        sizes = {p: os.path.getsize(os.path.join(d, p)) / 1e6 for p in os.listdir(d)}
        for p, s in sorted(sizes.items()):
            print(f"cache file {p}: {s:.1f} MB")


if __name__ == "__main__":
    main()
