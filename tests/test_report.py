"""Output files of one slide (GeoJSON, metrics.json, nerves.csv, overlay.png) and the cohort table."""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from shapely.geometry import Point, Polygon, box

from nervedet import classes, report
from nervedet.geojson import read_geojson
from nervedet.results import NERVE_MEASUREMENTS, CohortRow, NerveRecord, SlideMetrics, SlideResult
from tests.qupath_checks import check_qupath_geojson

OFFSET = (100, 50)
MPP, OVERLAY_MPP = 0.5, 8.0  # thumbnail px = level-0 px / 16
IMMUNE = np.array([[4000.0, 2800.0], [4100.0, 2850.0], [4200.0, 2900.0], [1000.0, 600.0]])


def _metrics(**changes) -> SlideMetrics:
    values = dict(
        slide="slide_a", mpp=MPP, analysis_mpp=0.5, tissue_area_mm2=3.5, tumor_area_mm2=0.38, nerve_count=2,
        nerve_density_per_mm2=0.571, intratumoral_nerve_count=1, nerve_area_fraction=0.01,
        median_nerve_min_diameter_um=130.0, pni_count=1, pni_fraction=None, immune_cell_count=4,
        immune_density_per_mm2=1.14, immune_density_intratumoral_per_mm2=float("nan"),
        immune_density_peritumoral_per_mm2=2.5, immune_density_perineural_per_mm2=0.0,
        weights_sha256="ab" * 32, nervedet_version="0.1.0", runtime_s=12.34,
    )
    return SlideMetrics(**{**values, **changes})


def _nerve(center: tuple[float, float], radius: float, grade: int, distance: float, inside: bool) -> NerveRecord:
    return NerveRecord(
        geometry=Point(center).buffer(radius), area_um2=math.pi * (radius * MPP) ** 2,
        perimeter_um=2 * math.pi * radius * MPP, min_diameter_um=2 * radius * MPP, max_diameter_um=2 * radius * MPP,
        probability=0.9, encirclement=0.5 if grade else 0.0, distance_to_tumor_um=distance, pni_grade=grade,
        immune_within_100um=3, intratumoral=inside,
    )


@pytest.fixture
def result() -> SlideResult:
    plain = _nerve((1600.0, 2400.0), 150.0, 0, math.inf, False)  # thumbnail (100, 150), no tumour
    pni = _nerve((3200.0, 1600.0), 120.0, 2, 0.0, True)  # thumbnail (200, 100), inside the tumour
    tumor = Polygon(box(3000, 1000, 4400, 2200).exterior.coords, [box(3400, 1400, 3800, 1800).exterior.coords])
    return SlideResult(
        slide_path=Path("slide_a.svs"), stem="slide_a", slide_metrics=_metrics(), nerves=[plain, pni],
        tumors=[tumor], immune_cells=IMMUNE.copy(), immune_probabilities=np.array([0.9, 0.8, 0.7, 0.6]),
        offset=OFFSET, overlay=np.full((200, 300, 3), 255, np.uint8), overlay_mpp=OVERLAY_MPP,
    )


@pytest.fixture
def saved(result: SlideResult, tmp_path: Path) -> Path:
    return result.save(tmp_path / "out" / "slide_a")


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _overlay_rgb(folder: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(folder / "overlay.png")), cv2.COLOR_BGR2RGB)


def test_save_writes_the_four_files_and_no_temporary_ones(saved: Path):
    assert sorted(os.listdir(saved)) == ["metrics.json", "nerves.csv", "overlay.png", "slide_a.geojson"]


def test_geojson_round_trips_with_the_offset(saved: Path, result: SlideResult):
    feats = read_geojson(saved / "slide_a.geojson", offset=OFFSET)
    by_class = {c: [f for f in feats if f.classification == c] for c in {f.classification for f in feats}}
    assert {c: len(v) for c, v in by_class.items()} == {classes.TUMOR: 1, classes.NERVE: 1, classes.NERVE_PNI: 1,
                                                        classes.IMMUNE: 4}
    (tumor,) = by_class[classes.TUMOR]
    assert tumor.object_type == "annotation" and len(tumor.geometry.interiors) == 1
    assert tumor.geometry.symmetric_difference(result.tumors[0]).area < 1.0
    (plain,), (pni,) = by_class[classes.NERVE], by_class[classes.NERVE_PNI]
    assert (plain.name, pni.name) == ("Nerve 1", "Nerve 2")
    assert "Distance to tumor µm" not in plain.measurements
    assert plain.measurements == pytest.approx(result.nerves[0].measurements())
    assert set(pni.measurements) == set(NERVE_MEASUREMENTS)
    assert pni.measurements == pytest.approx(result.nerves[1].measurements())
    assert pni.geometry.centroid.distance(result.nerves[1].geometry.centroid) < 0.05
    cells = sorted(by_class[classes.IMMUNE], key=lambda f: -f.measurements["Probability"])
    assert all(f.object_type == "detection" and f.geometry.geom_type == "Point" for f in cells)
    assert np.allclose([c.centroid for c in cells], IMMUNE, atol=0.01)
    assert [c.measurements["Probability"] for c in cells] == pytest.approx([0.9, 0.8, 0.7, 0.6])


