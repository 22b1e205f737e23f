"""The patch dataset: tiles of annotated slides as tensors (image, mask, immune heatmap), the split of slides
into training and validation, and a summary of the training data for the weights file."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nervedet.model import ModelConfig, normalize
from nervedet.train.data import (
    IGNORE,
    MAX_POINTS,
    NOT_NERVE,
    AnnotatedSlide,
    SamplingWeights,
    SlideSpec,
    sample_tile,
)

log = logging.getLogger(__name__)

__all__ = ["PatchDataset", "describe", "render_heatmap", "split_by_slide", "IGNORE", "NOT_NERVE"]


def render_heatmap(points: np.ndarray, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Max of Gaussians (peak 1.0 at the pixel that holds each point), float32 (H, W)."""
    h, w = shape
    heat = np.zeros((h, w), np.float32)
    if not len(points):
        return heat
    r = max(1, math.ceil(3 * sigma_px))
    g = np.exp(-np.arange(-r, r + 1, dtype=np.float32) ** 2 / (2 * sigma_px**2))
    kernel = np.outer(g, g)
    for cx, cy in np.floor(np.asarray(points, np.float64)).astype(np.int64):
        x0, y0, x1, y1 = max(cx - r, 0), max(cy - r, 0), min(cx + r + 1, w), min(cy + r + 1, h)
        if x1 <= x0 or y1 <= y0:
            continue
        k = kernel[y0 - cy + r : y1 - cy + r, x0 - cx + r : x1 - cx + r]
        np.maximum(heat[y0:y1, x0:x1], k, out=heat[y0:y1, x0:x1])
    return heat


