"""Weighted sums of losses, built from Python or from a string such as ``"dice:1,ce:1,ace:0.3"``.

Grammar (whitespace ignored, names case-insensitive)::

    spec   := term (("+" | ",") term)*
    term   := [number "*"] name ["(" kwarg ("," kwarg)* ")"] [":" number]
    kwarg  := identifier "=" python-literal          e.g. gamma=2, num_bins=15, variant='mL1-ECE'

Examples: ``"dice+ace"``, ``"dice:1,ce:1,ace:0.3"``, ``"dscpp(gamma=2)+soft_ace"``, ``"0.5*focal+dsc++"``.
A ``++`` right after a name is part of the name (``dsc++``, ``tversky++``). The weight defaults to 1.

Rules (each violation is a ``ValueError`` naming the term): a weight is a finite number ``>= 0``; an argument
value is a finite literal, a bool only where the loss's argument is annotated ``bool`` (``num_bins=True`` is
refused, as ``num_bins`` above ``MAX_BINS`` is by :func:`~segcal.functional.binning.check_num_bins`); any error
the loss's constructor raises is reported with the term's name.
"""

from __future__ import annotations

import ast
import inspect
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from segcal.losses import overlap
from segcal.losses.base import SegmentationLoss
from segcal.losses.calibration import HardL1ACELoss, LogitMarginPenaltyLoss, NACLPenaltyLoss, SoftL1ACELoss
from segcal.losses.distribution import (
    CrossEntropyLoss,
    FocalLoss,
    LabelSmoothingCrossEntropyLoss,
    SampleDependentFocalLoss,
    SVLSLoss,
)

__all__ = ["LOSS_REGISTRY", "CompositeLoss", "loss_from_string", "parse_loss_spec", "valid_loss_names"]

#: canonical name -> (class, fixed keyword arguments)
LOSS_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "dice": (overlap.DiceLoss, {}),
    "dscpp": (overlap.DSCPlusPlusLoss, {}),
    "tversky": (overlap.TverskyLoss, {}),
    "tverskypp": (overlap.TverskyPlusPlusLoss, {}),
    "focal_tversky": (overlap.FocalTverskyLoss, {}),
    "focal_tverskypp": (overlap.FocalTverskyPlusPlusLoss, {}),
    "combo": (overlap.ComboLoss, {}),
    "combopp": (overlap.ComboPlusPlusLoss, {}),
    "unified_focal": (overlap.AsymmetricUnifiedFocalLoss, {}),
    "unified_focalpp": (overlap.AsymmetricUnifiedFocalPlusPlusLoss, {}),
    "focal": (FocalLoss, {}),
    "ce": (CrossEntropyLoss, {}),
    "ace": (HardL1ACELoss, {}),
    "ece": (HardL1ACELoss, {"variant": "mL1-ECE"}),
    "mce": (HardL1ACELoss, {"variant": "mL1-MCE"}),
    "soft_ace": (SoftL1ACELoss, {}),
    "soft_ece": (SoftL1ACELoss, {"variant": "mL1-ECE"}),
    "soft_mce": (SoftL1ACELoss, {"variant": "mL1-MCE"}),
    "nacl": (NACLPenaltyLoss, {}),
    "mbls": (LogitMarginPenaltyLoss, {}),
    "svls": (SVLSLoss, {}),
    "ls": (LabelSmoothingCrossEntropyLoss, {}),
    "flsd": (SampleDependentFocalLoss, {}),
}

_ALIASES = {
    "dsc": "dice",
    "dice++": "dscpp",
    "dsc++": "dscpp",
    "dicepp": "dscpp",
    "tversky++": "tverskypp",
    "ft": "focal_tversky",
    "focaltversky": "focal_tversky",
    "ft++": "focal_tverskypp",
    "ftpp": "focal_tverskypp",
    "focal_tversky++": "focal_tverskypp",
    "combo++": "combopp",
    "auf": "unified_focal",
    "unifiedfocal": "unified_focal",
    "asymmetric_unified_focal": "unified_focal",
    "auf++": "unified_focalpp",
    "aufpp": "unified_focalpp",
    "unified_focal++": "unified_focalpp",
    "cross_entropy": "ce",
    "crossentropy": "ce",
    "hard_ace": "ace",
    "ml1-ace": "ace",
    "ml1_ace": "ace",
    "ml1-ece": "ece",
    "ml1-mce": "mce",
    "sace": "soft_ace",
    "softace": "soft_ace",
    "hard_ece": "ece",
    "hard_mce": "mce",
    "nacl_penalty": "nacl",
    "logit_margin": "mbls",
    "svls_ce": "svls",
    "label_smoothing": "ls",
    "ls_ce": "ls",
    "flsd53": "flsd",
    "flsd-53": "flsd",
    "flsd_53": "flsd",
}


