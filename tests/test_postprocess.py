"""From probabilities to nerves, PNI, tumour, zones and the slide metrics, on a canvas drawn by hand."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import shapely

from nervedet.analyze import AnalysisSettings, slide_metrics
from nervedet.infer import CanvasGrid, InferenceOutput
from nervedet.postprocess import PostprocessSettings, postprocess
from nervedet.results import SlideMetrics
from nervedet.tissue import TissueMask
from tests.fakes import fake_model

ORIGIN, SCALE = (1000.0, 500.0), 2.0  # canvas px (0.5 µm) → level-0 px (0.25 µm)
ZONE_UM = 20.0  # 40 canvas px


def _output(tumor: np.ndarray, nerve: np.ndarray, cells: list[tuple[float, float]]) -> InferenceOutput:
    h, w = tumor.shape
    grid = CanvasGrid(ORIGIN, SCALE, w, h, 256, 32, 2, 2, ((0, 0),))
    probs = np.stack([tumor, nerve]).astype(np.uint8) * 230
    xy = np.array(cells, float).reshape(-1, 2)
    return InferenceOutput(grid, ("Tumor", "Nerve"), probs, xy, np.full(len(xy), 0.9), 0.5, "fp32", 1.0)


def _tissue() -> TissueMask:
    return TissueMask(np.ones((60, 60), bool), mpp=8.0, slide_mpp=0.25)  # all tissue, 0.2304 mm²


@pytest.fixture(scope="module")
def scene():
    tumor = np.zeros((500, 400), np.uint8)
    nerve = np.zeros((500, 400), np.uint8)
    cv2.circle(nerve, (60, 60), 20, 1, -1)  # A: alone, far from tumour
    cv2.circle(nerve, (300, 120), 55, 1, -1)  # B: tumour hugs its left half -> PNI grade 2
    cv2.ellipse(tumor, (300, 120), (110, 110), 0, 90, 270, 1, -1)
    cv2.circle(tumor, (300, 120), 56, 0, -1)
    tumor[300:480, 160:380] = 1  # a tumour block with nerve C inside it
    cv2.circle(tumor, (270, 390), 26, 0, -1)
    cv2.circle(nerve, (270, 390), 20, 1, -1)
    cells = [(200.5, 350.5), (210.5, 460.5),  # in the tumour block
             (140.5, 400.5),  # 20 px left of the block: peritumoral
             (270.5, 345.5),  # in the block, 25 px from nerve C's boundary: perineural too
             (60.5, 60.5), (60.5, 95.5),  # in nerve A, and 15 px outside it: perineural
             (20.5, 490.5)]  # nowhere in particular
    out = _output(tumor, nerve, cells)
    return out, postprocess(out, _tissue(), PostprocessSettings(zone_um=ZONE_UM))


def _nerve_at(objs, x, y):
    x0, y0 = ORIGIN[0] + x * SCALE, ORIGIN[1] + y * SCALE
    (n,) = [n for n in objs.nerves if n.geometry.contains(__import__("shapely").Point(x0, y0))]
    return n


def test_each_nerve_is_one_polygon_in_level0_with_measurements_in_um(scene) -> None:
    _, objs = scene
    assert len(objs.nerves) == 3
    a = _nerve_at(objs, 60, 60)
    r_um = 20.5 * 0.5  # a drawn disk of radius 20 covers about radius 20.5 px
    assert math.isclose(a.area_um2, math.pi * r_um**2, rel_tol=0.05)
    assert math.isclose(a.min_diameter_um, 2 * r_um, rel_tol=0.05)
    assert math.isclose(a.max_diameter_um, 2 * r_um, rel_tol=0.05)
    assert a.probability == pytest.approx(230 / 255, abs=0.01)
    minx, miny, maxx, maxy = a.geometry.bounds  # level-0: origin + canvas px × 2
    assert minx == pytest.approx(ORIGIN[0] + 40 * SCALE, abs=2) and maxy == pytest.approx(ORIGIN[1] + 81 * SCALE, abs=2)


def test_pni_follows_the_one_rule(scene) -> None:
    _, objs = scene
    a, b, c = _nerve_at(objs, 60, 60), _nerve_at(objs, 300, 120), _nerve_at(objs, 270, 390)
    assert a.pni_grade == 0 and not a.is_pni and a.distance_to_tumor_um > 40
    assert b.pni_grade == 2 and 0.5 < b.encirclement < 0.7 and b.distance_to_tumor_um < 2
    assert c.is_pni and c.encirclement > 0.95
    assert (a.intratumoral, b.intratumoral, c.intratumoral) == (False, False, True)


def test_immune_cells_near_each_nerve_are_counted(scene) -> None:
    _, objs = scene
    assert _nerve_at(objs, 60, 60).immune_within_100um == 2  # ZONE_UM stands in for 100 µm here
    assert _nerve_at(objs, 270, 390).immune_within_100um == 1


def test_zones_count_the_cells_inside_them(scene) -> None:
    _, objs = scene
    assert objs.zone_count == {"intratumoral": 3, "peritumoral": 1, "perineural": 3}
    # intratumoral = inside the tumour outlines: the tumour itself plus nerve C, its hole
    c = _nerve_at(objs, 270, 390)
    assert objs.zone_area_mm2["intratumoral"] == pytest.approx(objs.tumor_area_mm2 + c.area_um2 / 1e6, rel=0.02)
    assert objs.immune_xy[0] == pytest.approx([ORIGIN[0] + 200.5 * SCALE, ORIGIN[1] + 350.5 * SCALE])


def test_slide_metrics_are_the_design_keys_and_ratios(scene) -> None:
    _, objs = scene
    slide = SimpleNamespace(path=Path("a.svs"), mpp=0.25)
    settings = AnalysisSettings(post=PostprocessSettings(zone_um=ZONE_UM))
    m = slide_metrics(slide, objs, fake_model(), settings, 3.0)
    d = m.to_dict()
    assert tuple(d) == SlideMetrics.keys()
    assert d["nerve_count"] == 3 and d["pni_count"] == 2 and d["intratumoral_nerve_count"] == 1
    assert d["tissue_area_mm2"] == pytest.approx(0.2304)
    assert d["nerve_density_per_mm2"] == pytest.approx(3 / 0.2304)
    assert d["pni_fraction"] == pytest.approx(2 / 2)  # A is farther than ZONE_UM from tumour: not counted
    assert d["immune_density_per_mm2"] == pytest.approx(7 / 0.2304)
    assert d["immune_density_peritumoral_per_mm2"] == pytest.approx(1 / objs.zone_area_mm2["peritumoral"])


def test_without_tumour_the_ratios_that_need_it_are_none() -> None:
    nerve = np.zeros((200, 200), np.uint8)
    cv2.circle(nerve, (100, 100), 20, 1, -1)
    objs = postprocess(_output(np.zeros_like(nerve), nerve, [(10.5, 10.5)]), _tissue())
    m = slide_metrics(SimpleNamespace(path=Path("b.svs"), mpp=0.25), objs, fake_model(), AnalysisSettings(), 1.0)
    assert m.nerve_count == 1 and math.isinf(objs.nerves[0].distance_to_tumor_um)
    assert m.pni_fraction is None and m.immune_density_intratumoral_per_mm2 is None
    assert m.immune_density_peritumoral_per_mm2 is None and m.tumor_area_mm2 == 0
    assert "Distance to tumor µm" not in objs.nerves[0].measurements()


def test_specks_below_the_minimum_areas_are_not_objects() -> None:
    tumor = np.zeros((200, 200), np.uint8)
    nerve = np.zeros((200, 200), np.uint8)
    nerve[10:20, 10:20] = 1  # 25 µm²
    tumor[100:125, 100:125] = 1  # 156 µm²: under 200
    objs = postprocess(_output(tumor, nerve, []), _tissue())
    assert objs.nerves == [] and objs.tumors == []


def test_class_masks_made_in_bands_equal_the_whole_canvas_at_once(monkeypatch) -> None:
    import nervedet.postprocess as pp

    rng = np.random.default_rng(0)
    tumor = cv2.GaussianBlur(rng.random((300, 200)).astype(np.float32), (0, 0), 6)
    nerve = cv2.GaussianBlur(rng.random((300, 200)).astype(np.float32), (0, 0), 6)
    out = _output(tumor > np.median(tumor), nerve > np.median(nerve), [])
    whole = pp.class_masks(out, 2)
    monkeypatch.setattr(pp, "BAND_ROWS", 37)
    banded = pp.class_masks(out, 2)
    for name in out.class_names:
        assert whole[name].any() and np.array_equal(whole[name], banded[name])


def test_class_masks_give_each_pixel_to_its_most_probable_class_ties_to_the_earlier_and_to_background() -> None:
    import nervedet.postprocess as pp

    rng = np.random.default_rng(3)
    tumor = rng.integers(0, 256, (120, 90)).astype(np.uint8)
    nerve = np.minimum(rng.integers(0, 256, (120, 90)), 255 - tumor).astype(np.uint8)
    nerve[::4] = np.minimum(tumor[::4], 127)  # ties between the classes
    tumor[::4] = nerve[::4]
    tumor[1::5], nerve[1::5] = 85, 85  # ties with background (255 - 170 = 85)
    grid = CanvasGrid(ORIGIN, SCALE, 90, 120, 256, 32, 1, 1, ((0, 0),))
    out = InferenceOutput(grid, ("Tumor", "Nerve"), np.stack([tumor, nerve]), np.zeros((0, 2)), np.zeros(0), 0.5,
                          "fp32", 1.0)
    t, n = tumor.astype(int), nerve.astype(int)
    background = 255 - t - n
    masks = pp.class_masks(out, 0)
    assert np.array_equal(masks["Tumor"], (t >= n) & (t > background))
    assert np.array_equal(masks["Nerve"], (n > t) & (n > background))
    assert masks["Tumor"][::4].any() and not masks["Nerve"][1::5].any()


def test_nerve_candidates_of_low_mean_probability_are_dropped_as_detections_below_the_score() -> None:
    tumor = np.zeros((300, 300), np.uint8)
    nerve = np.zeros((300, 300), np.uint8)
    cv2.circle(nerve, (70, 70), 30, 230, -1)  # confident: mean probability 0.90
    cv2.circle(nerve, (220, 220), 30, 165, -1)  # argmax says nerve (0.65 > 0.35), but not with confidence
    probs = np.stack([tumor, nerve])
    grid = CanvasGrid(ORIGIN, SCALE, 300, 300, 256, 32, 2, 2, ((0, 0),))
    out = InferenceOutput(grid, ("Tumor", "Nerve"), probs, np.zeros((0, 2)), np.zeros(0), 0.5, "fp32", 1.0)
    kept = postprocess(out, _tissue(), PostprocessSettings(min_nerve_probability=0.8)).nerves
    assert [round(n.probability, 2) for n in kept] == [0.9]
    every = postprocess(out, _tissue(), PostprocessSettings(min_nerve_probability=0.0)).nerves
    assert sorted(round(n.probability, 2) for n in every) == [0.65, 0.9]


def test_the_perineural_zone_is_the_band_around_every_boundary_holes_included() -> None:
    from shapely.geometry import Polygon, box

    from nervedet.postprocess import ZONE_QUAD_SEGS, perineural_zone

    ring = Polygon(box(0, 0, 400, 400).exterior.coords, [box(100, 100, 300, 300).exterior.coords])  # a big hole
    small = box(380, 380, 460, 440)  # overlaps the first nerve's band
    thin = box(600, 0, 640, 300)  # narrower than the band is wide on both sides: all of it is in the zone
    zone = perineural_zone([ring, small, thin], 30.0)
    band = shapely.union_all([g.boundary.buffer(30.0, quad_segs=ZONE_QUAD_SEGS) for g in (ring, small, thin)])
    assert zone.symmetric_difference(band).area < 1e-6 * band.area
    inside = lambda x, y: bool(shapely.contains_xy(zone, x, y))  # noqa: E731
    assert inside(200, 120) and inside(20, 200) and inside(-20, 200)  # near the hole's ring, in the nerve, outside
    assert not inside(200, 200) and not inside(50, 50) and not inside(-40, 200)  # hole's middle, deep, far out
    assert inside(620, 150) and not inside(680, 150)  # the thin nerve's middle; beyond its band
