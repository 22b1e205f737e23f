"""Whole-slide inference with a network whose answer is known: the canvas, the stitching and the peaks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from nervedet.infer import InferSettings, canvas_grid, run_inference
from nervedet.slide import open_slide
from nervedet.tissue import detect_tissue
from tests.fakes import GREEN, RED, TISSUE, draw_cells, fake_model


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A 700 × 600 px image at 0.5 µm/px: tissue, a red (tumour) and a green (nerve) block, dots on a grid
    whose lines fall on the seams of 256-px tiles with 64 px overlap (stride 192)."""
    img = np.full((600, 700, 3), TISSUE, np.uint8)
    img[40:200, 300:480] = RED
    img[350:420, 100:260] = GREEN
    cells = [(x, y) for x in range(20, 690, 37) for y in range(20, 590, 41)]
    cells += [(192 + 32, 100), (192 + 31, 300), (384 + 32, 500), (500, 192 + 32), (650, 384 + 31)]  # on seams
    cells = [c for c in cells if not (290 <= c[0] <= 490 and 30 <= c[1] <= 210)]
    cells = [c for c in cells if not (90 <= c[0] <= 270 and 340 <= c[1] <= 430)]
    cells = list(dict.fromkeys(cells))
    cells = [c for c in cells if all(abs(c[0] - o[0]) + abs(c[1] - o[1]) > 8 for o in cells if o != c)]
    draw_cells(img, cells)
    path = tmp_path_factory.mktemp("infer") / "colours.png"
    Image.fromarray(img).save(path)
    return path, img, np.array(cells, float) + 0.5


def _run(path, tile: int, overlap: int, workers: int = 0):
    with open_slide(path, mpp=0.5) as slide:
        tissue = detect_tissue(slide)
        settings = InferSettings(tile_size=tile, overlap=overlap, workers=workers, progress=False,
                                 precision="fp32", min_tissue_fraction=0.0)
        return run_inference(fake_model(), slide, tissue, settings)


@pytest.mark.parametrize("tile,overlap,workers", [(256, 64, 0), (384, 32, 1)])
def test_stitched_classes_match_the_image_whatever_the_tiling(image, tile, overlap, workers) -> None:
    path, img, _ = image
    out = _run(path, tile, overlap, workers)
    g = out.grid
    assert out.class_names == ("Tumor", "Nerve")
    assert g.width >= 690 and g.height >= 590  # the canvas covers the tissue (the whole image)
    ox, oy = int(round(g.origin[0])), int(round(g.origin[1]))
    crop = img[oy:oy + g.height, ox:ox + g.width]
    tumor, nerve = out.probs[0] > 127, out.probs[1] > 127
    assert np.array_equal(tumor, (crop == RED).all(-1))
    assert np.array_equal(nerve, (crop == GREEN).all(-1))


@pytest.mark.parametrize("tile,overlap", [(256, 64), (320, 96)])
def test_every_cell_is_found_once_also_on_tile_seams(image, tile, overlap) -> None:
    path, _, cells = image
    out = _run(path, tile, overlap)
    found = out.immune_level0()
    assert len(found) == len(cells)
    d = np.hypot(*(found[:, None, :] - cells[None, :, :]).transpose(2, 0, 1))
    assert np.all(d.min(0) <= 1.0) and np.all(d.min(1) <= 1.0)


def test_the_canvas_spans_the_tissue_and_only_tiles_with_tissue_are_run(image, tmp_path) -> None:
    path, img, _ = image
    big = np.full((1200, 1400, 3), 255, np.uint8)  # glass, the image top left, a small piece bottom right
    big[:600, :700] = img
    big[850:1150, 1050:1350] = TISSUE
    p = tmp_path / "wide.png"
    Image.fromarray(big).save(p)
    with open_slide(p, mpp=0.5) as slide:
        tissue = detect_tissue(slide)
        grid = canvas_grid(slide, tissue, 0.5, InferSettings(tile_size=256, overlap=64))
    assert grid.origin == (0.0, 0.0) and 1340 <= grid.width <= 1370 and 1140 <= grid.height <= 1170
    truth = np.zeros(big.shape[:2], bool)
    truth[:600, :700] = truth[850:1150, 1050:1350] = True
    kept = set(grid.tiles)
    for col in range(grid.nx):
        for row in range(grid.ny):
            x, y = grid.tile_origin(col, row)
            share = truth[y:y + 256, x:x + 256].sum() / 256**2
            if share == 0:
                assert (col, row) not in kept
            elif share > 0.2:
                assert (col, row) in kept
    assert 0 < len(kept) < grid.nx * grid.ny


