"""Reduced-scale JPEG reads: a 40x slide read at 0.5 µm/px decodes its tiles at half scale in the DCT domain,
and gives what OpenSlide's full decode plus an area resize gives; where the decode would differ from
OpenSlide's (colour conventions), OpenSlide reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nervedet import jpeg_tiles
from nervedet.jpeg_tiles import scale_for
from nervedet.slide import open_slide
from nervedet.synth import SynthSettings, make_synthetic_slide


@pytest.fixture(scope="module")
def svs40x(tmp_path_factory) -> Path:
    """A synthetic Aperio SVS at 0.25 µm/px: levels at 0.25 and 1.0 µm/px, none at 0.5."""
    out = tmp_path_factory.mktemp("svs40x")
    return make_synthetic_slide(out, SynthSettings(seed=3, width_mm=0.4, height_mm=0.3, mpp=0.25)).slide_path


def _count_reads(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = jpeg_tiles.JpegTiles.read

    def counted(self, size, x, y, w, h, scale):
        calls.append(scale)
        return original(self, size, x, y, w, h, scale)

    monkeypatch.setattr(jpeg_tiles.JpegTiles, "read", counted)
    return calls


def test_scale_is_the_largest_reduction_that_keeps_the_resolution() -> None:
    assert [scale_for(f) for f in (1.0, 1.9, 2.0, 3.99, 4.0, 7.5, 8.0, 30.0)] == [1, 1, 2, 2, 4, 4, 8, 8]


@pytest.mark.parametrize("location,size", [((0, 0), (256, 256)), ((334, 102), (300, 190)), ((1500, 1100), (64, 48))])
def test_half_scale_reads_equal_full_decodes_shrunk(svs40x: Path, monkeypatch, location, size) -> None:
    calls = _count_reads(monkeypatch)
    slide = open_slide(svs40x)
    assert slide.level_for_mpp(0.5) == 0  # no 0.5 µm/px level: every read shrinks level 0
    fast = slide.read_region(location, size, mpp=0.5)
    slide.fast_jpeg = False
    full = slide.read_region(location, size, mpp=0.5)
    assert calls[0] == 1 and set(calls[1:]) == {2}  # one full-scale agreement check, then half-scale decodes
    assert fast.shape == full.shape == (size[1], size[0], 3)
    diff = np.abs(fast.astype(int) - full.astype(int))
    assert diff.mean() < 2.5 and np.percentile(diff, 99) < 20, (diff.mean(), np.percentile(diff, 99))


def test_reads_at_the_levels_own_size_off_the_reduced_grid_or_beyond_the_image_stay_right(
        svs40x: Path, monkeypatch) -> None:
    calls = _count_reads(monkeypatch)
    slide = open_slide(svs40x)
    native = slide.read_region((100, 100), (128, 128))  # level 0 at its own mpp: decoded here at full scale
    assert native.shape == (128, 128, 3) and set(calls) == {1}
    slide.fast_jpeg = False
    assert np.array_equal(native, slide.read_region((100, 100), (128, 128)))  # as OpenSlide decodes it
    slide.fast_jpeg = True
    odd = slide.read_region((333, 101), (64, 64), mpp=0.5)  # starts between two half-scale pixels: full decode
    slide.fast_jpeg = False
    assert np.array_equal(odd, slide.read_region((333, 101), (64, 64), mpp=0.5)) and 2 not in calls
    slide.fast_jpeg = True
    w, h = slide.dimensions
    edge = slide.read_region((w - 100, h - 60), (100, 100), mpp=0.5)  # runs past the corner: white there
    assert 2 in calls and (edge[40:, :] == 255).all() and (edge[:, 60:] == 255).all()
    assert edge[:25, :45].mean() < 250  # tissue or stroma colour inside the image


def test_a_level_whose_decode_differs_from_openslides_is_read_by_openslide(svs40x: Path, monkeypatch) -> None:
    monkeypatch.setattr(jpeg_tiles, "AGREEMENT", -1.0)  # as for a writer whose colour convention Pillow misreads
    calls = _count_reads(monkeypatch)
    slide = open_slide(svs40x)
    slide.read_region((0, 0), (128, 128), mpp=0.5)
    assert set(calls) == {1}  # only the full-scale agreement check; the read itself went through OpenSlide


def test_an_aperio_slide_with_rgb_jpeg_tiles_is_read_at_half_scale_in_its_true_colours(real_data: Path,
                                                                                     monkeypatch) -> None:
    path = real_data / "slides" / "CMU-1-Small-Region.svs"  # photometric RGB, shared JPEG tables
    if not path.exists():
        pytest.skip(f"{path} is missing from the real sample folder")
    calls = _count_reads(monkeypatch)
    slide = open_slide(path)
    fast = slide.read_region((0, 0), (512, 512), mpp=1.0)  # 0.499 -> 1.0 µm/px: half scale
    slide.fast_jpeg = False
    full = slide.read_region((0, 0), (512, 512), mpp=1.0)
    assert 2 in calls
    diff = np.abs(fast.astype(int) - full.astype(int))
    assert diff.mean() < 2.5 and abs(fast.mean() - full.mean()) < 1.0


def test_thumbnail_takes_a_half_scale_decode_as_a_slightly_coarser_level(svs40x: Path, monkeypatch) -> None:
    calls = _count_reads(monkeypatch)
    slide = open_slide(svs40x)  # levels at 0.25 and 1.0 µm/px
    thumb, mpp = slide.thumbnail(mpp=0.4, coarser=1.5)  # 0.5 µm/px, level 0 decoded at half scale, is 1.25x
    assert mpp == 0.5 and thumb.shape[:2] == (600, 800)
    assert calls[-1] == 2 and calls.count(2) == 1, calls  # one half-scale read, after the agreement checks
    calls.clear()
    thumb, mpp = slide.thumbnail(mpp=0.4, coarser=1.2)  # not within 1.2x: level 0 at full scale, shrunk
    assert mpp == 0.4 and thumb.shape[:2] == (750, 1000) and set(calls) == {1}


def test_overlapping_reads_decode_each_jpeg_tile_once_within_the_cache_budget(svs40x: Path, monkeypatch) -> None:
    slide = open_slide(svs40x)
    first = slide.read_region((0, 0), (300, 200), mpp=0.5)  # half-scale reads of level 0's JPEG tiles
    jpeg = slide._backend._jpeg
    decoded: list[tuple[int, int]] = []
    original = jpeg_tiles.JpegTiles._decode

    def counted(self, lv, index, scale):
        decoded.append((index, scale))
        return original(self, lv, index, scale)

    monkeypatch.setattr(jpeg_tiles.JpegTiles, "_decode", counted)
    again = slide.read_region((0, 0), (300, 200), mpp=0.5)
    np.testing.assert_array_equal(again, first)
    assert decoded == []  # every tile came from the cache
    neighbour = slide.read_region((500, 0), (300, 200), mpp=0.5)  # overlaps the first read by 50 px
    assert decoded and len(set(decoded)) == len(decoded)
    jpeg.close()
    monkeypatch.setattr(jpeg_tiles, "CACHE_BYTES", 100_000)  # about two tiles of 128² px
    decoded.clear()
    np.testing.assert_array_equal(slide.read_region((500, 0), (300, 200), mpp=0.5), neighbour)
    assert jpeg._cached_bytes <= 100_000 and len(jpeg._cache) >= 1
    slide.read_region((500, 0), (300, 200), mpp=0.5)
    assert len(decoded) > len(set(decoded))  # a small cache: tiles decoded again
