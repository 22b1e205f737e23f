"""Tile-level accuracy of a weights file on held-out annotated slides, and nerve false positives on images
known to hold no nerve. Used by scripts/train_default.py for the numbers of weights/README.md."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from nervedet.model import normalize
from nervedet.train.data import SamplingWeights, SlideSpec
from nervedet.train.dataset import PatchDataset
from nervedet.train.metrics import TileScores
from nervedet.weights import Model, cpu_bf16_supported

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileMetrics:
    tiles: int
    dice: dict[str, float]  # per class, pooled over tiles
    immune_precision: float
    immune_recall: float
    immune_f1: float
    immune_truth: int

    def as_dict(self) -> dict:
        return {"tiles": self.tiles, **{f"dice_{k.lower()}": v for k, v in self.dice.items()},
                "immune_precision": self.immune_precision, "immune_recall": self.immune_recall,
                "immune_f1": self.immune_f1, "immune_truth": self.immune_truth}


def _autocast(device: torch.device):
    if device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16_supported())
    return torch.autocast(device.type, dtype=torch.float16)


def evaluate_tiles(model: Model, specs: list[SlideSpec], tiles: int = 256, seed: int = 0, batch_size: int = 8,
                   weights: SamplingWeights = SamplingWeights()) -> TileMetrics:
    """Dice per class and immune-cell F1 (one-to-one within 3 µm) over tiles sampled from ``specs``."""
    cfg, device = model.config, next(model.network.parameters()).device
    ds = PatchDataset(specs, cfg, tiles, seed, None, weights=weights)
    scores = TileScores(cfg)
    net = model.network.eval().to(memory_format=torch.channels_last)
    with torch.no_grad():
        for batch in DataLoader(ds, batch_size=batch_size, num_workers=0):
            with _autocast(device):
                out = net(batch["image"].to(device).contiguous(memory_format=torch.channels_last))
            scores.update(out, batch)
    prec, rec, f1 = scores.immune
    return TileMetrics(tiles, scores.dice, prec, rec, f1, scores.tp + scores.fn)


def predict_image(model: Model, rgb: np.ndarray, overlap: int = 32) -> np.ndarray:
    """Class probabilities (C, H, W) of a whole RGB image at the model's mpp, tiled with overlap."""
    cfg, device = model.config, next(model.network.parameters()).device
    t = cfg.tile_size
    h, w = rgb.shape[:2]
    H, W = max(h, t), max(w, t)
    padded = np.full((H, W, 3), 255, np.uint8)
    padded[:h, :w] = rgb
    probs = np.zeros((cfg.num_classes, H, W), np.float32)
    weight = np.zeros((H, W), np.float32)
    step = t - overlap
    ys = sorted({*range(0, H - t + 1, step), H - t})
    xs = sorted({*range(0, W - t + 1, step), W - t})
    with torch.no_grad():
        for y in ys:
            for x in xs:
                tile = torch.from_numpy(padded[y:y + t, x:x + t]).permute(2, 0, 1)[None]
                with _autocast(device):
                    out = model.network(normalize(tile, cfg).to(device)).float()
                probs[:, y:y + t, x:x + t] += torch.softmax(out[0, : cfg.num_classes], 0).cpu().numpy()
                weight[y:y + t, x:x + t] += 1
    return (probs / weight)[:, :h, :w]


def nerve_fraction_on_negatives(model: Model, images: list[Path], mpp: float = 0.5) -> dict[str, float]:
    """Share of each image's tissue the model calls nerve (images known to hold no nerve)."""
    import cv2
    from PIL import Image

    from nervedet.tissue import tissue_from_rgb

    cfg = model.config
    out = {}
    for path in images:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        scale = mpp / cfg.analysis_mpp
        if abs(scale - 1) > 1e-3:
            rgb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        probs = predict_image(model, rgb)
        nerve = probs.argmax(0) == cfg.class_index("Nerve")
        tissue = tissue_from_rgb(rgb, cfg.analysis_mpp)
        if tissue.shape != nerve.shape:
            tissue = cv2.resize(tissue.astype(np.uint8), nerve.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
        if tissue.sum() < 0.05 * tissue.size:  # small images: tissue detection is made for thumbnails
            tissue = np.ones_like(nerve)
        out[path.name] = float((nerve & tissue).sum() / max(tissue.sum(), 1))
    return out
