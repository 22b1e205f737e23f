"""Matching and pixel-overlap helpers for evaluation: polygons by IoU, points by distance, chunked Dice.

Everything works in level-0 pixel coordinates; :func:`raster_overlap` rescales to the analysis grid itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching
from scipy.spatial import cKDTree
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

__all__ = [
    "MatchCounts", "OverlapCounts", "match_by_iou", "match_points", "polygon_parts", "raster_overlap", "rasterize",
]


@dataclass
class MatchCounts:
    """Detection counts. Empty denominators: precision is 1.0 when nothing was predicted and nothing
    missed (else 0.0), recall likewise, F1 = 2tp / (2tp + fp + fn) is 1.0 when there was nothing at all."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __add__(self, other: MatchCounts) -> MatchCounts:
        return MatchCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def precision(self) -> float:
        if self.tp + self.fp == 0:
            return 1.0 if self.fn == 0 else 0.0
        return self.tp / (self.tp + self.fp)

    @property
    def recall(self) -> float:
        if self.tp + self.fn == 0:
            return 1.0 if self.fp == 0 else 0.0
        return self.tp / (self.tp + self.fn)

    @property
    def f1(self) -> float:
        denominator = 2 * self.tp + self.fp + self.fn
        return 1.0 if denominator == 0 else 2 * self.tp / denominator


@dataclass
class OverlapCounts:
    """Pixel counts for Dice: |P ∩ T|, |P|, |T|."""

    intersection: int = 0
    pred: int = 0
    truth: int = 0

    def __add__(self, other: OverlapCounts) -> OverlapCounts:
        return OverlapCounts(self.intersection + other.intersection, self.pred + other.pred,
                             self.truth + other.truth)

    @property
    def dice(self) -> float:
        total = self.pred + self.truth
        return 1.0 if total == 0 else 2 * self.intersection / total


def match_by_iou(
    pred: Sequence[BaseGeometry], truth: Sequence[BaseGeometry], min_iou: float = 0.5
) -> list[tuple[int, int, float]]:
    """One-to-one matches ``(pred index, truth index, IoU)`` with IoU >= ``min_iou``.

    Candidates come from an STRtree; pairs are taken greedily by IoU, highest first (ties by index)."""
    if not len(pred) or not len(truth):
        return []
    p_arr = np.asarray(pred, dtype=object)
    t_arr = np.asarray(truth, dtype=object)
    pi, ti = _intersecting_pairs(p_arr, t_arr)
    if not len(pi):
        return []
    inter = shapely.area(shapely.intersection(p_arr[pi], t_arr[ti]))
    union = shapely.area(p_arr[pi]) + shapely.area(t_arr[ti]) - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    keep = iou >= min_iou
    pi, ti, iou = pi[keep], ti[keep], iou[keep]
    order = np.lexsort((ti, pi, -iou))
    used_p: set[int] = set()
    used_t: set[int] = set()
    matches: list[tuple[int, int, float]] = []
    for k in order:
        p, t = int(pi[k]), int(ti[k])
        if p in used_p or t in used_t:
            continue
        used_p.add(p)
        used_t.add(t)
        matches.append((p, t, float(iou[k])))
    return matches


