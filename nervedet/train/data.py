"""Training data: label masks and immune-cell points from slides and QuPath GeoJSON, class-balanced patches.

Every patch lives on the analysis grid: pixel (c, r) of the grid covers level-0 pixels
[c·s, (c+1)·s) × [r·s, (r+1)·s), s = analysis_mpp / slide mpp. A mask pixel takes the label of the polygon
that contains its centre (c + 0.5, r + 0.5) (:func:`nervedet.matching.rasterize`); points are continuous
coordinates on the same grid, so a point (x, y) lies in pixel (floor(x), floor(y)).

Label values: the class index of ``ModelConfig.classes`` (Background 0, Tumor 1, Nerve 2 by default),
``IGNORE`` outside every labelled region (no loss), ``NOT_NERVE`` over images known to hold no nerve
("any class but Nerve").
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import box

from nervedet.classes import NERVE, TUMOR, is_nerve, is_region
from nervedet.geojson import read_geojson
from nervedet.matching import polygon_parts, rasterize
from nervedet.model import ModelConfig
from nervedet.slide import Slide, open_slide
from nervedet.tissue import detect_tissue

log = logging.getLogger(__name__)

__all__ = [
    "IGNORE", "MAX_POINTS", "NOT_NERVE", "AnnotatedSlide", "Patch", "SamplingWeights", "SlideSpec", "TileSample",
    "sample_tile",
]

IGNORE = 255  # outside every labelled region: no loss at all
NOT_NERVE = 254  # images known to hold no nerve: any class but Nerve
MAX_POINTS = 512  # immune-cell points per patch returned for validation (padded with -1)
CATEGORIES = ("nerve", "nerve_area", "pni", "tumor", "immune", "tissue")
_BY_AREA = {"nerve_area": "nerve"}  # categories that pick the objects of another in proportion to their area
NESTED = 0.5  # a tumour annotation with at least this share of its area inside a nerve is intraneural
PNI_REACH_UM = 10.0  # tumour this close to a nerve makes a "pni" sampling object (DESIGN.md's close proximity)
_POINT_TYPES = (0, 4)  # shapely Point, MultiPoint


@dataclass(frozen=True)
class SlideSpec:
    """A training image: a slide, its QuPath GeoJSON (None: no annotations), an mpp for files without one,
    and whether it is known to hold no nerve (then all its labelled area is NOT_NERVE)."""

    slide: Path
    labels: Path | None
    mpp: float | None = None
    negative: bool = False


@dataclass(frozen=True)
class SamplingWeights:
    """How often a tile is centred on a nerve (every nerve equally likely), on nerve area (``nerve_area``: a nerve
    picked in proportion to its area, so a large multi-fascicle nerve that one tile cannot hold is seen from
    several places), on tumour at a nerve (``pni``: tumour inside a nerve or within ``PNI_REACH_UM`` of it, one
    object per such nerve), a tumour region, an immune cell or any tissue. Weights are relative; a category
    without objects in the data passes its weight to ``tissue``."""

    nerve: float = 0.25
    nerve_area: float = 0.1
    pni: float = 0.1
    tumor: float = 0.15
    immune: float = 0.1
    tissue: float = 0.3

    @classmethod
    def only(cls, category: str) -> SamplingWeights:
        """Every tile centred on one category."""
        if category not in CATEGORIES:
            raise ValueError(f"unknown sampling category {category!r}; the categories are {', '.join(CATEGORIES)}")
        return cls(**{c: float(c == category) for c in CATEGORIES})

    def probabilities(self, available: dict[str, bool]) -> np.ndarray:
        w = np.array([max(0.0, float(getattr(self, c))) for c in CATEGORIES])
        for i, c in enumerate(CATEGORIES[:-1]):
            if not available.get(c, False):
                w[-1] += w[i]
                w[i] = 0.0
        if w.sum() <= 0:
            w[-1] = 1.0
        return w / w.sum()


@dataclass
class Patch:
    """One tile of the analysis grid: RGB image, label mask, immune points (patch px), where the heatmap
    is supervised, and the tile's top-left corner on the analysis grid."""

    image: np.ndarray  # (T, T, 3) uint8
    mask: np.ndarray  # (T, T) uint8
    points: np.ndarray  # (N, 2) float32, x y
    heat_valid: np.ndarray  # (T, T) bool
    origin: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class TileSample:
    """A sampled tile: its origin, the category that chose it and the object's index in that category
    (-1 for tissue)."""

    x: int
    y: int
    category: str
    index: int = -1