def test_tiles_are_run_only_over_their_tissue_and_a_margin_and_give_the_same_classes_and_cells(
        image, tmp_path) -> None:
    from nervedet.crops import CROP_MARGIN_PX, CROP_QUANTUM_PX

    path, img, cells = image
    big = np.full((1500, 2000, 3), 255, np.uint8)  # the image and a small piece on glass: 768-px tiles
    big[100:700, 150:850] = img                     # partly over the glass between them
    big[1000:1400, 1500:1900] = TISSUE
    big[1100:1200, 1550:1700] = GREEN  # a nerve and cells in the piece, whose tiles are cropped
    extra = [(1600 + 23 * k, 1300) for k in range(10)]
    draw_cells(big, extra)
    p = tmp_path / "sparse.png"
    Image.fromarray(big).save(p)
    runs = {}
    for crop in (True, False):
        with open_slide(p, mpp=0.5) as slide:
            settings = InferSettings(tile_size=768, overlap=64, progress=False, precision="fp32", workers=0,
                                     crop_to_tissue=crop)
            runs[crop] = run_inference(fake_model(), slide, detect_tissue(slide), settings)
    g, whole = runs[True].grid, runs[False].grid
    assert g.tiles == whole.tiles and whole.pixels == len(whole.tiles) * 768**2
    assert g.pixels < 0.75 * whole.pixels
    tissue = np.zeros(big.shape[:2], bool)
    tissue[100:700, 150:850] = tissue[1000:1400, 1500:1900] = True
    ox, oy = int(round(g.origin[0])), int(round(g.origin[1]))
    for i, (col, row) in enumerate(g.tiles):
        cx, cy, cw, ch = g.crop(i)
        assert cw % CROP_QUANTUM_PX == 0 and ch % CROP_QUANTUM_PX == 0 or cx + cw == 768 or cy + ch == 768
        x, y = g.tile_origin(col, row)
        inside = tissue[oy + y:oy + y + 768, ox + x:ox + x + 768]
        ys, xs = np.nonzero(inside)  # the tissue of the tile lies in its crop, a margin from its edges
        if not len(xs):
            continue
        assert xs.min() >= cx and xs.max() < cx + cw and ys.min() >= cy and ys.max() < cy + ch
        assert cx == 0 or xs.min() - cx >= CROP_MARGIN_PX - 16  # 16: the tissue mask's pixel at 8 µm
        assert cx + cw == 768 or cx + cw - xs.max() > CROP_MARGIN_PX - 16
    for name in (0, 1):  # the classes and cells are those of the whole tiles
        assert np.array_equal(runs[True].probs[name] > 127, runs[False].probs[name] > 127)
    a, b = runs[True].immune_level0(), runs[False].immune_level0()
    assert len(a) == len(b) == len(cells) + len(extra) and np.allclose(np.sort(a, 0), np.sort(b, 0))
    assert sum(g.crop(i) != (0, 0, 768, 768) for i in range(len(g.tiles))) >= 2


def test_a_slide_at_another_pixel_size_is_read_at_the_model_mpp(image, tmp_path) -> None:
    path, img, cells = image
    Image.fromarray(np.kron(img, np.ones((2, 2, 1), np.uint8))).save(tmp_path / "x2.png")  # 0.25 µm/px
    with open_slide(tmp_path / "x2.png", mpp=0.25) as slide:
        tissue = detect_tissue(slide)
        out = run_inference(fake_model(), slide, tissue, InferSettings(tile_size=256, overlap=64,
                            progress=False, precision="fp32", workers=0))
    assert out.grid.scale == 2.0
    found = out.immune_level0() / 2  # level-0 px at 0.25 µm → px of the original image
    assert len(found) == len(cells)
    d = np.hypot(*(found[:, None, :] - cells[None, :, :]).transpose(2, 0, 1))
    assert np.all(d.min(0) <= 1.0)


def test_settings_refuse_a_tile_size_the_network_cannot_take() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        InferSettings(tile_size=500)
    with pytest.raises(ValueError, match="overlap"):
        InferSettings(tile_size=256, overlap=128)


def test_auto_workers_read_in_a_process_only_where_tiles_are_decoded_in_full_and_shrunk_or_beside_a_gpu(
        tmp_path, pyramid_tiff) -> None:
    import torch

    from nervedet.infer import auto_workers
    from nervedet.slide import open_slide

    img = np.full((256, 256, 3), 200, np.uint8)
    # 0.5 µm/px shrunk from level 0: decoded in full (deflate), or at half scale in the DCT domain (JPEG)
    full = open_slide(pyramid_tiff(tmp_path / "deflate40x.tiff", img, mpp=0.25, n_levels=1, compression="zlib"))
    flat = open_slide(pyramid_tiff(tmp_path / "jpeg40x.tiff", img, mpp=0.25, n_levels=1))
    steps = open_slide(pyramid_tiff(tmp_path / "steps.tiff", img, mpp=0.25, n_levels=3))  # has a 0.5 µm/px level
    cpu = torch.device("cpu")
    assert not full.decodes_reduced(0.5) and flat.decodes_reduced(0.5) and not steps.decodes_reduced(0.5)
    assert auto_workers(full, 0.5, cpu) == 1
    assert auto_workers(flat, 0.5, cpu) == 0
    assert auto_workers(steps, 0.5, cpu) == 0
    assert auto_workers(steps, 0.5, torch.device("cuda")) >= 1


