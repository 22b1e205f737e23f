"""QuPath GeoJSON writer (DESIGN.md checklist, feature by feature) and tolerant reader."""

from __future__ import annotations

import gzip
import json
import logging
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import GeometryCollection, LineString, MultiPolygon, Point, Polygon, shape

from nervedet import geojson
from nervedet.classes import IMMUNE, NERVE, NERVE_PNI, TUMOR, color_of
from nervedet.geojson import (
    Feature,
    GeoJSONError,
    clean_polygonal,
    read_geojson,
    to_feature_collection,
    write_geojson,
)
from tests.conftest import real_data_dir

SQUARE_WITH_HOLE = Polygon(
    [(100, 100), (300, 100), (300, 300), (100, 300)], [[(150, 150), (250, 150), (250, 250), (150, 250)]]
)
TWO_PARTS = MultiPolygon(
    [
        Polygon([(0, 0), (10, 0), (10, 10), (0, 10)]),
        Polygon([(20, 20), (35.5, 20), (35.5, 30.25), (20, 30.25)]),
    ]
)


def _strict_loads(text: str) -> object:
    """json.loads that refuses NaN / Infinity, as QuPath's parser does."""

    def refuse(const: str) -> None:
        raise ValueError(f"non-standard JSON constant {const}")

    return json.loads(text, parse_constant=refuse)


def _read_raw(path: Path) -> dict:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return _strict_loads(data.decode("utf-8"))


def _on_grid(geometry: dict) -> bool:
    xy = shapely.get_coordinates(shape(geometry))
    return bool(np.allclose(xy * 100, np.round(xy * 100), atol=1e-6))


def _sample_features() -> list[Feature]:
    return [
        Feature(SQUARE_WITH_HOLE, "annotation", NERVE, {"Area µm^2": 30000.0, "PNI grade": 0}, name="n1"),
        Feature(TWO_PARTS, "annotation", TUMOR),
        Feature(Point(12.345, 67.891), "detection", IMMUNE),
        Feature(
            Polygon([(400, 400), (500, 400), (450, 480)]),
            "annotation",
            NERVE_PNI,
            {"Tumor encirclement %": np.float32(45.5), "PNI grade": np.int64(2)},
        ),
    ]


def test_writer_output_follows_the_checklist_feature_by_feature(tmp_path: Path) -> None:
    feats = _sample_features()
    out = write_geojson(tmp_path / "a.geojson", feats)
    doc = _read_raw(out)
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(feats)
    for f, d in zip(feats, doc["features"], strict=True):
        assert d["type"] == "Feature"
        assert str(uuid.UUID(d["id"])) == d["id"]
        props = d["properties"]
        assert props["objectType"] == f.object_type
        assert props["classification"] == {
            "name": f.classification,
            "color": list(color_of(f.classification)),
        }
        assert props.get("isLocked", False) is False
        assert props.get("name") == f.name
        meas = props.get("measurements", {})
        assert all(isinstance(k, str) and type(v) is float for k, v in meas.items())
        assert meas == {k: float(v) for k, v in f.measurements.items()}
        geom = shape(d["geometry"])
        assert geom.is_valid and _on_grid(d["geometry"])
        assert d["geometry"]["type"] == f.geometry.geom_type
    assert props["classification"]["color"] == [255, 0, 255]  # Nerve: PNI has its own colour
    assert to_feature_collection(feats) == doc


def test_round_trip_keeps_holes_parts_points_measurements(tmp_path: Path) -> None:
    feats = _sample_features()
    back = read_geojson(write_geojson(tmp_path / "a.geojson", feats))
    assert len(back) == len(feats)
    for f, b in zip(feats, back, strict=True):
        assert (b.object_type, b.classification, b.name, b.id) == (
            f.object_type,
            f.classification,
            f.name,
            f.id,
        )
        assert b.measurements == {k: float(v) for k, v in f.measurements.items()}
        assert b.geometry.geom_type == f.geometry.geom_type
    assert back[0].geometry.equals(SQUARE_WITH_HOLE) and len(back[0].geometry.interiors) == 1
    assert back[0].geometry.area == pytest.approx(200 * 200 - 100 * 100)
    assert back[1].geometry.equals(TWO_PARTS) and len(back[1].geometry.geoms) == 2
    assert (back[2].geometry.x, back[2].geometry.y) == (12.35, 67.89)  # rounded to 0.01 px
    assert back[3].centroid == pytest.approx((450, 426.6667), abs=1e-3)


