"""Prediction: sliding-window inference, MC dropout, checkpoint ensembles, temperature or a calibrator.

Per image ``(1, C_in, *S)`` each pass gives logits ``(1, C, *S)``; they are turned into probabilities by
``calibrator.transform(logits)`` when a calibrator is given (any object with that method, e.g. the
segcal.posthoc calibrators), otherwise by ``softmax(logits / T)`` (temperature scaling, PostHoc;
``T = 1`` is plain softmax). The probabilities of MC-dropout passes (running mean) and of ensemble members
(Ensembles eq. 6) are averaged.

Prediction refuses to start, with one error naming the file, when a checkpoint cannot be used
(:class:`~segcal.training.trainer.CheckpointError`: unreadable, no ``model`` section in its config, a config its
weights contradict, e.g. absurd ``channels``, checked before the network is built) or the output folder cannot
be written (:class:`~segcal.io.OutputError`, probed before any prediction; a failed write later, e.g. a full
disk, raises it too, naming the file).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from segcal.functional.inputs import as_tensor
from segcal.io import (
    FolderInfo,
    OutputError,
    prepare_output_dir,
    write_folder_info,
    write_nifti_probabilities,
    write_npz,
)
from segcal.io.numpy import LOGITS_KEY, PROBABILITIES_KEY, metadata_entries
from segcal.io.predictions import CALIBRATION_MARK
from segcal.training.config import ModelConfig
from segcal.training.data import case_name, read_image
from segcal.training.trainer import CheckpointError, build_model, load_checkpoint

__all__ = [
    "Calibrator",
    "enable_mc_dropout",
    "load_model",
    "mc_dropout_probabilities",
    "predict_files",
    "predict_probabilities",
    "sliding_window_logits",
]


class Calibrator(Protocol):
    """Anything with ``transform(logits (B, C, *S)) -> probabilities (B, C, *S)``."""

    def transform(self, logits: torch.Tensor) -> torch.Tensor: ...


def _min_unet_weights(cfg: ModelConfig) -> int:
    """A lower bound on the weights of the UNet of ``cfg``: its encoder alone holds one ``3^d`` convolution
    from each channel count to the next (``in_channels → channels[0] → channels[1] ...``)."""
    chans = [cfg.in_channels, *cfg.channels]
    return sum(a * b for a, b in itertools.pairwise(chans)) * 3**cfg.spatial_dims


def _model_config(checkpoint: str | Path, ckpt: dict[str, Any]) -> ModelConfig:
    """The checkpoint's model config, checked against its weights before anything is built.

    Rule: the config has a ``model`` section that is a valid :class:`ModelConfig`, and the weights stored in the
    checkpoint are at least as many as that UNet must have (:func:`_min_unet_weights`); otherwise
    :class:`CheckpointError` naming the file (absurd ``channels`` would otherwise allocate the network first).
    """
    if "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{checkpoint}: not a segcal training checkpoint (needs 'config' and 'model' entries)")
    section = ckpt["config"].get("model") if isinstance(ckpt["config"], dict) else None
    if not isinstance(section, dict):
        raise CheckpointError(
            f"{checkpoint}: the checkpoint's config has no 'model' section (the UNet settings), so the network "
            "cannot be rebuilt; use a checkpoint written by segcal train"
        )
    try:
        cfg = ModelConfig(**section)
        cfg.validate()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint}: invalid model config in the checkpoint: {exc}") from None
    weights = ckpt["model"] if isinstance(ckpt["model"], dict) else {}
    stored = sum(int(t.numel()) for t in weights.values() if isinstance(t, torch.Tensor))
    needed = _min_unet_weights(cfg)
    if needed > stored:
        raise CheckpointError(
            f"{checkpoint}: the model config (channels {cfg.channels}) needs at least {needed:,} weights but the "
            f"checkpoint holds {stored:,}; the config does not belong to these weights"
        )
    return cfg


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """UNet from a segcal checkpoint (``best.pt`` / ``last.pt``; config and weights inside), in eval mode.

    Every problem with the checkpoint is a :class:`CheckpointError` (a ``ValueError``) naming it.
    """
    ckpt = load_checkpoint(checkpoint)
    cfg = _model_config(checkpoint, ckpt)
    try:
        model = build_model(cfg)
    except (RuntimeError, MemoryError) as exc:
        raise CheckpointError(f"{checkpoint}: cannot build the network of the stored model config: {exc}") from None
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{checkpoint}: weights do not match the stored model config: {exc}") from None
    return model.to(device).eval()


def _size_factor(model: nn.Module) -> int:
    strides = getattr(model, "strides", None) or (1,)
    f = 1
    for s in strides:
        f *= int(s) if not isinstance(s, Sequence) else int(max(s))
    return f


@torch.no_grad()
def sliding_window_logits(
    model: nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
) -> torch.Tensor:
    """Logits ``(B, C, *S)`` of ``image (B, C_in, *S)`` by ``monai.inferers.sliding_window_inference``.

    ``roi_size`` defaults to the image size rounded up to a multiple of the UNet strides' product (one padded
    window); windows are blended with constant weights and cropped back to ``*S``.
    """
    from monai.inferers import sliding_window_inference

    if roi_size is None:
        f = _size_factor(model)
        roi_size = tuple(-(-s // f) * f for s in image.shape[2:])
    out = sliding_window_inference(image, tuple(roi_size), sw_batch_size, model, overlap=overlap)
    return as_tensor(out).float()


def enable_mc_dropout(model: nn.Module) -> int:
    """Put every dropout layer in train mode (the rest stays in eval); returns how many have ``p > 0``."""
    n = 0
    for m in model.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)):
            m.train()
            n += int(m.p > 0)
    return n


def mc_dropout_probabilities(
    model: nn.Module,
    image: torch.Tensor,
    infer: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    to_probs: Callable[[torch.Tensor], torch.Tensor],
    samples: int,
) -> torch.Tensor:
    """Mean probability of ``samples`` passes with dropout active (running mean, memory of one map).

    Minimal MC dropout (PostHoc, Ensembles); ``segcal.posthoc.mc_dropout`` can be plugged into
    :func:`predict_probabilities` through ``mc_fn`` with this same signature.
    """
    if samples < 1:
        raise ValueError(f"mc samples must be >= 1, got {samples}")
    was = model.training
    model.eval()
    if enable_mc_dropout(model) == 0:
        raise ValueError("MC dropout needs a model with dropout layers (train with model.dropout > 0)")
    mean = None
    try:
        for t in range(samples):
            p = to_probs(infer(model, image))
            mean = p if mean is None else mean + (p - mean) / (t + 1)
    finally:
        model.train(was)
    assert mean is not None
    return mean


def predict_probabilities(
    models: nn.Module | Sequence[nn.Module],
    image: torch.Tensor,
    *,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    mc_samples: int = 0,
    temperature: float = 1.0,
    calibrator: Calibrator | None = None,
    mc_fn: Callable[..., torch.Tensor] | None = None,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Probabilities ``(B, C, *S)`` for ``image (B, C_in, *S)`` from one model or an ensemble.

    Args:
        models: one network or several (deep ensemble: probabilities averaged, Ensembles eq. 6).
        roi_size: sliding-window size (default: whole image, padded to the strides' product).
        mc_samples: ``T > 0`` runs T passes with dropout active per model and averages them.
        temperature: logits are divided by ``T`` before the softmax (ignored when ``calibrator`` is given).
        calibrator: object with ``transform(logits) -> probabilities`` applied to each pass's logits.
        mc_fn: replacement for :func:`mc_dropout_probabilities` (same signature).
        return_logits: also return logits: the raw logits for one model without MC dropout, otherwise
            ``log(mean probability)`` (softmax of it gives the averaged probabilities back).
    """
    if temperature <= 0 or not np.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    members = [models] if isinstance(models, nn.Module) else list(models)
    if not members:
        raise ValueError("need at least one model")
    if calibrator is not None and not callable(getattr(calibrator, "transform", None)):
        raise TypeError("calibrator must have a transform(logits) -> probabilities method")

    def to_probs(logits: torch.Tensor) -> torch.Tensor:
        if calibrator is not None:
            return as_tensor(calibrator.transform(logits)).float()
        return torch.softmax(logits / temperature, 1)

    def infer(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return sliding_window_logits(m, x, roi_size, overlap)

    mean, raw = None, None
    for k, m in enumerate(members):
        m.eval()
        if mc_samples > 0:
            p = (mc_fn or mc_dropout_probabilities)(m, image, infer, to_probs, mc_samples)
        else:
            logits = infer(m, image)
            raw = logits if len(members) == 1 else None
            p = to_probs(logits)
        mean = p if mean is None else mean + (p - mean) / (k + 1)
    assert mean is not None
    if not return_logits:
        return mean
    logits_out = (
        raw
        if raw is not None and calibrator is None and temperature == 1.0
        else torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny))
    )
    return mean, logits_out


