"""DESIGN.md's QuPath GeoJSON checklist as one function, for any file the project writes."""

from __future__ import annotations

import gzip
import json
import math
import uuid
from pathlib import Path

import shapely
from shapely.geometry import shape

KNOWN_TYPES = {"annotation", "detection"}


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def check_qupath_geojson(path: Path) -> dict:
    """Assert the file is what QuPath 0.4-0.7 imports without a warning; return the parsed collection."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    data = json.loads(raw, parse_constant=_reject_constant)
    assert data["type"] == "FeatureCollection"
    ids = set()
    for f in data["features"]:
        assert f["type"] == "Feature"
        fid = f["id"]
        assert str(uuid.UUID(fid)) == fid, f"id {fid!r} is not a UUID"
        assert fid not in ids, f"duplicate id {fid}"
        ids.add(fid)
        props = f["properties"]
        assert props["objectType"] in KNOWN_TYPES
        cls = props.get("classification")
        if cls is not None:
            assert isinstance(cls["name"], str) and cls["name"]
            rgb = cls["color"]
            assert len(rgb) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in rgb)
        for k, v in props.get("measurements", {}).items():
            assert isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v), (k, v)
        geom = shape(f["geometry"])
        assert not geom.is_empty
        assert geom.is_valid, shapely.is_valid_reason(geom)
        if geom.geom_type == "MultiPolygon":
            assert len(geom.geoms) >= 2, "single-part MultiPolygon"
        if geom.geom_type in ("Polygon", "MultiPolygon"):
            rounded = shapely.set_precision(geom, 0.01)
            assert rounded.is_valid
    return data
