"""The Lightning module: the network, its losses, and validation Dice per class and immune-cell F1 (3 µm)."""

from __future__ import annotations

import math

import numpy as np
import pytorch_lightning as pl
import torch

from nervedet.model import ModelConfig, build_network
from nervedet.train.losses import class_loss, heatmap_loss
from nervedet.train.metrics import TileScores


class NerveSegmenter(pl.LightningModule):
    def __init__(self, model_config: dict, lr: float = 1e-3, weight_decay: float = 1e-4, heat_weight: float = 10.0,
                 max_steps: int = 1000):
        super().__init__()
        self.save_hyperparameters()
        self.config = ModelConfig.from_dict(model_config)
        self.network = build_network(self.config).to(memory_format=torch.channels_last)
        self.nerve_index = self.config.class_index("Nerve")
        self._scores = TileScores(self.config)
        self._val_loss_sum, self._val_count = 0.0, 0
        self.val_patches_seen = 0  # validation patches of the last validation, over all processes

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
        self._scores = TileScores(self.config)
        self._val_loss_sum, self._val_count = 0.0, 0

    def validation_step(self, batch, batch_idx):
        out, lc, lh = self._losses(batch)
        n = batch["image"].shape[0]
        self._val_loss_sum += float(lc + self.hparams.heat_weight * lh) * n
        self._val_count += n
        self._scores.update(out, batch)

    def on_validation_epoch_end(self) -> None:
        # Under DDP each process saw its share of the validation patches: sum the counts over processes,
        # then every process computes the same metrics (so early stopping and checkpoints agree).
        local = np.append(self._scores.counts(), [self._val_loss_sum, self._val_count])
        total = self.trainer.strategy.reduce(torch.tensor(local, dtype=torch.float64, device=self.device),
                                             reduce_op="sum")
        total = total.cpu().numpy()
        self._scores.set_counts(total[:-2])
        self.val_patches_seen = int(round(total[-1]))
        f1 = self._scores.immune[2]
        metrics = {f"val/dice_{name.lower()}": d for name, d in self._scores.dice.items()}
        metrics["val/immune_f1"] = f1
        metrics["val/loss"] = float(total[-2] / max(total[-1], 1))
        # equal on all processes already; sync_dist keeps Lightning's epoch-level reduction explicit
        self.log_dict(metrics, prog_bar=False, sync_dist=True)
        self.log("val/score", (metrics["val/dice_nerve"] + f1) / 2, prog_bar=True, sync_dist=True)

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


__all__ = ["NerveSegmenter"]