@pytest.mark.parametrize("workers", [0, 1])
def test_a_tile_that_cannot_be_read_is_one_slide_error_line_naming_the_file(image, monkeypatch, workers) -> None:
    from nervedet.slide import Slide, SlideError

    path = image[0]
    with open_slide(path, mpp=0.5) as slide:
        tissue = detect_tissue(slide)

        def broken(self, location, size, mpp=None):
            raise OSError("Input/output error\n(the disk went away)")

        monkeypatch.setattr(Slide, "read_region", broken)  # forked reader processes inherit it
        settings = InferSettings(tile_size=256, overlap=64, workers=workers, progress=False, precision="fp32")
        with pytest.raises(SlideError) as err:
            run_inference(fake_model(), slide, tissue, settings)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: cannot read the tile at level-0")
    assert "Input/output error (the disk went away)" in message


def test_the_default_batch_is_smaller_on_the_cpu_follows_the_tile_pixels_and_an_explicit_one_is_kept() -> None:
    import torch

    from nervedet.infer import batch_size_for

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert batch_size_for(InferSettings(tile_size=512), cpu) == 2
    assert batch_size_for(InferSettings(tile_size=512), cuda) == 8
    assert batch_size_for(InferSettings(tile_size=768), cpu) == 1
    assert batch_size_for(InferSettings(tile_size=768), cuda) == 4
    assert batch_size_for(InferSettings(tile_size=2048), cpu) == 1
    assert batch_size_for(InferSettings(batch_size=16), cpu) == 16


def test_a_compiled_network_stitches_the_same_canvas_and_cells(image, monkeypatch) -> None:
    import torch

    path, _, cells = image
    backends = []
    real = torch.compile

    def light_compile(net, **kwargs):  # the real torch.compile, with the backend that needs no C++ compiler
        backends.append("aot_eager")
        return real(net, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", light_compile)
    with open_slide(path, mpp=0.5) as slide:
        tissue = detect_tissue(slide)
        settings = InferSettings(tile_size=256, overlap=64, workers=0, progress=False, precision="fp32")
        plain = run_inference(fake_model(), slide, tissue, settings)
        fast = run_inference(fake_model(), slide, tissue, InferSettings(**{**vars(settings), "compile": True}))
    assert backends == ["aot_eager"]
    assert np.array_equal(plain.probs, fast.probs)
    assert len(fast.immune_xy) == len(cells) and np.allclose(plain.immune_xy, fast.immune_xy)


def test_the_inference_network_folds_batchnorm_into_the_convolutions_and_computes_the_same() -> None:
    import torch

    from nervedet.infer import inference_network
    from nervedet.weights import load_model

    model = load_model(None, device="cpu")
    net = inference_network(model)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.network.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert inference_network(model) is net  # made once
    x = torch.rand(2, 3, 128, 128)
    with torch.inference_mode():
        plain = model.network.eval()(x)
        folded = net(x.contiguous(memory_format=torch.channels_last))
    assert plain.abs().max() > 1.0
    torch.testing.assert_close(folded, plain, atol=1e-3, rtol=1e-4)
    with torch.no_grad():  # weights changed in place (say, fine-tuned in this process): folded again
        next(model.network.parameters()).mul_(0.5)
    refolded = inference_network(model)
    assert refolded is not net
    with torch.inference_mode():
        torch.testing.assert_close(refolded(x.contiguous(memory_format=torch.channels_last)), model.network(x),
                                   atol=1e-3, rtol=1e-4)


def test_cpu_streams_and_the_dataloader_give_the_same_canvas_and_cells(image, monkeypatch) -> None:
    from nervedet import infer

    path, _, _ = image
    calls = []
    real = infer.stream_results
    monkeypatch.setattr(infer, "stream_results", lambda *a: calls.append(a[3]) or real(*a))
    streams = _run(path, 256, 64, workers=0)  # on the CPU without reader processes: streams
    assert calls == [infer.stream_count()]
    loader = _run(path, 256, 64, workers=1)  # a reader process: the DataLoader
    assert len(calls) == 1
    assert np.array_equal(streams.probs, loader.probs)
    assert np.array_equal(streams.immune_xy, loader.immune_xy)
