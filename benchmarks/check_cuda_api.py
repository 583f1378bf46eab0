"""Device parity of segcal's public API: every entry point users call inside a GPU loop, on CUDA tensors, against
the same call on the CPU.

Run on a machine with a CUDA device (results recorded in docs/core-validation.md)::

    PYTHONPATH=src python benchmarks/check_cuda_api.py [--device cuda]

``benchmarks/check_cuda.py`` checks the functional core (binning, case statistics, losses). This one checks the
layers above it, as a user chains them in a GPU validation loop:

* the metric object (``SegmentationCalibrationMetric``, with a mask, HD95 and the peers' fine bins), the MONAI
  metrics (``CalibrationMetric``, ``HausdorffDistance95Metric``) and the torchmetrics metric (where installed);
* every calibrator's ``fit`` / ``transform`` on CUDA logits (temperature, vector, matrix, Dirichlet scaling, the
  auxiliary convolution, local temperature scaling, the last-layer fine-tuner), with targets and masks on the
  device or on the host, then MONAI's ``CalibrateLogits`` transform with it;
* conformal risk control (``fit`` / ``transform`` / ``report``), the threshold sweep, the uncertainty maps and
  scores, ensembles and MC dropout (``mc_predict``);
* two epochs of ``segcal.training.train`` (a MONAI UNet with the Dice + hard mL1-ACE loss) on the device.

A check passes when the CUDA call runs, returns its dense outputs (maps, masks, calibrated probabilities) on the
input's device (summaries such as metric values, curves and fitted parameters come back on the host), and its
values equal the CPU's: to 1e-6 for the statistics (float32 softmax on another device), to 1e-3 for the scaling
calibrators (the optimisers' reductions run in another order on the GPU), to 5e-3 / 5e-2 for the trained
convolution calibrators (see ``main``), and by their properties for the random ones (MC dropout: probabilities
that sum to one). ``--device cpu`` runs the script against itself (a
check of the script). Exits with status 1 when a check fails (the failures are listed).
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch

FAILURES: list[str] = []
PASSED: list[str] = []
#: an output with at least this many values is a dense one (a map, masks, calibrated probabilities) and must stay
#: on the input's device; summaries (metric values, curves, fitted parameters) come back on the host
DENSE = 1000


def _data(dev: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Logits (3, 4, 20, 18, 12) of a confident but imperfect model, labels, a mask and probabilities."""
    g = torch.Generator().manual_seed(seed)
    b, c, spatial = 3, 4, (20, 18, 12)
    lab = torch.randint(0, c, (b, *spatial), generator=g)
    lab[:, :6] = 0
    onehot = torch.nn.functional.one_hot(lab, c).movedim(-1, 1).float()
    logits = 4 * onehot + 1.5 * torch.randn(b, c, *spatial, generator=g)
    mask = torch.rand(b, *spatial, generator=g) > 0.2
    out = {"logits": logits, "labels": lab, "mask": mask, "probs": torch.softmax(logits, 1), "onehot": onehot}
    return {k: v.to(dev) for k, v in out.items()}


def _flatten(x: Any, prefix: str = "") -> dict[str, Any]:
    """Nested results as ``{path: tensor or number}``."""
    if isinstance(x, torch.Tensor):
        return {prefix: x}
    if isinstance(x, dict):
        out: dict[str, Any] = {}
        for k, v in x.items():
            out |= _flatten(v, f"{prefix}.{k}")
        return out
    if isinstance(x, (list, tuple)):
        out = {}
        for i, v in enumerate(x):
            out |= _flatten(v, f"{prefix}[{i}]")
        return out
    if hasattr(x, "__dataclass_fields__"):
        return _flatten({f: getattr(x, f) for f in x.__dataclass_fields__}, prefix)
    if isinstance(x, (int, float, bool, str)) or x is None:
        return {prefix: x}
    return {}


