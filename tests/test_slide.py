"""open_slide: formats, pixel size, reads at an mpp, pyramid level choice, out-of-bounds reads, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from nervedet.slide import Slide, SlideError, TileSpec, open_slide

CMU = "slides/CMU-1-Small-Region.svs"
OME = "slides/OS-1-detail.ome.tif"
TCGA = "slides/tcga-cr-7395-01a-01-ts1.svs"
RED, GREEN, BLUE = (200, 30, 30), (30, 200, 30), (30, 30, 200)


def spy_levels(slide: Slide, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the pyramid level of every backend read (OpenSlide's, or the JPEG tiles decoded by jpeg_tiles.py)."""
    levels: list[int] = []
    backend = slide._backend
    if hasattr(backend, "decodes_scaled"):  # its one-time check reads a tile: done before spying
        for level in range(slide.level_count):
            backend.decodes_scaled(level)

    def spying(read):
        def spy(level: int, *args: int) -> np.ndarray:
            out = read(level, *args)
            if out is not None:
                levels.append(level)
            return out
        return spy

    for name in ("read", "read_scaled"):
        if hasattr(backend, name):
            monkeypatch.setattr(backend, name, spying(getattr(backend, name)))
    return levels


@pytest.fixture
def coloured_pyramid(tmp_path: Path, pyramid_tiff) -> Path:
    """A 1024×768 generic TIFF at 0.25 µm/px whose levels 0, 1, 2 are red, green and blue."""
    levels = [np.full((768 // f, 1024 // f, 3), c, np.uint8) for f, c in ((1, RED), (2, GREEN), (4, BLUE))]
    return pyramid_tiff(tmp_path / "coloured.tif", levels, mpp=0.25)


def test_svs_reads_with_its_mpp(real_data: Path) -> None:
    with open_slide(real_data / CMU) as slide:
        assert slide.mpp == pytest.approx(0.499, abs=1e-3)
        assert slide.dimensions == (2220, 2967)
        assert slide.vendor == "aperio" and slide.offset == (0, 0) and slide.bounds == (0, 0, 2220, 2967)
        region = slide.read_region((1000, 1000), (256, 200))
        assert region.shape == (200, 256, 3) and region.dtype == np.uint8
        assert region.std() > 10  # tissue, not a blank fill


def test_ome_tiff_mpp_from_ome_xml_and_pixels_exact(real_data: Path) -> None:
    with open_slide(real_data / OME) as slide:
        assert slide.vendor == "ome-tiff"
        assert slide.mpp == pytest.approx(0.2271, abs=2e-4)
        assert slide.mpp_x == pytest.approx(0.227097, rel=1e-5) and slide.mpp_y == pytest.approx(
            0.227102, rel=1e-5
        )
        assert slide.dimensions == (1101, 1101)
        pixels = tifffile.imread(real_data / OME)
        np.testing.assert_array_equal(slide.read_region((500, 300), (520, 600)), pixels[300:900, 500:1020])
        assert slide._backend._levels == {}  # read tile by tile, the level was never loaded whole


def test_svs_without_mpp_is_refused(real_data: Path) -> None:
    with pytest.raises(SlideError) as err:
        open_slide(real_data / TCGA)
    message = str(err.value)
    assert "--mpp" in message and "tcga-cr-7395-01a-01-ts1.svs" in message and "\n" not in message


def test_jpeg2000_svs_opens_with_given_mpp(real_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_slide(real_data / TCGA, mpp=0.5) as slide:
        assert slide.mpp == 0.5 and slide.level_count == 2
        assert slide.level_mpps[1] == pytest.approx(1.0, rel=1e-3)
        levels = spy_levels(slide, monkeypatch)
        region = slide.read_region((1800, 1500), (256, 256), mpp=1.0)
        assert levels == [1]
        assert region.shape == (256, 256, 3) and region.std() > 10 and region.mean() < 235


def test_caller_mpp_wins_over_the_file(real_data: Path) -> None:
    with open_slide(real_data / CMU, mpp=0.25) as slide:
        assert slide.mpp == slide.mpp_x == slide.mpp_y == 0.25


@pytest.mark.parametrize("mpp, factor", [(1.0, 2), (0.75, 1.5)])
def test_read_at_coarser_mpp_is_area_downsample(real_data: Path, mpp: float, factor: float) -> None:
    with open_slide(real_data / CMU, mpp=0.5) as slide:
        out = slide.read_region((1001, 1301), (200, 150), mpp=mpp)
        full = slide.read_region((1001, 1301), (int(200 * factor), int(150 * factor)))
        np.testing.assert_array_equal(out, cv2.resize(full, (200, 150), interpolation=cv2.INTER_AREA))
        assert out.std() > 10


def test_pyramid_tiff_level_choice(coloured_pyramid: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_slide(coloured_pyramid) as slide:
        assert slide.vendor == "generic-tiff" and slide.level_count == 3
        assert slide.mpp == pytest.approx(0.25) and slide.level_mpps == pytest.approx((0.25, 0.5, 1.0))
        levels = spy_levels(slide, monkeypatch)
        expected = {
            0.25: (0, RED),
            0.49: (0, RED),
            0.497: (1, GREEN),
            0.5: (1, GREEN),
            0.504: (1, GREEN),
            0.99: (1, GREEN),
            1.0: (2, BLUE),
            4.0: (2, BLUE),
            0.1: (0, RED),
        }
        for mpp, (level, colour) in expected.items():
            levels.clear()
            region = slide.read_region((100, 60), (32, 24), mpp=mpp)
            assert slide.level_for_mpp(mpp) == level and levels == [level], mpp
            assert region.shape == (24, 32, 3)
            np.testing.assert_allclose(region[8:16, 8:24].reshape(-1, 3).mean(0), colour, atol=3)


def test_pyramid_level_read_matches_level0_downsample(
    tmp_path: Path, pyramid_tiff, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    level0 = cv2.resize(blocks, (1024, 768), interpolation=cv2.INTER_NEAREST)
    path = pyramid_tiff(tmp_path / "blocks.tif", level0, mpp=0.25, compression="zlib")
    with open_slide(path) as slide:
        levels = spy_levels(slide, monkeypatch)
        out = slide.read_region((304, 200), (100, 80), mpp=0.5)
        assert levels == [1]
        expected = cv2.resize(level0[200:360, 304:504], (100, 80), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(out, expected)


def test_thumbnail_reads_a_coarse_level(coloured_pyramid: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_slide(coloured_pyramid) as slide:
        levels = spy_levels(slide, monkeypatch)
        thumb, mpp = slide.thumbnail(max_size=64)
        assert thumb.shape == (48, 64, 3) and mpp == pytest.approx(4.0) and levels == [2]
        levels.clear()
        thumb, mpp = slide.thumbnail(mpp=0.6)
        assert mpp == 0.6 and thumb.shape == (320, 427, 3) and levels == [1]


def test_thumbnail_takes_a_slightly_coarser_level_as_it_is(coloured_pyramid: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with open_slide(coloured_pyramid) as slide:  # levels at 0.25, 0.5 and 1 µm/px
        levels = spy_levels(slide, monkeypatch)
        thumb, mpp = slide.thumbnail(mpp=0.7, coarser=1.5)  # 1 µm is 1.43x coarser: read as it is
        assert mpp == pytest.approx(1.0) and thumb.shape == (192, 256, 3) and levels == [2]
        np.testing.assert_allclose(thumb.reshape(-1, 3).mean(0), BLUE, atol=3)
        levels.clear()
        thumb, mpp = slide.thumbnail(mpp=0.7, coarser=1.3)  # too coarse: level 1 shrunk to 0.7 µm/px
        assert mpp == 0.7 and thumb.shape == (275, 366, 3) and levels == [1]


def test_read_tile_uses_level0_location_and_output_size(real_data: Path) -> None:
    spec = TileSpec(x0=400, y0=600, w0=256, h0=256, w=128, h=128, mpp=0.998)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.x0 = 1  # type: ignore[misc]
    with open_slide(real_data / CMU) as slide:
        np.testing.assert_array_equal(slide.read_tile(spec), slide.read_region((400, 600), (128, 128), 0.998))
        assert slide.read_tile(spec).shape == (128, 128, 3)


def _png(tmp_path: Path) -> tuple[Path, np.ndarray]:
    arr = np.random.default_rng(0).integers(0, 200, (90, 120, 3), dtype=np.uint8)
    path = tmp_path / "plain.png"
    Image.fromarray(arr).save(path)
    return path, arr


def test_png_without_mpp_is_refused_and_with_mpp_reads(tmp_path: Path) -> None:
    path, arr = _png(tmp_path)
    with pytest.raises(SlideError, match="--mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.vendor == "png" and slide.dimensions == (120, 90) and slide.level_count == 1
        np.testing.assert_array_equal(slide.read_region((10, 20), (30, 40)), arr[20:60, 10:40])
        half = slide.read_region((0, 0), (60, 45), mpp=1.0)
        np.testing.assert_array_equal(half, cv2.resize(arr, (60, 45), interpolation=cv2.INTER_AREA))


def test_transparent_png_pixels_are_white(tmp_path: Path) -> None:
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:, :10] = (10, 20, 30, 255)
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    with open_slide(tmp_path / "alpha.png", mpp=1.0) as slide:
        region = slide.read_region((0, 0), (20, 20))
        assert (region[:, :10] == (10, 20, 30)).all() and (region[:, 10:] == 255).all()


@pytest.mark.parametrize("name", ["cmu", "ome", "png"])
def test_out_of_bounds_is_white(request: pytest.FixtureRequest, tmp_path: Path, name: str) -> None:
    if name == "png":
        path, mpp = _png(tmp_path)[0], 0.5
    else:  # OpenSlide (transparent outside) and tifffile (tile by tile)
        path, mpp = request.getfixturevalue("real_data") / {"cmu": CMU, "ome": OME}[name], None
    with open_slide(path, mpp=mpp) as slide:
        w, h = slide.dimensions
        corner = slide.read_region((-16, -16), (32, 32))
        assert (corner[:16] == 255).all() and (corner[:, :16] == 255).all() and (corner[16:, 16:] < 250).any()
        far = slide.read_region((w - 8, h - 8), (16, 16))
        assert (far[8:] == 255).all() and (far[:, 8:] == 255).all() and (far[:8, :8] < 250).any()
        assert (slide.read_region((w + 100, 0), (8, 8), mpp=2 * slide.mpp) == 255).all()


def test_tiff_resolution_tags(tmp_path: Path) -> None:
    img = np.full((64, 80, 3), 128, np.uint8)
    tifffile.imwrite(
        tmp_path / "inch.tif", img, photometric="rgb", resolution=(50800, 50800), resolutionunit="INCH"
    )
    with open_slide(tmp_path / "inch.tif") as slide:
        assert slide.mpp == pytest.approx(0.5) and slide.vendor == "tiff"
    tifffile.imwrite(
        tmp_path / "dpi72.tif", img, photometric="rgb", resolution=(72, 72), resolutionunit="INCH"
    )
    with pytest.raises(SlideError, match="--mpp"):  # 72 dpi is a writer's default, not a pixel size
        open_slide(tmp_path / "dpi72.tif")


def test_ome_pyramid_levels_via_tifffile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pyramid.ome.tif"
    levels = [np.full((512 // f, 640 // f, 3), c, np.uint8) for f, c in ((1, RED), (2, GREEN), (4, BLUE))]
    with tifffile.TiffWriter(path, ome=True) as tw:
        meta = {"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25}
        tw.write(levels[0], subifds=2, tile=(128, 128), photometric="rgb", compression="zlib", metadata=meta)
        for lvl in levels[1:]:
            tw.write(lvl, subfiletype=1, tile=(128, 128), photometric="rgb", compression="zlib")
    with open_slide(path) as slide:
        assert slide.vendor == "ome-tiff" and slide.level_count == 3 and slide.mpp == pytest.approx(0.25)
        spied = spy_levels(slide, monkeypatch)
        region = slide.read_region((200, 100), (40, 40), mpp=1.0)
        assert spied == [2] and (region == BLUE).all()


def test_corrupt_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "broken.svs"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(SlideError) as err:
        open_slide(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "missing.svs")
