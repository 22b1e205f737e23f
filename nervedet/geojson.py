"""QuPath GeoJSON: a strict writer and a tolerant reader (export, training labels, evaluation).

Coordinates in memory are level-0 pixels of the slide as OpenSlide sees it. QuPath crops some formats to
``openslide.bounds-x/y``; pass those as ``offset``: the writer subtracts it, the reader adds it back.
Geometry work is vectorised with shapely so that 10^5-10^6 immune-cell points stay fast.
"""

from __future__ import annotations

import gzip as gzip_module
import io
import itertools
import json
import logging
import math
import os
import re
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.errors import ShapelyError
from shapely.geometry import GeometryCollection, LinearRing, LineString, MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry

from nervedet.classes import color_of

log = logging.getLogger(__name__)

GRID_SIZE = 0.01  # px; coordinates are written on this grid
OBJECT_TYPES = ("annotation", "detection")
# QuPath object types (and QuPath 0.2's Java class ids) that are detections; the rest read as annotations.
_DETECTION_TYPES = {"detection", "cell", "tile", "pathdetectionobject", "pathcellobject", "pathtileobject"}
_RING, _MULTIPOLYGON, _COLLECTION = 2, 6, 7  # shapely.GeometryType ids
_POLYGONAL = (3, 6, 7)
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[1-8][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_CHUNK = 4096
MAX_GEOJSON_BYTES = 2 << 30  # files (or gzip contents) larger than 2 GiB are refused
Offset = tuple[float, float]  # openslide.bounds-x/y of the slide


class GeoJSONError(ValueError):
    """A file that is not JSON or not GeoJSON; the message names the file."""


def _new_id() -> str:
    """A random (version 4) UUID string; a faster str(uuid.uuid4())."""
    b = bytearray(os.urandom(16))
    b[6], b[8] = (b[6] & 0x0F) | 0x40, (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass
class Feature:
    """One QuPath object: geometry in level-0 px of the slide, type, class and measurements."""

    geometry: BaseGeometry
    object_type: str = "annotation"
    classification: str | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    id: str = field(default_factory=_new_id)
    name: str | None = None

    @property
    def centroid(self) -> tuple[float, float]:
        """The geometry's centroid (x, y) in level-0 px."""
        c = self.geometry.centroid
        if c.is_empty:
            raise ValueError(f"feature {self.id} has an empty geometry")
        return (float(c.x), float(c.y))


def _polygonal_part(geom: BaseGeometry) -> Polygon | MultiPolygon | None:
    """The polygonal content of a geometry (the polygons of a GeometryCollection), or None."""
    if isinstance(geom, GeometryCollection) and not isinstance(geom, MultiPolygon):
        subs = [_polygonal_part(part) for part in geom.geoms]
        polys = [p for sub in subs if sub is not None for p in shapely.get_parts(sub)]
        if not polys:
            return None
        geom = MultiPolygon(polys)
        if not geom.is_valid:  # overlapping or touching parts: dissolve them
            geom = shapely.union_all(polys)
    return geom if isinstance(geom, (Polygon, MultiPolygon)) and not geom.is_empty else None


def clean_polygonal(
    geom: BaseGeometry | None, grid_size: float | None = GRID_SIZE
) -> Polygon | MultiPolygon | None:
    """Repair a polygonal geometry: make_valid, keep holes and only polygonal parts, snap to
    ``grid_size`` (validity kept; None = no snapping), drop degenerate results (None), and turn a
    one-part MultiPolygon into a Polygon."""
    if geom is None or geom.is_empty:
        return None
    g = _polygonal_part(geom if geom.is_valid else shapely.make_valid(geom))
    for _ in range(3):  # make_valid can add off-grid vertices; snapping again converges at once
        if g is None:
            return None
        if grid_size:
            g = _polygonal_part(shapely.set_precision(g, grid_size))
        if g is None or g.is_valid:
            break
        g = _polygonal_part(shapely.make_valid(g))
    else:
        log.warning("could not make a valid polygon of %s; dropped", geom.geom_type)
        return None
    if isinstance(g, MultiPolygon) and len(g.geoms) == 1:
        g = g.geoms[0]
    return g


def _as_array(geoms: Sequence[Any] | np.ndarray) -> np.ndarray:
    """An object array of geometries; None for anything missing, empty or with non-finite coordinates."""
    arr = np.empty(len(geoms), dtype=object)
    arr[:] = geoms
    arr[~shapely.is_geometry(arr)] = None
    arr[shapely.is_empty(arr)] = None
    arr = shapely.force_2d(arr)
    xy, index = shapely.get_coordinates(arr, return_index=True)
    arr[np.unique(index[~np.isfinite(xy).all(axis=1)])] = None
    return arr


def _shift(arr: np.ndarray, dx: float, dy: float) -> np.ndarray:
    if dx == 0 and dy == 0:
        return arr
    return shapely.transform(arr, lambda c: c + np.array([dx, dy]))


def _prepare_one(g: BaseGeometry) -> BaseGeometry | None:
    """The slow path of _prepare_geometries: repairs, rings, collapsed lines."""
    if shapely.get_type_id(g) in _POLYGONAL:
        return clean_polygonal(g)
    if isinstance(g, LinearRing):
        g = LineString(g.coords)
    g = shapely.set_precision(g, GRID_SIZE)
    return g if g.is_valid and not g.is_empty else None


def _prepare_geometries(geoms: Sequence[Any], offset: Offset) -> np.ndarray:
    """Geometries as written: 2-D, shifted by -offset, valid on the 0.01 grid; None where nothing is left."""
    arr = _shift(_as_array(geoms), -float(offset[0]), -float(offset[1]))
    types = shapely.get_type_id(arr)
    fast = shapely.is_valid(arr) & ~np.isin(types, (_RING, _COLLECTION))
    out = np.full(len(arr), None, dtype=object)
    out[fast] = shapely.set_precision(arr[fast], GRID_SIZE)
    ok = shapely.is_valid(out) & ~shapely.is_empty(out)
    single = ok & (shapely.get_type_id(out) == _MULTIPOLYGON) & (shapely.get_num_geometries(out) == 1)
    out[single] = shapely.get_geometry(out[single], 0)
    for i in np.flatnonzero(~ok & (types >= 0)):
        out[i] = _prepare_one(arr[i])
    return out


def _measurements_out(m: dict[str, Any], fid: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in m.items():
        if not isinstance(value, (int, float, np.integer, np.floating, np.bool_)):
            raise TypeError(f"feature {fid}: measurement {key!r} is {type(value).__name__}, not a number")
        v = float(value)
        if not math.isfinite(v):
            log.debug("feature %s: measurement %r is %s; dropped", fid, key, v)
            continue
        out[str(key)] = v
    return out


def _valid_uuid(value: object) -> str | None:
    """The canonical form of a UUID string, else None."""
    if not isinstance(value, str):
        return None
    if _UUID_RE.fullmatch(value):
        return value
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def _properties(f: Feature, fid: str) -> dict[str, Any]:
    if f.object_type not in OBJECT_TYPES:
        raise ValueError(f"feature {f.id}: object_type {f.object_type!r} is not one of {OBJECT_TYPES}")
    props: dict[str, Any] = {"objectType": f.object_type}
    if f.name is not None:
        props["name"] = str(f.name)
    if f.classification:
        props["classification"] = {"name": f.classification, "color": list(color_of(f.classification))}
    if f.object_type == "annotation":
        props["isLocked"] = False
    if meas := _measurements_out(f.measurements, fid):
        props["measurements"] = meas
    return props


def _feature_texts(features: Iterable[Feature], offset: Offset) -> Iterator[str]:
    """One compact JSON text per feature that keeps a geometry; the dropped ones are logged."""
    seen: set[str] = set()
    dropped: list[str] = []
    iterator = iter(features)
    while chunk := list(itertools.islice(iterator, _CHUNK)):
        geometries = shapely.to_geojson(_prepare_geometries([f.geometry for f in chunk], offset))
        for f, geometry in zip(chunk, geometries, strict=True):
            if geometry is None:
                dropped.append(str(f.id))
                continue
            fid = _valid_uuid(f.id)
            if fid is None or fid in seen:
                fid = _new_id()
                log.debug("feature id %r is not a unique UUID; written as %s", f.id, fid)
            seen.add(fid)
            props = _dumps(_properties(f, fid))
            yield f'{{"type":"Feature","id":"{fid}","geometry":{geometry},"properties":{props}}}'
    if dropped:
        log.warning("%d features not written (geometry empty or degenerate): %s", len(dropped), dropped[:5])


def _dumps(obj: Any) -> str:
    return json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def to_feature_collection(features: Iterable[Feature], offset: Offset = (0, 0)) -> dict[str, Any]:
    """A QuPath-ready GeoJSON FeatureCollection dict (offset subtracted, geometries repaired)."""
    features_out = [json.loads(text) for text in _feature_texts(features, offset)]
    return {"type": "FeatureCollection", "features": features_out}


def write_geojson(
    path: str | os.PathLike[str],
    features: Iterable[Feature],
    *,
    offset: Offset = (0.0, 0.0),
    gzip: bool | None = None,
) -> Path:
    """Write features as a FeatureCollection, atomically (temporary file + os.replace).

    ``gzip=None`` compresses iff the name ends with ``.gz``. Features are streamed, one per line."""
    path = Path(path)
    if gzip is None:
        gzip = path.name.lower().endswith(".gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    n = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp
        with open(fd, "wb") as raw:
            with (
                gzip_module.GzipFile(fileobj=raw, mode="wb", mtime=0) if gzip else nullcontext(raw) as stream
            ):
                out = io.TextIOWrapper(stream, encoding="utf-8", newline="\n")
                out.write('{"type":"FeatureCollection","features":[')
                for text in _feature_texts(features, offset):
                    out.write(("\n" if n == 0 else ",\n") + text)
                    n += 1
                out.write("\n]}\n")
                out.detach()  # flushes; closing is left to the with blocks
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %d features to %s", n, path)
    return path


def _gunzip(data: bytes, path: Path) -> bytes:
    """Decompress at most MAX_GEOJSON_BYTES (a small file must not expand into all the memory there is)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = d.decompress(data, MAX_GEOJSON_BYTES + 1)
    if len(out) > MAX_GEOJSON_BYTES:
        raise GeoJSONError(f"{path}: expands to more than {MAX_GEOJSON_BYTES / 2**30:.0f} GiB of GeoJSON; refused")
    if not d.eof:
        raise GeoJSONError(f"{path}: not JSON (gzip stream cut short)")
    return out


def _load_json(path: Path) -> Any:
    """The parsed JSON of a file (gzipped or not), bounded in size and nesting; GeoJSONError otherwise."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise GeoJSONError(f"{path}: cannot read ({e.strerror or e})") from None
    if size > MAX_GEOJSON_BYTES:
        raise GeoJSONError(f"{path}: {size / 2**30:.1f} GiB, over the {MAX_GEOJSON_BYTES / 2**30:.0f} GiB "
                           "that nervedet reads; refused")
    data = path.read_bytes()
    try:
        if data[:2] == b"\x1f\x8b":
            data = _gunzip(data, path)
        return json.loads(data.decode("utf-8-sig"))
    except RecursionError:
        raise GeoJSONError(f"{path}: not GeoJSON (JSON nested too deeply)") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GeoJSONError(f"{path}: not JSON ({type(e).__name__}: {' '.join(str(e).split())})") from None


def _feature_list(obj: Any, path: Path) -> list[Any]:
    if isinstance(obj, list):
        return obj
    if not isinstance(obj, dict):
        raise GeoJSONError(f"{path}: not GeoJSON (top level is a JSON {type(obj).__name__})")
    kind = obj.get("type")
    if kind == "Feature" or (kind is None and "geometry" in obj):
        return [obj]
    if kind == "FeatureCollection" or (kind is None and "features" in obj):
        feats = obj.get("features")
        if not isinstance(feats, list):
            raise GeoJSONError(f"{path}: not GeoJSON ('features' is not a list)")
        return feats
    raise GeoJSONError(f"{path}: not GeoJSON (top-level type {kind!r}, not FeatureCollection or Feature)")


def _object_type(props: dict[str, Any], raw_id: Any) -> str:
    value = props.get("objectType", props.get("object_type"))
    if value is None and "isDetection" in props:
        value = "detection" if props["isDetection"] else "annotation"
    if value is None:  # QuPath 0.2 wrote the Java class (PathDetectionObject, ...) as the id
        value = raw_id
    return "detection" if str(value).lower() in _DETECTION_TYPES else "annotation"


def _classification(value: Any) -> str | None:
    if isinstance(value, dict):
        names = value.get("names")
        value = ": ".join(map(str, names)) if isinstance(names, list) and names else value.get("name")
    return value if isinstance(value, str) and value.strip() else None


def _measurements_in(value: Any) -> dict[str, float]:
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):  # QuPath 0.2: [{"name": ..., "value": ...}]
        items = [(m.get("name"), m.get("value")) for m in value if isinstance(m, dict)]
    else:
        return {}
    numeric = ((k, v) for k, v in items if k is not None and type(v) in (int, float) and math.isfinite(v))
    return {str(k): float(v) for k, v in numeric}


def _unclosed(raw: dict[str, Any]) -> bool:
    """True when a Polygon or MultiPolygon ring does not end where it starts (shapely closes it silently)."""
    coords = raw.get("coordinates")
    polys = [coords] if raw.get("type") == "Polygon" else coords if raw.get("type") == "MultiPolygon" else []
    try:
        return any(len(ring) > 1 and list(ring[0][:2]) != list(ring[-1][:2]) for poly in polys for ring in poly)
    except (TypeError, IndexError, KeyError):
        return False  # malformed: reported as such by shape()


def _geometries_in(raws: list[dict[str, Any]], path: Path, label: Callable[[int], str]) -> np.ndarray:
    """Shapely geometries of GeoJSON geometry dicts (points in bulk); unclosed rings closed and invalid
    (self-intersecting) polygons repaired, with a warning naming the features (``label(i)``, asked only for
    those); None where a geometry is malformed, empty or degenerate (logged)."""
    geoms: list[Any] = [None] * len(raws)
    points: dict[int, list[float]] = {}
    unclosed: list[int] = []
    for i, raw in enumerate(raws):
        xy = raw.get("coordinates")
        if raw["type"] == "Point" and isinstance(xy, list) and len(xy) in (2, 3):
            if type(xy[0]) in (int, float) and type(xy[1]) in (int, float):
                points[i] = xy[:2]
                continue
        try:
            geoms[i] = shape(raw)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, ShapelyError, RecursionError) as e:
            log.debug("%s: %s: geometry is malformed: %s", path, label(i), type(e).__name__)
            continue
        if raw["type"] in ("Polygon", "MultiPolygon") and _unclosed(raw):
            unclosed.append(i)
    arr = np.empty(len(raws), dtype=object)
    arr[:] = geoms
    if points:
        arr[list(points)] = shapely.points(np.array(list(points.values()), dtype=float))
    arr = _as_array(arr)
    types = shapely.get_type_id(arr)
    repair = np.isin(types, _POLYGONAL) & ((types == _COLLECTION) | ~shapely.is_valid(arr))
    for i in np.flatnonzero(repair):
        arr[i] = clean_polygonal(arr[i], grid_size=None)
    invalid = [i for i in np.flatnonzero(repair) if types[i] != _COLLECTION and arr[i] is not None]
    unclosed = [i for i in unclosed if arr[i] is not None]
    for what, found in (("unclosed polygon rings closed", unclosed),
                        ("self-intersecting or otherwise invalid polygons repaired", invalid)):
        if found:
            log.warning("%s: %d %s: %s%s", path, len(found), what, ", ".join(label(i) for i in found[:5]),
                        ", ..." if len(found) > 5 else "")
    return arr


def _label(index: int, raw: dict[str, Any], props: dict[str, Any]) -> str:
    """How a warning names a feature: its index in the file, and its id or name when it has one."""
    ident = raw.get("id", props.get("id"))
    name = props.get("name")
    extra = f"id {ident}" if isinstance(ident, (str, int)) else f"name {name!r}" if isinstance(name, str) else ""
    return f"feature {index}" + (f" ({extra})" if extra else "")


def read_geojson(path: str | os.PathLike[str], *, offset: Offset = (0.0, 0.0)) -> list[Feature]:
    """Read QuPath (0.2-0.7) or other GeoJSON: FeatureCollection, bare array or one Feature, gzip or not.

    The offset is added to every coordinate. Features without a usable geometry are skipped (logged)."""
    path = Path(path)
    kept: list[tuple[int, dict[str, Any], dict[str, Any]]] = []
    for i, raw in enumerate(_feature_list(_load_json(path), path)):
        if not isinstance(raw, dict):
            raise GeoJSONError(f"{path}: not GeoJSON (feature {i} is a JSON {type(raw).__name__})")
        props = raw.get("properties") or {}
        if not isinstance(props, dict):
            raise GeoJSONError(f"{path}: not GeoJSON (feature {i}: 'properties' is not an object)")
        geometry = raw.get("geometry")
        if geometry is None:
            continue  # QuPath never writes this; other tools use it for "no location"
        if not isinstance(geometry, dict) or not isinstance(geometry.get("type"), str):
            raise GeoJSONError(f"{path}: not GeoJSON (feature {i}: 'geometry' is not a geometry object)")
        kept.append((i, raw, props))
    geoms = _geometries_in([raw["geometry"] for _, raw, _ in kept], path, lambda k: _label(*kept[k]))
    geoms = _shift(geoms, float(offset[0]), float(offset[1]))
    features: list[Feature] = []
    unusable: list[int] = []
    for (i, raw, props), geom in zip(kept, geoms, strict=True):
        if geom is None:
            unusable.append(i)
            continue
        raw_id = raw.get("id", props.get("id"))
        name = props.get("name")
        features.append(
            Feature(
                geometry=geom,
                object_type=_object_type(props, raw_id),
                classification=_classification(props.get("classification")),
                measurements=_measurements_in(props.get("measurements")),
                id=_valid_uuid(raw_id) or _new_id(),
                name=name if isinstance(name, str) else None,
            )
        )
    if unusable:
        log.warning("%s: %d features skipped (malformed, empty or degenerate geometry): features %s%s", path,
                    len(unusable), ", ".join(map(str, unusable[:5])), ", ..." if len(unusable) > 5 else "")
    log.info("read %d features from %s", len(features), path)
    return features