def _compare(
    name: str, got: Any, want: Any, dev: torch.device, rtol: float, atol: float, host: tuple[str, ...] = ()
) -> None:
    g, w = _flatten(got), _flatten(want)
    if g.keys() != w.keys():
        FAILURES.append(f"{name}: the results differ in their fields ({sorted(g.keys() ^ w.keys())[:5]})")
        return
    for key, a in g.items():
        b = w[key]
        if isinstance(a, torch.Tensor):
            if a.device.type != dev.type and a.numel() >= DENSE and not key.startswith(host):
                FAILURES.append(f"{name}{key}: on {a.device}, not on the input's device {dev}")
            ok = a.shape == b.shape and torch.allclose(
                a.detach().double().cpu(), b.detach().double().cpu(), rtol=rtol, atol=atol, equal_nan=True
            )
            if not ok:
                diff = (a.detach().double().cpu() - b.detach().double().cpu()).abs().nan_to_num().max().item()
                FAILURES.append(f"{name}{key}: CUDA != CPU (shape {tuple(a.shape)}, max abs diff {diff:.3g})")
                return
        elif isinstance(a, float) and isinstance(b, float):
            if not (abs(a - b) <= atol + rtol * abs(b) or (a != a and b != b)):
                FAILURES.append(f"{name}{key}: CUDA {a!r} != CPU {b!r}")
        elif a != b:
            FAILURES.append(f"{name}{key}: CUDA {a!r} != CPU {b!r}")


def parity(
    name: str,
    fn: Callable[[torch.device], Any],
    dev: torch.device,
    rtol: float = 1e-9,
    atol: float = 1e-9,
    host: tuple[str, ...] = (),
) -> None:
    """Runs ``fn`` on the CPU and on ``dev`` (the same seeds) and compares the results; ``host``: the fields that
    are summaries held on the host whatever their size (e.g. the sparse FNR statistics)."""
    n_before = len(FAILURES)
    try:
        torch.manual_seed(0)
        want = fn(torch.device("cpu"))
        torch.manual_seed(0)
        got = fn(dev)
    except Exception as exc:  # a crash on the device is the failure this script looks for
        where = traceback.format_exc(limit=-3).replace("\n", "\n    ")
        FAILURES.append(f"{name}: {type(exc).__name__}: {exc}\n    {where}")
        return
    _compare(name, got, want, dev, rtol, atol, host)
    if len(FAILURES) == n_before:
        PASSED.append(name)


def metric_object(dev: torch.device) -> Any:
    from segcal.metrics import SegmentationCalibrationMetric

    d = _data(dev)
    m = SegmentationCalibrationMetric(activation="softmax", hd95=True, fine_bins=100, surface=("assd", "nsd"))
    m.update(d["logits"][:2], d["labels"][:2], mask=d["mask"][:2], spacing=(1.0, 1.0, 2.5))
    m.update(d["logits"][2:], d["labels"][2:], mask=d["mask"][2:], spacing=(1.0, 1.0, 2.5))
    r = m.compute()
    return {"per_image": r.per_image, "pooled": r.pooled}


def monai_metrics(dev: torch.device) -> Any:
    from segcal.integrations.monai import CalibrationMetric, HausdorffDistance95Metric

    d = _data(dev)
    out = {}
    for name, metric in (("ace", CalibrationMetric(calibration_reduction="average")),
                         ("ece", CalibrationMetric()),
                         ("hd95", HausdorffDistance95Metric(spacing=(1.0, 1.0, 2.5)))):  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metric(y_pred=list(d["probs"]), y=list(d["onehot"]))
            out[name] = metric.aggregate()
    return out


def torchmetrics_metric(dev: torch.device) -> Any:
    from segcal.integrations.torchmetrics import SegmentationCalibrationError

    d = _data(dev)
    m = SegmentationCalibrationError(num_classes=4).to(dev)
    m.update(d["probs"][:2], d["labels"][:2])
    m.update(d["probs"][2:], d["labels"][2:])
    return m.compute()


def calibrator(cls_name: str, **kw: Any) -> Callable[[torch.device], Any]:
    def run(dev: torch.device) -> Any:
        from segcal import posthoc

        d = _data(dev)
        cal = getattr(posthoc, cls_name)(**kw).fit(d["logits"], d["labels"])
        return cal.transform(d["logits"])

    return run


def calibrator_host_targets(dev: torch.device) -> Any:
    """Logits on the device, targets and masks on the host (as a loader often gives them)."""
    from segcal.posthoc import TemperatureScaling, VectorScaling

    d = _data(dev)
    lab, mask = d["labels"].cpu(), d["mask"].cpu()
    return {cls.__name__: cls().fit(d["logits"], lab, mask).transform(d["logits"])
            for cls in (TemperatureScaling, VectorScaling)}  # fmt: skip


