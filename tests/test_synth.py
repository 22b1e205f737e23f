"""Synthetic slides: the truth every seed must carry, pixels that agree with it, and slides OpenSlide reads."""

from __future__ import annotations

import json
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import openslide
import pytest
import shapely
from shapely.geometry import shape

from nervedet import classes
from nervedet.cli import main
from nervedet.synth import SynthSettings, cached_synthetic_slide, make_synthetic_slide
from nervedet.synth.layout import make_layout
from nervedet.synth.pyramid import write_pyramid
from nervedet.synth.render import TileRenderer
from nervedet.synth.stain import Stain
from nervedet.synth.truth import truth_features
from tests.qupath_checks import check_qupath_geojson

EXPECTED_GRADE = {"intraneural": 3, "encircled": 2, "touching": 1, "near": 0}


@pytest.mark.parametrize("seed", range(1, 13))
def test_every_seed_has_nerves_pni_tumour_and_immune_cells(seed: int) -> None:
    layout = make_layout(seed, 2000.0, 2000.0, 0.7)
    feats = truth_features(layout, 0.25)
    by_class: dict[str, int] = {}
    for f in feats:
        by_class[f.classification] = by_class.get(f.classification, 0) + 1
    nerves = by_class.get(classes.NERVE, 0) + by_class.get(classes.NERVE_PNI, 0)
    assert nerves >= 3
    assert by_class.get(classes.NERVE_PNI, 0) >= 1
    assert by_class.get(classes.TUMOR, 0) >= 1
    assert by_class.get(classes.IMMUNE, 0) >= 50
    # every PNI case got the grade it was built for, by the one PNI rule
    cases = {f.name: int(f.measurements["PNI grade"]) for f in feats if f.name}
    assert set(cases) == set(EXPECTED_GRADE)
    for case, grade in cases.items():
        assert grade == EXPECTED_GRADE[case], (case, grade)


def test_nerve_sizes_span_small_to_large_over_seeds() -> None:
    diam = []
    for seed in range(1, 4):
        for f in truth_features(make_layout(seed, 3000.0, 3000.0, 0.8), 0.5):
            if classes.is_nerve(f.classification):
                diam.append(f.measurements["Min diameter µm"])
    assert min(diam) < 40 and max(diam) > 300


def test_same_seed_gives_the_same_slide_and_another_seed_another() -> None:
    a, b, c = (make_layout(s, 1500.0, 1500.0, 0.6) for s in (4, 4, 5))
    assert np.array_equal(a.immune, b.immune)
    assert a.tissue.equals(b.tissue)
    assert not np.array_equal(a.immune[:10], c.immune[:10])
    r1, r2 = TileRenderer(a, 0.5), TileRenderer(b, 0.5)
    assert np.array_equal(r1.render(800, 800, 256, 256), r2.render(800, 800, 256, 256))


def test_tiles_rendered_apart_join_without_seams() -> None:
    layout = make_layout(2, 1500.0, 1500.0, 1.0)
    r = TileRenderer(layout, 0.5, Stain.jittered(2))
    whole = r.render(1000, 1000, 512, 512).astype(float)
    parts = np.zeros_like(whole)
    for y in (0, 256):
        for x in (0, 256):
            parts[y:y + 256, x:x + 256] = r.render(1000 + x, 1000 + y, 256, 256)
    diff = np.abs(whole - parts)
    # only the per-tile sensor noise differs (sigma 1.6 per channel), nothing structural
    assert diff.mean() < 2.5
    assert np.percentile(diff, 99.9) < 14


def test_truth_agrees_with_the_pixels() -> None:
    mpp = 0.5
    layout = make_layout(6, 1500.0, 1500.0, 0.8)
    r = TileRenderer(layout, mpp, Stain.jittered(6, 0.0))
    img = r.render(0, 0, 3000, 3000)
    grey = img.astype(float).mean(axis=2)
    # immune cells: their centres are dark nuclei
    pts = (layout.immune / mpp).astype(int)
    centre_grey = grey[pts[:, 1], pts[:, 0]]
    assert np.mean(centre_grey < 150) > 0.9, np.median(centre_grey)
    # glass outside the tissue is bright; tissue is not
    outside = ~shapely.contains_xy(layout.tissue.buffer(20), (np.arange(3000)[None, :] + 0.5).repeat(3000, 0) * mpp,
                                   (np.arange(3000)[:, None] + 0.5).repeat(3000, 1) * mpp)
    assert grey[outside].mean() > 225 and grey[~outside].mean() < 200
    # nerve interiors are paler than the tumour nests
    feats = truth_features(layout, mpp)

    def mean_inside(cls_names) -> float:
        vals = []
        for f in feats:
            if f.classification in cls_names:
                x0, y0, x1, y1 = (min(max(int(v), 0), 3000) for v in f.geometry.bounds)
                yy, xx = np.mgrid[y0:y1, x0:x1]
                inside = shapely.contains_xy(f.geometry.buffer(-3), xx + 0.5, yy + 0.5)
                vals.append(grey[y0:y1, x0:x1][inside])
        return float(np.concatenate(vals).mean())

    assert mean_inside(classes.NERVE_CLASSES) > mean_inside((classes.TUMOR,)) + 15


