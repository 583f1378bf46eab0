"""The statistical unit of a run: its cases grouped into subjects (docs/evaluation.md, "Subjects").

Slices or patches of one patient are not independent observations: a test or an interval that treats each of
them as one is pseudo-replicated (Hurlbert 1984; Lazic 2010, docs/references.md) and its p-values and
intervals are far too small. A :class:`Grouping` maps each case id to its subject, by a regular expression on
the case id (``--group-by``: the first capture group, or the whole match, is the subject) or by a table
(``--groups``: a CSV file with the columns ``case_id, subject``, or a mapping). Without one, each case is its own
subject (the unit is the case) and every output says so.

A subject's values are those of its cases stacked into one volume: its statistics are the **sums** of its
cases' :class:`~segcal.functional.scoring.CaseStatistics` (bin sums, top-label bins, confusion counts,
Brier / NLL / MAE sums, voxels; :func:`pool_cases`), from which every metric is derived by the one scoring
function (:func:`segcal.functional.scoring.image_metrics`), never a mean of case metrics. HD95 is not a sum:
a subject's HD95 is the mean of its cases' finite HD95 values (NaN when none is finite). Summaries and tests
then run over subjects (the percentile bootstrap over subject values is the two-stage cluster bootstrap that
resamples subjects, Field & Welsh 2007, docs/references.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from segcal.functional.scoring import SURFACE_FIELDS, CaseStatistics
from segcal.io.runs import read_groups_csv

__all__ = [
    "NO_GROUPING_NOTE",
    "Grouping",
    "GroupingError",
    "pool_cases",
    "resolve_grouping",
    "stored_grouping",
    "subject_bins",
    "subject_indices",
    "subject_statistics",
]

#: what the outputs say when no grouping was given
NO_GROUPING_NOTE = (
    "no grouping given: each case is its own subject (the statistical unit is the case); if several cases come "
    "from one subject (slices, patches, repeated scans), pass --group-by REGEX or --groups FILE.csv"
)


class GroupingError(ValueError):
    """Cases that a grouping cannot place into a subject, or two groupings that disagree."""


@dataclass(frozen=True)
class Grouping:
    """``case id → subject`` of a run's cases.

    ``by``: ``"none"`` (each case its own subject), ``"regex"``, ``"file"`` or ``"mapping"``; ``source``: the
    pattern or the file path; ``subjects``: the subject of every case it was resolved on.
    """

    by: Literal["none", "regex", "file", "mapping"]
    source: str | None
    subjects: Mapping[str, str] = field(default_factory=dict)

    @property
    def unit(self) -> Literal["case", "subject"]:
        """The statistical unit: ``"case"`` without a grouping, else ``"subject"``."""
        return "case" if self.by == "none" else "subject"

    def subject_of(self, case_id: str) -> str:
        return self.subjects.get(case_id, case_id)

    def describe(self) -> str:
        """In words, for tables and messages."""
        if self.by == "regex":
            return f"subjects from the case ids by the regular expression {self.source}"
        if self.by == "file":
            return f"subjects from {self.source}"
        if self.by == "mapping":
            return "subjects from a given case → subject mapping"
        return "each case is its own subject (no grouping given)"

    def summary(self, case_ids: Sequence[str]) -> dict[str, Any]:
        """The ``summary.json`` / ``comparison.json`` entry for the cases ``case_ids``: unit, number of units and
        of cases, how the subjects were found and (grouped) each subject's cases."""
        groups = subject_indices(case_ids, self)
        out: dict[str, Any] = {
            "unit": self.unit,
            "n": len(groups),
            "n_cases": len(case_ids),
            "by": None if self.by == "none" else self.by,
            "source": self.source,
            "description": self.describe(),
        }
        if self.unit == "subject":
            out["subjects"] = {s: [case_ids[i] for i in idx] for s, idx in groups.items()}
        else:
            out["note"] = NO_GROUPING_NOTE
        return out


def _by_regex(case_ids: Sequence[str], pattern: str) -> dict[str, str]:
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise GroupingError(f"--group-by {pattern!r} is not a valid regular expression: {exc}") from None
    out, unmatched = {}, []
    for cid in case_ids:
        m = rx.search(cid)
        subject = (m.group(1) if rx.groups else m.group(0)) if m else None
        if not subject:
            unmatched.append(cid)
        else:
            out[cid] = subject
    if unmatched:
        raise GroupingError(
            f"--group-by {pattern!r} gives no subject for {len(unmatched)} of {len(case_ids)} case(s), e.g. "
            f"{unmatched[:3]}; it must match every case id, and its first capture group (or the whole match) "
            "name the case's subject"
        )
    return out


def _by_table(case_ids: Sequence[str], table: Mapping[str, str], where: str) -> dict[str, str]:
    missing = [c for c in case_ids if not str(table.get(c, "")).strip()]
    if missing:
        raise GroupingError(
            f"{where} gives no subject for {len(missing)} of {len(case_ids)} case(s), e.g. {missing[:3]}; "
            "every case of the run needs a row case_id,subject"
        )
    return {c: str(table[c]).strip() for c in case_ids}


