"""A slide's output files (QuPath GeoJSON, metrics.json, nerves.csv, overlay.png) and the cohort table.

Every file is written to a temporary name in its folder and renamed with os.replace, so a reader never
sees a partial file. metrics.json is written last: its presence means the slide's other files are complete.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import shapely
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from nervedet import classes
from nervedet.atomic import atomic_path, write_text
from nervedet.geojson import Feature, write_geojson
from nervedet.results import NERVE_MEASUREMENTS, CohortRow, SlideMetrics, SlideResult

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
NERVE_CSV_COLUMNS = ("nerve", "class", "centroid_x_px", "centroid_y_px", *NERVE_MEASUREMENTS, "intratumoral")
COHORT_METRICS = tuple(k for k in SlideMetrics.keys() if k != "slide")
COHORT_CSV_COLUMNS = ("slide", "status", "error", "output", *COHORT_METRICS)
_SHIFT = 4  # fractional bits of the OpenCV polygon coordinates
_MANY_POINTS = 5000  # above this many immune cells, draw 1-px dots
_ALPHA = 0.35  # opacity of region fills
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_ERROR_WIDTH = 90
_ID_NAMESPACE = uuid.UUID("5b0c7c3e-7c1a-4d53-9a43-6e65727665de")  # nervedet's namespace for object ids


def _write_csv(path: PathLike, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> Path:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([columns, *rows])
    return write_text(path, buf.getvalue())


def _json_safe(value: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays unwrapped, non-finite floats None."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _cell(value: Any) -> str:
    """A CSV cell: empty for None and non-finite numbers, compact numbers, booleans as 0/1."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return format(float(value), ".10g") if math.isfinite(value) else ""
    return str(value)


def _object_ids(result: SlideResult, kind: str, n: int) -> list[str]:
    """Name-based (version 5) UUIDs from the weights, the slide and the object's kind and number: the same
    run gives the same ids, so a resumed cohort's files equal an uninterrupted one's byte for byte."""
    base = uuid.uuid5(_ID_NAMESPACE, f"{result.slide_metrics.weights_sha256}/{result.stem}/{kind}")
    return [str(uuid.uuid5(base, str(i))) for i in range(n)]


def result_features(result: SlideResult) -> list[Feature]:
    """Tumour regions, nerves (``Nerve N``, with measurements) and immune-cell detections, in level-0 px."""
    tumor_ids = _object_ids(result, "tumor", len(result.tumors))
    feats = [Feature(t, "annotation", classes.TUMOR, id=fid) for t, fid in zip(result.tumors, tumor_ids)]
    nerve_ids = _object_ids(result, "nerve", len(result.nerves))
    for i, (rec, fid) in enumerate(zip(result.nerves, nerve_ids), start=1):
        cls = classes.NERVE_PNI if rec.is_pni else classes.NERVE
        feats.append(Feature(rec.geometry, "annotation", cls, rec.measurements(), name=f"Nerve {i}", id=fid))
    xy = np.asarray(result.immune_cells, dtype=float).reshape(-1, 2)
    probs = np.asarray(result.immune_probabilities, dtype=float).reshape(-1)
    if len(probs) != len(xy):
        raise ValueError(f"{result.stem}: {len(xy)} immune cells but {len(probs)} probabilities")
    for point, p, fid in zip(shapely.points(xy), probs.tolist(), _object_ids(result, "immune", len(xy))):
        feats.append(Feature(point, "detection", classes.IMMUNE, {"Probability": p}, id=fid))
    return feats


def write_metrics_json(path: PathLike, metrics: dict[str, Any]) -> Path:
    """Pretty JSON; None and non-finite numbers are null."""
    text = json.dumps(_json_safe(metrics), indent=2, allow_nan=False, ensure_ascii=False)
    return write_text(path, text + "\n")


def write_nerves_csv(path: PathLike, result: SlideResult) -> Path:
    """One row per nerve (``NERVE_CSV_COLUMNS``); centroids as QuPath shows them (level-0 minus offset)."""
    dx, dy = result.offset
    rows = []
    for i, rec in enumerate(result.nerves, start=1):
        cx, cy = rec.centroid
        m = rec.measurements()
        cls = classes.NERVE_PNI if rec.is_pni else classes.NERVE
        rows.append([str(i), cls, _cell(round(cx - dx, 2)), _cell(round(cy - dy, 2)),
                     *(_cell(m.get(k)) for k in NERVE_MEASUREMENTS), _cell(bool(rec.intratumoral))])
    return _write_csv(path, NERVE_CSV_COLUMNS, rows)


