"""Start-up cost of the command line: ``segcal --help`` and ``segcal <command> --help`` in fresh processes.

Each command line runs ``--runs`` times in a new interpreter (``python -m segcal ...``, so the checkout on
``PYTHONPATH`` is what runs); the table shows the median and the fastest wall time, and which heavy modules
(torch, monai, numba) the process had imported when it finished.

PYTHONPATH=src python benchmarks/bench_cli.py --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

#: every command of ``segcal`` (``segcal --help`` lists them); the first entry is the bare ``segcal --help``
COMMANDS: tuple[tuple[str, ...], ...] = (
    (),
    ("demo",),
    ("evaluate",),
    ("compare",),
    ("calibrate",),
    ("train",),
    ("predict",),
)
HEAVY = ("torch", "monai", "numba")

# Runs the CLI in-process, then reports the heavy modules it imported (the CLI exits through SystemExit).
_PROBE = """
import sys
sys.argv = ["segcal", *sys.argv[1:]]
try:
    from segcal.cli import main
    main()
except SystemExit:
    pass
finally:
    sys.stdout.flush()
    sys.stderr.write("HEAVY:" + ",".join(m for m in {heavy!r} if m in sys.modules) + "\\n")
"""


def time_command(args: tuple[str, ...], runs: int, env: dict[str, str]) -> tuple[list[float], str]:
    """Wall times of ``runs`` fresh ``segcal *args --help`` processes, and the heavy modules they imported."""
    probe = _PROBE.format(heavy=HEAVY)
    times: list[float] = []
    heavy = ""
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", probe, *args, "--help"], env=env, capture_output=True, text=True, check=False
        )
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0 or "Usage" not in proc.stdout:
            raise RuntimeError(f"segcal {' '.join(args)} --help failed:\n{proc.stdout}\n{proc.stderr}")
        heavy = next((ln[6:] for ln in proc.stderr.splitlines() if ln.startswith("HEAVY:")), "?")
    return times, heavy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="fresh processes per command line (median reported)")
    a = ap.parse_args()
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    # the interpreter alone, as the floor every command line pays
    bare = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
        bare.append(time.perf_counter() - t0)
    print(f"python {sys.version.split()[0]}, {a.runs} fresh process(es) per line, cpu count {os.cpu_count()}")
    print(f"{'command line':<30} {'median s':>9} {'min s':>7}  heavy modules imported")
    print(f"{'python -c pass':<30} {statistics.median(bare):9.3f} {min(bare):7.3f}")
    for args in COMMANDS:
        times, heavy = time_command(args, a.runs, env)
        line = " ".join(("segcal", *args, "--help"))
        print(f"{line:<30} {statistics.median(times):9.3f} {min(times):7.3f}  {heavy or '-'}")


if __name__ == "__main__":
    main()