def test_geojson_is_in_qupath_coordinates_and_passes_the_qupath_checks(saved: Path):
    data = check_qupath_geojson(saved / "slide_a.geojson")
    points = [f["geometry"]["coordinates"] for f in data["features"] if f["geometry"]["type"] == "Point"]
    assert np.allclose(sorted(points), sorted((IMMUNE - OFFSET).tolist()), atol=0.01)


def test_metrics_json_has_the_design_keys_and_null_for_missing_values(saved: Path):
    text = (saved / "metrics.json").read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert tuple(data) == SlideMetrics.keys()
    assert data["pni_fraction"] is None and data["immune_density_intratumoral_per_mm2"] is None
    assert data["nerve_count"] == 2 and data["runtime_s"] == 12.34


def test_metrics_json_turns_numpy_and_infinite_values_into_plain_json(tmp_path: Path):
    path = report.write_metrics_json(tmp_path / "m.json", {"a": np.float32(np.inf), "b": np.int64(3),
                                                           "c": [1.5, -math.inf], "d": None})
    assert json.loads(path.read_text()) == {"a": None, "b": 3, "c": [1.5, None], "d": None}


def test_nerves_csv_has_one_row_per_nerve_in_qupath_coordinates(saved: Path, result: SlideResult):
    header, rows = _read_csv(saved / "nerves.csv")
    assert header == ["nerve", "class", "centroid_x_px", "centroid_y_px", *NERVE_MEASUREMENTS, "intratumoral"]
    assert [r["nerve"] for r in rows] == ["1", "2"]
    assert [r["class"] for r in rows] == [classes.NERVE, classes.NERVE_PNI]
    assert rows[0]["Distance to tumor µm"] == "" and float(rows[1]["Distance to tumor µm"]) == 0.0
    for row, rec in zip(rows, result.nerves):
        cx, cy = rec.centroid
        assert float(row["centroid_x_px"]) == pytest.approx(cx - OFFSET[0], abs=0.01)
        assert float(row["centroid_y_px"]) == pytest.approx(cy - OFFSET[1], abs=0.01)
        assert float(row["Area µm^2"]) == pytest.approx(rec.area_um2)
    assert [r["PNI grade"] for r in rows] == ["0", "2"]
    assert [r["intratumoral"] for r in rows] == ["0", "1"]


def test_nerves_csv_without_nerves_has_only_the_header(result: SlideResult, tmp_path: Path):
    path = report.write_nerves_csv(tmp_path / "nerves.csv", replace(result, nerves=[]))
    header, rows = _read_csv(path)
    assert header == list(report.NERVE_CSV_COLUMNS) and rows == []


def test_overlay_draws_the_pni_nerve_and_leaves_empty_tissue_alone(saved: Path):
    img = _overlay_rgb(saved)
    assert img.shape == (200, 300, 3)
    near_pni = img[88:113, 188:213].reshape(-1, 3)  # the PNI nerve is at (200, 100), radius 7.5
    assert (np.abs(near_pni.astype(int) - classes.CLASS_COLORS[classes.NERVE_PNI]).max(axis=1) <= 10).any()
    assert (img[20:40, 160:180] == 255).all()  # far from every object, the legend and the scale bar
    assert (img[95:106, 220:231] == 255).all()  # the tumour's hole is not filled
    r, g, b = img[130, 195].astype(int)  # inside the tumour: tinted towards its red
    assert r > 200 and g < 200 and b < 200


def test_overlay_shows_immune_cells_and_the_plain_nerve_in_their_colours(result: SlideResult):
    img = report.render_overlay(result)
    assert img is not None

    def has(color: tuple[int, int, int], y0: int, y1: int, x0: int, x1: int) -> bool:
        return bool((np.abs(img[y0:y1, x0:x1].astype(int) - color).max(axis=-1) <= 10).any())

    assert has(classes.CLASS_COLORS[classes.IMMUNE], 172, 179, 247, 254)  # cell at level-0 (4000, 2800)
    assert has(classes.CLASS_COLORS[classes.NERVE], 138, 162, 88, 112)  # plain nerve at (100, 150)
    assert not has(classes.CLASS_COLORS[classes.NERVE_PNI], 138, 162, 88, 112)