def _intersecting_pairs(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (pred, truth) whose geometries intersect."""
    pairs = shapely.STRtree(truth).query(pred, predicate="intersects")
    return pairs[0].astype(np.intp), pairs[1].astype(np.intp)


def match_points(pred: np.ndarray, truth: np.ndarray, radius: float) -> int:
    """Size of a maximum one-to-one matching of points within ``radius`` (inclusive) of each other."""
    pred = np.asarray(pred, dtype=float).reshape(-1, 2)
    truth = np.asarray(truth, dtype=float).reshape(-1, 2)
    if not len(pred) or not len(truth):
        return 0
    pairs = cKDTree(pred).sparse_distance_matrix(cKDTree(truth), radius, output_type="ndarray")
    if not len(pairs):
        return 0
    graph = csr_matrix(
        (np.ones(len(pairs), dtype=np.int8), (pairs["i"], pairs["j"])), shape=(len(pred), len(truth))
    )
    matched = maximum_bipartite_matching(graph, perm_type="column")
    return int(np.count_nonzero(matched >= 0))


# ---------------------------------------------------------------- rasterisation


def polygon_parts(geoms: Sequence[BaseGeometry | None]) -> np.ndarray:
    """The non-empty Polygon parts of (multi)polygonal geometries, as an object array."""
    arr = np.asarray([g for g in geoms if g is not None and not g.is_empty], dtype=object)
    if not len(arr):
        return arr
    parts = shapely.get_parts(shapely.get_parts(arr))
    return np.asarray([p for p in parts if isinstance(p, Polygon) and not p.is_empty], dtype=object)


def rasterize(parts: np.ndarray, scale: float, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    """Boolean mask of the union of polygons on a pixel grid (exact, no boundary dilation).

    Coordinates are multiplied by ``scale``; mask pixel ``[r, c]`` is grid pixel ``(x0 + c, y0 + r)`` and is
    set iff its centre lies inside a polygon (non-zero winding over consistently oriented rings, so holes
    stay empty and overlapping polygons form their union). cv2.fillPoly was not used: it includes the
    boundary pixels on both sides (a 10x10 px square fills 11x11), which biases Dice upwards."""
    mask = np.zeros((height, width), dtype=bool)
    if not len(parts):
        return mask
    rings, poly_index = shapely.get_rings(parts, return_index=True)
    coords, ring_index = shapely.get_coordinates(rings, return_index=True)
    coords = coords * scale - np.array([x0, y0], dtype=float)
    # Orientation: exterior rings count +1, holes -1, whatever the file's ring order.
    first = np.r_[True, poly_index[1:] != poly_index[:-1]]
    a, b = coords[:-1], coords[1:]
    same = ring_index[:-1] == ring_index[1:]
    a, b, edge_ring = a[same], b[same], ring_index[:-1][same]
    twice_area = np.bincount(edge_ring, weights=a[:, 0] * b[:, 1] - b[:, 0] * a[:, 1], minlength=len(rings))
    ring_sign = np.where(first, 1.0, -1.0) * np.sign(twice_area)  # +1: edges keep their direction
    # Rows whose centre y = r + 0.5 satisfies ymin <= y < ymax (half-open: vertices are counted once).
    ylo, yhi = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
    r0 = np.clip(np.ceil(ylo - 0.5), 0, height).astype(np.int64)
    r1 = np.clip(np.ceil(yhi - 0.5), 0, height).astype(np.int64)
    n = r1 - r0
    keep = n > 0
    if not keep.any():
        return mask
    a, b, n, r0 = a[keep], b[keep], n[keep], r0[keep]
    wind = (np.where(b[:, 1] > a[:, 1], 1, -1) * ring_sign[edge_ring[keep]]).astype(np.int64)
    edge = np.repeat(np.arange(len(n)), n)
    row = r0[edge] + (np.arange(len(edge)) - np.repeat(np.cumsum(n) - n, n))
    yc = row + 0.5
    ea, eb = a[edge], b[edge]
    x = ea[:, 0] + (yc - ea[:, 1]) * (eb[:, 0] - ea[:, 0]) / (eb[:, 1] - ea[:, 1])
    order = np.lexsort((x, row))
    row, x, w = row[order], x[order], wind[edge][order]
    inside = np.cumsum(w) != 0  # each row's windings sum to 0, so the running sum restarts per row
    span = np.nonzero(inside[:-1] & (row[:-1] == row[1:]))[0]
    if not len(span):
        return mask
    start = np.clip(np.ceil(x[span] - 0.5), 0, width).astype(np.int64)
    stop = np.clip(np.ceil(x[span + 1] - 0.5), 0, width).astype(np.int64)
    # Spans in a row are disjoint, so the running sum is 0 or 1 and int8 (fast) cannot overflow.
    diff = np.zeros((height, width + 1), dtype=np.int8)
    np.add.at(diff, (row[span], start), 1)
    np.add.at(diff, (row[span], stop), -1)
    return np.cumsum(diff[:, :width], axis=1, dtype=np.int8) > 0


def _chunks(x0: int, y0: int, x1: int, y1: int, size: int) -> Iterator[tuple[int, int, int, int]]:
    for cy in range(y0, y1, size):
        for cx in range(x0, x1, size):
            yield cx, cy, min(size, x1 - cx), min(size, y1 - cy)


def raster_overlap(
    pred: np.ndarray,
    truth: np.ndarray,
    area: np.ndarray | None,
    scale: float,
    chunk: int = 2048,
) -> OverlapCounts:
    """Pixel counts ``|pred ∩ truth|, |pred|, |truth|`` inside ``area`` (None: everywhere).

    Arguments are Polygon arrays (:func:`polygon_parts`) in level-0 px; the grid has pixels of
    ``1/scale`` level-0 px. Only the bounding box of (pred ∪ truth) ∩ area is visited, in tiles of
    ``chunk`` x ``chunk`` pixels, so memory stays bounded on whole slides."""
    both = np.concatenate([pred, truth])
    if not len(both) or (area is not None and not len(area)):
        return OverlapCounts()
    minx, miny, maxx, maxy = shapely.total_bounds(both) * scale
    if area is not None:
        aminx, aminy, amaxx, amaxy = shapely.total_bounds(area) * scale
        minx, miny, maxx, maxy = max(minx, aminx), max(miny, aminy), min(maxx, amaxx), min(maxy, amaxy)
    x0, y0, x1, y1 = math.floor(minx), math.floor(miny), math.ceil(maxx), math.ceil(maxy)
    if x1 <= x0 or y1 <= y0:
        return OverlapCounts()
    trees = {name: shapely.STRtree(g) for name, g in (("pred", pred), ("truth", truth), ("area", area))
             if g is not None and len(g)}
    area_union = None if area is None else shapely.union_all(area)
    if area_union is not None:
        shapely.prepare(area_union)
    sets = {"pred": pred, "truth": truth, "area": area}
    inter = n_pred = n_truth = 0
    for cx, cy, w, h in _chunks(x0, y0, x1, y1, max(1, int(chunk))):
        box = shapely.box(cx / scale, cy / scale, (cx + w) / scale, (cy + h) / scale)
        found = {name: sets[name][tree.query(box, predicate="intersects")] for name, tree in trees.items()}
        if not (len(found.get("pred", ())) or len(found.get("truth", ()))):
            continue
        if area is not None and not len(found.get("area", ())):
            continue
        p = rasterize(found.get("pred", pred[:0]), scale, cx, cy, w, h)
        t = rasterize(found.get("truth", truth[:0]), scale, cx, cy, w, h)
        if area_union is not None and not area_union.contains(box):  # partly labelled chunk
            a = rasterize(found["area"], scale, cx, cy, w, h)
            p &= a
            t &= a
        inter += int(np.count_nonzero(p & t))
        n_pred += int(np.count_nonzero(p))
        n_truth += int(np.count_nonzero(t))
    return OverlapCounts(inter, n_pred, n_truth)