def _run_augment(augment: Callable[..., dict[str, Any]], image: np.ndarray, mask: np.ndarray,
                 points: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Call an albumentations-style augment; points go in and out of its integer-pixel-centre convention."""
    if hasattr(augment, "set_random_seed"):
        augment.set_random_seed(seed)
    h, w = mask.shape
    kp = np.asarray(points, np.float32).reshape(-1, 2) - 0.5
    if len(kp):  # albumentations refuses points outside [0, size); these are within half a pixel of it
        kp[:, 0] = np.clip(kp[:, 0], 0.0, w - 1e-3)
        kp[:, 1] = np.clip(kp[:, 1], 0.0, h - 1e-3)
    out = augment(image=image, mask=mask, keypoints=kp)
    pts = np.asarray(out["keypoints"], np.float32).reshape(-1, 2) + 0.5
    img, m = out["image"], out["mask"]
    mh, mw = m.shape[:2]
    keep = (pts[:, 0] >= 0) & (pts[:, 0] < mw) & (pts[:, 1] >= 0) & (pts[:, 1] < mh)
    return np.ascontiguousarray(img), np.ascontiguousarray(m), pts[keep]


class PatchDataset(torch.utils.data.Dataset):
    """Class-balanced training (or fixed validation) patches.

    Item i is a function of (seed, i) when `augment` is None: a fixed validation set. With an augment,
    tiles and augmentation are drawn from (seed, epoch, i) and one draw of torch's RNG, which the DataLoader
    seeds per worker and epoch (reproducible under ``torch.manual_seed`` / ``seed_everything``).
    `augment` is called as ``augment(image=, mask=, keypoints=)`` (albumentations; see build_augment)."""

    def __init__(self, slides: Sequence[AnnotatedSlide | SlideSpec], config: ModelConfig, length: int, seed: int,
                 augment: Callable[..., dict[str, Any]] | None = None,
                 weights: SamplingWeights = SamplingWeights()):
        if not slides:
            raise ValueError("PatchDataset needs at least one slide")
        self.slides = [s if isinstance(s, AnnotatedSlide) else AnnotatedSlide(s, config) for s in slides]
        self.config, self.length, self.seed = config, int(length), int(seed)
        self.augment, self.weights = augment, weights
        self.epoch = 0
        self.sigma_px = config.heatmap_sigma_um / config.analysis_mpp

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self, i: int) -> np.random.Generator:
        if self.augment is None:
            return np.random.default_rng([self.seed, i])
        draw = int(torch.randint(0, 2**62, ()).item())
        return np.random.default_rng([self.seed, self.epoch, i, draw])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = self._rng(i)
        k, tile = sample_tile(self.slides, rng, self.weights)
        return self.make_item(self.slides[k], tile.x, tile.y, rng)

    def make_item(self, slide: AnnotatedSlide, x: int, y: int,
                  rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
        """The training dict of the tile at (x, y) of `slide` (augmented when the dataset has an augment)."""
        p = slide.patch(x, y)
        image, mask, points = p.image, p.mask, p.points
        if self.augment is not None:
            seed = int((rng or np.random.default_rng()).integers(2**31 - 1))
            image, mask, points = _run_augment(self.augment, image, mask, points, seed)
        heat_valid = (mask < NOT_NERVE) & slide.immune_labelled
        heat = render_heatmap(points, mask.shape, self.sigma_px)
        if len(points) > MAX_POINTS:
            log.debug("%s: %d points in a patch; %d kept for validation", slide, len(points), MAX_POINTS)
        n = min(len(points), MAX_POINTS)
        padded = np.full((MAX_POINTS, 2), -1.0, np.float32)
        padded[:n] = points[:n]
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        return {
            "image": normalize(img, self.config)[0].contiguous(),
            "mask": torch.from_numpy(mask.astype(np.int64)),
            "heatmap": torch.from_numpy(heat)[None],
            "heat_valid": torch.from_numpy(heat_valid.astype(np.float32))[None],
            "points": torch.from_numpy(padded),
            "n_points": torch.tensor(n, dtype=torch.int64),
        }


def _spec_of(s: AnnotatedSlide | SlideSpec) -> SlideSpec:
    return s.spec if isinstance(s, AnnotatedSlide) else s


def split_by_slide(specs: Sequence[Any], val_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, val) by slide file: all entries of one slide go to the same side. Annotated slides and
    negatives are split separately (each about `val_fraction` to val); when there are two or more annotated
    slides, at least one goes to each side. Order is kept."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(specs):
        key = os.path.realpath(_spec_of(s).slide)
        groups.setdefault(key, []).append(i)
    keys = list(groups)
    negative = {k: all(_spec_of(specs[i]).negative for i in groups[k]) for k in keys}
    rng = np.random.default_rng(seed)
    val_keys: set[str] = set()
    frac = min(max(float(val_fraction), 0.0), 1.0)
    for is_neg in (False, True):
        pool = [k for k in keys if negative[k] == is_neg]
        n = len(pool)
        n_val = int(round(frac * n))
        if not is_neg and frac > 0 and n >= 2:
            n_val = max(n_val, 1)
        n_val = min(n_val, max(n - 1, 0))
        val_keys.update(pool[j] for j in rng.permutation(n)[:n_val])
    if frac > 0 and not val_keys:
        log.warning("validation split is empty: %d slide(s) are too few for val_fraction %.2f", len(keys), frac)
    val_idx = {i for k in val_keys for i in groups[k]}
    train = [s for i, s in enumerate(specs) if i not in val_idx]
    val = [s for i, s in enumerate(specs) if i in val_idx]
    return train, val


def describe(specs: Sequence[AnnotatedSlide | SlideSpec], config: ModelConfig = ModelConfig()) -> dict[str, Any]:
    """A summary of training data for the weights metadata: slides, negatives, labelled area (mm²), and the
    nerves, tumour regions and immune cells inside it."""
    out: dict[str, Any] = {"slides": 0, "negatives": 0, "labelled_area_mm2": 0.0, "nerves": 0, "tumor_regions": 0,
                           "immune_cells": 0, "analysis_mpp": config.analysis_mpp, "files": []}
    for spec in specs:
        a = spec if isinstance(spec, AnnotatedSlide) else AnnotatedSlide(spec, config)
        out["slides"] += 1
        out["negatives"] += int(a.spec.negative)
        out["labelled_area_mm2"] += a.labelled_area_mm2
        out["nerves"] += a.annotation_counts["nerve"]
        out["tumor_regions"] += a.annotation_counts["tumor"]
        out["immune_cells"] += a.count("immune")
        out["files"].append(Path(a.spec.slide).name)
        if a is not spec:
            a.close()
    out["labelled_area_mm2"] = round(out["labelled_area_mm2"], 4)
    return out