def _input_files(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    files: list[Path] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            files += sorted(
                f
                for f in p.iterdir()
                if (f.suffix == ".npz" or f.name.endswith((".nii", ".nii.gz")))
                and not f.name.endswith(("_label.nii", "_label.nii.gz"))
            )
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    if not files:
        raise ValueError(f"no input images (*.npz, *.nii, *.nii.gz) in {items}")
    return files


def _calibration_mark(kwargs: dict[str, Any]) -> str | None:
    """The calibration mark of predictions made with a temperature ``!= 1`` or a calibrator (``None``
    otherwise): such files are calibrated already and ``segcal calibrate`` refuses them."""
    if kwargs.get("calibrator") is not None:
        return f"{CALIBRATION_MARK} predict with {type(kwargs['calibrator']).__name__}"
    temperature = float(kwargs.get("temperature", 1.0))
    return f"{CALIBRATION_MARK} predict --temperature {temperature:g}" if temperature != 1.0 else None


def predict_files(
    checkpoints: str | Path | Sequence[str | Path],
    inputs: str | Path | Sequence[str | Path],
    output_dir: str | Path,
    *,
    output_format: str = "npz",
    dtype: str = "float32",
    save_logits: bool = False,
    device: str = "cpu",
    progress: bool = False,
    **kwargs: Any,
) -> list[Path]:
    """Predict every input image and write one file per case into ``output_dir``.

    Inputs: ``.npz`` (key ``image``, ``(C_in, *S)`` or ``(*S)``, optional ``spacing``) or NIfTI (``(*S)`` /
    ``(*S, C_in)``). ``output_format="npz"`` writes ``<case>.npz`` with ``probabilities`` ``(C, *S)`` (and
    ``logits`` with ``save_logits``) and the input's voxel size as ``spacing``; ``"nifti"`` writes ``<case>.nii.gz``
    with ``(*S, C)`` probabilities and the input's affine (from the npz ``spacing`` for ``.npz`` inputs, else
    identity), and with ``save_logits`` ``logits/<case>.nii.gz``. Every file declares what it holds (npz key,
    NIfTI ``intent_name``) and each folder gets a ``segcal.json`` sidecar saying it too; predictions made with a
    temperature ``!= 1`` or a calibrator carry the calibration mark (see docs/workflow.md). Other keyword
    arguments go to :func:`predict_probabilities`.
    """
    if output_format not in ("npz", "nifti"):
        raise ValueError(f"output_format must be 'npz' or 'nifti', got {output_format!r}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    ckpts = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    models = [load_model(c, device) for c in ckpts]
    spatial_dims = int(getattr(models[0], "dimensions", 2))
    files = _input_files(inputs)
    out = prepare_output_dir(output_dir)
    writer = _Writer(out, output_format, dtype, save_logits, spatial_dims, _calibration_mark(kwargs))
    written: list[Path] = []
    from rich.progress import Progress

    with Progress(disable=not progress) as bar:
        task = bar.add_task("predicting", total=len(files))
        for f in files:
            image, affine = read_image(f, spatial_dims)
            x = torch.from_numpy(image)[None].to(device)
            probs, logits = predict_probabilities(models, x, return_logits=True, **kwargs)
            case = _Prediction(case_name(f), probs[0].cpu().numpy(), logits[0].cpu().numpy(), affine)
            try:
                written.append(writer.write(case))
            except OSError as exc:
                raise OutputError(out, f"cannot write the prediction of {case.name}: {exc.strerror or exc}") from None
            bar.advance(task)
    writer.finish()
    return written


@dataclass
class _Prediction:
    """One predicted case: output name, probabilities and logits ``(C, *S)``, input affine (``None``: npz
    without ``spacing``)."""

    name: str
    probs: np.ndarray
    logits: np.ndarray
    affine: np.ndarray | None


@dataclass
class _Writer:
    """Writes the predicted cases of one output folder (see :func:`predict_files`)."""

    out: Path
    output_format: str
    dtype: str
    save_logits: bool
    spatial_dims: int
    calibration: str | None

    def write(self, case: _Prediction) -> Path:
        """``<name>.npz`` (``probabilities``, ``logits``, ``spacing``) or ``<name>.nii.gz`` ``(*S, C)`` (plus
        ``logits/<name>.nii.gz``); returns the probability file."""
        if self.output_format == "npz":
            arrays = {PROBABILITIES_KEY: case.probs.astype(self.dtype)}
            if self.save_logits:
                arrays[LOGITS_KEY] = case.logits.astype(self.dtype)
            spacing = np.linalg.norm(case.affine[:3, : self.spatial_dims], axis=0) if case.affine is not None else None
            arrays |= metadata_entries(spacing=spacing, calibration=self.calibration)
            return write_npz(self.out / f"{case.name}.npz", arrays, compressed=True)
        aff = case.affine if case.affine is not None else np.eye(4)

        def volume(a: np.ndarray) -> np.ndarray:  # (C, X, Y, 1): a 3D geometry for a 2D slice
            return a[..., None] if self.spatial_dims == 2 else a

        target = write_nifti_probabilities(
            self.out / f"{case.name}.nii.gz", volume(case.probs.astype(self.dtype)), aff, descrip=self.calibration
        )
        if self.save_logits:
            (self.out / "logits").mkdir(exist_ok=True)
            write_nifti_probabilities(
                self.out / "logits" / f"{case.name}.nii.gz", volume(case.logits), aff, kind="logits",
                descrip=self.calibration,
            )
        return target

    def finish(self) -> None:
        """The ``segcal.json`` sidecars: probabilities (and ``logits/`` for NIfTI logits)."""
        record = {"how": self.calibration} if self.calibration is not None else None
        write_folder_info(self.out, FolderInfo(kind="probabilities", calibration=record))
        if self.save_logits and self.output_format == "nifti":
            write_folder_info(self.out / "logits", FolderInfo(kind="logits", calibration=record))
