"""JPEG tiles decoded on the model's device (device_jpeg.py), tested with device="cpu" (torchvision decodes there
too): the tiles equal Slide.read_region's at the analysis mpp, inference gives the same canvases and cells,
slides whose tiles are not JPEG and decoders that disagree with OpenSlide use the normal path."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nervedet import cli, device_jpeg
from nervedet.analyze import AnalysisSettings, analyze_slide
from nervedet.infer import CanvasGrid, InferSettings, run_inference
from nervedet.slide import open_slide
from nervedet.synth import SynthSettings, make_synthetic_slide
from nervedet.tissue import detect_tissue
from nervedet.weights import load_model
from tests.fakes import GREEN, RED, TISSUE, draw_cells, fake_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def svs(tmp_path_factory) -> dict[float, Path]:
    """Synthetic Aperio SVS slides of 0.4 × 0.3 mm at 0.25 µm/px (40x: no level at 0.5) and at 0.5 µm/px."""
    out = tmp_path_factory.mktemp("svs")
    return {mpp: make_synthetic_slide(out / str(mpp), SynthSettings(seed=3, width_mm=0.4, height_mm=0.3,
                                                                    mpp=mpp)).slide_path
            for mpp in (0.25, 0.5)}


def _grid_over(slide, mpp: float, origin: tuple[float, float], tile: int = 256, overlap: int = 64) -> CanvasGrid:
    """Every tile of a grid from ``origin`` that reaches past the slide's right and bottom edges."""
    scale, stride = mpp / slide.mpp, tile - overlap
    w, h = slide.dimensions
    nx, ny = int((w - origin[0]) / scale / stride) + 1, int((h - origin[1]) / scale / stride) + 1
    tiles = tuple((c, r) for r in range(ny) for c in range(nx))
    return CanvasGrid(origin, scale, nx * stride + overlap, ny * stride + overlap, tile, overlap, nx, ny, tiles)


def _decode_all(tiles: device_jpeg.DeviceTiles, batch: int = 5) -> torch.Tensor:
    ds = tiles.dataset()
    out = []
    for start in range(0, len(ds), batch):
        streams, idx, errors = tiles.collate([ds[i] for i in range(start, min(start + batch, len(ds)))])
        assert not any(errors)
        out.append(tiles.decode(streams, idx))
    return torch.cat(out)


def _read(slide, grid: CanvasGrid, mpp: float) -> list[np.ndarray]:
    locs = [(grid.origin[0] + x * grid.scale, grid.origin[1] + y * grid.scale)
            for x, y in (grid.tile_origin(c, r) for c, r in grid.tiles)]
    return [slide.read_region(loc, (grid.tile_size, grid.tile_size), mpp) for loc in locs]


@pytest.mark.parametrize("slide_mpp,given_mpp,analysis_mpp,origin", [
    (0.25, None, 0.5, (0.0, 0.0)),  # 40x: level 0 halved (2 × 2 means)
    (0.25, None, 0.5, (101.3, 57.6)),  # starting at a fractional level pixel
    (0.25, 0.2527, 0.5, (77.7, 13.2)),  # a real scanner's 40x: 1.979 level px per output px
    (0.25, None, 1.0, (17.0, 9.0)),  # level 1 (downsample 4), starting at level px 4.25
    (0.5, None, 0.5, (0.0, 0.0)),  # 20x: level 0 as it is
    (0.5, 0.49, 0.5, (3.6, 0.7)),  # 1.02 level px per output px: read_region's crop skips one output px
])
def test_tiles_decoded_on_the_device_match_read_region_at_the_analysis_mpp_up_to_the_slide_edges(
        svs, slide_mpp, given_mpp, analysis_mpp, origin) -> None:
    with open_slide(svs[slide_mpp], mpp=given_mpp) as slide:
        grid = _grid_over(slide, analysis_mpp, origin)
        tiles = device_jpeg.device_tiles(slide, grid, analysis_mpp, CPU, "on")
        assert tiles is not None
        mine = _decode_all(tiles).permute(0, 2, 3, 1).numpy().astype(int)
        default = _read(slide, grid, analysis_mpp)  # 40x aligned tiles: decoded at ½ scale in the DCT domain
        slide.fast_jpeg = False
        full = _read(slide, grid, analysis_mpp)  # decoded in full and area-shrunk, as the device path does
        right = (grid.origin[0] + (grid.nx - 1) * grid.stride * grid.scale + grid.tile_size * grid.scale
                 > slide.dimensions[0])
    assert right and len(mine) == len(grid.tiles) > 1  # the last column runs past the image (white there)
    assert (mine[-1] == 255).all(-1).mean() > 0.05 and (mine[-1] < 250).any()  # past the corner, and tissue
    diff_full = [np.abs(m - f).mean() for m, f in zip(mine, full)]
    diff_default = [np.abs(m - f).mean() for m, f in zip(mine, default)]
    # measured: < 0.0001 (integer factors) to 0.0007 (1.979, 1.02), max 1 grey level; against the ½-scale DCT
    # decode (the default for aligned 40x tiles) 0.001-0.45 per tile
    assert max(diff_full) < 0.01 and max(np.abs(m - f).max() for m, f in zip(mine, full)) <= 1, diff_full
    assert max(diff_default) < 1.0, diff_default


def _infer(path: Path, model, mode: str, mpp: float | None = None, workers: int = 0, tile: int = 256):
    with open_slide(path, mpp=mpp) as slide:
        settings = InferSettings(tile_size=tile, overlap=64, workers=workers, progress=False, precision="fp32",
                                 device_decode=mode)
        return run_inference(model, slide, detect_tissue(slide), settings)