def valid_loss_names() -> list[str]:
    """Every accepted loss name (canonical names and aliases), sorted."""
    return sorted(set(LOSS_REGISTRY) | set(_ALIASES))


class CompositeLoss(nn.Module):
    """Weighted sum ``Σ_j w_j L_j(input, target)`` of loss modules.

    Args:
        terms: ``[(weight, module), ...]``, or a mapping ``name -> (weight, module)`` / ``name -> module``.

    After each call, :attr:`last_components` maps each term's name to its (detached) value, for logging.
    With ``reduction="none"`` terms, each term is averaged to one value per image before summing.
    """

    def __init__(
        self,
        terms: Sequence[tuple[float, nn.Module]] | Mapping[str, tuple[float, nn.Module] | nn.Module],
    ) -> None:
        super().__init__()
        items: list[tuple[str, float, nn.Module]] = []
        if isinstance(terms, Mapping):
            for name, v in terms.items():
                w, m = (1.0, v) if isinstance(v, nn.Module) else v
                items.append((str(name), float(w), m))
        else:
            for w, m in terms:
                items.append((type(m).__name__, float(w), m))
        if not items:
            raise ValueError("CompositeLoss needs at least one term")
        names: list[str] = []
        for name, w, m in items:
            if not isinstance(m, nn.Module):
                raise TypeError(f"term {name!r} is not a torch.nn.Module")
            _check_weight(w, name)
            base, k = name, 2
            while name in names:
                name = f"{base}_{k}"
                k += 1
            names.append(name)
        self.names = names
        self.weights = [w for _, w, _ in items]
        self.losses = nn.ModuleList([m for _, _, m in items])
        self.last_components: dict[str, torch.Tensor] = {}

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The weighted sum of the terms on ``input`` / ``target``. The terms share what they read: the value
        ranges of the input and of a label map are read from the device once per call (one host transfer with
        ``validate_args=True``, as a single loss), each term still applying its own rules to them."""
        total: torch.Tensor | None = None
        comps: dict[str, torch.Tensor] = {}
        terms = [m for m in self.losses if isinstance(m, SegmentationLoss)]
        shared: dict[tuple[object, ...], object] = {}
        for m in terms:
            m._shared = shared
        try:
            for name, w, loss in zip(self.names, self.weights, self.losses, strict=True):
                v = loss(input, target)
                if v.ndim > 1:
                    v = v.flatten(1).mean(1)
                comps[name] = v.detach()
                total = w * v if total is None else total + w * v
        finally:
            for m in terms:
                m._shared = None
        self.last_components = comps
        return total  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return " + ".join(f"{w:g}*{n}" for n, w in zip(self.names, self.weights, strict=True))


def _check_weight(weight: float, term: str) -> None:
    """Rule: a term's weight is a finite number ``>= 0`` (a negative weight would reward the loss)."""
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"loss term {term!r}: the weight must be a finite number >= 0, got {weight!r}")


def _split_top(spec: str) -> list[str]:
    """Split at top-level ``+`` / ``,`` (not inside parentheses; ``++`` after a name is part of it)."""
    parts, depth, cur, i = [], 0, [], 0
    while i < len(spec):
        ch = spec[i]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ')' in loss spec {spec!r}")
        if (
            depth == 0
            and ch == "+"
            and spec[i : i + 2] == "++"
            and cur
            and (cur[-1].isalnum() or cur[-1] == "_")
        ):
            cur.append("++")
            i += 2
            continue
        if depth == 0 and ch in "+,":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    if depth != 0:
        raise ValueError(f"unbalanced '(' in loss spec {spec!r}")
    parts.append("".join(cur))
    return parts


_TERM = re.compile(
    r"^(?:(?P<pre>[0-9.eE+-]+)\*)?(?P<name>[A-Za-z_][A-Za-z0-9_\-]*(?:\+\+)?)"
    r"(?:\((?P<args>.*)\))?(?::(?P<post>[0-9.eE+-]+))?$"
)


def _parse_kwargs(text: str, term: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"cannot parse the arguments of loss term {term!r}: {e.msg}") from None
    assert isinstance(call, ast.Call)
    if call.args:
        raise ValueError(f"loss term {term!r}: arguments must be keyword arguments (name=value)")
    out: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise ValueError(f"loss term {term!r}: '**' is not allowed")
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            if isinstance(kw.value, ast.Name):  # bare words: variant=ece
                out[kw.arg] = kw.value.id
            else:
                raise ValueError(f"loss term {term!r}: value of {kw.arg!r} must be a literal") from None
        if isinstance(out[kw.arg], float) and not math.isfinite(out[kw.arg]):
            raise ValueError(f"loss term {term!r}: value of {kw.arg!r} must be finite, got {out[kw.arg]!r}")
    return out


