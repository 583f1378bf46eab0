"""nnU-Net v2 integration: trainers that train with segcal's calibration losses (docs/integrations/nnunet.md).

* :mod:`segcal.integrations.nnunet.trainers`: ``nnUNetTrainerSegcalHardACE``, ``nnUNetTrainerSegcalSoftACE``,
  ``nnUNetTrainerSegcalDSCPlusPlus`` (importing it imports nnU-Net: ``pip install 'segcal[nnunet]'``);
* :mod:`segcal.integrations.nnunet.losses`: segcal's losses on nnU-Net's ``(logits, target)`` pairs, and how they
  are put into a loss built by nnU-Net (torch and segcal only);
* :mod:`segcal.integrations.nnunet.install`: ``segcal nnunet install-trainers`` (standard library only).

Nothing is imported here, so importing this package never loads nnU-Net.
"""