def resolve_grouping(
    case_ids: Sequence[str],
    *,
    group_by: str | None = None,
    groups: str | Path | Mapping[str, str] | None = None,
) -> Grouping:
    """The grouping of ``case_ids``: by the regular expression ``group_by`` (``re.search`` on each case id; the
    first capture group, or the whole match, is the subject), by ``groups`` (a CSV file with the columns
    ``case_id, subject``, or a mapping), or none (each case its own subject). A case that gets no subject is a
    :class:`GroupingError` naming it; giving both is a ``ValueError``."""
    if group_by is not None and groups is not None:
        raise GroupingError("give a grouping either as a regular expression (--group-by) or as a table (--groups)")
    ids = list(case_ids)
    if group_by is not None:
        return Grouping("regex", group_by, _by_regex(ids, group_by))
    if isinstance(groups, Mapping):
        return Grouping("mapping", None, _by_table(ids, groups, "the grouping"))
    if groups is not None:
        table = read_groups_csv(groups)
        return Grouping("file", str(groups), _by_table(ids, table, str(groups)))
    return Grouping("none", None, {c: c for c in ids})


def stored_grouping(entry: Mapping[str, Any] | None) -> Grouping:
    """The grouping a run was evaluated with, from its ``summary.json`` ``grouping`` entry (none when the
    entry is missing or ungrouped)."""
    if not entry or entry.get("unit") != "subject":
        return Grouping("none", None, {})
    subjects = {str(c): str(s) for s, cases in (entry.get("subjects") or {}).items() for c in cases}
    by = entry.get("by") if entry.get("by") in ("regex", "file", "mapping") else "mapping"
    return Grouping(by, entry.get("source"), subjects)


def subject_indices(case_ids: Sequence[str], grouping: Grouping) -> dict[str, list[int]]:
    """``subject → positions of its cases in case_ids``, subjects sorted by id, cases in the given order."""
    out: dict[str, list[int]] = {}
    for i, cid in enumerate(case_ids):
        out.setdefault(grouping.subject_of(cid), []).append(i)
    return {s: out[s] for s in sorted(out)}


def pool_cases(stats: CaseStatistics) -> CaseStatistics:
    """One image whose statistics are those of all images of ``stats`` stacked into one volume: every sum
    summed (so every metric equals that of the stacked volume), each surface metric (HD95, HD, ASSD, NSD) the
    mean of the finite case values (NaN when none is finite: a distance between surfaces does not add)."""
    sums = {
        name: getattr(stats, name).sum(0, keepdim=True)
        for name in ("bins", "top", "counts", "brier_sum", "mae_sum", "nll_sum", "n_voxels")
    }
    for name in ("fine", "entropy_sum"):  # the peers group's sums, when computed
        if getattr(stats, name) is not None:
            sums[name] = getattr(stats, name).sum(0, keepdim=True)
    return CaseStatistics(**sums, **{name: _finite_mean(getattr(stats, name)) for name in SURFACE_FIELDS})


def _finite_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean over images (axis 0, kept) of the finite values, NaN where none is finite."""
    finite = torch.isfinite(x)
    n = finite.sum(0, keepdim=True)
    mean = torch.where(n > 0, torch.where(finite, x, 0.0).sum(0, keepdim=True) / n.clamp_min(1), torch.nan)
    return mean.to(torch.float64)


def subject_statistics(
    stats: CaseStatistics, case_ids: Sequence[str], grouping: Grouping
) -> tuple[list[str], list[int], CaseStatistics]:
    """``(subjects, cases per subject, statistics with one image per subject)``: each subject's cases of
    ``stats`` (image ``i`` is case ``case_ids[i]``) pooled by :func:`pool_cases`."""
    if len(case_ids) != len(stats):
        raise ValueError(f"{len(case_ids)} case ids for statistics of {len(stats)} cases")
    groups = subject_indices(case_ids, grouping)
    if not groups:
        raise ValueError("no case to group into subjects")
    parts = [pool_cases(CaseStatistics.cat([stats.select(i) for i in idx])) for idx in groups.values()]
    return list(groups), [len(idx) for idx in groups.values()], CaseStatistics.cat(parts)


def subject_bins(
    bin_stats: np.ndarray, case_ids: Sequence[str], grouping: Grouping
) -> tuple[list[str], np.ndarray]:
    """``(subjects, (S, C, 3, M) bin sums)``: the marginal bin sums ``(N, C, 3, M)`` of each subject's cases
    summed (the subject's stacked volume)."""
    groups = subject_indices(case_ids, grouping)
    arr = np.asarray(bin_stats, dtype=np.float64)
    pooled = [arr[idx].sum(0) for idx in groups.values()]
    return list(groups), (np.stack(pooled) if pooled else np.zeros((0, *arr.shape[1:])))
