"""From stitched probabilities to objects and numbers: nerve instances and their measurements, tumour regions,
PNI per nerve (the one rule in pni.py), immune cells, the zones and the slide metrics.

Geometry is computed in canvas pixels at the analysis mpp (so µm are exact) and handed out in level-0 px.
Zones (DESIGN.md): intratumoral = inside tumour regions (their outlines); peritumoral = within 100 µm outside
them; perineural = within 100 µm of a nerve's boundary (both sides). Each zone is clipped to the tissue.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import cv2
import numpy as np
import shapely
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from nervedet.allocator import release_freed_memory
from nervedet.geometry import from_level0, mask_to_polygons, max_feret, min_feret, to_level0
from nervedet.infer import CanvasGrid, InferenceOutput
from nervedet.matching import rasterize
from nervedet.pni import PniSettings, fill_holes, grade_nerve
from nervedet.results import NerveRecord
from nervedet.threads import buffer_all, pool, thread_map
from nervedet.tissue import TissueMask

log = logging.getLogger(__name__)

# segments per quarter circle where a zone's outline turns round a corner: 8, not shapely's 16, for half the
# time; where a 100-µm zone turns round a corner its outline falls inside the true arc by at most 1.9 µm
# (0.5 µm with 16): a cell that close to a rounded corner of its zone may be counted just outside it (the
# per-nerve counts use exact distances)
ZONE_QUAD_SEGS = 8
# nerve outlines are simplified by this many canvas px (0.5 µm at 0.5 µm/px) before the perineural zone is
# built: OpenCV's staircase outlines have 4x the vertices, and buffering is most of the post-processing time
# (a 3 mm slide with 29 nerves: 1.46 -> 0.34 s; the zone's area changes by 0.17%)
ZONE_SIMPLIFY_PX = 1.0


@dataclass(frozen=True)
class PostprocessSettings:
    min_nerve_um2: float = 200.0  # smaller nerve components are noise (a small nerve twig is ~15 µm across)
    # A nerve instance is kept when its mean nerve probability (its detection score) reaches this. Chosen on
    # validation slides (synthetic seeds 9200-9205, never the test seeds 9100-9102; scripts/choose_postprocess.py)
    # for each bundled model: the stage-7 model calls small patches of stroma nerve at a mean probability of
    # 0.6-0.75; with 768-px tiles pooled nerve F1 is 0.51 at 0, 0.84 at 0.8, 0.85 at 0.85 (Dice 0.854 -> 0.835),
    # 0.82 at 0.9. 0 keeps every instance.
    min_nerve_probability: float = 0.8
    # Smaller tumour islands are dropped: about three tumour cells. Not more: the nests that define PNI are
    # small (300-2500 µm² in the synthetic truth), and at 2000 µm² every intraneural and touching nest was lost
    # (validation seeds 9200-9202: PNI F1 0.67 -> 0.80 and tumour Dice 0.93 -> 0.95 at 200).
    min_tumor_um2: float = 200.0
    min_hole_um2: float = 50.0  # holes smaller than this are filled
    smooth_um: float = 1.0  # opening and closing radius of the class masks
    zone_um: float = 100.0  # peritumoral and perineural distance; also "near tumour" for pni_fraction
    pni: PniSettings = field(default_factory=PniSettings)


@dataclass(frozen=True, eq=False)
class Objects:
    """What postprocessing found, geometry in level-0 px, plus the zone statistics for the metrics."""

    nerves: list[NerveRecord]
    tumors: list[BaseGeometry]
    immune_xy: np.ndarray  # (N, 2) level-0 px
    immune_p: np.ndarray
    tissue_area_mm2: float
    tumor_area_mm2: float
    zone_area_mm2: dict[str, float]  # intratumoral, peritumoral, perineural
    zone_count: dict[str, int]


def reading_order(geom: BaseGeometry) -> tuple[float, float]:
    """Objects are numbered top to bottom, then left to right (by their bounding box's top-left corner)."""
    return geom.bounds[1], geom.bounds[0]


def merge_objects(parts: list[Objects]) -> Objects:
    """One slide's objects from those of its regions (whose canvases, and so objects and zones, are disjoint):
    nerves and tumours in reading order over the whole slide, immune cells region after region, areas and
    counts added."""
    if len(parts) == 1:
        return parts[0]
    zones = ("intratumoral", "peritumoral", "perineural")
    return Objects(
        nerves=sorted((n for p in parts for n in p.nerves), key=lambda n: reading_order(n.geometry)),
        tumors=sorted((t for p in parts for t in p.tumors), key=reading_order),
        immune_xy=np.concatenate([p.immune_xy.reshape(-1, 2) for p in parts]) if parts else np.zeros((0, 2)),
        immune_p=np.concatenate([p.immune_p for p in parts]) if parts else np.zeros(0),
        tissue_area_mm2=sum(p.tissue_area_mm2 for p in parts), tumor_area_mm2=sum(p.tumor_area_mm2 for p in parts),
        zone_area_mm2={k: sum(p.zone_area_mm2[k] for p in parts) for k in zones},
        zone_count={k: sum(p.zone_count[k] for p in parts) for k in zones})


CONCURRENT_CONTOURS_PX = 64 << 20  # canvases up to this many pixels have both classes' contours traced at once
BAND_ROWS = 1024  # class masks are made this many canvas rows at a time (memory stays bounded), bands in threads


def class_masks(out: InferenceOutput, smooth_px: int) -> dict[str, np.ndarray]:
    """Each non-background class where it has the highest probability (background = 1 - the others; on a tie
    the earlier channel wins, and background wins over any), opened and closed with a disk of ``smooth_px``;
    computed in bands of rows (spread over threads), by channel-wise comparisons (an argmax over the channel
    axis of the whole band took three times as long)."""
    probs = out.probs
    n, h, w = probs.shape
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * smooth_px + 1,) * 2) if smooth_px > 0 else None
    margin = 2 * smooth_px + 1  # open then close: each reaches smooth_px rows beyond the band
    masks = {name: np.zeros((h, w), bool) for name in out.class_names}

    def band(y0: int) -> None:  # rows [y0, y0 + BAND_ROWS) of every mask: the bands do not overlap
        a, b = max(0, y0 - margin), min(h, y0 + BAND_ROWS + margin)
        p = probs[:, a:b]
        background = 255 - p.sum(0, dtype=np.int16)
        for k, name in enumerate(out.class_names):
            wins = p[k] > background
            for j in range(n):
                if j != k:
                    wins &= p[k] > p[j] if j < k else p[k] >= p[j]
            m = wins.view(np.uint8)
            if kernel is not None:
                m = cv2.morphologyEx(cv2.morphologyEx(m, cv2.MORPH_OPEN, kernel), cv2.MORPH_CLOSE, kernel)
            masks[name][y0:min(h, y0 + BAND_ROWS)] = m[y0 - a:y0 - a + min(BAND_ROWS, h - y0)].astype(bool)

    thread_map(band, range(0, h, BAND_ROWS))
    release_freed_memory()  # the bands' temporaries, freed in the threads' own malloc arenas
    return masks


