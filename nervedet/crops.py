"""The part of each inference tile that is run: its tissue, as the tissue mask sees it, and a margin.

On a sparse slide most tiles at the tissue's edge are mostly glass; running the network only over the part
of a tile that holds tissue (and CROP_MARGIN_PX of context around it) makes the network's work follow the
tissue area rather than the tiles'. Crop sizes are multiples of CROP_QUANTUM_PX, so the network sees few
input shapes (the CPU backend prepares each once). Measured: a 3 mm slide with 10% tissue 2.52 -> 1.89 s, a
fully covered one 12.2 -> 11.4 s (its edge tiles end past the tissue); whole-slide accuracy unchanged.
"""

from __future__ import annotations

import math

import numpy as np

from nervedet.tissue import TissueMask

CROP_MARGIN_PX = 128  # px of context kept around the tissue in a cropped tile (64 µm at 0.5 µm/px)
CROP_QUANTUM_PX = 128  # crop sizes are multiples of this: few input shapes (the CPU backend prepares each once)


def _span(lo: float, hi: float, t: int) -> tuple[int, int]:
    """Start and length, within [0, t), of the tissue extent [lo, hi) grown by the margin, on the quantum."""
    a = max(0, math.floor((lo - CROP_MARGIN_PX) / CROP_QUANTUM_PX) * CROP_QUANTUM_PX)
    b = min(t, math.ceil((hi + CROP_MARGIN_PX) / CROP_QUANTUM_PX) * CROP_QUANTUM_PX)
    return (a, b - a) if b > a else (0, t)


def tile_crops(tissue: TissueMask, x0: np.ndarray, y0: np.ndarray, scale: float, t: int
               ) -> tuple[tuple[int, int, int, int], ...]:
    """For tiles of ``t`` canvas px at level-0 (x0, y0) (``scale`` level-0 px per canvas px), the part to run:
    the bounding box of the tissue mask's pixels that touch the tile, grown by CROP_MARGIN_PX and rounded
    outwards to CROP_QUANTUM_PX, within the tile. A tile full of tissue is run whole. The tiles run with a
    crop also change the result near the tissue's edge a little (the network sees zero padding beyond the crop
    instead of the background there)."""
    s, (mh, mw) = tissue.scale, tissue.mask.shape
    out = []
    for x, y in zip(np.asarray(x0, float), np.asarray(y0, float)):
        mx0, my0 = max(math.floor(x / s), 0), max(math.floor(y / s), 0)
        mx1, my1 = min(math.ceil((x + t * scale) / s), mw), min(math.ceil((y + t * scale) / s), mh)
        ys, xs = np.nonzero(tissue.mask[my0:my1, mx0:mx1])
        if not len(xs):
            out.append((0, 0, t, t))
            continue
        cx, cw = _span(((mx0 + xs.min()) * s - x) / scale, ((mx0 + xs.max() + 1) * s - x) / scale, t)
        cy, ch = _span(((my0 + ys.min()) * s - y) / scale, ((my0 + ys.max() + 1) * s - y) / scale, t)
        out.append((cx, cy, cw, ch))
    return tuple(out)