def parse_loss_spec(spec: str) -> list[tuple[float, str, dict[str, Any]]]:
    """Parse a loss string into ``[(weight, canonical_name, kwargs), ...]`` (see module docstring)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"loss spec must be a non-empty string, got {spec!r}")
    terms = []
    for raw in _split_top(re.sub(r"\s+", "", spec)):
        if not raw:
            raise ValueError(f"empty term in loss spec {spec!r}")
        m = _TERM.match(raw)
        if m is None:
            raise ValueError(
                f"cannot parse loss term {raw!r} in {spec!r}; expected e.g. 'dice', 'ace:0.3', "
                "'0.5*focal', 'dscpp(gamma=2)'"
            )
        name = m.group("name").lower()
        canon = name if name in LOSS_REGISTRY else _ALIASES.get(name)
        if canon is None:
            raise ValueError(
                f"unknown loss {name!r} in {spec!r}; valid names: {', '.join(valid_loss_names())}"
            )
        w = 1.0
        for key in ("pre", "post"):
            if m.group(key) is not None:
                try:
                    w *= float(m.group(key))
                except ValueError:
                    raise ValueError(f"bad weight {m.group(key)!r} in loss term {raw!r}") from None
        _check_weight(w, raw)
        terms.append((w, canon, _parse_kwargs(m.group("args") or "", raw)))
    return terms


def _parameters(cls: type[nn.Module]) -> dict[str, inspect.Parameter]:
    """Keyword parameters ``cls`` accepts by name, walking ``**kwargs`` up to :class:`SegmentationLoss` (the
    most derived class's parameter wins)."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        if "__init__" not in klass.__dict__:
            continue
        params = inspect.signature(klass.__init__).parameters
        for n, p in params.items():
            if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                found.setdefault(n, p)
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return found


def _accepted(cls: type[nn.Module]) -> set[str] | None:
    """Keyword names ``cls`` accepts (walking ``**kwargs`` up to :class:`SegmentationLoss`); None = any."""
    return set(_parameters(cls))


def _check_types(canon: str, cls: type[nn.Module], kwargs: Mapping[str, Any]) -> None:
    """Rule: a bool goes only to an argument annotated ``bool`` (``num_bins=True`` is not a count)."""
    params = _parameters(cls)
    for key, value in kwargs.items():
        annotation = params[key].annotation if key in params else inspect.Parameter.empty
        if not isinstance(value, bool) or annotation is inspect.Parameter.empty:
            continue
        text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
        if "bool" not in text:
            raise ValueError(f"loss term {canon!r}: {key} must be {text}, got the bool {value!r}")


def _build(canon: str, cls: type[nn.Module], args: dict[str, Any]) -> nn.Module:
    """``cls(**args)``, a constructor's ``TypeError`` / ``ValueError`` reported with the term's name."""
    try:
        return cls(**args)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"loss term {canon!r} ({cls.__name__}): {exc}") from None


def loss_from_string(spec: str, **common_kwargs: Any) -> nn.Module:
    """Build a loss from a string, e.g. ``loss_from_string("dice:1,ce:1,ace:0.3", softmax=True)``.

    ``common_kwargs`` (``softmax``, ``sigmoid``, ``to_onehot_y``, ``include_background``, ``reduction``, ...)
    go to every term that accepts them; per-term arguments in parentheses override them. A single
    unweighted term returns the loss module itself, otherwise a :class:`CompositeLoss`. Unknown names raise
    a ``ValueError`` listing the valid ones.
    """
    parsed = parse_loss_spec(spec)
    built: dict[str, tuple[float, nn.Module]] = {}
    for w, canon, kwargs in parsed:
        cls, fixed = LOSS_REGISTRY[canon]
        accepted = _accepted(cls)
        unknown = [k for k in kwargs if accepted is not None and k not in accepted]
        if unknown:
            raise ValueError(
                f"loss {canon!r} ({cls.__name__}) does not accept {unknown}; "
                f"accepted: {sorted(accepted or [])}"
            )
        _check_types(canon, cls, kwargs)
        args = {k: v for k, v in common_kwargs.items() if accepted is None or k in accepted}
        args.update(fixed)
        args.update(kwargs)
        name, k = canon, 2
        while name in built:
            name = f"{canon}_{k}"
            k += 1
        built[name] = (w, _build(canon, cls, args))
    if len(built) == 1:
        ((w, module),) = built.values()
        if w == 1.0:
            return module
    return CompositeLoss(built)
