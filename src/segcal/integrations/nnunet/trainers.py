"""nnU-Net v2 trainers with segcal's calibration losses (they need nnU-Net: ``pip install 'segcal[nnunet]'``).

Each trainer is nnU-Net's ``nnUNetTrainer`` with only the loss changed; the loss is built by nnU-Net's own
``_build_loss`` (Dice + CE, or Dice + BCE for region-based training, with nnU-Net's ignore-label handling) and
then changed inside nnU-Net's ``DeepSupervisionWrapper``, so every scale gets the same ``(logits, target)`` and
nnU-Net's weights as before:

* :class:`nnUNetTrainerSegcalHardACE`: ``Dice + CE + 1 · hard mL1-ACE`` (Barfoot et al., MICCAI 2024);
* :class:`nnUNetTrainerSegcalSoftACE`: ``Dice + CE + 1 · soft mL1-ACE`` (Barfoot et al., arXiv:2506.03942);
* :class:`nnUNetTrainerSegcalDSCPlusPlus`: ``DSC++ + CE`` (Yeung et al., J. Digit. Imaging 2023).

Papers: docs/references.md. nnU-Net finds trainers by name only inside its own package: ``segcal nnunet
install-trainers`` writes a small module there that imports these classes (docs/integrations/nnunet.md).
"""

from __future__ import annotations

import math

import torch

try:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the installation
    if not (exc.name or "").startswith("nnunetv2"):
        raise
    raise ModuleNotFoundError(
        "segcal's nnU-Net trainers need nnU-Net v2: pip install 'segcal[nnunet]'", name=exc.name
    ) from exc

from segcal.integrations.nnunet.losses import (
    CalibrationTerm,
    DSCPlusPlusDice,
    SegcalCompoundLoss,
    add_calibration_term,
    inner_loss,
    replace_dice,
)

__all__ = ["nnUNetTrainerSegcalDSCPlusPlus", "nnUNetTrainerSegcalHardACE", "nnUNetTrainerSegcalSoftACE"]


class _SegcalACETrainer(nnUNetTrainer):
    """nnU-Net's loss plus ``segcal_weight ·`` mL1-ACE on every deep-supervision scale; the mean ACE term of each
    training epoch (full-resolution output) is written to nnU-Net's training log and kept in
    ``segcal_term_history``."""

    segcal_binning: str = "hard"
    #: weight of the ACE term relative to nnU-Net's Dice + CE (each weighted 1): equal weights, as in the papers
    segcal_weight: float = 1.0
    segcal_num_bins: int = 20

    def _build_loss(self):
        term = CalibrationTerm(
            self.segcal_binning,  # type: ignore[arg-type]
            regions=self.label_manager.has_regions,
            ignore_label=self.label_manager.ignore_label,
            num_bins=self.segcal_num_bins,
        )
        return add_calibration_term(super()._build_loss(), term, self.segcal_weight)

    def _segcal_loss(self) -> SegcalCompoundLoss | None:
        inner = inner_loss(self.loss) if self.loss is not None else None
        return inner if isinstance(inner, SegcalCompoundLoss) else None

    def on_train_start(self):
        self.segcal_term_history: list[float] = []
        super().on_train_start()

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        compound = self._segcal_loss()
        if compound is not None:
            compound.term_means(reset=True)  # drop the values of the validation steps

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        compound = self._segcal_loss()
        means = compound.term_means(reset=True) if compound is not None else {}
        if means:
            full = means[max(means, key=math.prod)]
            self.segcal_term_history.append(full)
            self.print_to_log_file(
                f"segcal {self.segcal_binning} mL1-ACE term (full resolution, mean over the epoch's training "
                f"steps): {full:.4f}"
            )


class nnUNetTrainerSegcalHardACE(_SegcalACETrainer):
    """nnU-Net's Dice + CE plus the hard-binned mL1-ACE loss with weight 1 (Barfoot et al., MICCAI 2024)."""

    segcal_binning = "hard"


class nnUNetTrainerSegcalSoftACE(_SegcalACETrainer):
    """nnU-Net's Dice + CE plus the soft-binned mL1-ACE loss with weight 1 (Barfoot et al., arXiv:2506.03942)."""

    segcal_binning = "soft"


class nnUNetTrainerSegcalDSCPlusPlus(nnUNetTrainer):
    """DSC++ (``γ = 2``) + CE instead of nnU-Net's Dice + CE (Yeung et al., J. Digit. Imaging 2023); the
    cross-entropy (or BCE for regions), the ignore label and the deep-supervision weights are nnU-Net's."""

    segcal_gamma: float = 2.0

    def _build_loss(self):
        dice = DSCPlusPlusDice(
            regions=self.label_manager.has_regions,
            batch_dice=self.configuration_manager.batch_dice,
            gamma=self.segcal_gamma,
        )
        if self._do_i_compile():  # as nnU-Net compiles its own Dice
            dice = torch.compile(dice)
        return replace_dice(super()._build_loss(), dice)