def test_offset_is_subtracted_on_write_and_added_on_read(tmp_path: Path) -> None:
    poly = Polygon([(1000, 2000), (1100, 2000), (1100, 2100)])
    feats = [Feature(poly, classification=TUMOR), Feature(Point(1050.5, 2050.25), "detection", IMMUNE)]
    out = write_geojson(tmp_path / "o.geojson", feats, offset=(1000, 2000))
    raw = _read_raw(out)["features"]
    assert shape(raw[0]["geometry"]).equals(Polygon([(0, 0), (100, 0), (100, 100)]))
    assert raw[1]["geometry"]["coordinates"] == [50.5, 50.25]
    assert to_feature_collection(feats, offset=(1000, 2000))["features"][1]["geometry"]["coordinates"] == [
        50.5,
        50.25,
    ]
    back = read_geojson(out, offset=(1000, 2000))
    assert back[0].geometry.equals(poly)
    assert (back[1].geometry.x, back[1].geometry.y) == (1050.5, 2050.25)
    assert read_geojson(out)[0].geometry.equals(Polygon([(0, 0), (100, 0), (100, 100)]))


def test_bow_tie_is_repaired_to_a_valid_geometry(tmp_path: Path) -> None:
    bow_tie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    assert not bow_tie.is_valid
    d = _read_raw(write_geojson(tmp_path / "b.geojson", [Feature(bow_tie, classification=NERVE)]))[
        "features"
    ][0]
    geom = shape(d["geometry"])
    assert geom.is_valid and geom.geom_type == "MultiPolygon" and geom.area == pytest.approx(50)


@pytest.mark.parametrize(
    "poly",
    [
        # a vertex 0.004 px above the opposite edge: naive rounding makes the ring touch itself
        Polygon([(0, 0), (10, 0), (10, 10), (5, 0.004), (0, 10)]),
        # a hole 0.003 px inside the shell: naive rounding makes the hole touch the shell along a line
        Polygon([(0, 0), (10, 0), (10, 10), (0, 10)], [[(0.003, 2), (4, 2), (4, 6), (0.003, 6)]]),
    ],
)
def test_polygon_invalid_only_after_rounding_is_valid_in_output(tmp_path: Path, poly: Polygon) -> None:
    assert poly.is_valid
    assert not shapely.transform(poly, lambda c: np.round(c, 2)).is_valid  # the trap exists
    fc = _read_raw(write_geojson(tmp_path / "r.geojson", [Feature(poly, classification=TUMOR)]))
    d = fc["features"][0]["geometry"]
    assert shape(d).is_valid and _on_grid(d)
    assert shape(d).area == pytest.approx(poly.area, abs=0.1)
    assert clean_polygonal(poly).is_valid


def test_single_part_multipolygon_and_collections_become_polygon(tmp_path: Path) -> None:
    square = Polygon([(0, 0), (4, 0), (4, 4), (0, 4)])
    gc = GeometryCollection([square, LineString([(10, 10), (20, 20)]), Point(30, 30)])
    feats = [Feature(MultiPolygon([square])), Feature(gc)]
    for d in _read_raw(write_geojson(tmp_path / "m.geojson", feats))["features"]:
        assert d["geometry"]["type"] == "Polygon" and shape(d["geometry"]).equals(square)
    assert clean_polygonal(MultiPolygon([square])).geom_type == "Polygon"
    overlapping = GeometryCollection([square, Polygon([(2, 2), (6, 2), (6, 6), (2, 6)])])
    merged = clean_polygonal(overlapping)
    assert merged.geom_type == "Polygon" and merged.is_valid and merged.area == pytest.approx(28)


