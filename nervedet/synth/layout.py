"""Where everything on a synthetic slide is: tissue, tumour, nerves (with PNI cases), look-alikes, immune cells.

All geometry is in µm from the slide's top-left corner; the renderer and the truth writer scale it to pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import shapely
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry

from nervedet.synth import shapes


@dataclass
class NerveSpec:
    outline: Polygon  # the whole nerve, perineurium included
    fascicles: list[Polygon]  # fascicle outlines (one for a small nerve)
    perineurium_um: float
    longitudinal: bool
    axis: float = 0.0  # fibre direction (radians) for a lengthwise cut
    origin: tuple[float, float] = (0.0, 0.0)  # start of the centre line
    wave: tuple[float, float, float] = (0.0, 50.0, 0.0)  # amplitude, wavelength, phase (µm, µm, rad)
    halo_immune: bool = False  # immune cells gather around it
    pni_case: str = ""  # "intraneural", "encircled", "touching", "near" or "" for a plain nerve


@dataclass
class BundleSpec:
    """Smooth muscle or wavy collagen: an oriented band."""

    outline: Polygon
    axis: float
    origin: tuple[float, float]
    wave: tuple[float, float, float]


@dataclass
class VesselSpec:
    outline: Polygon
    lumen: Polygon


@dataclass
class Layout:
    width_um: float
    height_um: float
    seed: int
    tissue: BaseGeometry
    tumor_areas: list[Polygon] = field(default_factory=list)  # invasive fronts (not truth themselves)
    tumors: list[Polygon] = field(default_factory=list)  # nests and glands (glands keep their lumen as a hole)
    nerves: list[NerveSpec] = field(default_factory=list)
    fat: list[Polygon] = field(default_factory=list)
    fat_seeds: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # adipocyte centres
    vessels: list[VesselSpec] = field(default_factory=list)
    muscle: list[BundleSpec] = field(default_factory=list)
    wavy: list[BundleSpec] = field(default_factory=list)
    immune: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # cell centres (N×2 µm)

    @property
    def tissue_area_mm2(self) -> float:
        return float(self.tissue.area) / 1e6


class _Occupancy:
    """Grid-hashed footprints so that structures do not overlap (fast for thousands of them)."""

    def __init__(self, cell: float = 250.0):
        self.cell = cell
        self.grid: dict[tuple[int, int], list[BaseGeometry]] = {}

    def _cells(self, g: BaseGeometry):
        x0, y0, x1, y1 = g.bounds
        for i in range(int(x0 // self.cell), int(x1 // self.cell) + 1):
            for j in range(int(y0 // self.cell), int(y1 // self.cell) + 1):
                yield (i, j)

    def free(self, g: BaseGeometry) -> bool:
        seen = set()
        for c in self._cells(g):
            for other in self.grid.get(c, ()):
                if id(other) not in seen and other.intersects(g):
                    return False
                seen.add(id(other))
        return True

    def add(self, g: BaseGeometry) -> None:
        for c in self._cells(g):
            self.grid.setdefault(c, []).append(g)


def _tissue(rng: np.random.Generator, w: float, h: float, fraction: float) -> BaseGeometry:
    """One or a few ragged tissue pieces covering ``fraction`` of the slide (binary search on their size)."""
    frame = box(0, 0, w, h)
    if fraction >= 0.999:
        return frame
    n_pieces = 1 if fraction > 0.35 or rng.uniform() < 0.5 else int(rng.integers(2, 4))
    centres = [(rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h)]
    for _ in range(n_pieces - 1):
        centres.append((rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h))
    shapes_seed = int(rng.integers(1 << 31))
    angle = rng.uniform(0, math.pi)

    def pieces(scale: float) -> BaseGeometry:
        r = np.random.default_rng(shapes_seed)
        parts = [
            shapes.blob(r, cx, cy, scale * min(w, h) / 2 * (1.0 if i == 0 else 0.45),
                        aspect=r.uniform(1.0, 1.6), angle=angle, roughness=0.25, ragged=0.006, n=400)
            for i, (cx, cy) in enumerate(centres)
        ]
        return shapely.union_all(parts).intersection(frame)

    lo, hi = 0.0, 4.0 * math.sqrt(max(w, h) / min(w, h))
    for _ in range(30):
        mid = (lo + hi) / 2
        if pieces(mid).area < fraction * w * h:
            lo = mid
        else:
            hi = mid
    return pieces((lo + hi) / 2)


def _place(rng, occ: _Occupancy, region: BaseGeometry, make, tries: int = 60, pad: float = 15.0,
           whole: bool = True):
    """Try ``make(point)`` at random points of ``region`` until it fits without overlap; None if it never does.

    With ``whole`` the structure must lie entirely inside ``region``, else only its centre must.
    """
    for _ in range(tries):
        p = shapes.random_point_in(rng, region)
        if p is None:
            return None
        g = make(p.x, p.y)
        if g is None:
            continue
        footprint = g[0] if isinstance(g, tuple) else g
        inside = region.contains(footprint) if whole else region.contains(footprint.centroid)
        if inside and occ.free(footprint.buffer(pad)):
            occ.add(footprint.buffer(pad))
            return g
    return None


def _keyed(spec):
    """(footprint, spec) for :func:`_place`."""
    return spec.outline, spec


def _nerve(rng, cx: float, cy: float, diameter: float, longitudinal: bool) -> NerveSpec:
    peri = float(np.clip(0.04 * diameter, 1.5, 8.0))
    if longitudinal:
        length = diameter * rng.uniform(3.0, 7.0)
        axis = rng.uniform(0, math.pi)
        wave = (rng.uniform(0.08, 0.2) * diameter + 3, rng.uniform(60, 160), rng.uniform(0, 2 * math.pi))
        ox, oy = cx - length / 2 * math.cos(axis), cy - length / 2 * math.sin(axis)
        outline = shapes.wavy_band(ox, oy, axis, length, diameter, *wave)
        return NerveSpec(outline, [outline], peri, True, axis, (ox, oy), wave)
    outline = shapes.blob(rng, cx, cy, diameter / 2, aspect=rng.uniform(1.0, 1.7),
                          angle=rng.uniform(0, math.pi), roughness=0.08)
    fascicles = [outline]
    if diameter > 250:  # a larger nerve: several fascicles in epineurium
        inner = outline.buffer(-0.05 * diameter)
        fascicles = []
        occ = _Occupancy(cell=diameter / 4)
        for _ in range(int(rng.integers(6, 16))):
            r = diameter * rng.uniform(0.08, 0.18)
            f = _place(rng, occ, inner,
                       lambda x, y, r=r: shapes.blob(rng, x, y, r, aspect=rng.uniform(1, 1.4), roughness=0.1),
                       tries=30, pad=diameter * 0.015)
            if f is not None:
                fascicles.append(f)
        if len(fascicles) < 2:  # not a multi-fascicle nerve after all
            fascicles = [outline]
        peri = float(np.clip(0.015 * diameter, 3.0, 10.0))
    return NerveSpec(outline, fascicles, peri, False)


def _pni_case(rng, occ: _Occupancy, area: Polygon, tissue: BaseGeometry, case: str):
    """A nerve at the invasive front of a tumour area with tumour placed to give the wanted relation."""
    d = rng.uniform(70, 180)
    front = area.exterior.buffer(d).intersection(tissue.buffer(-d * 1.5))
    for _ in range(40):
        p = shapes.random_point_in(rng, front)
        if p is None:
            return None
        nerve = _nerve(rng, p.x, p.y, d, longitudinal=False)
        nerve.outline = shapes.ellipse(p.x, p.y, d / 2, d / 2 * rng.uniform(0.75, 1.0), rng.uniform(0, math.pi))
        nerve.fascicles = [nerve.outline]
        outline = nerve.outline
        if case == "intraneural":
            tum = [shapes.blob(rng, p.x + rng.uniform(-0.2, 0.2) * d, p.y, d * 0.18, roughness=0.1)]
            tum = [t.intersection(outline.buffer(-nerve.perineurium_um * 2)) for t in tum]
            tum += [_around(outline, p.x, p.y, 2.0, rng.uniform(15, 35), rng.uniform(0, 6.3), rng.uniform(0.5, 1.5))]
        elif case == "encircled":
            tum = [_around(outline, p.x, p.y, rng.uniform(1, 4), rng.uniform(20, 45), rng.uniform(0, 6.3),
                           rng.uniform(0.5, 0.85) * 2 * math.pi)]
        else:  # touching (a small nest a few µm away) or near (a nest beyond the "close" distance)
            a = rng.uniform(0, 2 * math.pi)
            rb = d * (rng.uniform(0.12, 0.2) if case == "touching" else rng.uniform(0.2, 0.35))
            gap = rng.uniform(1, 4) if case == "touching" else rng.uniform(25, 60)
            t = shapes.blob(rng, p.x + d * math.cos(a), p.y + d * math.sin(a), rb, roughness=0.05)
            # slide the nest along the ray to the nerve until the gap is what the case needs
            shift = t.distance(outline) - gap
            t = shapely.affinity.translate(t, -shift * math.cos(a), -shift * math.sin(a))
            tum = [t]
        tum = [t.intersection(tissue) for t in tum]
        if case != "intraneural":
            tum = [t.difference(nerve.outline.buffer(1.0)) for t in tum]
        tum = [g for t in tum for g in getattr(t, "geoms", [t]) if isinstance(g, Polygon) and g.area > 50]
        footprint = shapely.union_all([nerve.outline, *tum]).convex_hull
        if tum and occ.free(footprint.buffer(15)):
            occ.add(footprint.buffer(15))
            nerve.pni_case = case
            nerve.halo_immune = rng.uniform() < 0.6
            return nerve, tum
    return None


def _around(outline: Polygon, cx: float, cy: float, gap: float, thickness: float, start: float, span: float):
    """Tumour hugging a nerve: a band from ``gap`` to ``gap + thickness`` µm outside it over an angle."""
    band = outline.buffer(gap + thickness).difference(outline.buffer(gap))
    reach = 10 * (gap + thickness) + max(outline.bounds[2] - outline.bounds[0], outline.bounds[3] - outline.bounds[1])
    t = np.linspace(start, start + span, 64)
    wedge = Polygon(np.r_[[[cx, cy]], np.c_[cx + reach * np.cos(t), cy + reach * np.sin(t)]])
    return band.intersection(wedge)


def make_layout(seed: int, width_um: float, height_um: float, tissue_fraction: float = 0.7) -> Layout:
    """Lay out one synthetic slide. Counts scale with the tissue area; every slide has every PNI case."""
    rng = np.random.default_rng([seed, 1])
    tissue = _tissue(rng, width_um, height_um, tissue_fraction)
    lay = Layout(width_um, height_um, seed, tissue)
    area_mm2 = tissue.area / 1e6
    inner = tissue.buffer(-40)
    occ = _Occupancy()
    small = min(width_um, height_um)

    # Tumour areas (invasive fronts) filled with nests and glands.
    n_areas = max(1, int(round(area_mm2 / 3.0)))
    for _ in range(n_areas):
        rad = min(rng.uniform(250, 600), small * 0.22)
        area = shapes.blob(rng, 0, 0, rad, aspect=rng.uniform(1, 1.8), angle=rng.uniform(0, 3.2), roughness=0.3)
        p = shapes.random_point_in(rng, tissue.buffer(-rad * 0.8)) or shapes.random_point_in(rng, inner)
        if p is None:
            continue
        area = shapely.affinity.translate(area, p.x, p.y).intersection(inner)
        if area.is_empty or area.area < 1e4:
            continue
        area = max(getattr(area, "geoms", [area]), key=lambda g: g.area)
        lay.tumor_areas.append(area)
    # PNI cases first so that they get room at the fronts.
    cases = ["intraneural", "encircled", "touching", "near"]
    extra = max(0, int(round(area_mm2 / 2.5)) - 1)
    cases += list(rng.choice(["intraneural", "encircled", "touching", "near"], size=extra))
    for i, case in enumerate(cases):
        if not lay.tumor_areas:
            break
        got = _pni_case(rng, occ, lay.tumor_areas[i % len(lay.tumor_areas)], tissue, case)
        if got:
            lay.nerves.append(got[0])
            lay.tumors.extend(got[1])
    for area in lay.tumor_areas:
        n_nests = int(area.area / (140 * 140))
        for _ in range(n_nests):
            gland = rng.uniform() < 0.35
            def make(x, y, gland=gland):
                if gland:
                    r = rng.uniform(35, 80)
                    outer = shapes.blob(rng, x, y, r, aspect=rng.uniform(1, 1.5), angle=rng.uniform(0, 3.2),
                                        roughness=0.1)
                    return outer.difference(outer.buffer(-rng.uniform(10, 16)))
                return shapes.blob(rng, x, y, rng.uniform(20, 70), aspect=rng.uniform(1, 2.2),
                                   angle=rng.uniform(0, 3.2), roughness=0.3)
            nest = _place(rng, occ, area, make, tries=8, pad=12, whole=False)
            if nest is not None:
                nest = nest.intersection(inner)
                nest = max(getattr(nest, "geoms", [nest]), key=lambda g: g.area) if not nest.is_empty else nest
            if nest is not None and isinstance(nest, Polygon) and nest.is_valid and nest.area > 100:
                lay.tumors.append(nest)

    # Plain nerves in the stroma: most small, some large with fascicles, about a third cut lengthwise.
    n_nerves = int(round(3 + 2.5 * area_mm2))
    for _ in range(n_nerves):
        longitudinal = rng.uniform() < 0.35
        d = float(np.exp(rng.uniform(math.log(20), math.log(220))))
        if rng.uniform() < 0.15:
            d = rng.uniform(300, 1000)
        d = min(d, small * (0.08 if longitudinal else 0.25))
        got = _place(rng, occ, inner, lambda x, y, d=d, lg=longitudinal: _keyed(_nerve(rng, x, y, d, lg)),
                     tries=30, pad=25)
        if got is not None:
            nerve = got[1]
            nerve.halo_immune = rng.uniform() < 0.4
            lay.nerves.append(nerve)

    # Look-alikes: fat lobules, vessels, smooth muscle, wavy stroma.
    for _ in range(int(round(0.8 * area_mm2))):
        lob = _place(rng, occ, tissue.buffer(-120), lambda x, y: shapes.blob(
            rng, x, y, min(rng.uniform(90, 260), small * 0.1), aspect=rng.uniform(1, 1.6),
            angle=rng.uniform(0, 3.2), roughness=0.2), tries=20)
        if lob is not None:
            lay.fat.append(lob)
    if lay.fat:
        seeds = [shapes.poisson_points(rng, f.buffer(10), 1 / 2400.0, min_dist=32) for f in lay.fat]
        lay.fat_seeds = np.concatenate(seeds)
    for _ in range(int(round(4 * area_mm2))):
        def vessel(x, y):
            r = rng.uniform(10, 70)
            out = shapes.blob(rng, x, y, r, aspect=rng.uniform(1, 1.8), angle=rng.uniform(0, 3.2), roughness=0.1)
            lumen = out.buffer(-max(3.0, r * rng.uniform(0.12, 0.3)))
            return (out, lumen) if isinstance(lumen, Polygon) and not lumen.is_empty else None
        v = _place(rng, occ, inner, vessel, tries=20)
        if v is not None:
            lay.vessels.append(VesselSpec(*v))
    for kind, n in (("muscle", 1.0 * area_mm2), ("wavy", 2.0 * area_mm2)):
        for _ in range(int(round(n))):
            def band(x, y, kind=kind):
                axis = rng.uniform(0, math.pi)
                length = min(rng.uniform(200, 700), small * 0.3)
                width = rng.uniform(40, 140) if kind == "muscle" else rng.uniform(20, 70)
                amp = 0.0 if kind == "muscle" else rng.uniform(4, 12)
                wave = (amp, rng.uniform(60, 150), rng.uniform(0, 6.3))
                ox, oy = x - length / 2 * math.cos(axis), y - length / 2 * math.sin(axis)
                return BundleSpec(shapes.wavy_band(ox, oy, axis, length, width, *wave), axis, (ox, oy), wave)
            b = _place(rng, occ, inner, lambda x, y: _keyed(band(x, y)), tries=20)
            if b is not None:
                getattr(lay, kind).append(b[1])

    lay.immune = _immune_cells(rng, lay, occ)
    return lay


def _immune_cells(rng: np.random.Generator, lay: Layout, occ: _Occupancy) -> np.ndarray:
    """Lymphocyte centres: scattered, clustered, dense at the invasive front and around some nerves."""
    tumor = shapely.union_all(lay.tumors) if lay.tumors else Polygon()
    nerves = shapely.union_all([n.outline for n in lay.nerves]) if lay.nerves else Polygon()
    groups: list[np.ndarray] = [shapes.poisson_points(rng, lay.tissue, 120e-6, 6.0)]
    for area in lay.tumor_areas:
        margin = area.buffer(100).difference(area.buffer(-30)).intersection(lay.tissue)
        groups.append(shapes.poisson_points(rng, margin, 1500e-6, 6.0))
    for n in lay.nerves:
        if n.halo_immune:
            halo = n.outline.buffer(60).difference(n.outline.buffer(3)).intersection(lay.tissue)
            groups.append(shapes.poisson_points(rng, halo, 2500e-6, 6.0))
    for _ in range(max(1, int(round(0.6 * lay.tissue_area_mm2)))):
        agg = _place(rng, occ, lay.tissue.buffer(-150), lambda x, y: shapes.blob(
            rng, x, y, rng.uniform(40, 120), aspect=rng.uniform(1, 1.5), roughness=0.2), tries=10, pad=5)
        if agg is not None:
            groups.append(shapes.poisson_points(rng, agg, 16000e-6, 6.0))
    pts = np.concatenate(groups) if groups else np.zeros((0, 2))
    blocked = shapely.union_all([
        nerves.buffer(2), *[f.buffer(-2) for f in lay.fat], *[v.lumen for v in lay.vessels],
        *[Polygon(r) for t in lay.tumors for r in t.interiors],  # gland lumens
        *[b.outline for b in lay.muscle],
    ])
    keep = shapely.contains_xy(lay.tissue.buffer(-4), pts[:, 0], pts[:, 1])
    keep &= ~shapely.contains_xy(blocked, pts[:, 0], pts[:, 1])
    in_tumor = shapely.contains_xy(tumor, pts[:, 0], pts[:, 1])
    keep &= ~in_tumor | (rng.uniform(size=len(pts)) < 0.08)  # a few intraepithelial lymphocytes
    pts = pts[keep]
    order = rng.permutation(len(pts))
    return shapes.thin(pts[order], 6.0)
