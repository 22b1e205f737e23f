"""Tissue mask from a slide thumbnail, and the tile grid over the tissue.

The mask is thresholded optical density relative to the glass (the brightest part of the slide), so a pale
or slightly tinted background with noise and JPEG artefacts stays background; holes such as fat inside the
tissue are filled up to a size, and specks are removed. Mask pixel (i, j) covers level-0 pixels
[j * scale, (j + 1) * scale) × [i * scale, (i + 1) * scale), scale = mask mpp / slide mpp.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import cv2
import numpy as np
from scipy import ndimage
from shapely.geometry import Polygon
from shapely.validation import make_valid

from .slide import Slide, TileSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TissueSettings:
    min_od: float = 0.05  # the threshold never goes below this optical density (glass noise stays glass)
    max_od: float = 0.10  # nor above this one (pale stroma stays tissue when dark tissue pulls Otsu up)
    median_px: int = 3  # median filter (mask pixels) against noise and JPEG artefacts; keeps borders in place
    open_um: float = 8.0  # opening radius (removes thin specks and lines)
    close_um: float = 8.0  # closing radius (bridges small gaps)
    max_hole_mm2: float = 1.0  # holes (fat, lumens) up to this area count as tissue
    min_piece_mm2: float = 0.01  # pieces smaller than this are dropped


@dataclass(frozen=True, eq=False)
class TissueMask:
    """A boolean tissue mask at `mpp` µm/px over a slide whose level-0 pixels are `slide_mpp` µm."""

    mask: np.ndarray
    mpp: float
    slide_mpp: float

    @property
    def scale(self) -> float:
        """Level-0 pixels per mask pixel."""
        return self.mpp / self.slide_mpp

    @property
    def area_mm2(self) -> float:
        return float(self.mask.sum()) * (self.mpp / 1000.0) ** 2

    @cached_property
    def _integral(self) -> np.ndarray:
        h, w = self.mask.shape
        sat = np.zeros((h + 2, w + 2), np.float64)  # one extra row/column so corner lookups stay in range
        sat[1 : h + 1, 1 : w + 1] = self.mask.cumsum(0, dtype=np.float64).cumsum(1)
        sat[h + 1, :] = sat[h, :]
        sat[:, w + 1] = sat[:, w]
        return sat

    def _area_below(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Tissue pixels in [0, x) × [0, y), mask px: the summed-area table is exactly bilinear per cell."""
        h, w = self.mask.shape
        x, y = np.clip(x, 0, w), np.clip(y, 0, h)
        ix, iy = np.floor(x).astype(np.intp), np.floor(y).astype(np.intp)
        fx, fy = x - ix, y - iy
        s = self._integral
        return (
            s[iy, ix] * (1 - fx) * (1 - fy)
            + s[iy, ix + 1] * fx * (1 - fy)
            + s[iy + 1, ix] * (1 - fx) * fy
            + s[iy + 1, ix + 1] * fx * fy
        )

    def fractions(self, x0: np.ndarray, y0: np.ndarray, w0: np.ndarray, h0: np.ndarray) -> np.ndarray:
        """Tissue fraction of level-0 rectangles (vectorised; area outside the mask counts as no tissue)."""
        s = self.scale
        xa, ya = np.asarray(x0, np.float64) / s, np.asarray(y0, np.float64) / s
        xb, yb = xa + np.asarray(w0, np.float64) / s, ya + np.asarray(h0, np.float64) / s
        inside = (
            self._area_below(xb, yb)
            - self._area_below(xa, yb)
            - self._area_below(xb, ya)
            + self._area_below(xa, ya)
        )
        area = np.maximum((xb - xa) * (yb - ya), 1e-12)
        return np.clip(inside / area, 0.0, 1.0)

    def fraction(self, x0: float, y0: float, w0: float, h0: float) -> float:
        """Tissue fraction of one level-0 rectangle."""
        return float(self.fractions(np.array([x0]), np.array([y0]), np.array([w0]), np.array([h0]))[0])

    @cached_property
    def contours(self) -> tuple[list[np.ndarray], np.ndarray | None]:
        """OpenCV contours (RETR_CCOMP: outer borders and holes) in level-0 px, through pixel centres."""
        found, hierarchy = cv2.findContours(
            self.mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
        )
        return [(c[:, 0, :].astype(np.float64) + 0.5) * self.scale for c in found], hierarchy

    def to_polygons(self) -> list[Polygon]:
        """Tissue pieces as shapely polygons with holes, level-0 px (borders within half a mask pixel)."""
        contours, hierarchy = self.contours
        if hierarchy is None:
            return []
        polygons = []
        for i, (_, _, _, parent) in enumerate(hierarchy[0]):
            if parent != -1 or len(contours[i]) < 3:
                continue
            holes = [contours[j] for j, h in enumerate(hierarchy[0]) if h[3] == i and len(contours[j]) >= 3]
            poly = make_valid(Polygon(contours[i], holes))
            polygons.extend(
                g for g in getattr(poly, "geoms", [poly]) if isinstance(g, Polygon) and g.area > 0
            )
        return polygons