def test_empty_and_degenerate_features_are_dropped_with_a_warning(tmp_path: Path, caplog) -> None:
    feats = [
        Feature(Polygon([(0, 0), (10, 0), (20, 0)]), classification=NERVE),  # zero area
        Feature(Polygon([(0, 0), (0.001, 0), (0.001, 0.001)]), classification=NERVE),  # collapses at 0.01
        Feature(LineString([(5, 5), (5.001, 5.001)])),  # collapses at 0.01
        Feature(Polygon()),
        Feature(Point(float("nan"), 3), "detection", IMMUNE),
        Feature(Polygon([(0, 0), (float("inf"), 0), (5, 5)]), classification=TUMOR),
        Feature(Point(1, 2), "detection", IMMUNE),
    ]
    with caplog.at_level(logging.WARNING, logger="nervedet.geojson"):
        fc = _read_raw(write_geojson(tmp_path / "e.geojson", feats))
    assert [d["geometry"] for d in fc["features"]] == [{"type": "Point", "coordinates": [1.0, 2.0]}]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "6 features not written" in warnings[0]
    assert clean_polygonal(None) is None and clean_polygonal(feats[0].geometry) is None


def test_nan_measurements_dropped_numpy_converted_strict_json(tmp_path: Path) -> None:
    m = {
        "ok": np.float64(1.5),
        "nan": float("nan"),
        "inf": np.inf,
        "ninf": np.float32(-np.inf),
        "int": np.int32(7),
        "flag": True,
        "np_flag": np.bool_(False),
    }
    text = write_geojson(tmp_path / "n.geojson", [Feature(Point(1, 1), "detection", IMMUNE, m)]).read_text(
        "utf-8"
    )
    meas = _strict_loads(text)["features"][0]["properties"]["measurements"]
    assert meas == {"ok": 1.5, "int": 7.0, "flag": 1.0, "np_flag": 0.0}
    assert "NaN" not in text and "Infinity" not in text


def test_ids_are_unique_uuids_even_when_given_duplicates_or_junk(tmp_path: Path) -> None:
    dup = str(uuid.uuid4())
    feats = [Feature(Point(i, i), "detection", IMMUNE, id=fid) for i, fid in enumerate([dup, dup, "7", "x"])]
    feats += [Feature(Point(9, 9), "detection", IMMUNE) for _ in range(50)]
    ids = [d["id"] for d in _read_raw(write_geojson(tmp_path / "i.geojson", feats))["features"]]
    assert ids[0] == dup and len(set(ids)) == len(ids) == 54
    assert all(str(uuid.UUID(i)) == i and uuid.UUID(i).version == 4 for i in ids)
    default_ids = [uuid.UUID(Feature(Point(0, 0)).id) for _ in range(100)]
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 for u in default_ids)


@pytest.mark.parametrize(
    "name,flag,compressed",
    [
        ("g.geojson.gz", None, True),
        ("g.geojson", None, False),
        ("g.geojson", True, True),
        ("g.geojson.gz", False, False),
    ],
)
def test_gzip_round_trip(tmp_path: Path, name: str, flag: bool | None, compressed: bool) -> None:
    feats = _sample_features()
    out = write_geojson(tmp_path / name, feats, gzip=flag)
    assert (out.read_bytes()[:2] == b"\x1f\x8b") is compressed
    back = read_geojson(out)
    assert [b.id for b in back] == [f.id for f in feats]
    assert back[0].geometry.equals(SQUARE_WITH_HOLE)


