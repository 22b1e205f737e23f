"""`nervedet infer` with the bundled weights on the real sample slides and a plain image: outputs, the
summary table, exit status, one-line errors and skipping on a rerun."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nervedet.cli import main
from tests.qupath_checks import check_qupath_geojson

OUTPUTS = ("metrics.json", "nerves.csv", "overlay.png", "run.json")


def _infer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nervedet.cli", "infer", "--no-progress", *args],
                          capture_output=True, text=True, timeout=600)


def _complete(folder: Path, stem: str) -> dict:
    for name in (f"{stem}.geojson", *OUTPUTS):
        assert (folder / name).is_file(), name
    check_qupath_geojson(folder / f"{stem}.geojson")
    return json.loads((folder / "metrics.json").read_text())


def test_real_slides_run_and_a_slide_without_mpp_is_one_error_row(real_data: Path, tmp_path: Path) -> None:
    slides = real_data / "slides"
    cmu, ome, tcga = (slides / n for n in ("CMU-1-Small-Region.svs", "OS-1-detail.ome.tif",
                                           "tcga-cr-7395-01a-01-ts1.svs"))
    for p in (cmu, ome, tcga):
        if not p.exists():
            pytest.skip(f"{p} is missing from the real sample folder")
    out = tmp_path / "out"
    r = _infer(str(cmu), str(ome), str(tcga), "--out", str(out))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "tcga-cr-7395" in errors[0] and "--mpp" in errors[0]
    assert "2 done, 0 skipped, 1 failed" in r.stdout
    m = _complete(out / "CMU-1-Small-Region", "CMU-1-Small-Region")
    assert m["mpp"] == pytest.approx(0.499, abs=0.001) and m["tissue_area_mm2"] > 0.5
    assert _complete(out / "OS-1-detail", "OS-1-detail")["mpp"] == pytest.approx(0.2271, abs=1e-3)
    assert not (out / "tcga-cr-7395-01a-01-ts1").exists()

    r = _infer(str(tcga), "--mpp", "0.25", "--out", str(out))  # the TCGA slide with its pixel size given
    assert r.returncode == 0, r.stderr
    assert _complete(out / "tcga-cr-7395-01a-01-ts1", "tcga-cr-7395-01a-01-ts1")["mpp"] == 0.25
    with open(out / "cohort.csv", newline="") as f:
        assert sorted(Path(row["slide"]).name for row in csv.DictReader(f)) == sorted(p.name for p in (cmu, ome, tcga))


def test_a_png_with_mpp_runs_and_a_rerun_skips_it(real_data: Path, tmp_path: Path, capsys) -> None:
    png = real_data / "negatives" / "colon_glands.png"
    if not png.exists():
        pytest.skip(f"{png} is missing from the real sample folder")
    out = tmp_path / "out"
    assert main(["infer", str(png), "--mpp", "0.5", "--out", str(out), "--no-progress"]) == 0
    m = _complete(out / "colon_glands", "colon_glands")
    assert m["mpp"] == 0.5 and m["analysis_mpp"] == 0.5
    capsys.readouterr()
    stamp = (out / "colon_glands" / "colon_glands.geojson").stat().st_mtime_ns
    assert main(["infer", str(png), "--mpp", "0.5", "--out", str(out), "--no-progress"]) == 0
    assert "0 done, 1 skipped, 0 failed" in capsys.readouterr().out
    assert (out / "colon_glands" / "colon_glands.geojson").stat().st_mtime_ns == stamp


def test_bad_options_and_missing_inputs_are_one_line_errors(tmp_path: Path) -> None:
    r = _infer(str(tmp_path / "nothing.svs"), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and "nothing.svs" in r.stderr and "Traceback" not in r.stderr
    r = _infer(str(tmp_path), "--out", str(tmp_path / "o"), "--tile-size", "500")
    assert r.returncode == 1 and "multiple of 32" in r.stderr and "Traceback" not in r.stderr
    r = _infer(str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and "no slide found" in r.stderr
