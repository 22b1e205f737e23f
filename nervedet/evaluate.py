"""Comparison of predicted QuPath GeoJSON with GeoJSON truth (the `nervedet evaluate` keys of DESIGN.md).

Labelled area: the union of the truth's ``Region*`` annotations and its unclassified polygonal annotations;
when the truth has none, everywhere. Only objects inside it count: nerves by their centroid, immune cells
by their point, and Dice pixels by their centre.

- ``dice_nerve`` (classes ``Nerve``, ``Nerve: PNI``, ``Nerve: *`` together) and ``dice_tumor`` (``Tumor``):
  pixels of the analysis mpp inside the labelled area; Dice = 2|P∩T| / (|P| + |T|), 1.0 when both are empty.
- ``nerve_*``: a predicted nerve matches a truth nerve at IoU >= 0.5, one-to-one (greedy by IoU).
- ``pni_*`` (over nerves, by class ``Nerve: PNI``): TP = predicted PNI nerve matched to a truth PNI nerve;
  FP = the other predicted PNI nerves; FN = the other truth PNI nerves.
- ``immune_*``: points (or centroids) of class ``Immune cells``, matched one-to-one within 3 µm (maximum
  bipartite matching); ``immune_count_*`` count the cells inside the labelled area.

Empty denominators, so that truth compared with itself gives 1.0 everywhere:
precision = tp / (tp + fp), or 1.0 when tp + fp == 0 and fn == 0, else 0.0; recall likewise with
tp + fn and fp; F1 = 2tp / (2tp + fp + fn), or 1.0 when that denominator is 0.
``mean`` pools the raw counts of all slides (micro-average); it is not the mean of the slides' ratios.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import MultiPoint, Point
from shapely.geometry.base import BaseGeometry

from nervedet import classes
from nervedet.atomic import write_text
from nervedet.geojson import Feature, clean_polygonal, read_geojson
from nervedet.matching import (
    MatchCounts,
    OverlapCounts,
    match_by_iou,
    match_points,
    polygon_parts,
    raster_overlap,
)
from nervedet.paths import SLIDE_EXTENSIONS, slide_stem

log = logging.getLogger(__name__)

KEYS = (
    "dice_nerve", "dice_tumor", "nerve_precision", "nerve_recall", "nerve_f1", "pni_precision", "pni_recall",
    "pni_f1", "immune_precision", "immune_recall", "immune_f1", "immune_count_truth", "immune_count_pred",
)
GEOJSON_SUFFIXES = (".geojson.gz", ".geojson")


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated (missing files, no pairs, unknown pixel size)."""


@dataclass(frozen=True)
class EvalSettings:
    nerve_iou: float = 0.5  # IoU at which a predicted nerve matches a truth nerve
    immune_radius_um: float = 3.0  # a detection matches a truth cell within this distance
    chunk_px: int = 2048  # Dice rasterisation tile, in analysis pixels


@dataclass
class SlideCounts:
    """The raw counts of one slide (or, summed, of several)."""

    nerve_pixels: OverlapCounts = field(default_factory=OverlapCounts)
    tumor_pixels: OverlapCounts = field(default_factory=OverlapCounts)
    nerves: MatchCounts = field(default_factory=MatchCounts)
    pni: MatchCounts = field(default_factory=MatchCounts)
    immune: MatchCounts = field(default_factory=MatchCounts)

    def __add__(self, other: SlideCounts) -> SlideCounts:
        return SlideCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def metrics(self) -> dict[str, float | int]:
        """The DESIGN.md evaluate keys, in order."""
        out: dict[str, float | int] = {"dice_nerve": self.nerve_pixels.dice, "dice_tumor": self.tumor_pixels.dice}
        for name, counts in (("nerve", self.nerves), ("pni", self.pni), ("immune", self.immune)):
            out.update({f"{name}_precision": counts.precision, f"{name}_recall": counts.recall,
                        f"{name}_f1": counts.f1})
        out["immune_count_truth"] = self.immune.tp + self.immune.fn
        out["immune_count_pred"] = self.immune.tp + self.immune.fp
        return out


