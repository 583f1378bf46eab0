"""Adapters that plug segcal into the loops users already run (MONAI, torchmetrics, Lightning, ...).

One module per library, each imported explicitly (``from segcal.integrations.monai import CalibrationMetric``);
nothing is imported here, so ``import segcal`` never loads an optional library. Every adapter is a thin wrapper
over :mod:`segcal.functional` (docs/integrations/).
"""
