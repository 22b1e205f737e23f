"""Evaluation against known answers: matching, PNI, immune cells, Dice, pooling, files and folders."""

from __future__ import annotations

import json
import logging
import math
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from shapely import affinity
from shapely.geometry import Point, Polygon, box

from nervedet import classes
from nervedet.evaluate import (
    EvalSettings,
    EvaluationError,
    EvaluationReport,
    MatchCounts,
    SlideCounts,
    evaluate_paths,
    evaluate_slide,
    format_table,
    pair_paths,
    resolve_mpp,
    write_report,
)
from nervedet.geojson import Feature, read_geojson, write_geojson
from nervedet.matching import match_points, polygon_parts, raster_overlap

# The DESIGN.md list, written out here so that a change to the module's own list is caught.
DESIGN_KEYS = {
    "dice_nerve", "dice_tumor", "nerve_precision", "nerve_recall", "nerve_f1", "pni_precision", "pni_recall",
    "pni_f1", "immune_precision", "immune_recall", "immune_f1", "immune_count_truth", "immune_count_pred",
}
RATIO_KEYS = DESIGN_KEYS - {"immune_count_truth", "immune_count_pred"}
REGION = box(0, 0, 4000, 4000)
N_NERVES, N_PNI, N_CELLS = 6, 3, 100


def _nerve(x: float, y: float, rx: float, ry: float, pni: bool, hole: bool = False) -> Feature:
    shape = affinity.scale(Point(x, y).buffer(1.0, 32), rx, ry)
    if hole:
        shape = Polygon(shape.exterior, [affinity.scale(shape, 0.3, 0.3).exterior])
    return Feature(shape, "annotation", classes.NERVE_PNI if pni else classes.NERVE)


