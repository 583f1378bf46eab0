"""A real Lightning Trainer (CPU, 2 epochs, a tiny model) with segcal's CalibrationCallback: the logged values
equal segcal's functional results on the same validation predictions, epoch by epoch, and the figures are
written into the logger's folder."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from _helpers import PNG_MAGIC, subprocess_env
from segcal.functional import bin_statistics, calibration_errors
from segcal.integrations.lightning import CalibrationCallback


def _squares(n: int, seed: int) -> TensorDataset:
    """Noisy images (1, 12, 12) whose 3-class label depends on the intensity (some voxels ambiguous)."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 3, (n, 12, 12), generator=g)
    img = clean.float()[:, None] + 0.7 * torch.randn(n, 1, 12, 12, generator=g)
    return TensorDataset(img, clean)


class TinySeg(LightningModule):
    """A 3x3 convolution to 3 classes; records its validation probabilities per epoch (for the test only)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        probs = torch.softmax(self.net(x), 1)
        if not self.trainer.sanity_checking:
            self.seen.setdefault(self.current_epoch, []).append((probs.detach().clone(), y.clone()))
        return {"pred": probs, "target": y}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _functional(parts: list[tuple[torch.Tensor, torch.Tensor]], num_bins: int) -> dict[str, torch.Tensor]:
    p = torch.cat([a for a, _ in parts])
    y = torch.cat([b for _, b in parts])
    return calibration_errors(bin_statistics(p, y, num_bins, include_background=False).pooled())


def test_trainer_logs_segcal_values_and_writes_figures(tmp_path, one_torch_thread):
    model = TinySeg()
    callback = CalibrationCallback(num_bins=10, log_per_class=True, class_names=["one", "two"])
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=CSVLogger(tmp_path, name="run"),
        default_root_dir=tmp_path,
        callbacks=[callback],
        log_every_n_steps=1,
    )
    train = DataLoader(_squares(8, 0), batch_size=4)
    val = DataLoader(_squares(6, 1), batch_size=4)  # 2 batches of 4 + 2 images
    trainer.fit(model, train, val)

    assert sorted(model.seen) == [0, 1] and all(len(v) == 2 for v in model.seen.values())
    rows = [r for r in csv.DictReader(open(Path(trainer.log_dir) / "metrics.csv")) if r.get("val_ece")]
    assert len(rows) == 2  # one row per validation epoch, the sanity check not logged
    for epoch, row in enumerate(rows):
        expected = _functional(model.seen[epoch], 10)
        assert int(row["epoch"]) == epoch
        for key in ("ece", "ace", "mce"):
            assert float(row[f"val_{key}"]) == pytest.approx(float(expected[key].mean()), rel=1e-6)
            assert float(row[f"val_{key}/two"]) == pytest.approx(float(expected[key][0, 1]), rel=1e-6)
        assert float(expected["ace"].mean()) > 0.01  # non-trivial values
    first, last = (_functional(model.seen[e], 10)["ece"].mean() for e in (0, 1))
    assert abs(float(first) - float(last)) > 1e-4  # training moved the model between the two epochs
    logged = trainer.callback_metrics
    assert float(logged["val_ece"]) == pytest.approx(float(last), rel=1e-6)
    assert callback.latest["val_ece"] == pytest.approx(float(last), rel=1e-12)

    folder = Path(trainer.log_dir) / "calibration"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"reliability_{kind}epoch{e:03d}.png" for kind in ("", "histogram_") for e in (0, 1)]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in callback.written)


def test_output_transform_logits_and_a_clear_error_for_missing_keys(tmp_path, one_torch_thread):
    class LogitsModel(TinySeg):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self.net(x)
            if not self.trainer.sanity_checking:
                self.seen.setdefault(self.current_epoch, []).append((torch.softmax(logits, 1).detach(), y))
            return logits

    model = LogitsModel()
    callback = CalibrationCallback(
        num_bins=8, activation="softmax", output_transform=lambda out, batch: (out, batch[1]), figures=False,
        prefix="v/",
    )
    trainer = Trainer(accelerator="cpu", max_epochs=1, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, logger=False, default_root_dir=tmp_path, callbacks=[callback],
                      num_sanity_val_steps=0)
    trainer.fit(model, DataLoader(_squares(4, 2), batch_size=4), DataLoader(_squares(3, 3), batch_size=2))
    expected = _functional(model.seen[0], 8)
    assert float(trainer.callback_metrics["v/mce"]) == pytest.approx(float(expected["mce"].mean()), rel=1e-6)
    assert not (tmp_path / "calibration").exists()

    bad = CalibrationCallback(figures=False)
    trainer = Trainer(accelerator="cpu", max_epochs=1, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, logger=False, default_root_dir=tmp_path, callbacks=[bad],
                      num_sanity_val_steps=0)
    with pytest.raises(ValueError, match="must return a dict with keys 'pred' and 'target'"):
        trainer.fit(LogitsModel(), DataLoader(_squares(4, 2), batch_size=4), DataLoader(_squares(3, 3)))


def test_ddp_over_two_processes_logs_the_values_of_all_images(tmp_path, one_torch_thread):
    """A real ``Trainer(strategy="ddp_spawn", devices=2)`` on the CPU: each rank validates half of the images,
    the callback gathers the per-image sums of both ranks, and the logged values equal segcal's functional
    result on all the images in one process (a rank alone would give other values)."""
    model = TinySeg()
    callback = CalibrationCallback(num_bins=10, figures=False, log_per_class=True)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, logger=False,
                      default_root_dir=tmp_path, callbacks=[callback])  # fmt: skip
    val = _squares(6, 1)
    logged = trainer.validate(model, DataLoader(val, batch_size=1), verbose=False)[0]
    with torch.no_grad():
        probs = torch.softmax(model.net(val.tensors[0]), 1)
    expected = _functional([(probs, val.tensors[1])], 10)
    for key in ("ece", "ace", "mce"):
        assert logged[f"val_{key}"] == pytest.approx(float(expected[key].mean()), rel=1e-6)
        assert logged[f"val_{key}/class_2"] == pytest.approx(float(expected[key][0, 1]), rel=1e-6)
    # the images of one rank alone (the distributed sampler's share: every other image) give other values
    alone = _functional([(probs[0::2], val.tensors[1][0::2])], 10)
    assert abs(float(alone["ece"].mean()) - logged["val_ece"]) > 1e-3


def test_import_segcal_loads_no_integration_library():
    """``import segcal`` and ``import segcal.integrations`` load none of the integrated libraries (nor torch):
    only importing an adapter module does."""
    code = (
        "import sys, segcal, segcal.integrations\n"
        "heavy = ('lightning', 'torchmetrics', 'ignite', 'monai', 'torch')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=subprocess_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
