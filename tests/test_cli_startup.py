"""The command line starts light: ``segcal --help`` and every ``segcal <command> --help`` load no torch, MONAI
or numba (the commands import them when they run). No timing here: ``benchmarks/bench_cli.py`` measures it."""

from __future__ import annotations

import json
import subprocess
import sys

from _helpers import subprocess_env

HEAVY = ("torch", "monai", "numba")

# In a fresh interpreter: import the CLI, then ask every command for its help, and report what got imported.
_PROBE = """
import json, sys
import typer
from segcal.cli import app, main

heavy = {heavy!r}
found = {{"import segcal.cli": [m for m in heavy if m in sys.modules]}}
commands = sorted(typer.main.get_command(app).commands)
for args in [[], *([c] for c in commands)]:
    sys.argv = ["segcal", *args, "--help"]
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None), (args, exc.code)
    found[" ".join(["segcal", *args, "--help"])] = [m for m in heavy if m in sys.modules]
print(json.dumps({{"commands": commands, "found": found}}))
"""


def test_help_imports_no_torch_monai_numba() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=HEAVY)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"demo", "evaluate", "compare", "calibrate", "train", "predict"} <= set(report["commands"])
    loaded = {line: mods for line, mods in report["found"].items() if mods}
    assert not loaded, f"heavy modules imported: {loaded}"