def split_regions(tissue: TissueMask, gap_um: float) -> list[TissueMask]:
    """The tissue as separate regions, each a TissueMask of the same shape holding only its own pixels.

    Pieces nearer to each other than ``gap_um`` belong to one region, and regions whose bounding boxes touch
    or overlap are merged, so the regions' bounding boxes are disjoint: every tissue pixel inside a region's
    box is that region's. Ordered by the top, then the left, of their boxes. No tissue: no regions."""
    mask = tissue.mask
    if not mask.any():
        return []
    r = max(1, math.ceil(gap_um / 2 / tissue.mpp))
    near = cv2.dilate(mask.astype(np.uint8), _disk(r))
    _, labels = cv2.connectedComponents(near, connectivity=8)
    boxes = [(s[1].start, s[0].start, s[1].stop, s[0].stop)  # x0, y0, x1, y1 of the tissue of each group
             for s in ndimage.find_objects(np.where(mask, labels, 0)) if s is not None]
    merged = True
    while merged:  # merge boxes that touch until none do (few regions: quadratic is fine)
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]:
                    boxes[i] = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    regions = []
    for x0, y0, x1, y1 in sorted(boxes, key=lambda b: (b[1], b[0])):
        part = np.zeros_like(mask)
        part[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
        regions.append(TissueMask(mask=part, mpp=tissue.mpp, slide_mpp=tissue.slide_mpp))
    return regions


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins, range=(0.0, float(values.max()) + 1e-9))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist, dtype=np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    between = (m0 * w0[-1] - w0 * m0[-1]) ** 2 / np.maximum(w0 * w1, 1)
    return float(edges[int(np.argmax(between[:-1])) + 1])


