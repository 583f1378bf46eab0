"""Calibration-aware and overlap-based segmentation losses (``torch.nn.Module``, MONAI-style arguments).

All losses take ``input`` ``(B, C, *spatial)`` (2D or 3D; logits with ``softmax=True`` / ``sigmoid=True``) and
``target`` (a label map with ``to_onehot_y=True``, else one-hot / multi-hot ``(B, C, *spatial)``), and share
``include_background``, ``to_onehot_y``, ``sigmoid``, ``softmax``, ``other_act``, ``weight``, ``reduction``.
:func:`loss_from_string` builds weighted sums such as ``"dice:1,ce:1,ace:0.3"`` or ``"ce+nacl"`` (NACL, MbLS
and the ACE losses are penalty terms to add to a cross-entropy or Dice). See ``docs/losses.md``.
"""

from segcal.losses.base import SegmentationLoss
from segcal.losses.calibration import HardL1ACELoss, LogitMarginPenaltyLoss, NACLPenaltyLoss, SoftL1ACELoss
from segcal.losses.composite import (
    LOSS_REGISTRY,
    CompositeLoss,
    loss_from_string,
    parse_loss_spec,
    valid_loss_names,
)
from segcal.losses.distribution import (
    CrossEntropyLoss,
    FocalLoss,
    LabelSmoothingCrossEntropyLoss,
    SampleDependentFocalLoss,
    SVLSLoss,
)
from segcal.losses.overlap import (
    AsymmetricUnifiedFocalLoss,
    AsymmetricUnifiedFocalPlusPlusLoss,
    ComboLoss,
    ComboPlusPlusLoss,
    DiceLoss,
    DSCPlusPlusLoss,
    FocalTverskyLoss,
    FocalTverskyPlusPlusLoss,
    TverskyLoss,
    TverskyPlusPlusLoss,
)

__all__ = [
    "LOSS_REGISTRY",
    "AsymmetricUnifiedFocalLoss",
    "AsymmetricUnifiedFocalPlusPlusLoss",
    "ComboLoss",
    "ComboPlusPlusLoss",
    "CompositeLoss",
    "CrossEntropyLoss",
    "DSCPlusPlusLoss",
    "DiceLoss",
    "FocalLoss",
    "FocalTverskyLoss",
    "FocalTverskyPlusPlusLoss",
    "HardL1ACELoss",
    "LabelSmoothingCrossEntropyLoss",
    "LogitMarginPenaltyLoss",
    "NACLPenaltyLoss",
    "SVLSLoss",
    "SampleDependentFocalLoss",
    "SegmentationLoss",
    "SoftL1ACELoss",
    "TverskyLoss",
    "TverskyPlusPlusLoss",
    "loss_from_string",
    "parse_loss_spec",
    "valid_loss_names",
]
