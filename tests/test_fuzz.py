"""Fuzzing: mutated SVS, pyramidal TIFF and GeoJSON files end as a result or as one clear error, never as an
uncaught exception, a hang or partial output.

Each case mutates the bytes of a small valid file (flipped bytes, overwritten spans, truncation, inserted or
deleted chunks; for slides often aimed at the TIFF structure rather than the JPEG pixel data; for GeoJSON also
structural edits of the parsed JSON). Case ``i`` of kind ``k`` is reproducible alone: its generator is
``np.random.default_rng([SEED, KINDS.index(k), i])`` and the failure messages print its mutations;
NERVEDET_FUZZ_SEED and NERVEDET_FUZZ_SCALE (a factor on the number of cases) make a longer hunt. A case stuck
past LIMIT seconds (even in C code) ends the run through faulthandler, with the tracebacks on the real stderr; a
case that kills the interpreter (an abort or a segfault in a C library) is the one named in ``current-case.txt``
of the test's temporary folder, which holds the mutated inputs too.
"""

from __future__ import annotations

import copy
import faulthandler
import gzip
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
import tifffile

from nervedet import SynthSettings, make_synthetic_slide
from nervedet.analyze import AnalysisSettings
from nervedet.cohort import COHORT_CSV, run_cohort
from nervedet.geojson import Feature, GeoJSONError, read_geojson
from nervedet.infer import InferSettings
from tests.fakes import GREEN, RED, TISSUE, draw_cells, fake_model

FAST = AnalysisSettings(infer=InferSettings(tile_size=256, overlap=32, workers=0, progress=False))
SEED = int(os.environ.get("NERVEDET_FUZZ_SEED", "20240611"))  # another seed or more cases for a longer hunt
SCALE = float(os.environ.get("NERVEDET_FUZZ_SCALE", "1"))
KINDS = ("svs", "tiff", "geojson")
CASES = {k: max(1, round(SCALE * n)) for k, n in {"svs": 100, "tiff": 200, "geojson": 600}.items()}  # ~1 min
LIMIT = 60.0  # seconds per case; cases normally take well under a second
TRACEBACK_FRAMES = 12  # outermost frames of a failing case's traceback in the report (a RecursionError has ~1000)
SHOWN = 10  # failing cases shown in full
SLIDE_FILES = ("metrics.json", "nerves.csv", "overlay.png", "run.json")  # plus <stem>.geojson


# ---------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A 600×400 px synthetic Aperio SVS (two levels and a thumbnail) and its truth GeoJSON."""
    return make_synthetic_slide(tmp_path_factory.mktemp("synth"),
                                SynthSettings(seed=5, width_mm=0.3, height_mm=0.2, mpp=0.5))


@pytest.fixture(scope="module")
def tiff(tmp_path_factory: pytest.TempPathFactory, pyramid_tiff: Callable[..., Path]) -> Path:
    """A 480×400 px three-level tiled JPEG TIFF painted like test_cohort's images (tumour, a nerve, cells)."""
    rng = np.random.default_rng(3)
    img = np.full((400, 480, 3), TISSUE, np.uint8)
    img[40:160, 240:400] = RED
    img[240:300, 60:160] = GREEN
    draw_cells(img, [tuple(p) for p in rng.integers(20, 380, (12, 2))])
    return pyramid_tiff(tmp_path_factory.mktemp("tiff") / "pyramid.tiff", img, mpp=0.5)