@dataclass
class EvaluationReport:
    slides: dict[str, SlideCounts] = field(default_factory=dict)

    @property
    def pooled(self) -> SlideCounts:
        return sum(self.slides.values(), SlideCounts())

    def to_dict(self) -> dict[str, dict]:
        return {"mean": self.pooled.metrics(), "slides": {s: c.metrics() for s, c in self.slides.items()}}


# ---------------------------------------------------------------- one slide


@dataclass
class _Objects:
    nerves: list[BaseGeometry] = field(default_factory=list)
    nerve_is_pni: list[bool] = field(default_factory=list)
    tumors: list[BaseGeometry] = field(default_factory=list)
    immune: list[tuple[float, float]] = field(default_factory=list)


def _collect(features: list[Feature]) -> _Objects:
    objs = _Objects()
    for f in features:
        cls = f.classification
        if cls == classes.IMMUNE:
            g = f.geometry
            if isinstance(g, Point) and not g.is_empty:
                objs.immune.append((g.x, g.y))
            elif isinstance(g, MultiPoint):
                objs.immune.extend(map(tuple, shapely.get_coordinates(g)))
            elif g is not None and not g.is_empty:
                c = g.centroid
                objs.immune.append((c.x, c.y))
        elif classes.is_nerve(cls) or cls == classes.TUMOR:
            g = clean_polygonal(f.geometry, grid_size=None)
            if g is None:
                log.debug("feature %s (%s) is not polygonal; ignored", f.id, cls)
            elif cls == classes.TUMOR:
                objs.tumors.append(g)
            else:
                objs.nerves.append(g)
                objs.nerve_is_pni.append(cls == classes.NERVE_PNI)
    return objs


def labelled_area(truth: list[Feature]) -> BaseGeometry | None:
    """Union of the truth's Region* and unclassified polygonal annotations; None means everywhere."""
    regions = [
        f.geometry for f in truth
        if f.object_type == "annotation" and (classes.is_region(f.classification) or not f.classification)
    ]
    parts = [g for g in (clean_polygonal(r, grid_size=None) for r in regions) if g is not None]
    return shapely.union_all(parts) if parts else None


def _inside(area: BaseGeometry | None, xy: np.ndarray) -> np.ndarray:
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    if area is None:
        return np.ones(len(xy), dtype=bool)
    return shapely.intersects_xy(area, xy[:, 0], xy[:, 1])


def _nerves_inside(objs: _Objects, area: BaseGeometry | None) -> tuple[list[BaseGeometry], np.ndarray]:
    centroids = shapely.get_coordinates(shapely.centroid(np.asarray(objs.nerves, dtype=object)))
    keep = _inside(area, centroids)
    return [g for g, k in zip(objs.nerves, keep) if k], np.asarray(objs.nerve_is_pni, dtype=bool)[keep]