def local_with_images(dev: torch.device) -> Any:
    from segcal.posthoc import LocalTemperatureScaling

    d = _data(dev)
    images = d["logits"][:, :1].clone()
    cal = LocalTemperatureScaling(image_channels=1, epochs=2).fit(d["logits"], d["labels"], images=images)
    return cal.transform(d["logits"], images)


def last_layer(dev: torch.device) -> Any:
    """The network on the device, the loader's batches on the host."""
    from segcal.posthoc import LastLayerFineTuner

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 4, 1)).to(dev)
    d = _data(torch.device("cpu"))
    batches = [(d["logits"][i : i + 1, :1], d["labels"][i : i + 1]) for i in range(3)]
    tuner = LastLayerFineTuner(net, epochs=2).fit(batches)
    return tuner.transform(d["logits"][:, :1].to(dev))


def calibrate_logits_transform(dev: torch.device) -> Any:
    from segcal.integrations.monai import CalibrateLogits
    from segcal.posthoc import TemperatureScaling

    d = _data(dev)
    cal = TemperatureScaling().fit(d["logits"], d["labels"])
    return CalibrateLogits(cal)(d["logits"][0])


def conformal(dev: torch.device) -> Any:
    from segcal.posthoc import ConformalRiskControl

    d = _data(dev)
    crc = ConformalRiskControl(alpha=0.3).fit(d["probs"], d["labels"])  # 3 cases: alpha >= 1 / (n + 1)
    masks = crc.transform(d["probs"])
    return {"lambdas": crc.lambdas_, "masks": masks, "risk": crc.report(d["probs"], d["labels"]).rows()}


def thresholds(dev: torch.device) -> Any:
    import segcal.functional as F

    d = _data(dev)
    sweep = F.threshold_sweep(d["probs"], d["labels"], 1, mask=d["mask"], n_bootstrap=50)
    return {"sweep": sweep, "pick": F.pick_threshold(sweep, min_recall=0.5)}


def uncertainty(dev: torch.device) -> Any:
    import segcal.functional as F

    d = _data(dev)
    ent = F.entropy_map(d["probs"])
    return {
        "entropy": ent,
        "mi": F.mutual_information(d["probs"], ent),
        "segment": F.segment_mean_entropy(d["probs"]),
        "ood": {k: F.ood_score(d["probs"], k) for k in ("segment_entropy", "max_probability", "mean_entropy")},
        "fnr": F.fnr_statistics(d["probs"], d["labels"]),
    }


def ensembles(dev: torch.device) -> Any:
    from segcal.posthoc import ensemble_probabilities

    d = _data(dev)
    members = [torch.softmax(d["logits"] * t, 1) for t in (0.5, 1.0, 2.0)]
    return ensemble_probabilities(members)


def mc_dropout(dev: torch.device) -> Any:
    from segcal.posthoc import mc_predict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.Dropout3d(0.3),
                                torch.nn.Conv3d(8, 3, 1)).to(dev)  # fmt: skip
    x = torch.randn(2, 1, 12, 12, 8, generator=torch.Generator().manual_seed(1)).to(dev)
    out = mc_predict(model, x, n_samples=4, seed=0)
    mean = next(v for k, v in out.items() if "prob" in k or "mean" in k)
    if mean.device.type != dev.type or not torch.allclose(mean.sum(1), torch.ones_like(mean.sum(1)), atol=1e-5):
        raise AssertionError(f"mc_predict: mean probabilities on {mean.device} that do not sum to one")
    return {}  # random draws differ between devices: checked by their properties above


