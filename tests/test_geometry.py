"""Mask to polygons (pixel-exact areas, holes kept or filled) and Feret diameters."""

from __future__ import annotations

import math

import numpy as np
from shapely.geometry import Point, box

from nervedet.geometry import from_level0, mask_to_polygons, max_feret, min_feret, to_level0


def test_a_square_region_becomes_a_polygon_covering_its_pixels() -> None:
    m = np.zeros((30, 30), bool)
    m[5:15, 8:20] = True
    (p,) = mask_to_polygons(m)
    assert math.isclose(p.area, 120, rel_tol=1e-6)
    assert p.bounds == (8.0, 5.0, 20.0, 15.0)


def test_holes_are_kept_and_small_holes_filled() -> None:
    m = np.zeros((40, 40), bool)
    m[5:35, 5:35] = True
    m[10:20, 10:20] = False  # 100 px hole
    m[25, 25] = False  # 1 px hole
    (kept,) = mask_to_polygons(m, min_hole_px=0)
    assert len(kept.interiors) == 2 and math.isclose(kept.area, 900 - 100 - 1, abs_tol=0.5)
    (filled,) = mask_to_polygons(m, min_hole_px=5)
    assert len(filled.interiors) == 1 and math.isclose(filled.area, 800, abs_tol=0.5)


def test_regions_smaller_than_the_minimum_are_dropped_and_separate_regions_stay_separate() -> None:
    m = np.zeros((40, 40), bool)
    m[2:12, 2:12] = True
    m[20:30, 20:30] = True
    m[35, 35] = True
    assert len(mask_to_polygons(m)) == 3
    polys = mask_to_polygons(m, min_area_px=50)
    assert sorted(round(p.area) for p in polys) == [100, 100]


def test_feret_diameters_of_a_rectangle_and_a_disk() -> None:
    r = box(0, 0, 40, 10)
    assert math.isclose(min_feret(r), 10, rel_tol=1e-6)
    assert math.isclose(max_feret(r), math.hypot(40, 10), rel_tol=1e-6)
    d = Point(0, 0).buffer(20, 256)
    assert math.isclose(min_feret(d), 40, rel_tol=0.01) and math.isclose(max_feret(d), 40, rel_tol=0.01)


def test_level0_transform_round_trips() -> None:
    g = box(1, 2, 5, 9)
    g0 = to_level0(g, (100.0, 50.0), 2.0)
    assert g0.bounds == (102.0, 54.0, 110.0, 68.0)
    assert from_level0(g0, (100.0, 50.0), 2.0).equals(g)


def test_an_island_in_a_hole_is_its_own_region() -> None:
    m = np.zeros((50, 50), bool)
    m[5:45, 5:45] = True
    m[10:40, 10:40] = False
    m[20:30, 20:30] = True  # island inside the lake
    polys = sorted(mask_to_polygons(m), key=lambda p: p.area)
    assert [round(p.area) for p in polys] == [100, 1600 - 900]
    assert len(polys[1].interiors) == 1 and polys[1].contains(polys[0].centroid) is False
