"""The one PNI rule: grades 0-3 from geometry, in µm whatever the pixel size."""

from __future__ import annotations

import math

import pytest
from shapely.geometry import Point, Polygon, box

from nervedet.pni import PniSettings, fill_holes, grade_nerve


def _arc(cx: float, cy: float, r_in: float, r_out: float, frac: float) -> Polygon:
    """A band around a circle covering ``frac`` of the full turn."""
    n = 200
    outer = [(cx + r_out * math.cos(2 * math.pi * frac * i / n), cy + r_out * math.sin(2 * math.pi * frac * i / n))
             for i in range(n + 1)]
    inner = [(cx + r_in * math.cos(2 * math.pi * frac * i / n), cy + r_in * math.sin(2 * math.pi * frac * i / n))
             for i in range(n, -1, -1)]
    return Polygon(outer + inner)


NERVE = Point(0, 0).buffer(100, quad_segs=64)  # 100 px radius


@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_tumour_inside_the_nerve_is_grade_3(mpp: float) -> None:
    tumour = Point(10, 0).buffer(40 / mpp / 4)
    res = grade_nerve(NERVE, tumour, mpp)
    assert res.grade == 3 and res.is_pni
    assert res.intraneural_um2 == pytest.approx(tumour.area * mpp * mpp, rel=0.01)


def test_segmented_nerve_with_a_hole_where_tumour_sits_is_still_intraneural() -> None:
    tumour = Point(0, 0).buffer(30)
    holed = NERVE.difference(tumour)
    assert holed.intersection(tumour).area < 1e-6
    assert grade_nerve(holed, tumour, 0.5).grade == 3
    assert fill_holes(holed).area == pytest.approx(NERVE.area)


@pytest.mark.parametrize(("frac", "grade"), [(0.60, 2), (0.33, 2), (0.22, 1), (0.10, 1)])
def test_encirclement_sets_grade_2_at_a_third_of_the_circumference(frac: float, grade: int) -> None:
    mpp = 0.5
    tumour = _arc(0, 0, 100 + 2 / mpp, 100 + 30 / mpp, frac)  # 2 µm off the nerve, 28 µm thick
    res = grade_nerve(NERVE, tumour, mpp)
    assert res.grade == grade
    # the band is close along its own arc plus a little at its two ends
    assert frac <= res.encirclement < frac + 0.08


def test_distance_decides_between_grade_1_and_0_in_micrometres() -> None:
    # a nest 8 µm away is "close" (10 µm default); 15 µm away is not; 15 µm is close when close_um=20
    for mpp in (0.25, 0.5):
        near = Point(100 + 8 / mpp + 20, 0).buffer(20)
        far = Point(100 + 15 / mpp + 20, 0).buffer(20)
        assert grade_nerve(NERVE, near, mpp).grade == 1
        res = grade_nerve(NERVE, far, mpp)
        assert res.grade == 0 and res.distance_um == pytest.approx(15, abs=0.2)
        assert grade_nerve(NERVE, far, mpp, PniSettings(close_um=20)).grade == 1


def test_no_tumour_is_grade_0_with_infinite_distance() -> None:
    for tumour in (None, Polygon()):
        res = grade_nerve(NERVE, tumour, 0.5)
        assert res.grade == 0 and res.encirclement == 0 and math.isinf(res.distance_um)


def test_a_sliver_of_overlap_is_not_intraneural() -> None:
    # a boundary-hugging tumour that overlaps the nerve by a hair (segmentation noise) is graded by encirclement
    tumour = box(-200, 99.5, 200, 140)
    res = grade_nerve(NERVE, tumour, 0.5)
    assert res.grade in (1, 2) and res.intraneural_um2 < PniSettings().min_intraneural_um2


def test_tumour_in_a_notch_of_the_segmented_nerve_is_still_intraneural() -> None:
    # at 0.5 µm/px: a nerve of radius 50 µm with tumour (radius 15 µm) at its centre, reaching its edge by a
    # 16 µm-wide channel, so the segmented nerve is a C, not a ring with a hole
    tumour = Point(0, 0).buffer(30).union(box(0, -16, 100, 16))
    nerve = NERVE.difference(tumour)
    assert len(nerve.interiors) == 0  # the notch opens the hole
    res = grade_nerve(nerve, tumour, 0.5)
    assert res.grade == 3 and res.intraneural_um2 > 700
    wide = NERVE.difference(box(-200, -60, 200, 200))  # a nerve cut by a straight edge has no notch to close
    assert grade_nerve(wide, box(-200, -60, 200, 200).difference(NERVE.buffer(-5)), 0.5).intraneural_um2 < 50