def _mean_prob(prob: np.ndarray, poly: Polygon) -> float:
    """Mean probability (0..1) of the canvas pixels whose centres lie inside the polygon."""
    x0, y0 = max(math.floor(poly.bounds[0]), 0), max(math.floor(poly.bounds[1]), 0)
    x1, y1 = min(math.ceil(poly.bounds[2]), prob.shape[1]), min(math.ceil(poly.bounds[3]), prob.shape[0])
    if x1 <= x0 or y1 <= y0:
        return 0.0
    inside = rasterize(np.array([poly]), 1.0, x0, y0, x1 - x0, y1 - y0)
    return float(prob[y0:y1, x0:x1][inside].mean()) / 255.0 if inside.any() else 0.0


def _count_in(zone: BaseGeometry | None, xy: np.ndarray) -> int:
    if zone is None or zone.is_empty or not len(xy):
        return 0
    shapely.prepare(zone)
    return int(shapely.contains_xy(zone, xy[:, 0], xy[:, 1]).sum())


def _count_within(geom: Polygon, xy: np.ndarray, distance: float) -> int:
    """Points at most ``distance`` from the polygon, inside included (exact distances, no buffer polygon)."""
    if not len(xy):
        return 0
    x0, y0, x1, y1 = geom.bounds
    box = (xy[:, 0] >= x0 - distance) & (xy[:, 0] <= x1 + distance) & (xy[:, 1] >= y0 - distance) & (
        xy[:, 1] <= y1 + distance)
    if not box.any():
        return 0
    shapely.prepare(geom)
    return int(shapely.dwithin(geom, shapely.points(xy[box]), distance).sum())


