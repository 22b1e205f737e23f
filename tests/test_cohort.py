"""Many slides: one complete folder per slide or none, resume by state file, one bad slide never stops a run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nervedet.analyze import AnalysisSettings, analyze_slide
from nervedet.cohort import COHORT_CSV, run_cohort
from nervedet.geojson import read_geojson
from nervedet.infer import InferSettings
from tests.fakes import GREEN, RED, TISSUE, draw_cells, fake_model
from tests.qupath_checks import check_qupath_geojson

FAST = AnalysisSettings(infer=InferSettings(tile_size=256, overlap=32, workers=0, progress=False))


def _image(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    img = np.full((500, 600, 3), TISSUE, np.uint8)
    img[50:200, 300:500] = RED
    img[300:380, 80:200] = GREEN
    draw_cells(img, [tuple(p) for p in rng.integers(20, 480, (12, 2))])
    Image.fromarray(img).save(path)
    return path


@pytest.fixture
def slides(tmp_path: Path) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    _image(folder / "a.png", 1)
    _image(folder / "b.png", 2)
    (folder / "broken.svs").write_bytes(b"not a slide at all")
    (folder / "notes.txt").write_text("not a slide: ignored")
    return folder


def _rows(out: Path) -> list[dict]:
    with open(out / COHORT_CSV, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_a_bad_slide_gets_an_error_row_and_the_others_are_complete(slides: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rows = run_cohort([slides], out, fake_model(), FAST, mpp=0.5)
    assert [(Path(r.slide).name, r.status) for r in rows] == [("a.png", "done"), ("b.png", "done"),
                                                              ("broken.svs", "error")]
    assert "broken.svs" in rows[2].error and "\n" not in rows[2].error
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", COHORT_CSV]  # no partial folder, none for broken
    for stem in ("a", "b"):
        files = sorted(p.name for p in (out / stem).iterdir())
        assert files == sorted([f"{stem}.geojson", "metrics.json", "nerves.csv", "overlay.png", "run.json"])
        check_qupath_geojson(out / stem / f"{stem}.geojson")
        metrics = json.loads((out / stem / "metrics.json").read_text())
        assert metrics["nerve_count"] == 1 and metrics["immune_cell_count"] == 12
    table = _rows(out)
    assert [r["status"] for r in table] == ["done", "done", "error"]
    assert table[0]["nerve_count"] == "1" and table[2]["nerve_count"] == ""


def test_a_rerun_skips_complete_slides_and_redoes_changed_or_incomplete_ones(slides: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    model = fake_model()
    run_cohort([slides], out, model, FAST, mpp=0.5)
    stamp = (out / "a" / "a.geojson").stat().st_mtime_ns
    again = run_cohort([slides], out, model, FAST, mpp=0.5)
    assert [r.status for r in again] == ["skipped", "skipped", "error"]
    assert (out / "a" / "a.geojson").stat().st_mtime_ns == stamp
    assert again[0].metrics["nerve_count"] == 1  # a skipped slide still has its row in cohort.csv
    assert _rows(out)[0]["nerve_count"] == "1"

    (out / "b" / "overlay.png").unlink()  # incomplete: redone
    other = AnalysisSettings(infer=InferSettings(tile_size=256, overlap=64, workers=0, progress=False))
    rows = run_cohort([slides / "a.png", slides / "b.png"], out, model, FAST, mpp=0.5)
    assert [r.status for r in rows] == ["skipped", "done"]
    rows = run_cohort([slides / "a.png"], out, model, other, mpp=0.5)  # other settings: redone
    assert [r.status for r in rows] == ["done"]
    rows = run_cohort([slides / "a.png"], out, model, other, mpp=0.5, force=True)
    assert [r.status for r in rows] == ["done"]
    # batch size and workers do not change results: no reason to redo
    same = AnalysisSettings(infer=InferSettings(tile_size=256, overlap=64, workers=1, batch_size=2, progress=False))
    assert [r.status for r in run_cohort([slides / "a.png"], out, model, same, mpp=0.5)] == ["skipped"]


def test_a_plain_image_without_pixel_size_is_refused_naming_it(slides: Path, tmp_path: Path) -> None:
    rows = run_cohort([slides / "a.png"], tmp_path / "out", fake_model(), FAST)
    assert rows[0].status == "error" and "a.png" in rows[0].error and "--mpp" in rows[0].error
    assert not (tmp_path / "out" / "a").exists()


def test_the_api_result_saves_the_same_files_with_qupath_coordinates(slides: Path, tmp_path: Path) -> None:
    result = analyze_slide(slides / "a.png", model=fake_model(), mpp=0.5, settings=FAST)
    assert result.metrics["slide"] == "a.png" and len(result.immune_cells) == 12
    assert result.immune_cells.shape == (12, 2) and result.immune_probabilities.shape == (12,)
    (nerve,) = result.nerves
    assert nerve.geometry.bounds == pytest.approx((80, 300, 200, 380), abs=1.5)
    folder = result.save(tmp_path / "api")
    feats = read_geojson(folder / "a.geojson")
    assert sum(f.classification == "Nerve" for f in feats) == 1
    assert sum(f.object_type == "detection" for f in feats) == 12


def test_cohort_csv_keeps_the_slides_of_earlier_runs_into_the_same_folder(slides: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_cohort([slides / "a.png"], out, fake_model(), FAST, mpp=0.5)
    run_cohort([slides / "b.png", slides / "broken.svs"], out, fake_model(), FAST, mpp=0.5)
    table = _rows(out)
    assert [(Path(r["slide"]).name, r["status"]) for r in table] == [("b.png", "done"), ("broken.svs", "error"),
                                                                     ("a.png", "done")]
    assert table[2]["nerve_count"] == "1"


def test_a_rerun_removes_the_temporary_cohort_csv_of_a_run_killed_while_writing_it(slides: Path,
                                                                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".cohort.csv.k1ll3d.tmp"  # what atomic_path leaves when SIGKILL lands before the rename
    stale.write_text("slide,status\n")
    keep = out / ".cohort.csv.notes"  # not one of its temporary files
    keep.write_text("mine")
    run_cohort([slides / "a.png"], out, fake_model(), FAST, mpp=0.5)
    assert not stale.exists() and keep.exists()
    assert [Path(r["slide"]).name for r in _rows(out)] == ["a.png"]