def test_overlay_keeps_dots_small_when_there_are_very_many_immune_cells(result: SlideResult):
    xs, ys = np.meshgrid(np.arange(150, 300, 2), np.arange(0, 200, 2))  # 7500 thumbnail pixels, 1 px apart
    cells = np.column_stack([xs.ravel(), ys.ravel()]) * (OVERLAY_MPP / MPP)
    many = replace(result, nerves=[], tumors=[], immune_cells=cells, immune_probabilities=np.ones(len(cells)))
    img = report.render_overlay(many)
    region = img[100:190, 200:290]  # away from the legend and the scale bar
    dots = (region == classes.CLASS_COLORS[classes.IMMUNE]).all(axis=-1)
    assert dots.sum() == 45 * 45 and not dots[1::2, 1::2].any()


def test_no_overlay_without_a_thumbnail(result: SlideResult, tmp_path: Path):
    no_thumb = replace(result, overlay=None)
    assert report.render_overlay(no_thumb) is None
    folder = report.save_result(no_thumb, tmp_path / "x")
    assert sorted(os.listdir(folder)) == ["metrics.json", "nerves.csv", "slide_a.geojson"]


def test_failed_png_write_leaves_the_old_file_and_no_temporary_file(tmp_path: Path, monkeypatch):
    path = tmp_path / "overlay.png"
    path.write_bytes(b"old")
    monkeypatch.setattr(report.cv2, "imwrite", lambda *a, **k: False)
    with pytest.raises(OSError):
        report.write_png(path, np.zeros((4, 4, 3), np.uint8))
    assert os.listdir(tmp_path) == ["overlay.png"] and path.read_bytes() == b"old"


def test_immune_probabilities_must_match_the_cells(result: SlideResult):
    with pytest.raises(ValueError, match="probabilities"):
        report.result_features(replace(result, immune_probabilities=np.ones(2)))


def _cohort() -> list[CohortRow]:
    return [
        CohortRow("slide_a", "done", "out/slide_a", metrics=_metrics().to_dict()),
        CohortRow("slide_b", "skipped", "out/slide_b", metrics=_metrics(slide="slide_b", pni_count=0).to_dict()),
        CohortRow("slide_c", "error", "out/slide_c",
                  error="SlideError: slide_c.svs has no mpp;\n give --mpp " + "x" * 80,
                  metrics=_metrics(slide="slide_c", nerve_count=77).to_dict()),  # stale: must not show
    ]


def test_cohort_csv_has_one_row_per_slide_and_empty_metrics_for_failures(tmp_path: Path):
    header, rows = _read_csv(report.write_cohort_csv(tmp_path / "cohort.csv", _cohort()))
    assert header == ["slide", "status", "error", "output", *(k for k in SlideMetrics.keys() if k != "slide")]
    assert [(r["slide"], r["status"]) for r in rows] == [("slide_a", "done"), ("slide_b", "skipped"),
                                                         ("slide_c", "error")]
    assert rows[0]["nerve_count"] == "2" and rows[0]["pni_fraction"] == "" and rows[1]["pni_count"] == "0"
    assert rows[2]["error"].startswith("SlideError") and rows[2]["output"] == "out/slide_c"
    assert all(rows[2][k] == "" for k in header[4:])
    assert os.listdir(tmp_path) == ["cohort.csv"]


def test_summary_table_lists_each_slide_the_error_and_the_counts():
    table = report.summary_table(_cohort())
    lines = table.splitlines()
    assert len(lines) == 5 and "nerves/mm²" in lines[0]
    for slide in ("slide_a", "slide_b", "slide_c"):
        assert slide in table
    assert "SlideError: slide_c.svs has no mpp; give --mpp" in lines[3] and "x" * 80 not in table
    assert lines[0].index("status") == lines[1].index("done") == lines[3].index("error")
    assert "12.3" in lines[1] and "0.6" in lines[1]
    assert "77" not in lines[3]
    assert lines[-1] == "3 slides: 1 done, 1 skipped, 1 failed"


def test_cohort_row_rejects_an_unknown_status():
    with pytest.raises(ValueError, match="status"):
        CohortRow("s", "running", "out/s")


def test_overlay_shows_immune_cell_density_as_a_heat_map_where_cells_crowd(result: SlideResult):
    angles = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    ring = np.column_stack([150 + 6 * np.cos(angles), 120 + 6 * np.sin(angles)])  # thumbnail px, radius 6
    cells = ring * (OVERLAY_MPP / MPP)
    crowd = replace(result, nerves=[], tumors=[], immune_cells=cells, immune_probabilities=np.ones(len(cells)))
    img = report.render_overlay(crowd).astype(int)
    assert (255 - img[120, 150]).sum() > 60  # the ring's empty centre is tinted by the density
    assert (img[120, 280] == 255).all()  # far from the crowd the tissue is left alone
