"""Nuclei of synthetic tissue: where they are (seeded per block, so every tile agrees) and how they are drawn."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from nervedet.synth import tissue_classes as C

BLOCK_UM = 64.0
GRID_UM = 8.0  # candidate spacing of the jittered grid inside a block

# Kinds of nucleus
SPINDLE, WAVY_SPINDLE, TUMOR, SCHWANN_WAVY, SCHWANN_OVAL, FLAT, CIGAR, IMMUNE, RBC = range(9)

# Chance that a candidate position in a tissue class holds a nucleus, and which kind
ACCEPT = {C.STROMA: 0.07, C.WAVY: 0.16, C.TUMOR: 0.7, C.NERVE: 0.11, C.EPI: 0.05, C.MUSCLE: 0.2,
          C.VWALL: 0.15, C.FAT: 0.004, C.LUMEN: 0.55}
KIND = {C.STROMA: SPINDLE, C.WAVY: WAVY_SPINDLE, C.TUMOR: TUMOR, C.NERVE: SCHWANN_WAVY, C.EPI: SPINDLE,
        C.MUSCLE: CIGAR, C.VWALL: FLAT, C.FAT: FLAT, C.LUMEN: RBC}


@dataclass
class Nuclei:
    x: np.ndarray  # µm
    y: np.ndarray
    kind: np.ndarray
    a: np.ndarray  # semi-major axis µm
    b: np.ndarray  # semi-minor axis µm
    angle: np.ndarray  # radians
    dark: np.ndarray  # haematoxylin optical density (eosin for red cells)

    @classmethod
    def empty(cls) -> Nuclei:
        z = np.zeros(0)
        return cls(z, z, z.astype(int), z, z, z, z)

    @classmethod
    def concat(cls, parts: list[Nuclei]) -> Nuclei:
        parts = [p for p in parts if len(p.x)]
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                     ("x", "y", "kind", "a", "b", "angle", "dark")))


def candidates(seed: int, bx: int, by: int) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """The jittered candidate grid of one block, and the block's own random generator."""
    rng = np.random.default_rng([seed, 101, bx + 100000, by + 100000])
    n = int(BLOCK_UM / GRID_UM)
    gx, gy = np.meshgrid(np.arange(n), np.arange(n))
    x = bx * BLOCK_UM + (gx.ravel() + 0.5 + rng.uniform(-0.4, 0.4, n * n)) * GRID_UM
    y = by * BLOCK_UM + (gy.ravel() + 0.5 + rng.uniform(-0.4, 0.4, n * n)) * GRID_UM
    return x, y, rng


SHAPES = {  # kind: (semi-major µm range, semi-minor µm range, darkness range)
    SPINDLE: ((5.0, 8.0), (1.0, 1.5), (1.9, 2.5)),
    WAVY_SPINDLE: ((5.5, 8.5), (1.0, 1.4), (1.9, 2.5)),
    TUMOR: ((3.6, 5.2), (2.9, 4.3), (1.8, 2.4)),
    SCHWANN_WAVY: ((5.0, 7.5), (1.0, 1.4), (1.5, 2.0)),
    SCHWANN_OVAL: ((2.2, 3.2), (1.5, 2.2), (1.5, 2.0)),
    FLAT: ((4.0, 6.0), (0.8, 1.1), (1.7, 2.2)),
    CIGAR: ((4.5, 6.5), (1.1, 1.5), (1.6, 2.1)),
    IMMUNE: ((2.8, 3.5), (2.6, 3.3), (2.6, 3.2)),
    RBC: ((3.3, 3.8), (3.1, 3.6), (1.1, 1.4)),
}


def shape(kind: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Semi-axes (µm) and darkness for nuclei of the given kinds, from three uniforms per nucleus (N×3).

    Taking the uniforms as input keeps every draw independent of which other nuclei a tile sees.
    """
    lo = np.array([[SHAPES[k][j][0] for j in range(3)] for k in kind]).reshape(-1, 3)
    hi = np.array([[SHAPES[k][j][1] for j in range(3)] for k in kind]).reshape(-1, 3)
    v = lo + (hi - lo) * u
    return v[:, 0], np.minimum(v[:, 0], v[:, 1]), v[:, 2]


def draw(nuc: Nuclei, h_layer: np.ndarray, e_layer: np.ndarray, mask: np.ndarray,
         ox: float, oy: float, mpp: float) -> None:
    """Draw nuclei into the haematoxylin layer (red cells into the eosin layer); ``mask`` marks nuclear pixels.

    (ox, oy) is the µm position of pixel (0, 0)'s corner; layers are float32 optical densities. Each
    nucleus is drawn anti-aliased into a small patch around it and blended in.
    """
    shift = 4
    one = 1 << shift
    H, W = h_layer.shape
    for i in range(len(nuc.x)):
        k = int(nuc.kind[i])
        a, b, ang = float(nuc.a[i]), float(nuc.b[i]), float(nuc.angle[i])
        px, py = (nuc.x[i] - ox) / mpp - 0.5, (nuc.y[i] - oy) / mpp - 0.5  # pixel-centre coordinates
        rad = int(math.ceil((a + 2 * b) / mpp)) + 2
        x0, y0 = int(math.floor(px)) - rad, int(math.floor(py)) - rad
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + 2 * rad + 1, W), min(y0 + 2 * rad + 1, H)
        if xa >= xb or ya >= yb:
            continue
        patch = np.zeros((2 * rad + 1, 2 * rad + 1), np.uint8)
        cx, cy = (px - x0) * one, (py - y0) * one
        if k in (WAVY_SPINDLE, SCHWANN_WAVY):
            t = np.linspace(-1, 1, 9)
            u, v = t * a, b * 0.6 * np.sin(t * math.pi * 0.6 + nuc.x[i] * 7.0)
            c, s = math.cos(ang), math.sin(ang)
            pts = np.c_[cx + (u * c - v * s) / mpp * one, cy + (u * s + v * c) / mpp * one].astype(np.int32)
            cv2.polylines(patch, [pts], False, 255, max(1, int(round(2 * b / mpp))), cv2.LINE_AA, shift)
        else:
            axes = (max(1, int(a / mpp * one)), max(1, int(b / mpp * one)))
            cv2.ellipse(patch, (int(cx), int(cy)), axes, math.degrees(ang), 0, 360, 255, -1, cv2.LINE_AA, shift)
        alpha = patch[ya - y0:yb - y0, xa - x0:xb - x0].astype(np.float32) / 255.0
        if k == RBC:
            e = e_layer[ya:yb, xa:xb]
            e[...] = e * (1 - alpha) + nuc.dark[i] * alpha
            continue
        dark = np.float32(nuc.dark[i])
        if k == TUMOR:  # vesicular: darker rim, paler centre, a nucleolus
            yy, xx = np.mgrid[ya - y0:yb - y0, xa - x0:xb - x0]
            r = np.hypot(xx - cx / one, yy - cy / one) * mpp / a
            prof = 0.85 + 0.35 * np.clip(r, 0, 1) ** 3
            prof += 0.7 * (np.hypot(xx - cx / one - 0.25 * a / mpp, yy - cy / one) * mpp < 0.8)
            dark = (dark * prof).astype(np.float32)
        h = h_layer[ya:yb, xa:xb]
        h[...] = h * (1 - alpha) + dark * alpha
        m = mask[ya:yb, xa:xb]
        np.maximum(m, alpha, out=m)
