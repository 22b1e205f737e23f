"""Tissue mask (area against drawn geometry, holes, blank slides) and the tile grid (exact, filtered)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from nervedet.slide import open_slide
from nervedet.synth import SynthSettings, make_synthetic_slide
from nervedet.tissue import TissueMask, TissueSettings, detect_tissue, split_regions, tile_grid, tissue_from_rgb

MPP = 2.0  # level-0 µm/px of the synthetic slides
W, H = 2000, 1500  # 4 mm × 3 mm
GLASS = 235.0
FAT_HOLE = (500, 450, 110, 80)  # centre x, y and half axes (level-0 px) of the fat inside the first piece
DUST, DUST_RADIUS = [(100, 100), (1900, 80), (120, 1400)], 8  # 0.0008 mm² each


@dataclass
class Synthetic:
    path: Path
    truth: np.ndarray  # level-0 bool mask of the drawn tissue (fat inside counts as tissue)

    @property
    def area_mm2(self) -> float:
        return float(self.truth.sum()) * (MPP / 1000) ** 2


def ragged_outline(cx: float, cy: float, rx: float, ry: float, rng: np.random.Generator) -> np.ndarray:
    """An ellipse with lumpy low-frequency wobble and a jagged high-frequency edge."""
    t = np.linspace(0, 2 * np.pi, 300, endpoint=False)
    wobble = sum(rng.normal(0, 0.04 / k) * np.cos(k * t + rng.uniform(0, 2 * np.pi)) for k in range(1, 9))
    r = 1 + wobble + rng.normal(0, 0.03, t.size)
    return np.stack([cx + rx * r * np.cos(t), cy + ry * r * np.sin(t)], 1).round().astype(np.int32)


def write_slide(path: Path, pyramid_tiff, blank: bool = False, seed: int = 0) -> Synthetic:
    """Pale noisy glass with dense pink, purple and pale-stroma pieces, fat (white) inside the first piece,
    and three dust specks on the glass."""
    rng = np.random.default_rng(seed)
    img = np.full((H, W, 3), GLASS, np.float32)
    truth = np.zeros((H, W), np.uint8)
    if not blank:
        pieces = [
            ((500, 450, 350, 275), (225, 120, 190)),
            ((1450, 500, 300, 225), (200, 110, 190)),
            ((800, 1150, 250, 175), (236, 205, 222)),
            ((1650, 1200, 130, 100), (160, 80, 160)),
        ]
        for (cx, cy, rx, ry), colour in pieces:
            piece = np.zeros((H, W), np.uint8)
            cv2.fillPoly(piece, [ragged_outline(cx, cy, rx, ry, rng)], 1)
            img[piece > 0] = colour
            truth |= piece
        nuclei = np.zeros((H, W), np.uint8)
        for x, y in rng.integers(0, (W, H), (3000, 2)):
            cv2.circle(nuclei, (int(x), int(y)), int(rng.integers(1, 3)), 1, -1)
        dots = (nuclei > 0) & (truth > 0)
        img[dots] = img[dots] * 0.5 + np.array([70, 40, 120]) * 0.5
        cx, cy, ax, ay = FAT_HOLE
        cv2.ellipse(img, (cx, cy), (ax, ay), 0, 0, 360, (241, 239, 241), -1)
    for x, y in DUST:  # dark specks on the glass: not tissue
        cv2.circle(img, (x, y), DUST_RADIUS, (90, 90, 90), -1)
    img += 4 * rng.standard_normal(img.shape, dtype=np.float32)
    pyramid_tiff(path, np.clip(img, 0, 255).astype(np.uint8), mpp=MPP, n_levels=4)
    return Synthetic(path, truth > 0)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory, pyramid_tiff) -> Synthetic:
    return write_slide(tmp_path_factory.mktemp("tissue") / "synthetic.tif", pyramid_tiff)


@pytest.fixture(scope="module")
def blank(tmp_path_factory: pytest.TempPathFactory, pyramid_tiff) -> Synthetic:
    return write_slide(tmp_path_factory.mktemp("tissue") / "blank.tif", pyramid_tiff, blank=True)


@pytest.fixture(scope="module")
def tissue(synthetic: Synthetic) -> TissueMask:
    with open_slide(synthetic.path) as slide:
        return detect_tissue(slide)


def test_area_matches_drawn_geometry(synthetic: Synthetic, tissue: TissueMask) -> None:
    assert tissue.mpp == 8.0 and tissue.mask.dtype == bool and tissue.mask.shape == (375, 500)
    assert tissue.area_mm2 == pytest.approx(synthetic.area_mm2, rel=0.05)
    with open_slide(synthetic.path) as slide:
        coarse = detect_tissue(slide, mask_mpp=16.0)
    assert coarse.mpp == 16.0 and coarse.area_mm2 == pytest.approx(synthetic.area_mm2, rel=0.05)


def test_pale_stroma_is_tissue(tissue: TissueMask) -> None:
    assert tissue.fraction(800 - 100, 1150 - 60, 200, 120) > 0.95  # the centre of the pale piece


def test_fat_inside_tissue_is_filled(synthetic: Synthetic, tissue: TissueMask) -> None:
    cx, cy, ax, ay = FAT_HOLE
    assert tissue.fraction(cx - ax // 2, cy - ay // 2, ax, ay) == 1.0
    with open_slide(synthetic.path) as slide:
        unfilled = detect_tissue(slide, settings=TissueSettings(max_hole_mm2=0.0))
    hole_mm2 = np.pi * ax * ay * (MPP / 1000) ** 2
    assert tissue.area_mm2 - unfilled.area_mm2 == pytest.approx(hole_mm2, rel=0.25)


def test_blank_slide_has_no_tissue_and_no_tiles(blank: Synthetic) -> None:
    with open_slide(blank.path) as slide:
        empty = detect_tissue(slide)
        assert empty.area_mm2 < 1e-3
        assert tile_grid(slide, 2.0, 128, tissue=empty) == []
        assert len(tile_grid(slide, 2.0, 128)) > 0
        raw = detect_tissue(slide, settings=TissueSettings(open_um=0.0, min_piece_mm2=0.0))
    # without the clean-up only the dust specks remain: the glass noise stays under the threshold
    dust_mm2 = len(DUST) * np.pi * DUST_RADIUS**2 * (MPP / 1000) ** 2
    assert 0.5 * dust_mm2 < raw.area_mm2 < 3 * dust_mm2


def test_noisy_glass_alone_stays_below_the_threshold() -> None:
    rng = np.random.default_rng(5)
    glass = np.clip(GLASS + 6 * rng.standard_normal((300, 400, 3)), 0, 255).astype(np.uint8)
    mask = tissue_from_rgb(glass, 2.0, TissueSettings(open_um=0.0, close_um=0.0, min_piece_mm2=0.0))
    assert mask.mean() < 0.001


def test_min_tissue_fraction_filters_monotonically(synthetic: Synthetic, tissue: TissueMask) -> None:
    with open_slide(synthetic.path) as slide:
        every = tile_grid(slide, 4.0, 64)
        grids = [
            tile_grid(slide, 4.0, 64, tissue=tissue, min_tissue_fraction=t) for t in (0.0, 0.05, 0.5, 0.95)
        ]
    assert grids[0] == every
    sizes = [len(g) for g in grids]
    assert sizes[0] > sizes[1] > sizes[2] > sizes[3] > 0
    for finer, coarser in itertools.pairwise(grids):
        assert set(coarser) <= set(finer)


def test_every_tile_lies_over_tissue(synthetic: Synthetic, tissue: TissueMask) -> None:
    with open_slide(synthetic.path) as slide:
        tiles = tile_grid(slide, 2.0, 64, overlap=16, tissue=tissue)
    assert len(tiles) > 20
    for t in tiles:
        assert (t.w, t.h, t.w0, t.h0, t.mpp) == (64, 64, 64, 64, 2.0)
        assert synthetic.truth[t.y0 : t.y0 + t.h0, t.x0 : t.x0 + t.w0].mean() > 0.01, t
        assert tissue.fraction(t.x0, t.y0, t.w0, t.h0) >= 0.05


def test_grid_coordinates_are_exact_without_drift() -> None:
    slide = SimpleNamespace(mpp=0.25, bounds=(0, 0, 1_000_000, 2_000))
    tiles = tile_grid(slide, 0.5, 512, overlap=64)
    xs = sorted({t.x0 for t in tiles})
    assert len(xs) == -(-1_000_000 // 896) and xs == [i * 896 for i in range(len(xs))]
    assert {t.y0 for t in tiles} == {0, 896, 1792}
    assert all((t.w0, t.h0, t.w, t.h, t.mpp) == (1024, 1024, 512, 512, 0.5) for t in tiles)
    odd = SimpleNamespace(mpp=0.2431, bounds=(1000, 2000, 500_000, 1_000))  # non-integer scale, offset bounds
    xs = sorted({t.x0 for t in tile_grid(odd, 0.5, 256)})
    step = Fraction(256) * Fraction("0.5") / Fraction("0.2431")
    assert xs == [1000 + round(i * step) for i in range(len(xs))]
    assert len(xs) == 950 and {t.y0 for t in tile_grid(odd, 0.5, 256)} == {2000, 2527}


def test_fraction_is_area_weighted() -> None:
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    tm = TissueMask(mask=mask, mpp=5.0, slide_mpp=0.5)  # 10 level-0 px per mask px
    assert tm.area_mm2 == pytest.approx(4 * 25e-6)
    assert tm.fraction(10, 10, 20, 20) == pytest.approx(1.0)
    assert tm.fraction(0, 0, 40, 40) == pytest.approx(0.25)
    assert tm.fraction(5, 5, 10, 10) == pytest.approx(0.25)
    assert tm.fraction(25, 12, 10, 4) == pytest.approx(0.5)
    assert tm.fraction(-40, -40, 40, 40) == 0.0 and tm.fraction(30, 30, 20, 20) == pytest.approx(0.0)


def test_polygons_in_level0_pixels_keep_holes() -> None:
    mask = np.zeros((40, 40), bool)
    mask[5:35, 5:35] = True
    mask[15:25, 15:25] = False
    polygons = TissueMask(mask=mask, mpp=4.0, slide_mpp=0.25).to_polygons()  # 16 level-0 px per mask px
    assert len(polygons) == 1 and len(polygons[0].interiors) == 1
    minx, miny, maxx, maxy = polygons[0].bounds
    assert (minx, miny) == pytest.approx((5.5 * 16, 5.5 * 16)) and (maxx, maxy) == pytest.approx(
        (34.5 * 16, 34.5 * 16)
    )
    assert polygons[0].area == pytest.approx((29**2 - 11**2) * 256, rel=0.01)


def test_real_svs_tissue(real_data: Path) -> None:
    with open_slide(real_data / "slides/CMU-1-Small-Region.svs") as slide:
        tm = detect_tissue(slide)
    slide_mm2 = 2220 * 2967 * (0.499 / 1000) ** 2
    assert 0.2 * slide_mm2 < tm.area_mm2 < 0.6 * slide_mm2


@pytest.mark.parametrize(
    ("seed", "fraction", "fmt", "mpp"),
    [(11, 0.25, "svs", 0.5), (12, 0.7, "tiff", 0.5), (13, 1.0, "svs", 0.5), (14, 0.5, "svs", 0.25)],
)
def test_area_of_project_synthetic_slides_within_5_percent(tmp_path: Path, seed: int, fraction: float, fmt: str,
                                                           mpp: float) -> None:
    size = 1.5 if mpp == 0.5 else 1.0
    r = make_synthetic_slide(tmp_path, SynthSettings(seed=seed, width_mm=size, height_mm=size, mpp=mpp, fmt=fmt,
                                                     tissue_fraction=fraction))
    with open_slide(r.slide_path) as slide:
        found = detect_tissue(slide).area_mm2
    assert found == pytest.approx(r.tissue_area_mm2, rel=0.05)


def _boxes(regions: list[TissueMask]) -> list[tuple[int, int, int, int]]:
    out = []
    for r in regions:
        ys, xs = np.nonzero(r.mask)
        out.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    return out


def test_regions_split_far_pieces_and_keep_near_ones_and_nested_ones_together() -> None:
    mask = np.zeros((400, 600), bool)  # 8 µm/px: 3.2 x 4.8 mm
    mask[10:60, 10:80] = True  # piece A
    mask[10:60, 85:120] = True  # B: 40 µm from A (one region with A at a 500 µm gap)
    mask[300:390, 400:590] = True  # C: far away, a ring ...
    mask[320:370, 420:570] = False
    mask[335:355, 480:500] = True  # ... around D, 120 µm inside it: same box, so one region
    mask[200:220, 10:30] = True  # E: 1.1 mm below A
    tissue = TissueMask(mask, mpp=8.0, slide_mpp=0.5)
    regions = split_regions(tissue, gap_um=500.0)
    assert _boxes(regions) == [(10, 10, 120, 60), (10, 200, 30, 220), (400, 300, 590, 390)]
    parts = np.stack([r.mask for r in regions])
    assert np.array_equal(parts.sum(0), mask.astype(int))  # a partition of the tissue: every pixel once
    assert _boxes(split_regions(tissue, gap_um=2000.0)) == [(10, 10, 120, 220), (400, 300, 590, 390)]  # A-B, E
    assert len(split_regions(tissue, gap_um=6000.0)) == 1
    assert split_regions(TissueMask(np.zeros((5, 5), bool), 8.0, 0.5), 500.0) == []
    corner = np.zeros((320, 320), bool)  # an L of tissue, and a speck 1.5 mm from it inside the L's box:
    corner[0:10, 0:300] = corner[0:300, 0:10] = True  # far apart, but their boxes overlap, so one region
    corner[200:210, 200:210] = True
    assert _boxes(split_regions(TissueMask(corner, mpp=8.0, slide_mpp=0.5), gap_um=500.0)) == [(0, 0, 300, 300)]