def test_synth_command_writes_an_aperio_slide_openslide_reads(tmp_path: Path, capsys) -> None:
    assert main(["synth", str(tmp_path), "--seed", "3", "--width-mm", "1", "--height-mm", "1"]) == 0
    slide = openslide.OpenSlide(str(tmp_path / "synth_3.svs"))
    assert slide.properties["openslide.vendor"] == "aperio"
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert slide.dimensions == (4000, 4000)
    assert slide.level_count >= 3
    assert slide.level_downsamples[1] == pytest.approx(4.0)
    region = np.asarray(slide.read_region((1000, 1000), 1, (200, 200)).convert("RGB"))
    assert region.std() > 5  # real content on a reduced level, not an empty page
    data = check_qupath_geojson(tmp_path / "synth_3.geojson")
    names = [f["properties"]["classification"]["name"] for f in data["features"]]
    assert names.count(classes.NERVE_PNI) >= 1 and names.count(classes.IMMUNE) >= 50
    assert "synth_3.svs" in capsys.readouterr().out  # the summary table


def test_generic_tiff_format_and_name_and_half_micron(tmp_path: Path) -> None:
    r = make_synthetic_slide(tmp_path, SynthSettings(seed=8, width_mm=1.0, height_mm=0.6, mpp=0.5, fmt="tiff",
                                                     name="case_a"))
    assert r.slide_path == tmp_path / "case_a.tiff" and r.truth_path == tmp_path / "case_a.geojson"
    slide = openslide.OpenSlide(str(r.slide_path))
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    assert slide.dimensions == (2000, 1200) and slide.level_count >= 2
    truth = json.loads(r.truth_path.read_text())
    xs = [c for f in truth["features"] for c in shapely.get_coordinates(shape(f["geometry"]))[:, 0]]
    assert 0 <= min(xs) and max(xs) <= 2000  # truth in level-0 pixels of this slide
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_pyramid_memory_is_bounded_by_the_strip_not_the_slide(tmp_path: Path) -> None:
    width, height = 12000, 12000  # 432 MB of RGB if it were ever held whole

    def flat(x0: int, y0: int, w: int, h: int) -> np.ndarray:
        out = np.empty((h, w, 3), np.uint8)
        out[...] = (x0 // 7 + y0 // 5) % 200
        return out

    tracemalloc.start()
    sizes = write_pyramid(tmp_path / "big.tiff", width, height, flat, 0.25, "tiff")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sizes[0] == (width, height) and len(sizes) >= 3
    assert peak < 120e6, f"peak {peak / 1e6:.0f} MB"
    assert openslide.OpenSlide(str(tmp_path / "big.tiff")).level_count == len(sizes)


def test_bad_settings_are_one_line_errors(tmp_path: Path, capsys) -> None:
    assert main(["synth", str(tmp_path), "--count", "2", "--name", "x"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("nervedet: error:") and "\n" not in err
    with pytest.raises(SystemExit):
        main(["synth", str(tmp_path), "--tissue-fraction", "1.5"])


def test_glass_shortcut_gives_the_pixels_of_the_full_render() -> None:
    """Chunks with no tissue near skip the texture/nuclei/blur path: bit for bit what that path gives."""
    layout = make_layout(9101, 1500.0, 1500.0, 0.05)
    r = TileRenderer(layout, 0.25, Stain.jittered(9101))
    full = TileRenderer(layout, 0.25, Stain.jittered(9101))
    full.is_glass = lambda *a: False  # type: ignore[method-assign]  # always the full path
    shortcut = 0
    for y0 in range(0, 6000, 1000):
        for x0 in range(0, 6000, 1000):
            m = 64  # the render margin at 0.25 µm/px
            shortcut += r.is_glass((x0 - m) * 0.25, (y0 - m) * 0.25, (x0 + 256 + m) * 0.25, (y0 + 200 + m) * 0.25)
            assert np.array_equal(r.render(x0, y0, 256, 200), full.render(x0, y0, 256, 200)), (x0, y0)
    assert 0 < shortcut < 36  # both paths were compared


def test_block_average_is_the_rounded_float_mean() -> None:
    from nervedet.synth.pyramid import _downsample

    img = np.random.default_rng(0).integers(0, 256, (1030, 2999, 3), dtype=np.uint8)
    img[:4, :8] = 255
    h, w = 1030 // 4, 2999 // 4
    ref = (img[:h * 4, :w * 4].reshape(h, 4, w, 4, 3).mean(axis=(1, 3), dtype=np.float32) + 0.5).astype(np.uint8)
    assert np.array_equal(_downsample(img), ref)


def test_tiled_glass_changes_only_bare_glass_and_encodes_it_once(tmp_path: Path) -> None:
    s = SynthSettings(seed=9101, width_mm=1.0, height_mm=0.75, tissue_fraction=0.05, fmt="tiff")
    W, H, m, mpp = 4000, 3000, 64, 0.25
    exact = make_synthetic_slide(tmp_path / "exact", s)
    tiled = make_synthetic_slide(tmp_path / "tiled", replace(s, glass="tiled"))
    assert make_synthetic_slide(tmp_path / "auto", s).slide_path.read_bytes() == exact.slide_path.read_bytes()
    a, b = openslide.OpenSlide(str(exact.slide_path)), openslide.OpenSlide(str(tiled.slide_path))
    assert a.level_dimensions == b.level_dimensions and b.properties["openslide.vendor"] == "generic-tiff"
    renderer = TileRenderer(make_layout(s.seed, W * mpp, H * mpp, 0.05), mpp, tiled_glass=True)

    def bare(x: int, y: int) -> bool:  # was the 1024² chunk holding this tile rendered as bare glass?
        cx, cy = x // 1024 * 1024, y // 1024 * 1024
        return renderer.is_glass((cx - m) * mpp, (cy - m) * mpp, (min(cx + 1024, W) + m) * mpp,
                                 (min(cy + 1024, H) + m) * mpp)

    glass_tiles, same = [], 0
    for y in range(0, H, 256):
        for x in range(0, W, 256):
            size = min(256, W - x), min(256, H - y)
            ta = np.asarray(a.read_region((x, y), 0, size).convert("RGB"))
            tb = np.asarray(b.read_region((x, y), 0, size).convert("RGB"))
            if not bare(x, y):
                same += 1
                assert np.array_equal(ta, tb), (x, y)  # tissue, and glass near it, pixel for pixel as before
            elif size == (256, 256):
                glass_tiles.append(tb)
                assert abs(tb.astype(float).mean() - ta.astype(float).mean()) < 0.5  # the same glass colour
    assert len(glass_tiles) > 20 and same > 20
    assert all(np.array_equal(t, glass_tiles[0]) for t in glass_tiles)  # one glass tile, repeated
    assert np.abs(glass_tiles[0].astype(float) - renderer.glass_tile).mean() < 2
    # the writer makes the same file whether or not it is told which tile is the glass
    out1, out2 = tmp_path / "w1.tiff", tmp_path / "w2.tiff"
    write_pyramid(out1, 2000, 1500, renderer.render, mpp, "tiff")
    write_pyramid(out2, 2000, 1500, renderer.render, mpp, "tiff", glass=renderer.glass_tile)
    assert out1.read_bytes() == out2.read_bytes()


def test_glass_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="glass"):
        SynthSettings(glass="plain")


def test_a_cached_slide_is_made_once_and_again_when_its_truth_is_missing(tmp_path: Path) -> None:
    s = SynthSettings(seed=5, width_mm=0.2, height_mm=0.2, mpp=0.5, name="cached")
    slide, truth = cached_synthetic_slide(tmp_path, s)
    assert (slide.name, truth.name) == ("cached.svs", "cached.geojson") and slide.exists() and truth.exists()
    stamps = slide.stat().st_mtime_ns, truth.stat().st_mtime_ns
    assert cached_synthetic_slide(tmp_path, s) == (slide, truth)
    assert (slide.stat().st_mtime_ns, truth.stat().st_mtime_ns) == stamps  # not made again
    truth.unlink()  # an interrupted run: the slide without its truth
    assert cached_synthetic_slide(tmp_path, s) == (slide, truth) and truth.exists()
    assert slide.stat().st_mtime_ns != stamps[0]
