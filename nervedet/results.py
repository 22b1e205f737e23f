"""The typed results of one slide's analysis: nerves, tumour regions, immune cells and the slide metrics.

Geometries and points are level-0 pixels of the slide as OpenSlide shows it (the GeoJSON writer subtracts
QuPath's offset). :class:`SlideResult` is what :func:`nervedet.analyze_slide` returns.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from shapely.geometry.base import BaseGeometry

# DESIGN.md's per-nerve measurement names (GeoJSON `measurements`, nerves.csv columns)
NERVE_MEASUREMENTS = ("Area µm^2", "Perimeter µm", "Min diameter µm", "Max diameter µm", "Nerve probability",
                      "Tumor encirclement %", "Distance to tumor µm", "PNI grade", "Immune cells within 100 µm")


@dataclass(frozen=True)
class NerveRecord:
    """One nerve: its outline (level-0 px, holes kept) and its measurements."""

    geometry: BaseGeometry
    area_um2: float
    perimeter_um: float
    min_diameter_um: float
    max_diameter_um: float
    probability: float  # mean nerve probability of its pixels
    encirclement: float  # fraction of the boundary within the PNI "close" distance of tumour, 0..1
    distance_to_tumor_um: float  # inf without tumour
    pni_grade: int  # 0..3 (pni.grade_nerve)
    immune_within_100um: int
    intratumoral: bool  # lies inside a tumour region's outline

    @property
    def is_pni(self) -> bool:
        return self.pni_grade >= 2

    @property
    def centroid(self) -> tuple[float, float]:
        c = self.geometry.centroid
        return float(c.x), float(c.y)

    def measurements(self) -> dict[str, float]:
        """DESIGN.md's measurements, finite numbers only (no distance without tumour)."""
        values = (self.area_um2, self.perimeter_um, self.min_diameter_um, self.max_diameter_um, self.probability,
                  100.0 * self.encirclement, self.distance_to_tumor_um, float(self.pni_grade),
                  float(self.immune_within_100um))
        return {k: float(v) for k, v in zip(NERVE_MEASUREMENTS, values) if math.isfinite(v)}


@dataclass(frozen=True)
class SlideMetrics:
    """metrics.json: DESIGN.md's keys. Ratios with nothing to divide by are None (null in JSON)."""

    slide: str
    mpp: float
    analysis_mpp: float
    tissue_area_mm2: float
    tumor_area_mm2: float
    nerve_count: int
    nerve_density_per_mm2: float | None  # nerves per mm² of tissue
    intratumoral_nerve_count: int
    nerve_area_fraction: float | None  # nerve area / tissue area
    median_nerve_min_diameter_um: float | None
    pni_count: int
    pni_fraction: float | None  # PNI nerves / nerves within 100 µm of tumour
    immune_cell_count: int
    immune_density_per_mm2: float | None
    immune_density_intratumoral_per_mm2: float | None
    immune_density_peritumoral_per_mm2: float | None
    immune_density_perineural_per_mm2: float | None
    weights_sha256: str
    nervedet_version: str
    runtime_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True, eq=False)
class SlideResult:
    """Everything found on one slide. ``save(folder)`` writes the files `nervedet infer` writes."""

    slide_path: Path
    stem: str
    slide_metrics: SlideMetrics
    nerves: list[NerveRecord]
    tumors: list[BaseGeometry]
    immune_cells: np.ndarray  # (N, 2) level-0 px x, y
    immune_probabilities: np.ndarray  # (N,)
    offset: tuple[int, int] = (0, 0)  # openslide.bounds-x/y: QuPath shows the image cropped to it
    overlay: np.ndarray | None = field(default=None, repr=False)  # RGB thumbnail for overlay.png
    overlay_mpp: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)  # what made it (for resuming a cohort)

    @property
    def metrics(self) -> dict[str, Any]:
        """The metrics.json keys and values."""
        return self.slide_metrics.to_dict()

    def save(self, folder: str | Path) -> Path:
        """Write ``<stem>.geojson``, ``metrics.json``, ``nerves.csv`` and ``overlay.png`` into ``folder``."""
        from nervedet.report import save_result

        return save_result(self, Path(folder))


COHORT_STATUSES = ("done", "skipped", "error")


@dataclass(frozen=True)
class CohortRow:
    """One slide of a cohort run: "done", "skipped" (outputs already complete) or "error" (with the message).

    ``output`` is the slide's output folder; ``metrics`` its metrics.json dict (None when it failed)."""

    slide: str
    status: str
    output: str
    error: str = ""
    metrics: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.status not in COHORT_STATUSES:
            raise ValueError(f"cohort status {self.status!r} is not one of {COHORT_STATUSES}")