def evaluate_slide(pred: list[Feature], truth: list[Feature], mpp: float, analysis_mpp: float = 0.5,
                   settings: EvalSettings = EvalSettings()) -> SlideCounts:
    """Counts of one slide; coordinates are level-0 px of pixel size ``mpp`` µm."""
    if not (mpp > 0 and math.isfinite(mpp) and analysis_mpp > 0 and math.isfinite(analysis_mpp)):
        raise EvaluationError(f"pixel sizes must be positive: mpp={mpp}, analysis_mpp={analysis_mpp}")
    area = labelled_area(truth)
    if area is not None:
        shapely.prepare(area)
    p, t = _collect(pred), _collect(truth)
    counts = SlideCounts()

    scale = mpp / analysis_mpp
    area_parts = None if area is None else polygon_parts([area])
    for name, p_geoms, t_geoms in (("nerve_pixels", p.nerves, t.nerves), ("tumor_pixels", p.tumors, t.tumors)):
        overlap = raster_overlap(polygon_parts(p_geoms), polygon_parts(t_geoms), area_parts, scale,
                                 settings.chunk_px)
        setattr(counts, name, overlap)

    p_nerves, p_pni = _nerves_inside(p, area)
    t_nerves, t_pni = _nerves_inside(t, area)
    matches = match_by_iou(p_nerves, t_nerves, settings.nerve_iou)
    counts.nerves = MatchCounts(len(matches), len(p_nerves) - len(matches), len(t_nerves) - len(matches))
    pni_tp = sum(1 for i, j, _ in matches if p_pni[i] and t_pni[j])
    counts.pni = MatchCounts(pni_tp, int(p_pni.sum()) - pni_tp, int(t_pni.sum()) - pni_tp)

    p_cells = np.asarray(p.immune, dtype=float).reshape(-1, 2)
    t_cells = np.asarray(t.immune, dtype=float).reshape(-1, 2)
    p_cells, t_cells = p_cells[_inside(area, p_cells)], t_cells[_inside(area, t_cells)]
    n = match_points(p_cells, t_cells, settings.immune_radius_um / mpp)
    counts.immune = MatchCounts(n, len(p_cells) - n, len(t_cells) - n)
    return counts


# ---------------------------------------------------------------- files and folders