def test_inference_with_tiles_decoded_on_the_device_gives_the_same_canvases_and_cells(svs) -> None:
    model = load_model(device="cpu")  # the bundled weights: a real network's sensitivity to the pixels
    on = _infer(svs[0.25], model, "on")
    off = _infer(svs[0.25], model, "off")
    assert (on.decode, off.decode) == ("device", "reader")
    assert on.probs.shape == off.probs.shape and on.grid == off.grid
    diff = np.abs(on.probs.astype(int) - off.probs.astype(int))
    classes_on = np.argmax(np.concatenate([255 - on.probs.max(0, keepdims=True), on.probs]), 0)
    classes_off = np.argmax(np.concatenate([255 - off.probs.max(0, keepdims=True), off.probs]), 0)
    # measured: mean 0.084 of 255 (max 14), class maps 99.95% equal, immune cells 142 and 142
    assert diff.mean() < 0.5 and (classes_on == classes_off).mean() > 0.999, (diff.mean(), diff.max())
    assert abs(len(on.immune_xy) - len(off.immune_xy)) <= 1 and len(off.immune_xy) > 0


def test_analyze_slide_records_the_decode_path_in_its_settings_without_changing_the_fingerprint(svs) -> None:
    def run(mode: str, workers: int):
        infer = InferSettings(tile_size=256, overlap=64, workers=workers, progress=False, precision="fp32",
                              device_decode=mode)
        return analyze_slide(svs[0.25], model=fake_model(), settings=AnalysisSettings(infer=infer))

    on, off = run("on", 1), run("off", 0)  # "on" through a reader process: the streams cross processes
    assert on.settings["decode"] == "device" and off.settings["decode"] == "reader"
    assert on.settings["fingerprint"] == off.settings["fingerprint"]  # a rerun with the other mode skips it
    assert on.metrics["immune_cell_count"] == off.metrics["immune_cell_count"]


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> np.ndarray:
    img = np.full((600, 700, 3), TISSUE, np.uint8)
    img[40:200, 300:480] = RED
    img[350:420, 100:260] = GREEN
    draw_cells(img, [(x, y) for x in range(20, 690, 37) for y in range(230, 330, 41)])
    return img


@pytest.mark.parametrize("kind", ["png", "deflate-tiff"])
def test_a_slide_whose_tiles_are_not_jpeg_uses_the_normal_path_with_on(colours, kind, tmp_path, pyramid_tiff,
                                                                       caplog) -> None:
    if kind == "png":
        path = tmp_path / "colours.png"
        Image.fromarray(colours).save(path)
    else:
        path = pyramid_tiff(tmp_path / "colours.tiff", colours, mpp=0.5, n_levels=2, compression="zlib")
    with caplog.at_level(logging.INFO, logger="nervedet.device_jpeg"):
        on = _infer(path, fake_model(), "on", mpp=0.5)
    off = _infer(path, fake_model(), "off", mpp=0.5)
    assert on.decode == "reader" and "decoded by the readers" in caplog.text
    assert np.array_equal(on.probs, off.probs) and np.array_equal(on.immune_xy, off.immune_xy)
    assert (on.probs[0] > 127).any() and len(on.immune_xy) > 0  # the fake network saw the colours


def test_auto_decodes_on_the_device_only_with_cuda(svs) -> None:
    with open_slide(svs[0.25]) as slide:
        grid = _grid_over(slide, 0.5, (0.0, 0.0))
        assert device_jpeg.device_tiles(slide, grid, 0.5, CPU, "auto") is None
        assert device_jpeg.device_tiles(slide, grid, 0.5, CPU, "off") is None
        assert device_jpeg.device_tiles(slide, grid, 0.5, CPU, "on") is not None
    with pytest.raises(ValueError, match="device_decode"):
        InferSettings(device_decode="gpu")


def test_a_device_decoder_that_disagrees_with_openslide_falls_back_with_one_warning(svs, monkeypatch,
                                                                                    caplog) -> None:
    real = device_jpeg.decode_streams

    def swapped(streams, device):  # R and B exchanged: a decoder that ignores the RGB marker goes as wrong
        return [img.flip(0) for img in real(streams, device)]

    monkeypatch.setattr(device_jpeg, "decode_streams", swapped)
    settings = InferSettings(tile_size=256, overlap=64, workers=0, progress=False, precision="fp32",
                             device_decode="on")
    with open_slide(svs[0.25]) as slide, caplog.at_level(logging.WARNING, logger="nervedet.device_jpeg"):
        tissue = detect_tissue(slide)
        first = run_inference(fake_model(), slide, tissue, settings)
        second = run_inference(fake_model(), slide, tissue, settings)  # a second region of the same slide
    off = _infer(svs[0.25], fake_model(), "off")
    assert first.decode == second.decode == "reader"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "differ from OpenSlide" in warnings[0].getMessage()
    assert np.array_equal(first.probs, off.probs)


def test_the_cli_passes_device_decode_to_the_settings(svs, tmp_path, monkeypatch) -> None:
    import nervedet.cohort
    import nervedet.weights

    seen = []
    monkeypatch.setattr(nervedet.weights, "load_model", lambda *a, **k: fake_model())
    monkeypatch.setattr(nervedet.cohort, "run_cohort", lambda slides, out, model, settings, **k: seen.append(
        settings) or [])
    assert cli.main(["infer", str(svs[0.25]), "--out", str(tmp_path / "o"), "--device", "cpu",
                     "--device-decode", "on", "--no-progress"]) == 0
    assert cli.main(["infer", str(svs[0.25]), "--out", str(tmp_path / "o"), "--device", "cpu",
                     "--no-progress"]) == 0
    assert [s.infer.device_decode for s in seen] == ["on", "auto"]
