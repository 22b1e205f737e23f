"""Shape primitives for synthetic tissue, in µm: ragged blobs, rings, arcs and wavy bands."""

from __future__ import annotations

import math

import numpy as np
import shapely
from shapely.geometry import LineString, Point, Polygon
from shapely.geometry.base import BaseGeometry


def blob(
    rng: np.random.Generator,
    cx: float,
    cy: float,
    radius: float,
    *,
    aspect: float = 1.0,
    angle: float = 0.0,
    roughness: float = 0.15,
    ragged: float = 0.0,
    n: int = 96,
) -> Polygon:
    """A closed irregular outline: an ellipse with smooth radial noise and optional fine raggedness."""
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, 7):  # smooth low-frequency wobble
        r += roughness / k * rng.normal() * np.cos(k * t + rng.uniform(0, 2 * math.pi))
    if ragged > 0:  # high-frequency tearing of a cut tissue border
        r += ragged * rng.uniform(-1, 1, n) * (rng.uniform(size=n) < 0.5)
    r = np.clip(r, 0.35, None) * radius
    x = r * np.cos(t) * math.sqrt(aspect)
    y = r * np.sin(t) / math.sqrt(aspect)
    ca, sa = math.cos(angle), math.sin(angle)
    poly = Polygon(np.c_[cx + x * ca - y * sa, cy + x * sa + y * ca])
    return poly if poly.is_valid else shapely.make_valid(poly).buffer(0)


def ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 64) -> Polygon:
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return Polygon(np.c_[cx + x * ca - y * sa, cy + x * sa + y * ca])


def wavy_centerline(
    x0: float, y0: float, angle: float, length: float, amp: float, wavelength: float, phase: float
) -> LineString:
    """A sinusoidal centre line along ``angle`` starting at (x0, y0)."""
    u = np.linspace(0.0, length, max(16, int(length / 4)))
    v = amp * np.sin(2 * math.pi * u / wavelength + phase)
    ca, sa = math.cos(angle), math.sin(angle)
    return LineString(np.c_[x0 + u * ca - v * sa, y0 + u * sa + v * ca])


def wavy_band(
    x0: float, y0: float, angle: float, length: float, width: float, amp: float, wavelength: float, phase: float
) -> Polygon:
    """A wavy bundle of the given width around a sinusoidal centre line, with rounded tapered ends."""
    line = wavy_centerline(x0, y0, angle, length, amp, wavelength, phase)
    band = line.buffer(width / 2, quad_segs=8)
    return band if isinstance(band, Polygon) else max(band.geoms, key=lambda g: g.area)


def random_point_in(rng: np.random.Generator, geom: BaseGeometry, tries: int = 200) -> Point | None:
    """A uniform random point inside ``geom`` (None when it is empty or too thin)."""
    if geom.is_empty:
        return None
    minx, miny, maxx, maxy = geom.bounds
    for _ in range(tries):
        x, y = rng.uniform(minx, maxx), rng.uniform(miny, maxy)
        if shapely.contains_xy(geom, x, y):
            return Point(x, y)
    return None


def poisson_points(
    rng: np.random.Generator, geom: BaseGeometry, density_per_um2: float, min_dist: float = 0.0
) -> np.ndarray:
    """Points of the given density uniformly inside ``geom`` (N×2, µm), thinned to a minimum distance."""
    if geom.is_empty or density_per_um2 <= 0:
        return np.zeros((0, 2))
    minx, miny, maxx, maxy = geom.bounds
    n = rng.poisson(density_per_um2 * (maxx - minx) * (maxy - miny))
    pts = np.c_[rng.uniform(minx, maxx, n), rng.uniform(miny, maxy, n)]
    shapely.prepare(geom)
    pts = pts[shapely.contains_xy(geom, pts[:, 0], pts[:, 1])] if n else pts
    return thin(pts, min_dist) if min_dist > 0 else pts


def thin(pts: np.ndarray, min_dist: float, keep: np.ndarray | None = None) -> np.ndarray:
    """Drop points closer than ``min_dist`` to an earlier kept point (and to the ``keep`` points)."""
    from scipy.spatial import cKDTree

    if len(pts) == 0:
        return pts
    base = keep if keep is not None and len(keep) else np.zeros((0, 2))
    allp = np.r_[base, pts]
    tree = cKDTree(allp)
    removed = np.zeros(len(allp), bool)
    for i, j in sorted(tree.query_pairs(min_dist)):
        # base points come first and are never removed; of two new points the later one goes
        if removed[i] or removed[j]:
            continue
        removed[j] = True
    return pts[~removed[len(base):]]