def _polygonal(geom: Any) -> bool:
    return geom is not None and len(polygon_parts([geom])) > 0


def _random_point_in(geom: Any, rng: np.random.Generator) -> tuple[float, float]:
    """A uniformly random point inside a polygonal geometry (rejection in its bounding box)."""
    minx, miny, maxx, maxy = geom.bounds
    for _ in range(32):
        xs, ys = rng.uniform(minx, maxx, 256), rng.uniform(miny, maxy, 256)
        inside = shapely.contains_xy(geom, xs, ys)
        if inside.any():
            k = int(np.argmax(inside))
            return float(xs[k]), float(ys[k])
    p = geom.representative_point()
    return float(p.x), float(p.y)


class _Layer:
    """The polygon parts of one class, with a spatial index, for fast per-patch rasterisation."""

    def __init__(self, geoms: Sequence[Any]):
        self.parts = polygon_parts(list(geoms))
        self.tree = shapely.STRtree(self.parts) if len(self.parts) else None

    def raster(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        if self.tree is None:
            return np.zeros((h, w), bool)
        found = self.parts[self.tree.query(box(x, y, x + w, y + h), predicate="intersects")]
        return rasterize(found, 1.0, x, y, w, h)


class AnnotatedSlide:
    """A slide with its labels on the analysis grid: label masks, immune points, and tile sampling.

    The slide file is opened lazily and again in every process that uses it (DataLoader workers never
    share an OpenSlide handle across fork)."""

    def __init__(self, spec: SlideSpec, config: ModelConfig = ModelConfig()):
        if not isinstance(spec, SlideSpec):
            raise TypeError(f"AnnotatedSlide needs a SlideSpec, not {type(spec).__name__}")
        self.spec = spec
        self.config = config
        self.tile = int(config.tile_size)
        self._handle: Slide | None = None
        self._pid: int | None = None
        self._stale: list[Slide] = []  # handles inherited through fork: kept, never closed or used
        self._tissue: tuple[np.ndarray, np.ndarray, float] | None = None
        slide = self._open()
        self.slide_mpp = slide.mpp
        self.scale = slide.mpp / config.analysis_mpp  # analysis px per level-0 px
        bx, by, bw, bh = slide.bounds
        s = self.scale
        self.bounds = (bx * s, by * s, (bx + bw) * s, (by + bh) * s)  # analysis px
        features = read_geojson(spec.labels, offset=slide.offset) if spec.labels is not None else []
        if spec.labels is None and not spec.negative:
            log.warning("%s: no labels and not marked negative: all of it is labelled background", spec.slide)
        self._load(features)
        log.info("%s: %d nerves, %d tumour regions, %d immune cells, labelled %.3f mm²%s", spec.slide,
                 self.annotation_counts["nerve"], self.annotation_counts["tumor"], len(self.points),
                 self.labelled_area_mm2, " (negative)" if spec.negative else "")

    # ------------------------------------------------------------------ labels
    def _class_of(self, name: str | None) -> int | None:
        if not name:
            return None
        names = self.config.class_names
        if is_nerve(name) and NERVE in names:
            return names.index(NERVE)
        for i, c in enumerate(names):
            if name == c or name.startswith(c + ":"):
                return i
        return None

    def _load(self, features: list[Any]) -> None:
        heat_name = self.config.heatmap.name
        negative = self.spec.negative
        regions: list[Any] = []
        ignored: list[Any] = []
        by_class: dict[int, list[Any]] = {}
        points: list[np.ndarray] = []
        skipped = 0
        unknown: dict[str, list[str]] = {}
        for f in features:
            name, g = f.classification, f.geometry
            if name and (name == heat_name or name.startswith(heat_name + ":")):
                if shapely.get_type_id(g) in _POINT_TYPES:
                    points.append(shapely.get_coordinates(g))
                elif f.object_type == "detection" and _polygonal(g):
                    points.append(np.array([f.centroid]))
                else:
                    skipped += 1
                continue
            idx = self._class_of(name)
            if idx is not None:
                if idx > 0 and _polygonal(g):
                    by_class.setdefault(idx, []).append(g)
            elif f.object_type == "annotation" and _polygonal(g):
                if name is None or is_region(name):
                    regions.append(g)
                elif name.lower().startswith("ignore"):  # QuPath's Ignore*: no labels there
                    ignored.append(g)
                else:
                    unknown.setdefault(name, []).append(f"{f.name!r}" if f.name else f"id {f.id}")
        for name, found in unknown.items():
            log.warning("%s: %d annotations of unknown class %r (%s%s) are not labels; the classes are "
                        "%s, Region* and Ignore*", self.spec.labels, len(found), name,
                        ", ".join(found[:5]), ", ..." if len(found) > 5 else "",
                        ", ".join([*self.config.class_names[1:], heat_name]))
        if skipped:
            log.info("%s: %d %r objects that are neither points nor detections ignored", self.spec.labels,
                     skipped, heat_name)

        def to_grid(geoms: list[Any]) -> list[Any]:
            if not geoms:
                return []
            return list(shapely.transform(np.asarray(geoms, dtype=object), lambda c: c * self.scale))

        bounds = box(*self.bounds)
        area = shapely.union_all(to_grid(regions)).intersection(bounds) if regions else bounds
        if ignored:
            area = area.difference(shapely.union_all(to_grid(ignored)))
        self.area = area  # the labelled area, analysis px
        self._area_layer = _Layer([area])
        shapely.prepare(area)
        self.has_regions = bool(regions)

        names = self.config.class_names
        nerve_idx = names.index(NERVE) if NERVE in names else None
        tumor_idx = names.index(TUMOR) if TUMOR in names else None
        if negative and nerve_idx in by_class:
            log.warning("%s: a negative image with %d nerve annotations; they are ignored",
                        self.spec.labels, len(by_class[nerve_idx]))
            del by_class[nerve_idx]
        grid = {i: to_grid(g) for i, g in by_class.items()}
        # Overlaps: the nerve is painted over every other class (a tumour area drawn around the nerves it
        # holds), except tumour nested inside a nerve (intraneural invasion), painted over the nerve.
        nerve_all = shapely.union_all(grid[nerve_idx]) if nerve_idx in grid else None
        nested: list[Any] = []
        if nerve_all is not None and tumor_idx in grid:
            outer = []
            for g in grid[tumor_idx]:
                inside = g.intersection(nerve_all).area >= NESTED * g.area if g.area > 0 else False
                (nested if inside else outer).append(g)
            grid[tumor_idx] = outer
        order = sorted(grid, key=lambda i: (i == nerve_idx, i))
        self._layers = [(i, _Layer(grid[i])) for i in order]
        if nested:
            self._layers.append((tumor_idx, _Layer(nested)))

        def objects(geoms: list[Any], hidden: Any = None) -> tuple[list[Any], int]:
            """The labelled parts of each annotation (minus `hidden`, painted over), and the number of
            annotations in the labelled area."""
            out, n = [], 0
            for g in geoms:
                clipped = g.intersection(area)
                if not (_polygonal(clipped) and clipped.area > 0):
                    continue
                n += 1
                visible = clipped.difference(hidden) if hidden is not None else clipped
                if _polygonal(visible) and visible.area >= 1.0:
                    shapely.prepare(visible)
                    out.append(visible)
            return out, n

        nerves, n_nerves = objects(grid.get(nerve_idx, []))
        nerve_union = shapely.union_all(nerves) if nerves else None
        nested_parts, n_nested = objects(nested)
        tumors, n_tumors = objects(grid.get(tumor_idx, []), nerve_union)
        tumors += nested_parts
        self.objects = {"nerve": nerves, "pni": self._pni_objects(nerves, tumors), "tumor": tumors}
        self.annotation_counts = {"nerve": n_nerves, "tumor": n_tumors + n_nested}
        pts = np.concatenate(points).astype(np.float64) * self.scale if points else np.zeros((0, 2))
        self.immune_labelled = bool(len(pts)) and not negative
        if negative:
            pts = np.zeros((0, 2))
        elif len(pts):
            pts = pts[shapely.contains_xy(area, pts[:, 0], pts[:, 1])]
        self.points = pts  # immune cells inside the labelled area, analysis px

    def _pni_objects(self, nerves: list[Any], tumors: list[Any]) -> list[Any]:
        """Per nerve with tumour inside it or within PNI_REACH_UM: that tumour (clipped to twice the reach
        around the nerve), what the ``pni`` sampling category centres tiles on."""
        if not nerves or not tumors:
            return []
        reach = PNI_REACH_UM / self.config.analysis_mpp
        tree = shapely.STRtree(tumors)
        out = []
        for n in nerves:
            near = [tumors[i] for i in tree.query(n, predicate="dwithin", distance=reach)]
            if not near:
                continue
            part = shapely.union_all(near).intersection(n.buffer(2 * reach))
            if _polygonal(part) and part.area >= 1.0:
                shapely.prepare(part)
                out.append(part)
        return out

    @property
    def labelled_area_mm2(self) -> float:
        return float(self.area.area) * (self.config.analysis_mpp / 1000.0) ** 2

    # ------------------------------------------------------------------ slide access
    def _open(self) -> Slide:
        pid = os.getpid()
        if self._handle is None or self._pid != pid:
            if self._handle is not None:
                self._stale.append(self._handle)
            self._handle = open_slide(self.spec.slide, mpp=self.spec.mpp)
            self._pid = pid
        return self._handle

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_handle=None, _pid=None, _stale=[])
        return state

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = self._pid = None

    def __repr__(self) -> str:
        return f"AnnotatedSlide({str(self.spec.slide)!r}, negative={self.spec.negative})"

    # ------------------------------------------------------------------ patches
    def mask_at(self, x: int, y: int) -> np.ndarray:
        """The (T, T) uint8 label mask of the tile whose top-left is (x, y) on the analysis grid."""
        t = self.tile
        labelled = self._area_layer.raster(x, y, t, t)
        mask = np.full((t, t), IGNORE, np.uint8)
        mask[labelled] = NOT_NERVE if self.spec.negative else 0
        for idx, layer in self._layers:
            mask[layer.raster(x, y, t, t) & labelled] = idx
        return mask

    def points_at(self, x: int, y: int) -> np.ndarray:
        """Immune points inside the tile at (x, y), in patch px (float32, (N, 2))."""
        t, p = self.tile, self.points
        sel = (p[:, 0] >= x) & (p[:, 0] < x + t) & (p[:, 1] >= y) & (p[:, 1] < y + t)
        return (p[sel] - np.array([x, y], np.float64)).astype(np.float32)

    def patch(self, x: int, y: int) -> Patch:
        """The tile_size × tile_size patch whose top-left is (x, y) on the analysis grid."""
        x, y, t = int(x), int(y), self.tile
        loc = (x / self.scale, y / self.scale)
        if abs(self.scale - 1.0) < 1e-12:
            loc = (x, y)
        image = self._open().read_region(loc, (t, t), self.config.analysis_mpp)
        mask = self.mask_at(x, y)
        heat_valid = (mask < NOT_NERVE) & self.immune_labelled
        return Patch(image, mask, self.points_at(x, y), heat_valid, (x, y))

    # ------------------------------------------------------------------ sampling
    def count(self, category: str) -> int:
        """Objects of a category: nerves, tumour regions, immune cells (tissue: 1, the slide itself)."""
        if category == "immune":
            return len(self.points)
        if category == "tissue":
            return 1
        return len(self.objects_of(category))

    def objects_of(self, category: str) -> list[Any]:
        """The objects a category picks from (``nerve_area`` picks the nerves, by area)."""
        return self.objects[_BY_AREA.get(category, category)]

    def _tissue_cells(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Rows, columns and size (analysis px) of the coarse cells that hold labelled tissue."""
        if self._tissue is None:
            try:
                tm = detect_tissue(self._open())
                tissue, f = tm.mask, tm.mpp / self.config.analysis_mpp
            except Exception as exc:  # noqa: BLE001 - a failed tissue mask only means "sample the area"
                log.warning("%s: no tissue mask (%s); sampling the whole labelled area", self.spec.slide, exc)
                f = 8.0 / self.config.analysis_mpp
                tissue = None
            h = max(1, math.ceil(self.bounds[3] / f))
            w = max(1, math.ceil(self.bounds[2] / f))
            labelled = rasterize(self._area_layer.parts, 1.0 / f, 0, 0, w, h)
            cand = labelled.copy()
            if tissue is not None:
                th, tw = min(h, tissue.shape[0]), min(w, tissue.shape[1])
                both = np.zeros_like(labelled)
                both[:th, :tw] = labelled[:th, :tw] & tissue[:th, :tw]
                cand = both if both.any() else labelled
            rows, cols = np.nonzero(cand)
            self._tissue = (rows, cols, f)
        return self._tissue

    def point_in(self, category: str, index: int, rng: np.random.Generator) -> tuple[float, float]:
        """A random point (analysis px) in object `index` of a category, or of labelled tissue."""
        if category == "immune":
            x, y = self.points[index]
            return float(x), float(y)
        if category != "tissue":
            return _random_point_in(self.objects_of(category)[index], rng)
        rows, cols, f = self._tissue_cells()
        if not len(rows):
            return _random_point_in(self.area, rng)
        k = int(rng.integers(len(rows)))
        return (cols[k] + rng.random()) * f, (rows[k] + rng.random()) * f

    def place_tile(self, px: float, py: float, rng: np.random.Generator) -> tuple[int, int]:
        """A tile origin such that (px, py) lands at a random place in the tile's central 3/4, the tile kept
        inside the slide's bounds where the slide is large enough."""
        t = self.tile
        m = t // 8
        ux, uy = rng.integers(m, t - m, size=2)
        origin = []
        for p, u, lo_f, hi_f in ((px, ux, self.bounds[0], self.bounds[2]), (py, uy, self.bounds[1], self.bounds[3])):
            v = math.floor(p) - int(u)
            lo, hi = math.ceil(lo_f), math.floor(hi_f) - t
            v = min(max(v, lo), hi) if hi >= lo else round((lo_f + hi_f - t) / 2)
            origin.append(int(v))
        return origin[0], origin[1]

    def sample(self, rng: np.random.Generator, weights: SamplingWeights = SamplingWeights()) -> TileSample:
        return sample_tile([self], rng, weights)[1]

    def sample_origins(self, rng: np.random.Generator, n: int,
                       weights: SamplingWeights = SamplingWeights()) -> list[tuple[int, int]]:
        """`n` class-balanced tile origins (see :func:`sample_tile`)."""
        return [(s.x, s.y) for s in (self.sample(rng, weights) for _ in range(n))]


def sample_tile(slides: Sequence[AnnotatedSlide], rng: np.random.Generator,
                weights: SamplingWeights = SamplingWeights()) -> tuple[int, TileSample]:
    """Pick a category by `weights`, then an object of it uniformly over all slides (every nerve equally
    likely, whatever its size), a random point in it, and a tile around that point. ``tissue`` picks a
    slide uniformly, then a random point of its labelled tissue. Returns (slide index, sample)."""
    counts = {c: np.array([s.count(c) for s in slides], np.int64) for c in CATEGORIES[:-1]}
    p = weights.probabilities({c: bool(v.sum()) for c, v in counts.items()})
    category = CATEGORIES[int(rng.choice(len(CATEGORIES), p=p))]
    if category == "tissue":
        k, index = int(rng.integers(len(slides))), -1
    else:
        cum = np.cumsum(counts[category])
        if category in _BY_AREA:
            areas = np.array([g.area for s in slides for g in s.objects_of(category)], np.float64)
            flat = int(rng.choice(len(areas), p=areas / areas.sum()))
        else:
            flat = int(rng.integers(cum[-1]))
        k = int(np.searchsorted(cum, flat, side="right"))
        index = flat - int(cum[k] - counts[category][k])
    px, py = slides[k].point_in(category, index, rng)
    x, y = slides[k].place_tile(px, py, rng)
    return k, TileSample(x, y, category, index)
