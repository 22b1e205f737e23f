"""Every bad input the issue lists: one clear line naming the file, no traceback, a non-zero exit status and no
partial output; and a cohort of one good and four bad slides that finishes the good one and, run again, skips it
and leaves its outputs byte for byte as they were."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from nervedet import geojson as G
from nervedet.analyze import AnalysisSettings
from nervedet.cli import main
from nervedet.cohort import run_cohort
from nervedet.geojson import GeoJSONError, read_geojson
from nervedet.infer import InferSettings
from nervedet.paths import safe_name, slide_stem
from nervedet.slide import SlideError, open_slide
from tests.fakes import GREEN, RED, TISSUE, draw_cells, fake_model

FAST = AnalysisSettings(infer=InferSettings(tile_size=256, overlap=32, workers=0, progress=False))
CMU = "slides/CMU-1-Small-Region.svs"


def _tissue_image(h: int = 300, w: int = 400) -> np.ndarray:
    img = np.full((h, w, 3), TISSUE, np.uint8)
    img[20:120, 20:190] = RED
    img[180:260, 220:360] = GREEN
    draw_cells(img, [(300, 40), (40, 220), (100, 250)])
    return img


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nervedet.cli", *args], capture_output=True, text=True,
                          timeout=600)


def _one_error_line(stderr: str, *names: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert all(n in lines[0] for n in names), (names, lines[0])
    return lines[0]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------------ slide files
@pytest.fixture
def bad_slides(tmp_path: Path, real_data: Path) -> dict[str, Path]:
    folder = tmp_path / "bad"
    folder.mkdir()
    rng = np.random.default_rng(7)
    (folder / "empty.svs").write_bytes(b"")
    (folder / "notes.tiff").write_text("a text file that is not a TIFF\n" * 20)
    (folder / "noise.ndpi").write_bytes(rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    data = (real_data / CMU).read_bytes()
    (folder / "cut.svs").write_bytes(data[: len(data) // 2])  # a copy that stopped half way
    return {p.stem: p for p in folder.iterdir()}


@pytest.mark.parametrize("name,reason", [("empty", "empty file"), ("notes", "not a slide or image"),
                                         ("noise", "not a slide or image"), ("cut", "truncated")])
def test_each_bad_slide_file_is_refused_with_one_line_naming_it(bad_slides, name: str, reason: str) -> None:
    path = bad_slides[name]
    with pytest.raises(SlideError) as err:
        open_slide(path)
    message = str(err.value)
    assert str(path) in message and reason in message and "\n" not in message


def test_a_cohort_of_one_good_and_four_bad_slides_finishes_the_good_one_and_reruns_skip_it(
        bad_slides, tmp_path: Path, pyramid_tiff) -> None:
    good = pyramid_tiff(tmp_path / "bad" / "good.tiff", _tissue_image(600, 800), mpp=0.5, n_levels=2)
    out = tmp_path / "out"
    r = _cli("infer", str(tmp_path / "bad"), "--out", str(out), "--no-progress")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("nervedet: error")]
    assert len(errors) == 4, r.stderr
    for p in bad_slides.values():
        assert sum(str(p) in line for line in errors) == 1, (p, errors)
    with open(out / "cohort.csv", newline="", encoding="utf-8") as f:
        rows = {Path(row["slide"]).name: row for row in csv.DictReader(f)}
    assert len(rows) == 5
    assert rows["good.tiff"]["status"] == "done" and rows["good.tiff"]["nerve_count"] != ""
    assert all(rows[p.name]["status"] == "error" and p.name in rows[p.name]["error"] for p in bad_slides.values())
    assert sorted(p.name for p in out.iterdir()) == ["cohort.csv", "good"]  # nothing of the bad ones, no leftovers
    before = {name: (out / "good" / name).read_bytes() for name in _files(out / "good")}
    stamps = {name: (out / "good" / name).stat().st_mtime_ns for name in before}

    r = _cli("infer", str(tmp_path / "bad"), "--out", str(out))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "good.tiff: skipped" in r.stderr and "1 skipped" in r.stdout
    assert {name: (out / "good" / name).read_bytes() for name in _files(out / "good")} == before
    assert {name: (out / "good" / name).stat().st_mtime_ns for name in before} == stamps
    assert good.exists()


def test_a_missing_path_or_a_folder_without_slides_is_one_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["infer", str(tmp_path / "nowhere.svs"), "--out", str(out)]) == 1
    _one_error_line(capsys.readouterr().err, "nowhere.svs", "no such file")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    (empty / "readme.txt").write_text("no slides here")
    assert main(["infer", str(empty), "--out", str(out)]) == 1
    _one_error_line(capsys.readouterr().err, "no slide found", str(empty))
    assert not out.exists()


def test_a_slide_without_pixel_size_is_refused_unless_mpp_is_given(tmp_path: Path) -> None:
    png = tmp_path / "crop.png"
    Image.fromarray(_tissue_image()).save(png)
    rows = run_cohort([png], tmp_path / "out", fake_model(), FAST)
    assert rows[0].status == "error" and str(png) in rows[0].error and "--mpp" in rows[0].error
    assert not (tmp_path / "out" / "crop").exists()
    rows = run_cohort([png], tmp_path / "out", fake_model(), FAST, mpp=0.5)
    assert rows[0].status == "done" and rows[0].metrics["mpp"] == 0.5


def test_an_image_smaller_than_one_tile_is_analysed_whole(tmp_path: Path) -> None:
    png = tmp_path / "small.png"
    Image.fromarray(_tissue_image()).save(png)  # 400 x 300 px: under one 512-px tile
    settings = AnalysisSettings(infer=InferSettings(tile_size=512, overlap=64, workers=0, progress=False))
    (row,) = run_cohort([png], tmp_path / "out", fake_model(), settings, mpp=0.5)
    assert row.status == "done", row.error
    assert row.metrics["nerve_count"] == 1 and row.metrics["immune_cell_count"] == 3
    assert row.metrics["tumor_area_mm2"] == pytest.approx(170 * 100 * 0.25e-6, rel=0.05)


def test_a_slide_without_tissue_gives_valid_empty_outputs_with_zero_counts(tmp_path: Path) -> None:
    png = tmp_path / "glass.png"
    Image.fromarray(np.full((600, 800, 3), 244, np.uint8)).save(png)
    (row,) = run_cohort([png], tmp_path / "out", fake_model(), FAST, mpp=0.5)
    assert row.status == "done", row.error
    m = json.loads((tmp_path / "out" / "glass" / "metrics.json").read_text())
    assert (m["tissue_area_mm2"], m["nerve_count"], m["pni_count"], m["immune_cell_count"]) == (0, 0, 0, 0)
    assert json.loads((tmp_path / "out" / "glass" / "glass.geojson").read_text()) == {
        "type": "FeatureCollection", "features": []}
    assert (tmp_path / "out" / "glass" / "nerves.csv").read_text().count("\n") == 1  # the header alone


# ------------------------------------------------------------------------------------------------ weights
def _corrupt(path: Path) -> None:
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _wrong_metadata(path: Path) -> None:
    safetensors.torch.save_file({"w": torch.zeros(3)}, str(path), metadata={"format": "pt", "config": "{"})


def _pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"state_dict": {"w": [0.0, 1.0]}}))


@pytest.mark.parametrize("make", [_corrupt, _wrong_metadata, _pickle], ids=["corrupt", "metadata", "pickle"])
def test_a_bad_weights_file_is_one_line_naming_it_before_any_output(tmp_path: Path, make, capsys) -> None:
    png = tmp_path / "a.png"
    Image.fromarray(_tissue_image()).save(png)
    weights = tmp_path / "model.safetensors"
    make(weights)
    out = tmp_path / "out"
    assert main(["infer", str(png), "--mpp", "0.5", "--weights", str(weights), "--out", str(out)]) == 1
    _one_error_line(capsys.readouterr().err, str(weights))
    assert not out.exists()


def test_an_impossible_batch_size_is_refused_before_any_output(tmp_path: Path, capsys) -> None:
    png = tmp_path / "a.png"
    Image.fromarray(_tissue_image()).save(png)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["infer", str(png), "--mpp", "0.5", "--batch-size", "0", "--out", str(out)])
    assert exit_.value.code == 2 and "--batch-size: must be positive" in capsys.readouterr().err
    assert main(["infer", str(png), "--mpp", "0.5", "--batch-size", "10000000", "--out", str(out)]) == 1
    line = _one_error_line(capsys.readouterr().err, "--batch-size 10000000")
    assert "use --batch-size" in line
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ output paths
@pytest.mark.parametrize("name", ["..svs", "...svs", ".hidden.png", " ..png", "a\x01b.png"])
def test_output_folders_stay_inside_out_whatever_the_slide_is_called(tmp_path: Path, name: str) -> None:
    src = tmp_path / "in"
    src.mkdir()
    path = src / name
    Image.fromarray(_tissue_image()).save(path, format="PNG")
    out = tmp_path / "a" / "out"
    (row,) = run_cohort([path], out, fake_model(), FAST, mpp=0.5)
    assert row.status in ("done", "error")
    folder = Path(row.output).resolve()
    assert folder.parent == out.resolve() and not folder.name.startswith(".")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["out"]


def test_safe_names_drop_separators_dots_and_control_characters() -> None:
    assert safe_name("..") == safe_name(".") == safe_name("") == "slide"
    assert safe_name("../../etc/passwd") == "_.._etc_passwd"
    assert safe_name(".hidden") == "hidden" and safe_name("a\x00b") == "a_b"
    assert len(safe_name("x" * 500).encode()) == 200 and safe_name("Biopsy 12 (HE)") == "Biopsy 12 (HE)"
    assert slide_stem("case 7.ome.tiff") == "case 7" and slide_stem("...svs") == "slide"


# ------------------------------------------------------------------------------------------------ GeoJSON
def _collection(*features: dict) -> dict:
    return {"type": "FeatureCollection", "features": list(features)}


def _polygon(coords: list, cls: str = "Nerve", fid: str | None = None) -> dict:
    f = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [coords]},
         "properties": {"objectType": "annotation", "classification": {"name": cls}}}
    if fid:
        f["id"] = fid
    return f


def test_self_intersecting_and_unclosed_polygons_are_repaired_with_a_warning_naming_them(tmp_path, caplog) -> None:
    bowtie = _polygon([[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]], fid="bow-tie")
    unclosed = _polygon([[20, 20], [30, 20], [30, 30], [20, 30]], fid="open-ring")
    good = _polygon([[40, 40], [50, 40], [50, 50], [40, 40]])
    path = tmp_path / "labels.geojson"
    path.write_text(json.dumps(_collection(good, bowtie, unclosed)))
    with caplog.at_level(logging.WARNING, logger="nervedet.geojson"):
        feats = read_geojson(path)
    assert len(feats) == 3 and all(f.geometry.is_valid for f in feats)
    assert feats[1].geometry.area == pytest.approx(50) and feats[2].geometry.area == pytest.approx(100)
    text = " | ".join(r.getMessage() for r in caplog.records)
    assert "feature 1 (id bow-tie)" in text and "self-intersecting" in text
    assert "feature 2 (id open-ring)" in text and "unclosed" in text
    assert "feature 0" not in text


def test_a_feature_that_is_not_an_object_is_refused_with_its_index(tmp_path: Path) -> None:
    path = tmp_path / "labels.geojson"
    path.write_text(json.dumps(_collection(_polygon([[0, 0], [1, 0], [1, 1], [0, 0]]), "oops")))
    with pytest.raises(GeoJSONError, match=r"labels.geojson: not GeoJSON \(feature 1 is a JSON str\)"):
        read_geojson(path)


def test_unknown_training_classes_are_warned_about_by_name(tmp_path: Path, caplog, pyramid_tiff) -> None:
    from nervedet.train.data import AnnotatedSlide, SlideSpec

    slide = pyramid_tiff(tmp_path / "s.tiff", _tissue_image(512, 512), mpp=0.5, n_levels=1)
    labels = tmp_path / "s.geojson"
    stroma = _polygon([[0, 0], [100, 0], [100, 100], [0, 0]], cls="Stroma")
    stroma["properties"]["name"] = "stroma 1"
    labels.write_text(json.dumps(_collection(_polygon([[200, 200], [300, 200], [300, 300], [200, 200]]), stroma)))
    with caplog.at_level(logging.WARNING, logger="nervedet.train.data"):
        annotated = AnnotatedSlide(SlideSpec(slide=slide, labels=labels))
    assert annotated.annotation_counts["nerve"] == 1
    (warning,) = [r.getMessage() for r in caplog.records if "unknown class" in r.getMessage()]
    assert "'Stroma'" in warning and "'stroma 1'" in warning and "Tumor" in warning


def test_deeply_nested_or_oversized_geojson_is_refused_in_one_line(tmp_path: Path, monkeypatch) -> None:
    deep = tmp_path / "deep.geojson"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(GeoJSONError, match="deep.geojson: not GeoJSON \\(JSON nested too deeply\\)"):
        read_geojson(deep)
    monkeypatch.setattr(G, "MAX_GEOJSON_BYTES", 1000)
    big = tmp_path / "big.geojson"
    big.write_text(json.dumps(_collection(*[_polygon([[0, 0], [1, 0], [1, 1], [0, 0]])] * 50)))
    with pytest.raises(GeoJSONError, match="big.geojson: .* refused"):
        read_geojson(big)
    bomb = tmp_path / "bomb.geojson.gz"
    bomb.write_bytes(gzip.compress(b" " * 100_000))  # 100 kB of spaces in a few hundred bytes
    assert bomb.stat().st_size < 1000
    with pytest.raises(GeoJSONError, match="bomb.geojson.gz: expands to more than"):
        read_geojson(bomb)


def test_debug_shows_the_traceback_instead_of_the_one_line(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere.svs"
    with pytest.raises(ValueError, match="nowhere.svs: no such file"):
        main(["--debug", "infer", str(missing), "--out", str(tmp_path / "out")])
    assert main(["infer", str(missing), "--out", str(tmp_path / "out")]) == 1  # without it: the one line


def test_an_unexpected_error_is_one_line_with_exit_status_3(tmp_path: Path, monkeypatch, capsys) -> None:
    import nervedet.cli as cli

    def boom(args):
        raise RuntimeError("something we did not foresee")

    monkeypatch.setitem(cli.COMMANDS, "evaluate", boom)
    assert main(["evaluate", "--pred", str(tmp_path), "--truth", str(tmp_path)]) == 3
    line = _one_error_line(capsys.readouterr().err, "internal error", "RuntimeError", "--debug")
    assert "something we did not foresee" in line