@pytest.fixture(scope="module")
def result_geojson(tiff: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """nervedet's own GeoJSON of the TIFF (annotations with measurements, detections), from the unmutated file."""
    out = tmp_path_factory.mktemp("result")
    (row,) = run_cohort([tiff], out, fake_model(), FAST, mpp=0.5)
    assert row.status == "done", row.error
    return out / tiff.stem / f"{tiff.stem}.geojson"


@pytest.fixture(scope="module")
def real_stderr(request: pytest.FixtureRequest) -> Iterator[IO[str]]:
    """The terminal's stderr (pytest captures fd 2 into a file that is lost when faulthandler ends the run)."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            fd = os.dup(2)
    else:
        fd = os.dup(2)
    with os.fdopen(fd, "w") as stream:
        yield stream


@contextmanager
def _time_limit(label: str, stream: IO[str], note: Path) -> Iterator[None]:
    """Ends the process with every thread's traceback if the case runs past LIMIT (even inside C code). The
    case's label is written to ``note`` first, for a case that crashes the interpreter."""
    note.write_text(label + "\n", encoding="utf-8")

    def warn() -> None:
        os.write(stream.fileno(), f"\n{label}: still running after {0.9 * LIMIT:.0f} s\n".encode())

    timer = threading.Timer(0.9 * LIMIT, warn)  # names the case, when the interpreter can still run a thread
    timer.daemon = True
    faulthandler.dump_traceback_later(LIMIT, exit=True, file=stream)
    timer.start()
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        timer.cancel()


# ---------------------------------------------------------------- byte mutations


@dataclass(frozen=True)
class TiffLayout:
    """Where a TIFF's structure is: the bytes that are not compressed pixel data (header, directories, tag
    values) and the directory entries, as (file offset of the entry, tag name, page index)."""

    structure: np.ndarray
    entries: list[tuple[int, str, int]]

    @classmethod
    def of(cls, path: Path) -> TiffLayout:
        keep = np.ones(path.stat().st_size, bool)
        entries = []
        with tifffile.TiffFile(path) as tif:
            assert tif.byteorder == "<" and not tif.is_bigtiff  # entries below are classic little-endian ones
            for page in tif.pages:
                for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
                    keep[offset : offset + count] = False
                entries += [(tag.offset, tag.name, page.index) for tag in page.tags]
        return cls(np.flatnonzero(keep), entries)


EXTREMES = [0, 1, 2, 255, 256, 0xFFFF, 0x10000, 10**6, 10**7, 10**9, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF]


def _offsets(rng: np.random.Generator, n: int, size: int, aim: np.ndarray | None) -> list[int]:
    """``n`` offsets below ``size``, drawn from ``aim`` (where still inside the file) when given."""
    pool = aim[aim < size] if aim is not None else None
    if pool is not None and len(pool):
        return sorted(int(p) for p in rng.choice(pool, n))
    return sorted(int(p) for p in rng.integers(0, size, n))


def _mutate_bytes(data: bytes, rng: np.random.Generator, tiff: TiffLayout | None = None) -> tuple[bytes, list[str]]:
    """One to three random edits of ``data``. With the layout of a TIFF, flips and overwrites land on its
    structure, and an edit may set the count or value of a directory entry to an extreme number.
    Returns the new bytes and a description of each edit."""
    buf = bytearray(data)
    done: list[str] = []
    ops = ["flip", "overwrite", "truncate", "insert", "delete", "entry"]
    weights = [0.35, 0.15, 0.12, 0.1, 0.1, 0.18] if tiff else [0.4, 0.2, 0.14, 0.13, 0.13, 0.0]
    aim, where = (tiff.structure, " (aimed at the structure)") if tiff else (None, "")
    for _ in range(int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))):
        op, size = str(rng.choice(ops, p=weights)), len(buf)
        if op == "truncate":
            cut = int(rng.choice([0, rng.integers(1, 16), rng.integers(0, min(65536, size) + 1),
                                  rng.integers(0, size + 1)]))
            del buf[cut:]
            done.append(f"truncate to {cut} bytes")
        elif op == "insert":
            at, n = int(rng.integers(0, size + 1)), int(rng.integers(1, 513))
            buf[at:at] = rng.bytes(n)
            done.append(f"insert {n} random bytes at {at}")
        elif size == 0:
            continue
        elif op == "flip":
            at = _offsets(rng, int(np.exp(rng.uniform(0, np.log(51)))), size, aim)  # 1..50, mostly few
            for p in at:
                buf[p] ^= int(rng.integers(1, 256))
            done.append(f"flip {len(at)} bytes at {at[:8]}{'...' if len(at) > 8 else ''}{where}")
        elif op == "overwrite":
            (at,), n = _offsets(rng, 1, size, aim), int(rng.integers(1, 257))
            buf[at : at + n] = rng.bytes(len(buf[at : at + n]))
            done.append(f"overwrite {n} bytes at {at} with random bytes{where}")
        elif op == "delete":
            at, n = int(rng.integers(0, size)), int(rng.integers(1, 513))
            del buf[at : at + n]
            done.append(f"delete {n} bytes at {at}")
        else:  # entry: code (2 bytes), type (2), count (4), value or offset of the values (4)
            entry, name, page = tiff.entries[int(rng.integers(0, len(tiff.entries)))]
            field = str(rng.choice(["count", "value"], p=[0.25, 0.75]))
            at = entry + (4 if field == "count" else 8)
            if at + 4 <= size:
                was, pick = int.from_bytes(buf[at : at + 4], "little"), rng.random()
                number = (int(rng.choice(EXTREMES)) if pick < 0.5 else int(rng.integers(0, 2**32)) if pick < 0.7
                          else (was * int(rng.choice([2, 16, 1000])) + int(rng.integers(-1, 2))) % 2**32)
                buf[at : at + 4] = number.to_bytes(4, "little")
                done.append(f"set the {field} of page {page}'s {name} (entry at byte {entry}) to {number}")
    return bytes(buf), done