def _grade(nerve: Polygon, tumors: list[Polygon], tree: shapely.STRtree | None, mpp: float,
           s: PostprocessSettings):
    """PNI of one nerve against the tumour near it (the whole tumour's union is never needed)."""
    if tree is None:
        return grade_nerve(nerve, None, mpp, s.pni), math.inf
    d = s.pni.close_um / mpp * 2 + 2  # the tree tests bounding boxes: the nerve's, grown by d, is enough
    x0, y0, x1, y1 = nerve.bounds
    near = tree.query(shapely.box(x0 - d, y0 - d, x1 + d, y1 + d))
    local = shapely.union_all([tumors[i] for i in near]) if len(near) else None
    res = grade_nerve(nerve, local, mpp, s.pni)
    if len(near):
        return res, res.distance_um
    i = tree.query_nearest(nerve)
    return res, float(nerve.distance(tumors[int(i[0])])) * mpp


def perineural_zone(nerves: list[Polygon], distance: float) -> BaseGeometry:
    """Everything within ``distance`` of a nerve's boundary, inside or out (holes' rings included).

    The boundary is the nerves' rings, each the outline of a simple polygon (a nerve's exterior or one of its
    holes), and the points within ``distance`` of a ring are that polygon grown minus it shrunk: the same set
    as the union of the rings' buffers, for about half the time (measured on a 1.5 mm slide with 10 nerves:
    0.48 against 0.82 s). Polygons without holes, because shrinking a nerve with holes is slow: one with 46
    holes shrank in 0.68 s, its exterior alone in 0.22 s (a 3 mm slide's zone 1.8 -> 0.5 s). A polygon
    narrower than twice the distance in some direction shrinks to nothing (its inscribed circle is at most
    half of any width): it is not shrunk at all, which GEOS does at three times the cost of growing it."""
    simple = [Polygon(n.exterior) for n in nerves] + [Polygon(h) for n in nerves for h in n.interiors]
    wide = [i for i, p in enumerate(simple) if min_feret(p) >= 2 * distance]
    # grown and shrunk in one call, so the threads share out both by size
    both = buffer_all(simple + [simple[i] for i in wide], np.r_[np.full(len(simple), distance),
                                                               np.full(len(wide), -distance)],
                      quad_segs=ZONE_QUAD_SEGS)
    ring = both[:len(simple)].copy()
    ring[wide] = shapely.difference(ring[wide], both[len(simple):])
    return shapely.union_all(ring)


def zone_statistics(outlines: list[Polygon], nerves: list[Polygon], tissue: TissueMask, grid: CanvasGrid,
                    zone_px: float, immune: np.ndarray) -> tuple[dict[str, float], dict[str, int]]:
    """Each zone's area (canvas px²) and immune-cell count: zones built in canvas px from the tumours' outlines
    and the nerves, clipped to the tissue."""
    tissue_geom = shapely.union_all([from_level0(p, grid.origin, grid.scale) for p in tissue.to_polygons()])
    tumor_all = shapely.union_all(outlines) if outlines else None
    zones: dict[str, BaseGeometry | None] = {"intratumoral": None, "peritumoral": None, "perineural": None}
    if tumor_all is not None:
        zones["intratumoral"] = tumor_all.intersection(tissue_geom)
        # the union of each outline's buffer is the union's buffer, for a third of the time (measured on a
        # 1.5 mm slide with 17 tumour regions: 0.13 against 0.33 s)
        grown = shapely.union_all(buffer_all(outlines, zone_px, quad_segs=ZONE_QUAD_SEGS))
        zones["peritumoral"] = grown.difference(tumor_all).intersection(tissue_geom)
    if nerves:
        nerve_outlines = [n.simplify(ZONE_SIMPLIFY_PX, preserve_topology=True) for n in nerves]
        zones["perineural"] = perineural_zone(nerve_outlines, zone_px).intersection(tissue_geom)
    return ({k: (z.area if z is not None else 0.0) for k, z in zones.items()},
            {k: _count_in(z, immune) for k, z in zones.items()})