@pytest.mark.parametrize("name", ["x.geojson", "x.geojson.gz"])
def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path: Path, name: str, monkeypatch) -> None:
    many = [Feature(Point(i, i), "detection", IMMUNE) for i in range(5000)]  # more than one write buffer
    bad = Feature(Point(1, 1), "detection", IMMUNE, {"bad": object()})  # type: ignore[dict-item]
    sizes_when_failing: list[int] = []
    real_measurements_out = geojson._measurements_out

    def spy(m: dict, fid: str) -> dict:
        if "bad" in m:  # the failure really happens mid-write: a temporary file with content exists
            sizes_when_failing.extend(p.stat().st_size for p in tmp_path.iterdir())
        return real_measurements_out(m, fid)

    with monkeypatch.context() as mp:
        mp.setattr(geojson, "_measurements_out", spy)
        with pytest.raises(TypeError, match="bad"):
            write_geojson(tmp_path / name, [*many, bad])
    assert len(sizes_when_failing) == 1 and sizes_when_failing[0] > 0
    assert list(tmp_path.iterdir()) == []
    # an existing file is kept intact when a rewrite fails
    good = write_geojson(tmp_path / name, many[:3])
    before = good.read_bytes()
    with pytest.raises(TypeError):
        write_geojson(good, [*many, bad])
    assert good.read_bytes() == before and list(tmp_path.iterdir()) == [good]
    monkeypatch.setattr(geojson, "_measurements_out", lambda m, fid: {"x": float("nan")})  # filter bypassed
    with pytest.raises(ValueError, match="JSON compliant"):  # allow_nan=False is the last line of defence
        write_geojson(good, many[:3])
    assert good.read_bytes() == before and list(tmp_path.iterdir()) == [good]
    with pytest.raises(ValueError, match="object_type"):
        write_geojson(good, [Feature(Point(0, 0), "cells")])
    assert list(tmp_path.iterdir()) == [good]


def _write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def test_reader_accepts_bare_array_single_feature_and_legacy_fields(tmp_path: Path) -> None:
    sq = {"type": "Polygon", "coordinates": [[[0, 0], [8, 0], [8, 8], [0, 8], [0, 0]]]}
    legacy = {  # QuPath 0.2 style: object_type, colorRGB, measurement list, Java class as id
        "type": "Feature",
        "id": "PathDetectionObject",
        "geometry": sq,
        "properties": {
            "object_type": "detection",
            "classification": {"name": "Tumor", "colorRGB": -3670016},
            "measurements": [{"name": "Area", "value": 64}, {"name": "Bad", "value": "NaN"}],
        },
    }
    derived = {
        "type": "Feature",
        "id": 17,
        "geometry": {"type": "Point", "coordinates": [3, 4]},
        "properties": {
            "objectType": "cell",
            "classification": {"names": ["Nerve", "PNI"], "color": [1, 2, 3]},
        },
    }
    plain = {"geometry": sq, "properties": {"classification": "Region*", "isLocked": True}}
    no_geom = {"type": "Feature", "geometry": None, "properties": {"objectType": "annotation"}}
    bow_tie = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 4], [4, 0], [0, 4], [0, 0]]]},
    }

    arr = read_geojson(_write_json(tmp_path / "arr.json", [legacy, derived, plain, no_geom, bow_tie]))
    assert len(arr) == 4  # null geometry skipped
    assert (arr[0].object_type, arr[0].classification, arr[0].measurements) == (
        "detection",
        TUMOR,
        {"Area": 64.0},
    )
    assert (arr[1].object_type, arr[1].classification) == ("detection", NERVE_PNI)
    assert (arr[2].object_type, arr[2].classification, arr[2].measurements) == ("annotation", "Region*", {})
    assert arr[3].geometry.is_valid and arr[3].geometry.area == pytest.approx(8)
    assert all(str(uuid.UUID(f.id)) == f.id for f in arr)

    single = read_geojson(_write_json(tmp_path / "one.geojson", derived))
    assert (
        len(single) == 1
        and single[0].classification == "Nerve: PNI"
        and single[0].geometry.equals(Point(3, 4))
    )
    flagged = dict(legacy, id=None, properties={"isDetection": True})
    assert read_geojson(_write_json(tmp_path / "f.json", flagged))[0].object_type == "detection"
    assert read_geojson(_write_json(tmp_path / "u.json", plain))[0].object_type == "annotation"
    snake = {"id": 3, "geometry": sq, "properties": {"object_type": "detection"}}
    assert read_geojson(_write_json(tmp_path / "s.json", [snake]))[0].object_type == "detection"
    qupath02 = [
        {"id": kind, "geometry": sq, "properties": {}} for kind in ("PathCellObject", "PathAnnotationObject")
    ]
    assert [f.object_type for f in read_geojson(_write_json(tmp_path / "q.json", qupath02))] == [
        "detection",
        "annotation",
    ]