# ---------------------------------------------------------------- GeoJSON structure mutations

NEST = "\x00nest\x00"  # placeholder replaced by deeply nested JSON text after serialising
WRONG = [None, True, 0, -1, 1.5e308, float("nan"), float("inf"), "", "text", [], {}, [[]], [None], {"type": 1},
         {"type": "Polygon"}, {"type": "Point", "coordinates": "1,2"}, [[1, 2], [3]]]
TYPES = ["Point", "MultiPoint", "LineString", "Polygon", "MultiPolygon", "GeometryCollection", "Feature",
         "FeatureCollection", "Nonsense", ""]


def _slots(obj: Any) -> list[tuple[Any, Any]]:
    """Every (container, key or index) of a parsed JSON document, found without recursion."""
    out, stack = [], [obj]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, value in items:
            out.append((node, key))
            stack.append(value)
    return out


def _stringify_numbers(value: Any, rng: np.random.Generator) -> Any:
    if isinstance(value, list):
        return [_stringify_numbers(v, rng) for v in value]
    return str(value) if isinstance(value, (int, float)) and rng.random() < 0.5 else value


def _mutate_structure(text: str, rng: np.random.Generator) -> tuple[str, list[str]]:
    """One to three edits of the parsed JSON, re-serialised."""
    doc = json.loads(text)
    done: list[str] = []
    nests: list[str] = []
    for _ in range(int(rng.integers(1, 4))):
        slots = _slots(doc)
        if not slots:
            break
        op = str(rng.choice(["delete", "wrong type", "nest", "coordinates", "type"]))
        if op == "coordinates" or (op == "nest" and rng.random() < 0.5):  # shapely walks coordinates recursively
            slots = [(c, k) for c, k in slots if k == "coordinates"] or slots
        elif op == "type":
            slots = [(c, k) for c, k in slots if k == "type"] or slots
        container, key = slots[int(rng.integers(0, len(slots)))]
        if op == "delete":
            del container[key]
            done.append(f"delete [{key!r}]")
        elif op == "wrong type":
            container[key] = copy.deepcopy(WRONG[int(rng.integers(0, len(WRONG)))])
            done.append(f"[{key!r}] = {container[key]!r}")
        elif op == "nest":
            depth, bracket = int(rng.choice([3, 60, 300, 600, 900, 3000, 100_000])), str(rng.choice(["[]", "{}"]))
            inner = json.dumps(container[key]) if bracket == "[]" else "0"
            opener = "[" if bracket == "[]" else '{"a":'
            nests.append(opener * depth + inner + bracket[1] * depth)
            container[key] = f"{NEST}{len(nests) - 1}"
            done.append(f"nest [{key!r}] {depth} deep in {bracket}")
        elif op == "coordinates":
            if rng.random() < 0.3:
                container[key] = json.dumps(container[key])
                done.append(f"[{key!r}] as one string")
            else:
                container[key] = _stringify_numbers(container[key], rng)
                done.append(f"numbers of [{key!r}] as strings")
        else:
            container[key] = TYPES[int(rng.integers(0, len(TYPES)))]
            done.append(f"[{key!r}] = {container[key]!r}")
    out = json.dumps(doc)
    for n, nested in reversed(list(enumerate(nests))):  # the later ones may hold the earlier ones
        out = out.replace(json.dumps(f"{NEST}{n}"), nested)
    return out, done


