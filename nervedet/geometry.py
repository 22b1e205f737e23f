"""Shape helpers shared by inference and the synthetic truth: mask to polygons, Feret diameters, transforms."""

from __future__ import annotations

import cv2
import numpy as np
import shapely
from shapely.affinity import affine_transform
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry
from shapely.validation import make_valid


def min_feret(g: BaseGeometry) -> float:
    """Minimum caliper width (the minimum rotated rectangle's short side)."""
    r = shapely.minimum_rotated_rectangle(g)
    if not isinstance(r, Polygon):  # a degenerate shape (line or point) has no width
        return 0.0
    xy = np.asarray(r.exterior.coords)[:4]
    sides = np.hypot(*(np.roll(xy, -1, 0) - xy).T)
    return float(sides.min())


def max_feret(g: BaseGeometry) -> float:
    """Maximum caliper diameter (largest distance between convex-hull vertices)."""
    hull = g.convex_hull
    xy = np.asarray(hull.exterior.coords if isinstance(hull, Polygon) else hull.coords)
    d = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
    return float(d.max())


def _polygons(g: BaseGeometry) -> list[Polygon]:
    return [p for p in getattr(g, "geoms", [g]) if isinstance(p, Polygon) and p.area > 0]


def mask_to_polygons(mask: np.ndarray, min_area_px: float = 0.0, min_hole_px: float = 0.0) -> list[Polygon]:
    """Connected regions (8-connected) of a boolean mask as polygons with holes, in pixel-edge coordinates.

    Outer contours run through boundary pixel centres and are grown by half a pixel (mitred), so a region's
    polygon covers its pixels. Holes are the background components (4-connected) enclosed by a region,
    traced the same way from their own pixels, in a crop around that region only (memory stays small on a
    whole-slide mask). Regions under ``min_area_px`` are dropped; holes under ``min_hole_px`` are filled.
    """
    m = mask.astype(np.uint8)
    found, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    out: list[Polygon] = []
    for contour, (_, _, child, parent) in zip(found, hierarchy[0]):
        if parent != -1:
            continue
        p = _grown(contour[:, 0, :].astype(np.float64) + 0.5)
        if p is None or p.area < min_area_px:
            continue
        holes = _holes(m, contour, min_hole_px) if child != -1 else []
        if holes:
            p = p.difference(shapely.union_all(holes))
        out.extend(q for q in _polygons(make_valid(p)) if q.area >= min_area_px)
    return out


def _holes(m: np.ndarray, contour: np.ndarray, min_hole_px: float) -> list[Polygon]:
    """Polygons of the background components inside one region's outer contour."""
    x, y, w, h = cv2.boundingRect(contour)
    inside = np.zeros((h, w), np.uint8)
    cv2.drawContours(inside, [contour], -1, 1, thickness=cv2.FILLED, offset=(-x, -y))
    background = inside & (m[y:y + h, x:x + w] == 0)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(background, connectivity=4)
    holes = []
    for k in range(1, n):
        if stats[k, cv2.CC_STAT_AREA] < max(min_hole_px, 1):
            continue
        bx, by, bw, bh = (int(v) for v in stats[k, :4])
        crop = (labels[by:by + bh, bx:bx + bw] == k).astype(np.uint8)
        rings, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        for c in rings:
            g = _grown(c[:, 0, :].astype(np.float64) + 0.5 + (x + bx, y + by))
            if g is not None:
                holes.append(g)
    return holes


def _grown(ring: np.ndarray) -> Polygon | None:
    """The polygon of one contour through pixel centres, grown by half a pixel to the pixels' edges."""
    if len(ring) >= 3:
        base: BaseGeometry = make_valid(Polygon(ring))
    elif len(ring):  # one or two pixels: a point or a line
        base = shapely.LineString(ring) if len(ring) == 2 else shapely.Point(ring[0])
    else:
        return None
    parts = _polygons(base.buffer(0.5, join_style="mitre", cap_style="square"))
    return max(parts, key=lambda p: p.area) if parts else None


def to_level0(g: BaseGeometry, origin: tuple[float, float], scale: float) -> BaseGeometry:
    """Canvas pixels to level-0 pixels: x0 = origin_x + x * scale (likewise y)."""
    return affine_transform(g, [scale, 0.0, 0.0, scale, origin[0], origin[1]])


def from_level0(g: BaseGeometry, origin: tuple[float, float], scale: float) -> BaseGeometry:
    """Level-0 pixels to canvas pixels (the inverse of :func:`to_level0`)."""
    return affine_transform(g, [1 / scale, 0.0, 0.0, 1 / scale, -origin[0] / scale, -origin[1] / scale])
