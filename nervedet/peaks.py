"""Immune-cell centres from the model's heatmap: local maxima above a threshold (one point per cell)."""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_THRESHOLD = 0.5


def find_peaks(prob: torch.Tensor, threshold: float = DEFAULT_THRESHOLD, radius: int = 2,
               logits: bool = False) -> list[torch.Tensor]:
    """Peaks of a probability heatmap batch (N, 1, H, W) or (N, H, W): a list of (K, 3) tensors [x, y, p] per
    image, x/y at pixel centres (+0.5). A peak is the maximum of its (2r+1)² neighbourhood and above threshold.
    With ``logits``, the heatmap holds the logits of the probabilities (the sigmoid is monotonic: the same
    maxima, found without a sigmoid over every pixel; only the peaks' own values are turned into p)."""
    if prob.dim() == 3:
        prob = prob.unsqueeze(1)
    prob = prob.float().contiguous()  # a channel of a channels-last output is strided: made dense once
    cut = float(torch.logit(torch.tensor(threshold, dtype=torch.float64))) if logits else threshold
    pooled = square_max(prob, radius)
    out = []
    for i in range(prob.shape[0]):
        # the few pixels above the threshold first, then those of them that are their square's maximum (two
        # comparisons over the whole image fewer: a 768-px tile's peaks 3.1 -> 2.4 ms)
        ys, xs = torch.nonzero(prob[i, 0] >= cut, as_tuple=True)
        p = prob[i, 0, ys, xs]
        top = p == pooled[i, 0, ys, xs]
        ys, xs, p = ys[top], xs[top], p[top]
        # plateaus (equal neighbours) would give several peaks: keep one per 3x3 block of ties
        pts = _dedupe(torch.stack([xs.float() + 0.5, ys.float() + 0.5, p], dim=1), radius)
        if logits:
            pts[:, 2] = torch.sigmoid(pts[:, 2])
        out.append(pts)
    return out


def square_max(x: torch.Tensor, radius: int) -> torch.Tensor:
    """The maximum over each pixel's (2r+1)² square of an (N, 1, H, W) float tensor (outside the image counts
    as -inf), equal to one square max-pool but much cheaper: on the CPU OpenCV's dilation (constant time per
    pixel; 25x faster than max_pool2d at r = 8), elsewhere two 1-D max-pools (rows, then columns)."""
    k = 2 * radius + 1
    if x.device.type == "cpu":
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (k, k))
        planes = x.detach().float().numpy()
        out = np.empty_like(planes)
        for i in range(planes.shape[0]):
            cv2.dilate(planes[i, 0], kernel, dst=out[i, 0], borderType=cv2.BORDER_CONSTANT, borderValue=-np.inf)
        return torch.from_numpy(out)
    rows = F.max_pool2d(x, kernel_size=(1, k), stride=1, padding=(0, radius))
    return F.max_pool2d(rows, kernel_size=(k, 1), stride=1, padding=(radius, 0))


def _dedupe(pts: torch.Tensor, radius: int) -> torch.Tensor:
    """Drop peaks within ``radius`` px of a stronger (or equal, earlier) one; strongest first. Each peak is the
    maximum of its square, so only ties (plateaus) can be that close: the loop runs over those alone."""
    if len(pts) < 2:
        return pts
    order = torch.argsort(pts[:, 2], descending=True, stable=True)
    pts = pts[order]
    d = torch.cdist(pts[:, :2], pts[:, :2])
    near = d <= radius
    near.fill_diagonal_(False)
    keep = torch.ones(len(pts), dtype=torch.bool)
    for i in torch.nonzero(near.any(1)).flatten().tolist():  # in order of strength, as before
        if keep[i]:
            close = near[i].clone()
            close[: i + 1] = False
            keep &= ~close
    return pts[keep]