def training(dev: torch.device) -> Any:
    """``segcal.training.train`` (two epochs of a small MONAI UNet with the hard mL1-ACE + Dice loss) on the
    device: it runs, and its losses are finite (training draws differ between devices: not compared)."""
    import math
    import tempfile

    import numpy as np

    from segcal.training import train

    rng = np.random.default_rng(0)
    labels = np.zeros((8, 16, 16), dtype=np.int64)
    for i in range(8):
        y0, x0 = rng.integers(0, 8, 2)
        labels[i, y0 : y0 + 6, x0 : x0 + 6] = 1
    images = (labels[:, None] + 0.3 * rng.standard_normal((8, 1, 16, 16))).astype(np.float32)
    with tempfile.TemporaryDirectory() as out:
        cfg = {"epochs": 2, "output_dir": out, "progress": False, "device": dev.type, "loss": "dice+hard_ace",
               "model": {"channels": [4, 8], "strides": [2], "num_res_units": 1},
               "data": {"batch_size": 4}, "optim": {"lr": 0.01}}  # fmt: skip
        res = train(cfg, (images[:6], labels[:6]), (images[6:], labels[6:]), resume=False)
    if next(res.model.parameters()).device.type != dev.type:
        raise AssertionError(f"the trained model is on {next(res.model.parameters()).device}, not {dev}")
    losses = [v for row in res.history for k, v in row.items() if "loss" in k and isinstance(v, float)]
    if not losses or not all(math.isfinite(v) for v in losses):
        raise AssertionError(f"training losses {losses}")
    return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", default="", help="run the checks whose name contains this text")
    ap.add_argument("--no-tf32", action="store_true", help="float32 convolutions and matmuls without TF32")
    args = ap.parse_args()
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this check runs on a GPU machine")
    #: (name, flow, tolerance). The convolution-based calibrators are trained (Adam, minibatches): the auxiliary
    #: convolution, trained on the GPU, runs its convolutions in PyTorch's default TF32 there (H200: 1.8e-3 apart,
    #: equal to 1e-3 with --no-tf32); local temperature scaling cuts its patches from logits centred on the GPU
    #: (float32 means a few ulps apart), and its held-out early stopping can then keep another epoch (H200: up to
    #: 0.028 apart, with or without TF32)
    checks: list[tuple[str, Callable[[torch.device], Any], float]] = [
        ("SegmentationCalibrationMetric (mask, HD95, ASSD, NSD, fine bins)", metric_object, 1e-6),
        ("MONAI CalibrationMetric / HausdorffDistance95Metric", monai_metrics, 1e-6),
        ("torchmetrics SegmentationCalibrationError", torchmetrics_metric, 1e-6),
        ("TemperatureScaling", calibrator("TemperatureScaling"), 1e-3),
        ("VectorScaling", calibrator("VectorScaling"), 1e-3),
        ("MatrixScaling", calibrator("MatrixScaling"), 1e-3),
        ("DirichletScaling", calibrator("DirichletScaling"), 1e-3),
        ("AuxiliaryConvCalibrator", calibrator("AuxiliaryConvCalibrator", epochs=3), 5e-3),
        ("AuxiliaryConvCalibrator (patches)", calibrator("AuxiliaryConvCalibrator", epochs=3, patch_size=6), 5e-3),
        ("TemperatureScaling (voxel reservoir)", calibrator("TemperatureScaling", max_voxels=2000), 1e-3),
        ("calibrators with targets and masks on the host", calibrator_host_targets, 1e-3),
        ("LocalTemperatureScaling (with images)", local_with_images, 5e-2),
        ("LastLayerFineTuner (batches on the host)", last_layer, 1e-3),
        ("LocalTemperatureScaling", calibrator("LocalTemperatureScaling", epochs=3), 5e-2),
        ("MONAI CalibrateLogits", calibrate_logits_transform, 1e-3),
        ("ConformalRiskControl", conformal, 1e-6),
        ("threshold_sweep / pick_threshold", thresholds, 1e-6),
        ("uncertainty maps and scores", uncertainty, 1e-6),
        ("ensemble_probabilities", ensembles, 1e-6),
        ("mc_predict", mc_dropout, 1e-6),
        ("segcal.training.train (2 epochs)", training, 1e-6),
    ]
    for name, fn, tol in checks:
        if args.only not in name:
            continue
        if name.startswith("torchmetrics"):
            try:
                import torchmetrics  # noqa: F401
            except ImportError:
                print(f"  skipped (torchmetrics not installed): {name}")
                continue
        parity(name, fn, dev, rtol=tol, atol=tol, host=(".fnr",))
        print(f"  {'ok  ' if PASSED and PASSED[-1] == name else 'FAIL'} {name}", flush=True)
    if FAILURES:
        print("\nFAILURES:\n  " + "\n  ".join(FAILURES))
        sys.exit(1)
    print(f"\nall {len(PASSED)} device parity checks passed on {dev}")


if __name__ == "__main__":
    main()
