"""Reading and writing every file segcal touches, split by format (see docs/evaluation.md, "Inputs" and
"Outputs").

* :mod:`segcal.io.case`: :class:`Case`, :class:`CaseFiles`, :class:`CaseError`;
* :mod:`segcal.io.nifti`: NIfTI data with spacing and affine;
* :mod:`segcal.io.numpy`: ``.npy`` / ``.npz`` arrays (keys ``probabilities`` / ``logits``, never pickled);
* :mod:`segcal.io.nnunet`: nnU-Net v2 ``case.npz`` probabilities ``(C, z, y, x)`` and side files;
* :mod:`segcal.io.sidecar`: the folder sidecar ``segcal.json`` (kind, spacing, class names, calibration);
* :mod:`segcal.io.predictions`: the prediction-file contract: probabilities or logits, and how that is known;
* :mod:`segcal.io.volumes`: probability / label / mask files of any format, in label order ``(C, *S)``;
* :mod:`segcal.io.matching`: case ids, format detection, :func:`match_cases`, :func:`load_case`;
* :mod:`segcal.io.runs`: run-folder files (``cases.csv``, ``failed.csv``, ``bins.npz``, ``summary.json``).

Every reader raises :class:`CaseError` (a ``ValueError`` naming the file) for a missing, corrupt or truncated
file or wrong content; every writer is atomic (:func:`atomic_write`): a temporary file in the target folder
moved onto the final name, so no truncated file is ever left under that name.
"""

from segcal.io._atomic import (
    OutputError,
    atomic_write,
    check_output_outside_inputs,
    copy_file,
    prepare_output_dir,
    write_bytes,
    write_text,
)
from segcal.io.case import GEOMETRY_ATOL, Case, CaseError, CaseFiles
from segcal.io.matching import Format, case_id_from_path, detect_format, load_case, match_cases
from segcal.io.nifti import (
    NIFTI_SUFFIXES,
    read_nifti,
    read_nifti_image,
    read_nifti_probabilities,
    write_nifti,
    write_nifti_probabilities,
)
from segcal.io.nnunet import (
    NNUNET_SIDE_FILES,
    copy_nnunet_side_files,
    read_nnunet_probabilities,
    write_nnunet_probabilities,
)
from segcal.io.numpy import (
    NUMPY_SUFFIXES,
    read_npz,
    read_numpy,
    read_numpy_array,
    read_numpy_logits,
    read_numpy_probabilities,
    write_npz,
    write_numpy,
    write_numpy_logits,
    write_numpy_probabilities,
)
from segcal.io.predictions import KindOption, Prediction, calibration_mark, read_prediction
from segcal.io.sidecar import SIDECAR_NAME, FolderInfo, PredictionKind, read_folder_info, write_folder_info
from segcal.io.volumes import (
    FolderFormat,
    list_prediction_files,
    read_label,
    read_mask,
    read_probabilities,
    write_prediction_file,
)

__all__ = [
    "GEOMETRY_ATOL",
    "NIFTI_SUFFIXES",
    "NNUNET_SIDE_FILES",
    "NUMPY_SUFFIXES",
    "SIDECAR_NAME",
    "Case",
    "CaseError",
    "CaseFiles",
    "FolderFormat",
    "FolderInfo",
    "Format",
    "KindOption",
    "OutputError",
    "Prediction",
    "PredictionKind",
    "atomic_write",
    "calibration_mark",
    "case_id_from_path",
    "check_output_outside_inputs",
    "copy_file",
    "copy_nnunet_side_files",
    "detect_format",
    "list_prediction_files",
    "load_case",
    "match_cases",
    "prepare_output_dir",
    "read_folder_info",
    "read_label",
    "read_mask",
    "read_nifti",
    "read_nifti_image",
    "read_nifti_probabilities",
    "read_nnunet_probabilities",
    "read_npz",
    "read_numpy",
    "read_numpy_array",
    "read_numpy_logits",
    "read_numpy_probabilities",
    "read_prediction",
    "read_probabilities",
    "write_bytes",
    "write_folder_info",
    "write_nifti",
    "write_nifti_probabilities",
    "write_nnunet_probabilities",
    "write_npz",
    "write_numpy",
    "write_numpy_logits",
    "write_numpy_probabilities",
    "write_prediction_file",
    "write_text",
]
