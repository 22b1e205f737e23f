"""A stand-in for the trained network whose output is known exactly, so inference can be tested alone.

The fake reads colours: pure red pixels are tumour, pure green nerve, anything else background; the immune
heatmap peaks at the centre of every small black dot. It works pixel by pixel (the dot detector looks 2 px
around), so the stitched result of any tiling must equal the fake applied to the whole image at once.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from nervedet.model import ModelConfig
from nervedet.weights import Model

TISSUE = (205, 140, 185)  # pink: tissue of the background class
RED, GREEN = (230, 20, 20), (20, 230, 20)


class ColourNet(torch.nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # a device to live on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.config.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config.std, device=x.device).view(1, 3, 1, 1)
        rgb = x.float() * std + mean  # back to 0..1
        r, g, b = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
        tumor = 20 * (r - g - b - 0.4)
        nerve = 20 * (g - r - b - 0.4)
        dark = 1 - rgb.amax(1, keepdim=True)
        heat = 30 * (F.avg_pool2d(dark, 5, 1, 2, count_include_pad=False) - 0.5)
        return torch.cat([torch.zeros_like(r), tumor, nerve, heat], 1) + 0 * self.dummy


def fake_model() -> Model:
    cfg = ModelConfig()
    return Model(ColourNet(cfg).eval(), cfg, {}, Path("colour-net"), "f" * 64)


def draw_cells(img: np.ndarray, centres: list[tuple[int, int]]) -> None:
    """Black dots of radius 2 px centred on pixel centres (x + 0.5, y + 0.5)."""
    for x, y in centres:
        cv2.circle(img, (int(x), int(y)), 2, (0, 0, 0), -1)
