"""segcal: calibration metrics, calibration-aware losses and post-hoc calibration for segmentation.

Docstrings cite papers by short names (ACE-MICCAI, ACE-journal, DSC++, PostHoc, Ensembles) or author and year;
full citations are in docs/references.md.
"""

__version__ = "0.1.0"
