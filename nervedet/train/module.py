"""The Lightning module: the network, its losses, and validation Dice per class and immune-cell F1 (3 µm)."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from nervedet.matching import match_points
from nervedet.model import ModelConfig, build_network
from nervedet.peaks import find_peaks
from nervedet.train.losses import IGNORE, class_loss, heatmap_loss

MATCH_UM = 3.0


class NerveSegmenter(pl.LightningModule):
    def __init__(self, model_config: dict, lr: float = 1e-3, weight_decay: float = 1e-4, heat_weight: float = 10.0,
                 max_steps: int = 1000):
        super().__init__()
        self.save_hyperparameters()
        self.config = ModelConfig.from_dict(model_config)
        self.network = build_network(self.config).to(memory_format=torch.channels_last)
        self.nerve_index = self.config.class_index("Nerve")
        self._val: dict[str, torch.Tensor] = {}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(image.contiguous(memory_format=torch.channels_last))

    def _losses(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self(batch["image"])
        c = self.config.num_classes
        lc = class_loss(out[:, :c], batch["mask"], self.nerve_index)
        lh = heatmap_loss(out[:, c:c + 1], batch["heatmap"], batch["heat_valid"])
        return out, lc, lh

    def training_step(self, batch, batch_idx):
        _, lc, lh = self._losses(batch)
        loss = lc + self.hparams.heat_weight * lh
        self.log_dict({"train/loss": loss, "train/class_loss": lc, "train/heat_loss": lh},
                      prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["image"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        c = self.config.num_classes
        self._val = {"inter": torch.zeros(c), "sum": torch.zeros(c), "tp": torch.zeros(()), "fp": torch.zeros(()),
                     "fn": torch.zeros(()), "loss": torch.zeros(()), "n": torch.zeros(())}

    def validation_step(self, batch, batch_idx):
        out, lc, lh = self._losses(batch)
        v = self._val
        v["loss"] += float(lc + self.hparams.heat_weight * lh)
        v["n"] += 1
        c = self.config.num_classes
        pred = out[:, :c].argmax(1)
        mask = batch["mask"]
        labelled = mask < c
        for k in range(c):
            p, t = (pred == k) & labelled, (mask == k) & labelled
            v["inter"][k] += float((p & t).sum())
            v["sum"][k] += float(p.sum() + t.sum())
        prob = torch.sigmoid(out[:, c].float())
        radius = MATCH_UM / self.config.analysis_mpp
        for i, peaks in enumerate(find_peaks(prob)):
            valid = batch["heat_valid"][i, 0]
            if len(peaks):
                inside = valid[peaks[:, 1].long(), peaks[:, 0].long()] > 0
                peaks = peaks[inside]
            truth = batch["points"][i, : int(batch["n_points"][i])]
            n = match_points(peaks[:, :2].cpu().numpy(), truth.cpu().numpy(), radius)
            v["tp"] += n
            v["fp"] += len(peaks) - n
            v["fn"] += len(truth) - n

    def on_validation_epoch_end(self) -> None:
        v = self._val
        dice = (2 * v["inter"] / v["sum"].clamp(min=1)).tolist()
        tp, fp, fn = float(v["tp"]), float(v["fp"]), float(v["fn"])
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
        metrics = {f"val/dice_{name.lower()}": d for name, d in zip(self.config.class_names, dice)}
        metrics["val/immune_f1"] = f1
        metrics["val/loss"] = float(v["loss"] / v["n"].clamp(min=1))
        self.log_dict(metrics, prog_bar=False)
        self.log("val/score", (metrics["val/dice_nerve"] + f1) / 2, prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up over 5% of the steps, then cosine decay to 2% at max_steps. Computed from the
        current max_steps, so a resumed run with more steps stretches the schedule instead of failing."""
        total = max(int(self.hparams.max_steps), 2)
        warm = max(1, total // 20)
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t))


__all__ = ["NerveSegmenter", "IGNORE"]
