"""Dataset evaluation: runner, resumable store, outputs, statistics and comparison (docs/evaluation.md)."""

from segcal.evaluation.compare import compare_runs
from segcal.evaluation.folders import ClassNamesError, GeometryConflictError
from segcal.evaluation.grouping import Grouping, GroupingError, resolve_grouping
from segcal.evaluation.lock import RunLockedError
from segcal.evaluation.runner import (
    DaskClusterError,
    EvalConfig,
    RunResult,
    compute_case,
    evaluate_case_files,
    run_evaluation,
)
from segcal.evaluation.store import CaseResult, ConfigMismatchError, ResultStore

__all__ = [
    "CaseResult",
    "ClassNamesError",
    "ConfigMismatchError",
    "DaskClusterError",
    "EvalConfig",
    "GeometryConflictError",
    "Grouping",
    "GroupingError",
    "ResultStore",
    "RunLockedError",
    "RunResult",
    "compare_runs",
    "compute_case",
    "evaluate_case_files",
    "resolve_grouping",
    "run_evaluation",
]
