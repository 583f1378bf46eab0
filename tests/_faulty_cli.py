"""Runs the ``segcal`` command line with faults injected into the dataset runner, for fault-injection tests:
``python _faulty_cli.py evaluate ...``. Faults are set by environment variables read here, in the tests, not
by the library:

* ``FAULT_CASE_DELAY=SECONDS``: every evaluated case takes that much longer (so a test can kill a run midway);
* ``FAULT_KILL_CASE=ID``: the process evaluating case ``ID`` kills itself with ``SIGKILL`` (as the
  out-of-memory killer would).

Run as a script, it replaces the runner's per-case function by :func:`_faulty`; the runner submits that
function to its workers, which import this file to find it (forkserver / spawn workers as their main module,
Dask workers by name, with ``tests/`` on their path).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import segcal.evaluation.runner as runner

_evaluate = runner.evaluate_case_files


def _faulty(files, config, *args):  # type: ignore[no-untyped-def]
    if files.case_id == os.environ.get("FAULT_KILL_CASE"):
        os.kill(os.getpid(), signal.SIGKILL)
    res = _evaluate(files, config, *args)
    time.sleep(float(os.environ.get("FAULT_CASE_DELAY", "0")))
    return res


if __name__ == "__main__":
    from segcal.cli import main

    runner.evaluate_case_files = _faulty
    sys.argv[0] = "segcal"
    main()
