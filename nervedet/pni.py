"""The one perineural-invasion rule (Liebig et al., Cancer 2009).

Grade 3: tumour inside the nerve (any sheath layer), i.e. tumour overlapping the nerve's outline (holes
filled, notches narrower than 2 × ``close_um`` closed) by at least ``min_intraneural_um2``.
Grade 2: tumour within ``close_um`` of at least 33% of the nerve's circumference.
Grade 1: tumour within ``close_um`` of some of it, under 33%. Grade 0: no tumour that close.
PNI means grade 2 or 3. Inference, the synthetic ground truth and evaluation all call :func:`grade_nerve`.
"""

from __future__ import annotations

from dataclasses import dataclass

import shapely
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

ENCIRCLEMENT_THRESHOLD = 0.33


@dataclass(frozen=True)
class PniSettings:
    close_um: float = 10.0  # "close proximity" in µm
    min_intraneural_um2: float = 50.0  # overlap that counts as tumour inside the nerve (about one tumour cell)
    encirclement_threshold: float = ENCIRCLEMENT_THRESHOLD


@dataclass(frozen=True)
class PniResult:
    grade: int  # 0..3
    encirclement: float  # fraction of the nerve boundary within close_um of tumour, 0..1
    distance_um: float  # shortest distance from nerve to tumour (0 when touching); inf without tumour
    intraneural_um2: float  # area of tumour inside the nerve

    @property
    def is_pni(self) -> bool:
        return self.grade >= 2


def grade_nerve(
    nerve: BaseGeometry,
    tumor: BaseGeometry | None,
    mpp: float,
    settings: PniSettings = PniSettings(),
) -> PniResult:
    """Grade one nerve against the tumour (both in pixel coordinates of pixel size ``mpp`` µm)."""
    if tumor is None or tumor.is_empty or nerve.is_empty:
        return PniResult(0, 0.0, float("inf"), 0.0)
    # A segmented nerve has a hole where tumour sits inside it, or a notch where that tumour reaches its edge:
    # grade against the outline with holes filled and notches narrower than twice close_um closed.
    close_px = settings.close_um / mpp
    nerve = fill_holes(nerve)
    distance_um = float(nerve.distance(tumor)) * mpp
    if distance_um > settings.close_um:
        return PniResult(0, 0.0, distance_um, 0.0)
    solid = fill_holes(nerve.buffer(close_px, join_style="round").buffer(-close_px, join_style="round"))
    solid = solid if not solid.is_empty else nerve
    # Only the tumour near this nerve matters: clip first so the overlay work stays local.
    local = tumor.intersection(nerve.buffer(close_px * 2 + 1))
    inside_um2 = float(local.intersection(solid).area) * mpp * mpp
    boundary = nerve.boundary
    near = boundary.intersection(local.buffer(close_px))
    encirclement = min(1.0, float(near.length) / float(boundary.length)) if boundary.length > 0 else 0.0
    if inside_um2 >= settings.min_intraneural_um2:
        grade = 3
    elif encirclement >= settings.encirclement_threshold:
        grade = 2
    elif encirclement > 0.0 or distance_um <= settings.close_um:
        grade = 1
    else:
        grade = 0
    return PniResult(grade, encirclement, distance_um, inside_um2)


def fill_holes(geom: BaseGeometry) -> BaseGeometry:
    """The geometry with the holes of its polygons filled."""
    parts = [Polygon(p.exterior) for p in getattr(geom, "geoms", [geom]) if isinstance(p, Polygon)]
    if not parts:
        return geom
    return parts[0] if len(parts) == 1 else shapely.union_all(parts)


def tumor_union(tumors: list[BaseGeometry]) -> BaseGeometry | None:
    """Union of tumour regions for grading (None when there is no tumour)."""
    parts = [t for t in tumors if t is not None and not t.is_empty]
    return shapely.union_all(parts) if parts else None