def make_truth(region: bool = True) -> list[Feature]:
    """6 nerves (the first 3 PNI, one with a hole), 2 tumours, 100 immune cells (10 as cell polygons)."""
    feats = [Feature(REGION, "annotation", classes.REGION)] if region else []
    for k in range(N_NERVES):
        feats.append(_nerve(500 + 600 * k, 500 + 250 * (k % 2), 120 + 20 * k, 80, pni=k < N_PNI, hole=k == 4))
    feats.append(Feature(Polygon([(300, 1200), (1800, 1100), (1900, 2000), (400, 2100)]), "annotation",
                         classes.TUMOR))
    feats.append(Feature(Point(3000, 1600).buffer(400, 32), "annotation", classes.TUMOR))
    for i in range(N_CELLS):
        x, y = 250 + 350 * (i % 10), 2300 + 150 * (i // 10)  # 150 px apart: no cross-matching when moved
        geom = Point(x, y).buffer(12, 16) if i < 10 else Point(x, y)
        feats.append(Feature(geom, "detection", classes.IMMUNE))
    return feats


def _metrics(pred, truth, mpp=0.25, **kw) -> dict:
    return evaluate_slide(pred, truth, mpp, **kw).metrics()


def _moved(features: list[Feature], dx: float, dy: float, cls: str) -> list[Feature]:
    return [replace(f, geometry=affinity.translate(f.geometry, dx, dy)) if f.classification == cls else f
            for f in features]


def test_truth_against_itself_is_perfect(tmp_path):
    truth = make_truth()
    m = _metrics(truth, truth)
    assert set(m) == DESIGN_KEYS
    assert all(m[k] == 1.0 for k in RATIO_KEYS), m
    assert m["immune_count_truth"] == m["immune_count_pred"] == N_CELLS
    path = write_geojson(tmp_path / "s.geojson", truth)
    d = evaluate_paths(path, path, mpp=0.25).to_dict()
    assert all(d["slides"]["s"][k] == 1.0 for k in RATIO_KEYS)
    assert d["mean"] == d["slides"]["s"]


def test_one_nerve_removed_costs_recall_only():
    truth = make_truth()
    nerves = [i for i, f in enumerate(truth) if classes.is_nerve(f.classification)]
    pred = [f for i, f in enumerate(truth) if i != nerves[-1]]
    m = _metrics(pred, truth)
    assert m["nerve_recall"] == pytest.approx((N_NERVES - 1) / N_NERVES)
    assert m["nerve_precision"] == 1.0
    assert m["nerve_f1"] == pytest.approx(2 * 5 / (2 * 5 + 1))
    assert m["dice_nerve"] < 1.0


def test_nerve_match_needs_iou_half():
    truth = [Feature(box(0, 0, 100, 100), classification=classes.NERVE)]
    pred_ok = [Feature(box(20, 0, 120, 100), classification=classes.NERVE)]  # IoU 80/120 = 0.67
    pred_bad = [Feature(box(40, 0, 140, 100), classification=classes.NERVE)]  # IoU 60/140 = 0.43
    assert _metrics(pred_ok, truth)["nerve_f1"] == 1.0
    bad = evaluate_slide(pred_bad, truth, 0.25)
    assert bad.nerves == MatchCounts(tp=0, fp=1, fn=1)
    # one-to-one: two copies of a truth nerve give one match and one false positive
    twice = evaluate_slide(truth + truth, truth, 0.25)
    assert twice.nerves == MatchCounts(tp=1, fp=1, fn=0)


@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_immune_cells_match_within_3_um(mpp):
    truth = make_truth()
    step = 1 / math.sqrt(2) / mpp  # px per µm along the diagonal
    near = _metrics(_moved(truth, 2 * step, 2 * step, classes.IMMUNE), truth, mpp)
    assert near["immune_precision"] == near["immune_recall"] == near["immune_f1"] == 1.0
    far = _metrics(_moved(truth, 4 * step, 4 * step, classes.IMMUNE), truth, mpp)
    assert far["immune_precision"] == far["immune_recall"] == far["immune_f1"] == 0.0
    assert far["immune_count_truth"] == far["immune_count_pred"] == N_CELLS


def test_immune_matching_is_one_to_one_and_maximal():
    truth = make_truth()
    cells = [f for f in truth if f.classification == classes.IMMUNE]
    m = _metrics(truth + cells, truth)
    assert m["immune_precision"] == pytest.approx(0.5) and m["immune_recall"] == 1.0
    # Greedy nearest-first would pair p1 with A and leave p2 alone; the maximum matching pairs both.
    a_b = np.array([[0.0, 0.0], [4.0, 0.0]])
    assert match_points(np.array([[1.5, 0.0], [-1.6, 0.0]]), a_b, radius=3.0) == 2


def test_pni_relabelled_and_overcalled():
    truth = make_truth()
    first_pni = next(i for i, f in enumerate(truth) if f.classification == classes.NERVE_PNI)
    pred = list(truth)
    pred[first_pni] = replace(truth[first_pni], classification=classes.NERVE)
    m = _metrics(pred, truth)
    assert m["pni_recall"] == pytest.approx((N_PNI - 1) / N_PNI)
    assert m["pni_precision"] == 1.0
    assert m["nerve_f1"] == m["dice_nerve"] == 1.0  # still nerves
    plain = next(i for i, f in enumerate(truth) if f.classification == classes.NERVE)
    pred = list(truth)
    pred[plain] = replace(truth[plain], classification=classes.NERVE_PNI)
    m = _metrics(pred, truth)
    assert m["pni_precision"] == pytest.approx(N_PNI / (N_PNI + 1)) and m["pni_recall"] == 1.0


def _wrong_objects(x: float) -> list[Feature]:
    return [
        Feature(Point(x, 500).buffer(100), classification=classes.NERVE),
        Feature(box(x - 100, 1000, x + 100, 1200), classification=classes.TUMOR),
        Feature(Point(x, 1500), "detection", classes.IMMUNE),
    ]


def test_predictions_outside_the_labelled_area_are_ignored():
    truth = make_truth()
    outside = _metrics(truth + _wrong_objects(5000), truth)
    assert all(outside[k] == 1.0 for k in RATIO_KEYS), outside
    inside = _metrics(truth + _wrong_objects(3700), truth)  # the same objects inside the region count
    assert inside["nerve_precision"] < 1 and inside["dice_tumor"] < 1 and inside["immune_precision"] < 1
    # Two regions: a tumour between them lies inside their bounding box but outside the labelled area.
    two = [Feature(box(0, 0, 1000, 1000), classification=classes.REGION),
           Feature(box(2000, 0, 3000, 1000), classification=classes.REGION),
           Feature(box(100, 100, 900, 900), classification=classes.TUMOR)]
    between = Feature(box(1200, 100, 1800, 900), classification=classes.TUMOR)
    assert _metrics(two + [between], two)["dice_tumor"] == 1.0
    # Without a Region the whole slide is labelled, so the far objects count too.
    no_region = make_truth(region=False)
    everywhere = _metrics(no_region + _wrong_objects(5000), no_region)
    assert everywhere["nerve_precision"] < 1 and everywhere["immune_count_pred"] == N_CELLS + 1


def test_unclassified_annotation_bounds_the_area():
    truth = [Feature(box(0, 0, 1000, 1000)), Feature(box(100, 100, 300, 300), classification=classes.NERVE)]
    pred = truth + [Feature(box(1500, 100, 1700, 300), classification=classes.NERVE)]
    assert _metrics(pred, truth)["nerve_precision"] == 1.0


def test_dice_of_known_overlaps():
    truth = [Feature(box(0, 0, 400, 400), classification=classes.TUMOR)]
    half = [Feature(box(200, 0, 600, 400), classification=classes.TUMOR)]
    counts = evaluate_slide(half, truth, 0.25)  # 200 x 200 analysis pixels each, half shared
    assert (counts.tumor_pixels.intersection, counts.tumor_pixels.pred) == (20000, 40000)
    assert counts.tumor_pixels.dice == pytest.approx(0.5)
    holed = [Feature(Polygon(box(0, 0, 400, 400).exterior, [box(100, 100, 300, 300).exterior]),
                     classification=classes.TUMOR)]
    assert evaluate_slide(truth, holed, 0.25).tumor_pixels.dice == pytest.approx(2 * 120000 / 280000)
    region = Feature(box(0, 0, 400, 400), classification=classes.REGION)  # clips the shifted square
    assert evaluate_slide(half, truth + [region], 0.25).tumor_pixels.dice == pytest.approx(2 / 3)
    assert _metrics([], [])["dice_nerve"] == 1.0 and _metrics([], truth)["dice_tumor"] == 0.0


def test_chunked_rasterisation_equals_one_chunk():
    truth = make_truth()
    pred = _moved(_moved(truth, 37.3, -11.9, classes.NERVE_PNI), 60.2, 25.1, classes.TUMOR)
    big = evaluate_slide(pred, truth, 0.25, settings=EvalSettings(chunk_px=4096))
    small = evaluate_slide(pred, truth, 0.25, settings=EvalSettings(chunk_px=300))
    assert big.nerve_pixels == small.nerve_pixels and big.tumor_pixels == small.tumor_pixels
    assert 0 < big.nerve_pixels.dice < 1 and 0 < big.tumor_pixels.dice < 1
    # a tiny chunk on a small scene, with a hole, overlapping parts and a clipping area
    p = polygon_parts([Polygon(box(0, 0, 90, 70).exterior, [box(20, 20, 50, 40).exterior]), box(60, 10, 110, 50)])
    t = polygon_parts([Point(55, 40).buffer(33.3)])
    area = polygon_parts([box(5, 3, 100, 77), Point(60, 60).buffer(30)])
    assert raster_overlap(p, t, area, 0.7, chunk=7) == raster_overlap(p, t, area, 0.7, chunk=2048)


def _report(per_slide: dict[str, SlideCounts]) -> EvaluationReport:
    return EvaluationReport(slides=per_slide)


def test_mean_pools_counts_over_slides():
    a_truth = [Feature(box(0, 0, 100, 100), classification=classes.NERVE)]
    b_truth = [Feature(box(200 * k, 0, 200 * k + 100, 100), classification=classes.NERVE) for k in range(3)]
    report = _report({"a": evaluate_slide(a_truth, a_truth, 0.25), "b": evaluate_slide([], b_truth, 0.25)})
    d = report.to_dict()
    assert d["slides"]["a"]["nerve_recall"] == 1.0 and d["slides"]["b"]["nerve_recall"] == 0.0
    assert d["mean"]["nerve_recall"] == pytest.approx(1 / 4)  # pooled 1 of 4, not (1 + 0) / 2
    assert d["mean"]["dice_nerve"] == pytest.approx(2 * 2500 / (2500 + 4 * 2500))  # 2500 px per square
    assert report.pooled.nerves == MatchCounts(tp=1, fp=0, fn=3)


def test_precision_recall_conventions():
    assert (MatchCounts().precision, MatchCounts().recall, MatchCounts().f1) == (1.0, 1.0, 1.0)
    missed = MatchCounts(fn=3)
    assert (missed.precision, missed.recall, missed.f1) == (0.0, 0.0, 0.0)
    spurious = MatchCounts(fp=2)
    assert (spurious.precision, spurious.recall, spurious.f1) == (0.0, 0.0, 0.0)


def _write(path: Path, features: list[Feature]) -> Path:
    return write_geojson(path, features)


def test_folders_are_matched_by_stem(tmp_path, caplog):
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    full = make_truth()
    _write(truth / "a.geojson", full)
    _write(truth / "b.geojson.gz", full)
    _write(truth / "c.geojson", full)  # no prediction: all misses
    _write(pred / "a.geojson", full)
    _write(pred / "b" / "b.geojson", full)  # the inference layout
    (pred / "b" / "metrics.json").write_text(json.dumps({"slide": "b", "mpp": 0.25}))
    _write(pred / "d.geojson", full)  # no truth: ignored
    with caplog.at_level(logging.WARNING, logger="nervedet.evaluate"):
        report = evaluate_paths(pred, truth, mpp=0.25)
    assert set(report.slides) == {"a", "b", "c"}
    d = report.to_dict()["slides"]
    assert d["a"]["nerve_f1"] == d["b"]["nerve_f1"] == 1.0
    assert d["c"]["nerve_recall"] == 0.0 and d["c"]["immune_count_pred"] == 0 and d["c"]["dice_nerve"] == 0.0
    assert "c.geojson" in caplog.text and "d.geojson" in caplog.text
    pairs = {p.stem: p for p in pair_paths(pred, truth)}
    assert pairs["b"].pred == pred / "b" / "b.geojson" and pairs["c"].pred is None
    # a single truth file against the prediction folder
    assert [p.pred for p in pair_paths(pred, truth / "b.geojson.gz")] == [pred / "b" / "b.geojson"]
    _write(tmp_path / "other" / "z.geojson", full)
    with pytest.raises(EvaluationError, match="matches"):
        pair_paths(tmp_path / "other", truth)
    with pytest.raises(EvaluationError, match="no such"):
        pair_paths(tmp_path / "nowhere", truth)


def test_pixel_size_from_slide_or_metrics(tmp_path, monkeypatch):
    truth = _write(tmp_path / "truth" / "x.geojson", make_truth())
    pred = _write(tmp_path / "pred" / "x" / "x.geojson", make_truth())
    (pair,) = pair_paths(pred, truth)
    with pytest.raises(EvaluationError, match="give --mpp"):
        resolve_mpp(pair)
    (pred.parent / "metrics.json").write_text(json.dumps({"slide": "x.svs", "mpp": 0.2501}))
    assert resolve_mpp(pair) == 0.2501
    assert resolve_mpp(pair, 0.5) == 0.5
    (tmp_path / "truth" / "x.svs").write_bytes(b"")
    fake = types.ModuleType("nervedet.slide")
    class FakeSlide(types.SimpleNamespace):  # a Slide is a context manager
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    fake.open_slide = lambda path: FakeSlide(mpp=0.26, path=path)
    monkeypatch.setitem(sys.modules, "nervedet.slide", fake)
    assert resolve_mpp(pair) == 0.26  # the slide next to the truth comes first
    report = evaluate_paths(pred, truth)
    assert report.to_dict()["slides"]["x"]["nerve_f1"] == 1.0


def test_out_file_and_table(tmp_path):
    truth = make_truth()
    pred = [f for f in truth if f.classification != classes.NERVE_PNI]
    report = _report({"s1": evaluate_slide(pred, truth, 0.25), "slide_two": evaluate_slide(truth, truth, 0.5)})
    out = write_report(report, tmp_path / "out" / "eval.json")
    data = json.loads(out.read_text())
    assert set(data) == {"mean", "slides"}
    assert set(data["mean"]) == DESIGN_KEYS
    assert set(data["slides"]) == {"s1", "slide_two"}
    assert all(set(v) == DESIGN_KEYS for v in data["slides"].values())
    assert data["mean"]["immune_count_truth"] == 2 * N_CELLS
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temporary file left
    table = format_table(report)
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # fixed width
    assert lines[1].startswith("s1") and lines[2].startswith("slide_two") and lines[-1].startswith("mean")
    row = dict(zip(lines[0].split(), lines[1].split()))
    assert (row["nerve_R"], row["nerve_F1"], row["pni_R"], row["immune_truth"]) == ("0.500", "0.667", "0.000", "100")


def test_read_round_trip_keeps_classes(tmp_path):
    path = _write(tmp_path / "t.geojson", make_truth())
    back = read_geojson(path)
    assert sum(f.classification == classes.NERVE_PNI for f in back) == N_PNI
    assert _metrics(back, make_truth())["nerve_f1"] == 1.0