# ---------------------------------------------------------------- checks


def _hidden(out: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(out):
        found += [str(Path(root, n).relative_to(out)) for n in dirs + files if n.startswith(".")]
    return found


def _slide_case_problems(path: Path, out: Path, rows: list[Any]) -> list[str]:
    """What is wrong with run_cohort's answer and output folder for one mutated slide."""
    if len(rows) != 1 or rows[0].status not in ("done", "error"):
        return [f"expected one row, done or error: {rows!r}"]
    row, stem = rows[0], path.stem
    problems = []
    if row.status == "error" and ("\n" in row.error or path.name not in row.error):
        problems.append(f"error is not one line naming {path.name}: {row.error!r}")
    top = sorted(p.name for p in out.iterdir())
    want = sorted([COHORT_CSV, stem]) if row.status == "done" else [COHORT_CSV]
    if [n for n in top if not n.startswith(".")] != want:
        problems.append(f"{row.status}: output folder holds {top}, not {want}")
    if row.status == "done" and (out / stem).is_dir():
        files = sorted(p.name for p in (out / stem).iterdir())
        if files != sorted([f"{stem}.geojson", *SLIDE_FILES]):
            problems.append(f"done: {stem}/ holds {files}")
    if hidden := _hidden(out):
        problems.append(f"hidden leftovers in the output folder: {hidden}")
    return problems


def _report(kind: str, problems: list[str], times: list[tuple[float, str]], counts: dict[str, int]) -> str:
    slowest = max(times)
    return (f"{kind}: {len(times)} cases, {counts}, slowest {slowest[0]:.2f} s ({slowest[1]}); "
            f"{len(problems)} failing{f', the first {SHOWN} shown' if len(problems) > SHOWN else ''}:\n\n"
            + "\n\n".join(problems[:SHOWN]))


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", ["svs", "tiff"])
def test_mutated_slides_end_done_or_as_one_error_line_with_no_partial_output(
    kind: str, synth: Any, tiff: Path, real_stderr: IO[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL)  # each bad slide logs its error row; the report below has what matters
    original = synth.slide_path if kind == "svs" else tiff
    data, layout = original.read_bytes(), TiffLayout.of(original)
    model = fake_model()
    (row,) = run_cohort([original], tmp_path / "unmutated", model, FAST, mpp=0.5)
    assert row.status == "done", f"the unmutated {original.name} must be analysed: {row.error}"
    inputs = tmp_path / "in"
    inputs.mkdir()
    counts = {"done": 0, "error": 0}
    problems: list[str] = []
    times: list[tuple[float, str]] = []
    for i in range(CASES[kind]):
        rng = np.random.default_rng([SEED, KINDS.index(kind), i])
        mutated, edits = _mutate_bytes(data, rng, layout if rng.random() < 0.5 else None)
        path = inputs / f"case{i}{original.suffix}"
        path.write_bytes(mutated)
        out = tmp_path / f"case{i}"
        label = f"{kind} case {i} ({path}, {len(mutated)} bytes): {'; '.join(edits)}"
        t0 = time.perf_counter()
        try:
            with _time_limit(label, real_stderr, tmp_path / "current-case.txt"):
                rows = run_cohort([path], out, model, FAST, mpp=0.5)
        except Exception:  # noqa: BLE001 - collected: every failing case is reported
            problems.append(f"{label}\n{traceback.format_exc(limit=TRACEBACK_FRAMES)}")
            continue
        finally:
            times.append((time.perf_counter() - t0, label))
        if rows and rows[0].status in counts:
            counts[rows[0].status] += 1
        problems += [f"{label}\n  {p}" for p in _slide_case_problems(path, out, rows)]
    report = _report(kind, problems, times, counts)
    print(report.split("\n")[0])
    assert not problems, report
    assert max(times)[0] < LIMIT, report
    assert counts["error"] > 0 and counts["done"] > 0, f"the mutations do not exercise both outcomes: {report}"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN coordinates, on purpose
def test_mutated_geojson_is_read_or_refused_with_one_geojson_error_line(
    synth: Any, result_geojson: Path, real_stderr: IO[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL)  # skipped features and repaired rings are logged; expected here
    sources = [synth.truth_path, result_geojson]  # the synthetic truth, and nervedet's own QuPath output
    assert all(read_geojson(p) for p in sources)
    counts = {"read": 0, "GeoJSONError": 0}
    problems: list[str] = []
    times: list[tuple[float, str]] = []
    for i in range(CASES["geojson"]):
        rng = np.random.default_rng([SEED, KINDS.index("geojson"), i])
        text = sources[i % 2].read_text(encoding="utf-8")
        if rng.random() < 0.5:
            mutated, edits = _mutate_bytes(text.encode(), rng)
        else:
            new_text, edits = _mutate_structure(text, rng)
            mutated = new_text.encode()
            if rng.random() < 0.3:  # and then broken bytes of the result
                mutated, more = _mutate_bytes(mutated, rng)
                edits += more
        if rng.random() < 0.15:  # read_geojson also reads gzip; sometimes the stream itself is broken
            mutated = gzip.compress(mutated, mtime=0)
            edits.append("gzip")
            if rng.random() < 0.5:
                mutated, more = _mutate_bytes(mutated, rng)
                edits += [f"{e} of the gzip stream" for e in more]
        path = tmp_path / f"case{i}.geojson"
        path.write_bytes(mutated)
        label = f"geojson case {i} ({path} from {sources[i % 2].name}, {len(mutated)} bytes): {'; '.join(edits)}"
        t0 = time.perf_counter()
        try:
            with _time_limit(label, real_stderr, tmp_path / "current-case.txt"):
                feats = read_geojson(path)
        except GeoJSONError as exc:
            counts["GeoJSONError"] += 1
            if "\n" in str(exc) or path.name not in str(exc):
                problems.append(f"{label}\n  GeoJSONError is not one line naming {path.name}: {str(exc)!r}")
        except Exception:  # noqa: BLE001 - collected: every failing case is reported
            problems.append(f"{label}\n{traceback.format_exc(limit=TRACEBACK_FRAMES)}")
        else:
            counts["read"] += 1
            if not isinstance(feats, list) or not all(isinstance(f, Feature) for f in feats):
                problems.append(f"{label}\n  returned {type(feats).__name__}, not a list of Feature")
        finally:
            times.append((time.perf_counter() - t0, label))
    report = _report("geojson", problems, times, counts)
    print(report.split("\n")[0])
    assert not problems, report
    assert max(times)[0] < LIMIT, report
    assert counts["GeoJSONError"] > 0 and counts["read"] > 0, f"the mutations do not exercise both outcomes: {report}"