def postprocess(out: InferenceOutput, tissue: TissueMask, settings: PostprocessSettings = PostprocessSettings()
                ) -> Objects:
    """Objects and zone statistics from one slide's inference output."""
    g, mpp = out.grid, out.analysis_mpp
    px2 = mpp * mpp  # µm² per canvas pixel
    masks = class_masks(out, round(settings.smooth_um / mpp))
    hole_px = settings.min_hole_um2 / px2
    min_px = {"Tumor": settings.min_tumor_um2 / px2, "Nerve": settings.min_nerve_um2 / px2}
    # OpenCV's contour tracing copies the whole mask: a region's canvas can be 256 Mpx, and two classes at once
    # raised the peak memory of a 50k² slide from 1.90 to 2.23 GB, so large canvases go one class after the
    # other; small ones both at once (a 3 mm slide: 0.17 -> 0.10 s)
    trace = lambda k: mask_to_polygons(masks[k], min_px[k], hole_px)  # noqa: E731
    classes = ("Tumor", "Nerve")
    tumors, nerves = thread_map(trace, classes) if g.width * g.height <= CONCURRENT_CONTOURS_PX else map(trace, classes)
    tumors = sorted(thread_map(lambda t: t.simplify(0.5, preserve_topology=True), tumors), key=reading_order)
    nerves = sorted(nerves, key=reading_order)
    immune = out.immune_xy  # canvas px
    outlines = [fill_holes(t) for t in tumors]
    tree = shapely.STRtree(tumors) if tumors else None
    outline_tree = shapely.STRtree(outlines) if outlines else None
    nerve_prob = out.probs[out.class_names.index("Nerve")]
    zone_px = settings.zone_um / mpp
    scored = [(n, p) for n, p in zip(nerves, thread_map(lambda n: _mean_prob(nerve_prob, n), nerves))
              if p >= settings.min_nerve_probability]
    if len(scored) < len(nerves):
        log.info("%d nerve candidates dropped: mean nerve probability under %.2f", len(nerves) - len(scored),
                 settings.min_nerve_probability)
    nerves = [n for n, _ in scored]
    def record(item: tuple[Polygon, float]) -> NerveRecord:  # one nerve's measurements; nerves in threads
        n, probability = item
        res, distance = _grade(n, tumors, tree, mpp, settings)
        intratumoral = bool(outline_tree is not None and len(outline_tree.query(n.centroid, predicate="within")))
        return NerveRecord(
            geometry=to_level0(n, g.origin, g.scale), area_um2=n.area * px2, perimeter_um=n.length * mpp,
            min_diameter_um=min_feret(n) * mpp, max_diameter_um=max_feret(n) * mpp,
            probability=probability, encirclement=res.encirclement, distance_to_tumor_um=distance,
            pni_grade=res.grade, immune_within_100um=_count_within(n, immune, zone_px),
            intratumoral=intratumoral)

    # the zones do not depend on the nerves' records: built by another thread meanwhile (their single-threaded
    # unions and intersections overlap the records' work)
    zoned = pool("zones", 1).submit(zone_statistics, outlines, nerves, tissue, g, zone_px, immune)
    records = thread_map(record, scored)
    zone_area, zone_count = zoned.result()
    zone_area = {k: a * px2 / 1e6 for k, a in zone_area.items()}
    tumors0 = [to_level0(t, g.origin, g.scale) for t in tumors]
    log.info("%d nerves (%d PNI), %d tumour regions, %d immune cells", len(records),
             sum(r.is_pni for r in records), len(tumors), len(immune))
    return Objects(records, tumors0, out.immune_level0(), out.immune_p, tissue.area_mm2,
                   sum(t.area for t in tumors) * px2 / 1e6, zone_area, zone_count)