def save_result(result: SlideResult, folder: Path) -> Path:
    """Write ``<stem>.geojson``, ``nerves.csv``, ``overlay.png`` (when there is a thumbnail) and
    ``metrics.json`` into ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_geojson(folder / f"{result.stem}.geojson", result_features(result), offset=result.offset)
    write_nerves_csv(folder / "nerves.csv", result)
    overlay = render_overlay(result)
    if overlay is not None:
        write_png(folder / "overlay.png", overlay)
    write_metrics_json(folder / "metrics.json", result.metrics)
    log.info("%s: results written to %s", result.stem, folder)
    return folder


def write_png(path: PathLike, rgb: np.ndarray) -> Path:
    """Save an RGB uint8 image as PNG, atomically."""
    path = Path(path)
    with atomic_path(path, suffix=".tmp.png") as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}")
    return path


def _polygon_rings(geom: BaseGeometry, scale: float) -> list[list[np.ndarray]]:
    """Per polygon part: its exterior and holes as OpenCV fixed-point arrays (``_SHIFT`` bits)."""
    f = scale * (1 << _SHIFT)
    polygons = [p for p in shapely.get_parts(geom) if isinstance(p, Polygon) and not p.is_empty]
    return [[np.round(np.asarray(r.coords)[:, :2] * f).astype(np.int32) for r in (p.exterior, *p.interiors)]
            for p in polygons]


def _draw_regions(img: np.ndarray, geoms: Sequence[BaseGeometry], color: tuple[int, int, int],
                  scale: float, thickness: int) -> np.ndarray:
    """Semi-transparent fill (holes kept) and an opaque outline."""
    parts = [rings for g in geoms for rings in _polygon_rings(g, scale)]
    if not parts:
        return img
    layer = img.copy()
    for rings in parts:
        cv2.fillPoly(layer, rings, color, cv2.LINE_8, _SHIFT)
    img = cv2.addWeighted(layer, _ALPHA, img, 1 - _ALPHA, 0)
    for rings in parts:
        cv2.polylines(img, rings, True, color, thickness, cv2.LINE_8, _SHIFT)
    return img


def _draw_points(img: np.ndarray, xy: np.ndarray, color: tuple[int, int, int], scale: float) -> None:
    """Immune cells: 2-px-radius dots, or single pixels when there are very many."""
    pts = np.round(np.asarray(xy, dtype=float).reshape(-1, 2) * scale).astype(np.int64)
    h, w = img.shape[:2]
    pts = pts[(pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)]
    if len(pts) > _MANY_POINTS:
        img[pts[:, 1], pts[:, 0]] = color
        return
    for x, y in pts.tolist():
        cv2.circle(img, (x, y), 2, color, -1, cv2.LINE_AA)


def _draw_legend(img: np.ndarray, entries: list[tuple[str, tuple[int, int, int], int]], fs: float) -> None:
    """A white box at the top left: colour swatch, class name and count per class."""
    labels = [f"{name} ({count})" for name, _, count in entries]
    sizes = [cv2.getTextSize(t, _FONT, fs, 1)[0] for t in labels]
    th = max(s[1] for s in sizes)
    pad, row = max(3, th // 2), th + max(3, th // 2)
    box_w = pad * 3 + th + max(s[0] for s in sizes)
    box_h = pad * 2 + row * len(entries) - (row - th)
    cv2.rectangle(img, (pad, pad), (pad + box_w, pad + box_h), (255, 255, 255), -1)
    cv2.rectangle(img, (pad, pad), (pad + box_w, pad + box_h), (80, 80, 80), 1)
    for i, ((_, color, _), text) in enumerate(zip(entries, labels)):
        y = pad * 2 + i * row
        cv2.rectangle(img, (pad * 2, y), (pad * 2 + th, y + th), color, -1)
        cv2.putText(img, text, (pad * 3 + th, y + th), _FONT, fs, (0, 0, 0), 1, cv2.LINE_AA)


def _draw_scale_bar(img: np.ndarray, overlay_mpp: float, fs: float) -> None:
    """A black bar of 1, 2 or 5 × 10^k µm, about a quarter of the width, with its length (µm written "um":
    OpenCV fonts are ASCII) at the bottom left."""
    h, w = img.shape[:2]
    target = w * overlay_mpp / 4
    k = math.floor(math.log10(target))
    length_um = max(m * 10.0**k for m in (1, 2, 5) if m * 10.0**k <= target)
    bar = int(round(length_um / overlay_mpp))
    label = f"{length_um / 1000:g} mm" if length_um >= 1000 else f"{length_um:g} um"
    (tw, th), _ = cv2.getTextSize(label, _FONT, fs, 1)
    pad = max(3, th // 2)
    x0, y1 = pad, h - pad
    cv2.rectangle(img, (x0, y1 - 3 * pad - th - 3), (x0 + 2 * pad + max(bar, tw), y1), (255, 255, 255), -1)
    cv2.rectangle(img, (x0 + pad, y1 - pad - 3), (x0 + pad + bar, y1 - pad), (0, 0, 0), -1)
    cv2.putText(img, label, (x0 + pad, y1 - 2 * pad - 3), _FONT, fs, (0, 0, 0), 1, cv2.LINE_AA)


DENSITY_SIGMA_UM = 25.0  # smoothing of the immune-cell density heat map


def _draw_density(img: np.ndarray, points: np.ndarray, scale: float, overlay_mpp: float) -> np.ndarray:
    """Immune-cell density as a translucent heat map (inferno), strongest where the cells are densest."""
    pts = np.asarray(points, float).reshape(-1, 2) * scale
    h, w = img.shape[:2]
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
    if not inside.any():
        return img
    counts = np.zeros((h, w), np.float32)
    np.add.at(counts, (pts[inside, 1].astype(int), pts[inside, 0].astype(int)), 1.0)
    density = cv2.GaussianBlur(counts, (0, 0), max(DENSITY_SIGMA_UM / overlay_mpp, 1.0))
    level = density / density.max()
    heat = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)[..., ::-1]
    alpha = (0.55 * np.clip((level - 0.1) / 0.9, 0, 1))[..., None]
    return (img * (1 - alpha) + heat * alpha).astype(np.uint8)


def render_overlay(result: SlideResult) -> np.ndarray | None:
    """The thumbnail with the immune-cell density as a heat map, tumour, nerves, PNI nerves, immune cells,
    a legend and a scale bar (RGB uint8); None without a thumbnail."""
    if result.overlay is None:
        return None
    mpp = result.slide_metrics.mpp
    if not (result.overlay_mpp > 0 and mpp > 0):
        log.warning("%s: no overlay (overlay mpp %s, slide mpp %s)", result.stem, result.overlay_mpp, mpp)
        return None
    img = np.ascontiguousarray(result.overlay[..., :3], dtype=np.uint8)
    scale = mpp / result.overlay_mpp
    line = max(1, round(max(img.shape[:2]) / 1000))
    colors = classes.CLASS_COLORS
    pni = [n.geometry for n in result.nerves if n.is_pni]
    plain = [n.geometry for n in result.nerves if not n.is_pni]
    img = _draw_density(img, result.immune_cells, scale, result.overlay_mpp)
    img = _draw_regions(img, result.tumors, colors[classes.TUMOR], scale, line)
    img = _draw_regions(img, plain, colors[classes.NERVE], scale, line)
    img = _draw_regions(img, pni, colors[classes.NERVE_PNI], scale, 2 * line + 1)
    _draw_points(img, result.immune_cells, colors[classes.IMMUNE], scale)
    n_immune = len(np.asarray(result.immune_cells).reshape(-1, 2))
    entries = [(classes.TUMOR, len(result.tumors)), (classes.NERVE, len(plain)), (classes.NERVE_PNI, len(pni)),
               (classes.IMMUNE, n_immune)]
    fs = float(np.clip(min(img.shape[:2]) / 600, 0.3, 0.8))
    _draw_legend(img, [(name, colors[name], count) for name, count in entries], fs)
    _draw_scale_bar(img, result.overlay_mpp, fs)
    return img


def write_cohort_csv(path: PathLike, rows: list[CohortRow]) -> Path:
    """One row per slide: ``COHORT_CSV_COLUMNS``; slides with an error have empty metric cells."""
    out = []
    for r in rows:
        m = {} if r.status == "error" or r.metrics is None else r.metrics
        out.append([r.slide, r.status, r.error, r.output, *(_cell(m.get(k)) for k in COHORT_METRICS)])
    return _write_csv(path, COHORT_CSV_COLUMNS, out)


_SUMMARY = (("nerves", "nerve_count", "d"), ("PNI", "pni_count", "d"), ("nerves/mm²", "nerve_density_per_mm2", ".1f"),
            ("immune cells", "immune_cell_count", "d"),
            ("immune/mm² intratumoral", "immune_density_intratumoral_per_mm2", ".1f"), ("time s", "runtime_s", ".1f"))


def _summary_cells(row: CohortRow) -> list[str]:
    m = row.metrics or {}
    cells = []
    for _, key, fmt in _SUMMARY:
        v = m.get(key)
        ok = isinstance(v, (int, float)) and math.isfinite(v)
        cells.append(format(int(v) if fmt == "d" else v, fmt) if ok else "-")
    return cells


_COUNTED = (("done", "done"), ("skipped", "skipped"), ("error", "failed"))


def summary_table(rows: list[CohortRow]) -> str:
    """A fixed-width text table of a cohort run, with a final line of done / skipped / failed (error) counts."""
    head = ["slide", "status", *(name for name, _, _ in _SUMMARY)]
    body = [[Path(r.slide).name, r.status, *([] if r.status == "error" else _summary_cells(r))] for r in rows]
    widths = [max(len(c[i]) for c in [head, *body] if len(c) > i) for i in range(len(head))]
    lines = []
    for cells, r in zip([head, *body], [None, *rows]):
        text = [c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(cells)]
        if r is not None and r.status == "error":
            error = " ".join(r.error.replace(r.slide, Path(r.slide).name).split()) or "unknown"
            text.append("error: " + (error if len(error) <= _ERROR_WIDTH else error[: _ERROR_WIDTH - 1] + "…"))
        lines.append("  ".join(text).rstrip())
    counts = {word: sum(r.status == s for r in rows) for s, word in _COUNTED}
    lines.append(f"{len(rows)} slides: " + ", ".join(f"{n} {word}" for word, n in counts.items()))
    return "\n".join(lines)