def test_reader_skips_degenerate_or_malformed_geometries_with_a_warning(tmp_path: Path, caplog) -> None:
    def feat(geometry: dict) -> dict:
        return {"type": "Feature", "geometry": geometry, "properties": {"objectType": "annotation"}}

    good = feat({"type": "Point", "coordinates": [5, 6]})
    bad = [
        feat({"type": "Polygon", "coordinates": 5}),
        feat({"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}),  # too few points for a ring
        feat({"type": "Polygon", "coordinates": [[[0, 0], [5, 0], [9, 0], [0, 0]]]}),  # zero area
        feat({"type": "Polygon", "coordinates": []}),  # empty
        feat({"type": "Nonsense", "coordinates": [1, 2]}),
        feat({"type": "Point", "coordinates": [float("nan"), 2]}),  # Python's json writes NaN
        feat({"type": "LineString", "coordinates": [[0, 0], [float("inf"), 2]]}),
    ]
    with caplog.at_level(logging.WARNING, logger="nervedet.geojson"):
        feats = read_geojson(
            _write_json(tmp_path / "d.geojson", {"type": "FeatureCollection", "features": [good, *bad]})
        )
    assert len(feats) == 1 and feats[0].geometry.equals(Point(5, 6))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"{len(bad)} features skipped" in warnings[0]


@pytest.mark.parametrize(
    "content,problem",
    [
        (b"not json at all {", "not JSON"),
        (b"", "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b'{"type": "Polygon", "coordinates": []}', "not GeoJSON"),
        (b"[1, 2]", "not GeoJSON"),
        (b'{"type": "FeatureCollection", "features": {}}', "not GeoJSON"),
        (b'[{"type": "Feature", "geometry": "POLYGON ((0 0, 1 0, 1 1, 0 0))"}]', "feature 0"),
        (b'[{"type": "Feature", "geometry": {"type": "Point"}}, "junk"]', "feature 1"),
        (gzip.compress(b"{oops"), "not JSON"),
        (gzip.compress(b"[]" * 50)[:12] + b"\x00garbled deflate" * 3, "not JSON"),
        (gzip.compress(b'{"type": "FeatureCollection", "features": []}')[:25], "not JSON"),
    ],
)
def test_bad_files_raise_geojson_error_naming_the_file(tmp_path: Path, content: bytes, problem: str) -> None:
    bad = tmp_path / "labels.geojson"
    bad.write_bytes(content)
    with pytest.raises(GeoJSONError) as err:
        read_geojson(bad)
    msg = str(err.value)
    assert msg.startswith(f"{bad}: ") and problem in msg and "\n" not in msg
    assert isinstance(err.value, ValueError)


def _real(name: str) -> Path:
    folder = real_data_dir()
    path = (folder or Path("shared/data/real")) / "immune" / name
    if not path.exists():
        pytest.skip(
            f"real label data not found at {path} (set NERVEDET_REAL_DATA to the shared/data/real folder)"
        )
    return path


def test_reads_real_hgsc_nuclei_labels() -> None:
    feats = read_geojson(_real("hgsc_stroma.nuclei.geojson"))
    assert len(feats) == 423
    assert all(f.geometry.geom_type == "Polygon" and f.geometry.is_valid for f in feats)
    assert Counter(f.classification for f in feats) == {
        "connective": 387,
        "inflammatory": 31,
        "neoplastic": 5,
    }
    assert {f.object_type for f in feats} == {"detection"}
    assert len({f.id for f in feats}) == 423
    xs, ys = zip(*(f.centroid for f in feats), strict=True)
    assert 0 <= min(xs) and max(xs) <= 1500 and 0 <= min(ys) and max(ys) <= 1500  # the 1500x1500 image


def test_reads_real_cryonuseg_labels_and_rewrites_them(tmp_path: Path) -> None:
    feats = read_geojson(_real("cryonuseg_thyroid.nuclei.geojson"))
    assert len(feats) == 59
    assert {f.classification for f in feats} == {"Nucleus"} and {f.object_type for f in feats} == {
        "annotation"
    }
    assert feats[0].name == "0403-0113" and all(f.geometry.is_valid for f in feats)
    back = read_geojson(write_geojson(tmp_path / "c.geojson", feats))
    assert len(back) == 59 and all(b.geometry.equals(f.geometry) for b, f in zip(back, feats, strict=True))