def geojson_stem(path: Path) -> str:
    name = path.name
    for suffix in (*GEOJSON_SUFFIXES, ".json.gz", ".json", ".gz"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return path.stem


def _is_geojson(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(GEOJSON_SUFFIXES) and not path.name.startswith(".")


def _scan(folder: Path) -> dict[str, Path]:
    """``stem -> file`` for ``folder/x.geojson[.gz]`` and the inference layout ``folder/x/x.geojson[.gz]``."""
    found: dict[str, Path] = {}
    entries = sorted(folder.iterdir())
    for p in entries:  # x.geojson sorts before x.geojson.gz, so the plain file wins
        if _is_geojson(p):
            found.setdefault(geojson_stem(p), p)
    for d in entries:
        if d.is_dir():
            for name in (f"{d.name}.geojson", f"{d.name}.geojson.gz"):
                if _is_geojson(d / name):
                    if d.name in found:
                        log.warning("%s: both %s and %s; using the first", d.name, found[d.name], d / name)
                    found.setdefault(d.name, d / name)
                    break
    return found


@dataclass(frozen=True)
class SlidePair:
    stem: str
    pred: Path | None  # None: no prediction, evaluated as an empty one
    truth: Path


def pair_paths(pred: Path, truth: Path) -> list[SlidePair]:
    """Pairs of prediction and truth files; folders are matched by stem."""
    pred, truth = Path(pred), Path(truth)
    for p in (pred, truth):
        if not p.exists():
            raise EvaluationError(f"{p}: no such file or folder")
    if pred.is_file() and truth.is_file():
        return [SlidePair(geojson_stem(truth), pred, truth)]
    truths = {geojson_stem(truth): truth} if truth.is_file() else _scan(truth)
    preds = {geojson_stem(pred): pred} if pred.is_file() else _scan(pred)
    if not truths:
        raise EvaluationError(f"{truth}: no .geojson or .geojson.gz files")
    pairs = []
    for stem, t in truths.items():
        if stem not in preds:
            log.warning("%s: no prediction for this truth in %s; counted as an empty prediction", t, pred)
        pairs.append(SlidePair(stem, preds.get(stem), t))
    for stem in sorted(set(preds) - set(truths)):
        log.warning("%s: no truth named %s in %s; ignored", preds[stem], stem, truth)
    if not any(pair.pred for pair in pairs):
        raise EvaluationError(f"no prediction in {pred} matches a truth in {truth} by name")
    return pairs


def _mpp_of_slide(pair: SlidePair) -> float | None:
    """The pixel size of a slide next to the truth with the same stem, if one opens and knows it."""
    for ext in SLIDE_EXTENSIONS:
        for path in (pair.truth.with_name(pair.stem + ext), pair.truth.with_name(pair.stem + ext.upper())):
            if not path.is_file():
                continue
            from nervedet.slide import open_slide  # lazily: evaluation needs no slide reader otherwise

            try:
                with open_slide(path) as slide:
                    value = slide.mpp
            except Exception as e:  # noqa: BLE001 - an unreadable slide falls through to metrics.json
                log.warning("%s: cannot read the pixel size (%s)", path, e)
                continue
            if _positive(value):
                return float(value)
    return None


def _mpp_of_metrics(pair: SlidePair) -> float | None:
    """``mpp`` of the ``metrics.json`` next to the prediction, if it is about the same slide."""
    path = None if pair.pred is None else pair.pred.parent / "metrics.json"
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s)", path, e)
        return None
    if not isinstance(data, dict):
        return None
    slide = data.get("slide")
    if slide is not None and slide_stem(str(slide)) != pair.stem:
        return None
    return float(data["mpp"]) if _positive(data.get("mpp")) else None


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def resolve_mpp(pair: SlidePair, mpp: float | None = None) -> float:
    """``mpp`` if given, else the slide next to the truth, else ``metrics.json`` next to the prediction."""
    value = mpp if mpp is not None else _mpp_of_slide(pair) or _mpp_of_metrics(pair)
    if value is None:
        raise EvaluationError(f"{pair.truth}: cannot tell the pixel size; give --mpp")
    return float(value)


def evaluate_paths(pred: str | os.PathLike[str], truth: str | os.PathLike[str], mpp: float | None = None,
                   analysis_mpp: float = 0.5, settings: EvalSettings = EvalSettings()) -> EvaluationReport:
    """Evaluate prediction file(s) against truth file(s); folders are matched by stem."""
    report = EvaluationReport()
    for pair in pair_paths(Path(pred), Path(truth)):
        slide_mpp = resolve_mpp(pair, mpp)
        truth_features = read_geojson(pair.truth)
        pred_features = read_geojson(pair.pred) if pair.pred is not None else []
        counts = evaluate_slide(pred_features, truth_features, slide_mpp, analysis_mpp, settings)
        report.slides[pair.stem] = counts
        log.info("%s (%.4g µm/px): nerves %s, PNI %s, immune cells %s", pair.stem, slide_mpp, counts.nerves,
                 counts.pni, counts.immune)
    return report


# ---------------------------------------------------------------- output


def write_report(report: EvaluationReport, path: str | os.PathLike[str]) -> Path:
    """Write ``report.to_dict()`` as JSON, atomically (temporary file + os.replace)."""
    return write_text(path, json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")


_SUFFIXES = (("_precision", "_P"), ("_recall", "_R"), ("_f1", "_F1"), ("_count", ""))
_HEADERS = {k: next((k.replace(a, b) for a, b in _SUFFIXES if a in k), k) for k in KEYS}


def format_table(report: EvaluationReport) -> str:
    """A fixed-width table: one row per slide, then the pooled mean."""
    rows = [(stem, counts.metrics()) for stem, counts in report.slides.items()]
    rows.append(("mean (pooled)", report.pooled.metrics()))
    first = max(len("slide"), *(len(stem) for stem, _ in rows))
    widths = {k: max(len(h), 6) for k, h in _HEADERS.items()}

    def cell(key: str, value: float) -> str:
        text = str(value) if isinstance(value, int) else f"{value:.3f}"
        return text.rjust(widths[key])

    lines = ["  ".join(["slide".ljust(first), *(_HEADERS[k].rjust(widths[k]) for k in KEYS)])]
    for i, (stem, values) in enumerate(rows):
        if i == len(rows) - 1:
            lines.append("-" * len(lines[0]))
        lines.append("  ".join([stem.ljust(first), *(cell(k, values[k]) for k in KEYS)]))
    return "\n".join(lines)