def _glass_colour(img: np.ndarray) -> np.ndarray:
    """The glass colour: the commonest brightness among the brighter half of the pixels (glass is uniform,
    tissue is not, and fat may be brighter than glass), median per channel; white if that is no glass."""
    bright = img.mean(axis=2)
    upper = bright[bright >= np.median(bright)]
    hist = np.convolve(np.bincount(np.clip(upper, 0, 255).astype(np.intp), minlength=256), np.ones(5), "same")
    mode = float(np.argmax(hist))
    colour = np.median(img[np.abs(bright - mode) <= 4.0], axis=0)
    if colour.min() < 180:  # no glass in view: compare with white
        log.debug("tissue: no glass found (brightest common colour %s); using white", np.round(colour))
        return np.full(3, 255.0, np.float32)
    return colour


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def tissue_from_rgb(rgb: np.ndarray, mpp: float, settings: TissueSettings = TissueSettings()) -> np.ndarray:
    """Boolean tissue mask of an RGB image whose pixels are `mpp` µm."""
    if settings.median_px > 1:
        rgb = cv2.medianBlur(np.ascontiguousarray(rgb), settings.median_px | 1)
    img = rgb.astype(np.float32)
    background = _glass_colour(img)
    od = np.log(background / np.maximum(img, 1.0)).max(axis=2)
    od = np.maximum(od, 0.0)
    threshold = float(np.clip(_otsu(np.minimum(od, 2.0)), settings.min_od, settings.max_od))
    mask = od > threshold
    log.debug("tissue: glass %s, OD threshold %.3f", np.round(background, 1), threshold)
    for op, um in ((cv2.MORPH_OPEN, settings.open_um), (cv2.MORPH_CLOSE, settings.close_um)):
        r = round(um / mpp)
        if r > 0:
            mask = cv2.morphologyEx(mask.astype(np.uint8), op, _disk(r), borderType=cv2.BORDER_REPLICATE) > 0
    px_mm2 = (mpp / 1000.0) ** 2
    holes, n = ndimage.label(~mask)
    if n:
        sizes = np.bincount(holes.ravel())
        edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
        fill = sizes * px_mm2 <= settings.max_hole_mm2
        fill[edge] = False
        fill[0] = False
        mask |= fill[holes]
    pieces, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n:
        keep = np.bincount(pieces.ravel()) * px_mm2 >= settings.min_piece_mm2
        keep[0] = False
        mask = keep[pieces]
    return mask


def detect_tissue(
    slide: Slide, mask_mpp: float = 8.0, settings: TissueSettings = TissueSettings()
) -> TissueMask:
    """Tissue mask of a slide, computed on a thumbnail at `mask_mpp` µm/px."""
    thumb, thumb_mpp = slide.thumbnail(mpp=mask_mpp)
    mask = tissue_from_rgb(thumb, thumb_mpp, settings)
    result = TissueMask(mask=mask, mpp=thumb_mpp, slide_mpp=slide.mpp)
    log.info("%s: tissue %.3f mm² (mask %dx%d at %.3g µm/px)", slide.path, result.area_mm2, *mask.shape[::-1],
             thumb_mpp)
    return result


class _GridSlide(Protocol):
    mpp: float
    bounds: tuple[int, int, int, int]


def tile_grid(
    slide: _GridSlide,
    mpp: float,
    tile_size: int,
    overlap: int = 0,
    tissue: TissueMask | None = None,
    min_tissue_fraction: float = 0.05,
) -> list[TileSpec]:
    """A regular grid of `tile_size`-px tiles at `mpp` over the slide's bounds, stride tile_size - overlap.

    Each tile's level-0 origin is computed from its index (no drift). With `tissue`, only tiles whose tissue
    fraction is at least `min_tissue_fraction` are kept. Row-major order.
    """
    stride = tile_size - overlap
    if tile_size <= 0 or stride <= 0 or mpp <= 0:
        raise ValueError(
            f"tile_grid needs tile_size > overlap >= 0 and mpp > 0 (got {tile_size}, {overlap}, {mpp})"
        )
    scale = mpp / slide.mpp  # level-0 px per output px
    bx, by, bw, bh = slide.bounds
    step = stride * scale
    nx, ny = max(1, math.ceil(bw / step - 1e-9)), max(1, math.ceil(bh / step - 1e-9))
    xs = bx + np.floor(np.arange(nx) * step + 0.5).astype(np.int64)
    ys = by + np.floor(np.arange(ny) * step + 0.5).astype(np.int64)
    size0 = math.floor(tile_size * scale + 0.5)
    gx, gy = np.meshgrid(xs, ys)  # row-major: y outer, x inner
    gx, gy = gx.ravel(), gy.ravel()
    if tissue is not None:
        keep = tissue.fractions(
            gx, gy, np.full(gx.shape, tile_size * scale), np.full(gy.shape, tile_size * scale)
        )
        sel = keep >= min_tissue_fraction
        gx, gy = gx[sel], gy[sel]
    return [TileSpec(int(x), int(y), size0, size0, tile_size, tile_size, float(mpp)) for x, y in zip(gx, gy)]
