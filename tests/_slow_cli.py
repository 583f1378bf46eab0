"""Runs the ``segcal`` command line with every evaluated case slowed down, so that fault-injection tests can
kill a run midway: ``python _slow_cli.py SECONDS evaluate ...``. The delay is injected here, by wrapping the
runner's per-case function, not by a hook in the library (in-process runs only: ``--workers 0``)."""

from __future__ import annotations

import sys
import time

import segcal.evaluation.runner as runner
from segcal.cli import main

_delay = float(sys.argv.pop(1))
_evaluate = runner.evaluate_case_files


def _slow(*args, **kwargs):  # type: ignore[no-untyped-def]
    res = _evaluate(*args, **kwargs)
    time.sleep(_delay)
    return res


runner.evaluate_case_files = _slow
if __name__ == "__main__":
    sys.argv[0] = "segcal"
    main()
