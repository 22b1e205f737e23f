"""Kill and resume: `nervedet infer` killed with SIGKILL after its first slide, then run again, finishes the
cohort without redoing that slide, leaves no partial file behind, and writes what an uninterrupted run writes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nervedet

SEEDS = (40, 41, 42, 43)
FILES = ("metrics.json", "nerves.csv", "overlay.png", "run.json")


def _infer(slides: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "nervedet.cli", "infer", str(slides), "--out", str(out), "--no-progress"]


def _outputs(out: Path, stem: str) -> dict[str, object]:
    """A slide's outputs, compared as an uninterrupted run would write them: every file byte for byte, except
    the time it took (metrics.json) and when and where it ran (run.json)."""
    folder = out / stem
    got: dict[str, object] = {name: (folder / name).read_bytes() for name in (f"{stem}.geojson", "nerves.csv",
                                                                               "overlay.png")}
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics.pop("runtime_s")
    got["metrics.json"] = metrics
    run = json.loads((folder / "run.json").read_text())
    run["settings"].pop("inference_s")
    got["run.json"] = {k: run[k] for k in ("weights_sha256", "fingerprint", "size", "mtime_ns", "settings")}
    return got


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cohort")
    for seed in SEEDS:  # 0.5 x 0.5 mm at 0.5 µm/px: a few seconds each with the bundled weights
        nervedet.make_synthetic_slide(folder, nervedet.SynthSettings(seed=seed, width_mm=0.5, height_mm=0.5, mpp=0.5))
    return folder


def test_a_run_killed_after_its_first_slide_resumes_without_redoing_it_and_matches_an_uninterrupted_run(
        cohort: Path, tmp_path: Path) -> None:
    stems = [f"synth_{seed}" for seed in SEEDS]
    reference = tmp_path / "reference"
    r = subprocess.run(_infer(cohort, reference), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr

    out = tmp_path / "out"
    proc = subprocess.Popen(_infer(cohort, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / stems[0] / "run.json"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert first.exists()
    unfinished = [s for s in stems[1:] if not (out / s / "run.json").exists()]
    assert unfinished, "every slide had finished before the kill: nothing was interrupted"
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / stems[0]).iterdir()}

    r = subprocess.run(_infer(cohort, out), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"{stems[0]}.svs: skipped" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / stems[0]).iterdir()} == stamps  # not redone
    assert sorted(p.name for p in out.iterdir()) == sorted([*stems, "cohort.csv"])  # no partial leftovers
    for stem in stems:
        assert sorted(p.name for p in (out / stem).iterdir()) == sorted([f"{stem}.geojson", *FILES])
        assert _outputs(out, stem) == _outputs(reference, stem), stem
    with open(out / "cohort.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(row["slide"]).name for row in rows) == [f"{s}.svs" for s in stems]
    assert all(row["status"] in ("done", "skipped") and row["nerve_count"] != "" for row in rows)
