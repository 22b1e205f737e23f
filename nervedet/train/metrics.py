"""Tile-level accuracy, accumulated over batches: Dice per class (pooled over pixels) and immune-cell
precision / recall / F1 (peaks of the heatmap matched one-to-one to the truth points within 3 µm).
Serves the validation of training and the held-out measurement of a weights file alike."""

from __future__ import annotations

import numpy as np
import torch

from nervedet.matching import match_points
from nervedet.model import ModelConfig
from nervedet.peaks import find_peaks

MATCH_UM = 3.0


class TileScores:
    def __init__(self, config: ModelConfig):
        self.config = config
        self.inter = np.zeros(config.num_classes)
        self.total = np.zeros(config.num_classes)
        self.tp = self.fp = self.fn = 0

    def update(self, out: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Add a batch: ``out`` the network's raw output (N, classes + 1, H, W); ``batch`` as PatchDataset gives."""
        c = self.config.num_classes
        out = out.detach().float().cpu()
        pred, mask = out[:, :c].argmax(1), batch["mask"].cpu()
        labelled = mask < c
        for k in range(c):
            p, t = (pred == k) & labelled, (mask == k) & labelled
            self.inter[k] += float((p & t).sum())
            self.total[k] += float(p.sum() + t.sum())
        radius = MATCH_UM / self.config.analysis_mpp
        for i, peaks in enumerate(find_peaks(torch.sigmoid(out[:, c]))):
            valid = batch["heat_valid"][i, 0].cpu()
            if len(peaks):
                peaks = peaks[valid[peaks[:, 1].long(), peaks[:, 0].long()] > 0]
            truth = batch["points"][i, : int(batch["n_points"][i])].cpu().numpy()
            n = match_points(peaks[:, :2].numpy(), truth, radius)
            self.tp, self.fp, self.fn = self.tp + n, self.fp + len(peaks) - n, self.fn + len(truth) - n

    def counts(self) -> np.ndarray:
        """The accumulated counts as one vector (to be summed over processes), read back by ``set_counts``."""
        return np.concatenate([self.inter, self.total, [self.tp, self.fp, self.fn]]).astype(np.float64)

    def set_counts(self, counts: np.ndarray) -> None:
        c = self.config.num_classes
        counts = np.asarray(counts, np.float64)
        self.inter, self.total = counts[:c].copy(), counts[c:2 * c].copy()
        self.tp, self.fp, self.fn = (int(round(x)) for x in counts[2 * c:2 * c + 3])

    @property
    def dice(self) -> dict[str, float]:
        return {name: float(2 * self.inter[k] / self.total[k]) if self.total[k] else 1.0
                for k, name in enumerate(self.config.class_names)}

    @property
    def immune(self) -> tuple[float, float, float]:
        """(precision, recall, F1), 1.0 where there was nothing to find and nothing found."""
        tp, fp, fn = self.tp, self.fp, self.fn
        prec = tp / (tp + fp) if tp + fp else 1.0
        rec = tp / (tp + fn) if tp + fn else 1.0
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
        return prec, rec, f1
