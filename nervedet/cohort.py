"""Many slides: one output folder per slide, written whole or not at all, resumable, one bad slide never
stopping the others, and cohort.csv over them all.

Each slide's files go to a hidden temporary folder that is renamed to ``OUT/<stem>/`` when complete, with a
state file ``run.json`` (weights, settings fingerprint, the slide's size and modification time). A rerun
skips a slide whose ``run.json`` matches; anything else (other weights or settings, a changed slide, an
incomplete folder) is analysed again.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nervedet.analyze import AnalysisSettings, analyze_slide
from nervedet.atomic import remove_stale
from nervedet.paths import find_slides, slide_stem
from nervedet.report import write_cohort_csv
from nervedet.results import CohortRow, SlideResult
from nervedet.slide import SlideError, one_line
from nervedet.weights import Model

log = logging.getLogger(__name__)

STATE_FILE = "run.json"
OUTPUT_FILES = ("metrics.json", "nerves.csv", "overlay.png")  # plus <stem>.geojson
COHORT_CSV = "cohort.csv"


def _slide_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"slide": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_complete(folder: Path, stem: str, state: dict[str, Any]) -> bool:
    """True when ``folder`` holds every output and its run.json says they came from ``state``."""
    try:
        saved = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = [folder / f"{stem}.geojson", *(folder / f for f in OUTPUT_FILES)]
    return all(saved.get(k) == v for k, v in state.items()) and all(f.is_file() for f in files)


def _metrics_of(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _publish(tmp: Path, final: Path) -> None:
    """Replace ``final`` with the complete folder ``tmp`` (the old one is removed only once tmp is in place)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(out: Path, stem: str) -> None:
    """Remove what a killed run left of this slide: its hidden partial folder, or the old folder it was
    replacing. Only this slide's: each slide is analysed by one process at a time."""
    for pattern in (f".{glob.escape(stem)}.partial-*", f".{glob.escape(stem)}.old-*"):
        for leftover in out.glob(pattern):
            log.info("%s: removing %s, left by an interrupted run", stem, leftover.name)
            shutil.rmtree(leftover, ignore_errors=True)


def _error_text(path: Path, exc: BaseException) -> str:
    """One line naming the file and the problem."""
    text = one_line(exc)
    if str(path) in text:  # SlideError, WeightsError and OSError messages name the file already
        return text
    return f"{path}: {text}" if isinstance(exc, SlideError) else f"{path}: {type(exc).__name__}: {text}"


def analyze_one(path: Path, out: Path, model: Model, settings: AnalysisSettings, mpp: float | None = None,
                force: bool = False) -> CohortRow:
    """Analyse one slide into ``out/<stem>/`` unless it is complete already; never raises for a bad slide."""
    stem = slide_stem(path)
    final = out / stem
    try:
        state = {"weights_sha256": model.sha256, "fingerprint": settings.fingerprint(model.sha256, mpp),
                 **_slide_identity(path)}
    except OSError as exc:
        return CohortRow(str(path), "error", str(final), _error_text(path, exc))
    if not force and is_complete(final, stem, state):
        log.info("%s: complete in %s, skipped", path.name, final)
        return CohortRow(str(path), "skipped", str(final), "", _metrics_of(final))
    _remove_leftovers(out, stem)
    tmp = out / f".{stem}.partial-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # not mkdtemp: its folder is private (0700); the published one gets the umask like any other
    try:
        result: SlideResult = analyze_slide(path, model=model, mpp=mpp, settings=settings, workdir=tmp)
        result.save(tmp)
        run = {**state, "nervedet_version": result.slide_metrics.nervedet_version, "settings": result.settings,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / STATE_FILE).write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, final)
        return CohortRow(str(path), "done", str(final), "", result.metrics)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - one bad slide gets an error row; the cohort goes on
        log.debug("%s failed", path, exc_info=True)
        return CohortRow(str(path), "error", str(final), _error_text(path, exc))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _earlier_rows(out: Path) -> list[CohortRow]:
    """Rows for the slides that earlier runs analysed into ``out`` (read once, before this run writes)."""
    rows = []
    for state in sorted(out.glob(f"*/{STATE_FILE}")):
        try:
            slide = str(json.loads(state.read_text(encoding="utf-8"))["slide"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        metrics = _metrics_of(state.parent)
        if metrics is not None:
            rows.append(CohortRow(slide, "done", str(state.parent), "", metrics))
    return rows


def plan_slides(inputs: list[Path]) -> list[tuple[Path, str]]:
    """Every slide of ``inputs`` (files or folders) in order, each with "" or the reason it cannot be run (it is
    missing, or a slide before it has the same output name). The same on every rank of a sharded run."""
    plan: list[tuple[Path, str]] = []
    stems: dict[str, Path] = {}
    for path in find_slides(inputs):
        stem = slide_stem(path)
        if not path.exists():
            plan.append((path, f"{path}: no such file"))
        elif stem in stems:
            plan.append((path, f"{path}: same output name {stem!r} as {stems[stem]}"))
        else:
            stems[stem] = path
            plan.append((path, ""))
    return plan


def run_planned(plan: list[tuple[Path, str]], out: Path, model: Model, settings: AnalysisSettings,
                mpp: float | None = None, force: bool = False,
                on_row: Callable[[CohortRow], None] | None = None) -> list[CohortRow]:
    """Analyse the planned slides into ``out`` one by one; ``on_row`` is told each row as it is made."""
    rows: list[CohortRow] = []
    for path, problem in plan:
        row = CohortRow(str(path), "error", "", problem) if problem else analyze_one(path, out, model, settings,
                                                                                        mpp, force)
        if row.status == "error":
            log.error("%s", row.error)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def cohort_rows(rows: list[CohortRow], out: Path, earlier: list[CohortRow] | None = None) -> list[CohortRow]:
    """cohort.csv's rows: this run's, then those of slides that earlier runs analysed into ``out``."""
    seen = {str(Path(r.slide).resolve()) for r in rows}
    earlier = _earlier_rows(out) if earlier is None else earlier
    return rows + [r for r in earlier if r.slide not in seen]


def run_cohort(inputs: list[Path], out: Path, model: Model, settings: AnalysisSettings | None = None,
               mpp: float | None = None, force: bool = False,
               on_row: Callable[[CohortRow], None] | None = None) -> list[CohortRow]:
    """Analyse every slide of ``inputs`` (files or folders) into ``out``. cohort.csv, rewritten after each
    slide, has this run's rows and then those of slides that earlier runs analysed into ``out``."""
    settings = settings or AnalysisSettings()
    out.mkdir(parents=True, exist_ok=True)
    remove_stale(out / COHORT_CSV)  # a run killed while writing cohort.csv left its temporary file
    earlier = _earlier_rows(out)
    rows: list[CohortRow] = []

    def written(row: CohortRow) -> None:
        rows.append(row)
        write_cohort_csv(out / COHORT_CSV, cohort_rows(rows, out, earlier))
        if on_row is not None:
            on_row(row)

    run_planned(plan_slides(inputs), out, model, settings, mpp, force, on_row=written)
    return rows
