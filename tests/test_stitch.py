"""The blended stitcher: overlapping tiles fade into each other without seams, whatever the tiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nervedet.stitch import Stitcher, blend_window


def _tile_field(field: np.ndarray, tile: int, overlap: int) -> np.ndarray:
    """Stitch ``field`` (C, H, W) cut into overlapping tiles, row-major, as inference feeds them."""
    c, h, w = field.shape
    stride = tile - overlap
    s = Stitcher(w, h, c, tile, overlap)
    padded = np.zeros((c, h + tile, w + tile), np.float32)
    padded[:, :h, :w] = field
    for y in range(0, h, stride):
        for x in range(0, w, stride):
            s.add(x, y, padded[:, y:y + tile, x:x + tile])
    return s.finish()


def test_window_is_one_inside_and_ramps_over_the_overlap() -> None:
    w = blend_window(64, 16)
    assert w[32, 32] == 1.0
    assert w[0, 0] < 0.01 and w[0, 32] < 0.05
    assert np.all(np.diff(w[32, :16]) > 0)  # rises monotonically across the overlap


@pytest.mark.parametrize("tile,overlap", [(64, 16), (96, 32), (64, 0)])
def test_a_smooth_field_comes_back_unchanged_whatever_the_tiling(tile: int, overlap: int) -> None:
    yy, xx = np.mgrid[0:150, 0:170]
    field = np.stack([0.5 + 0.4 * np.sin(xx / 17.0) * np.cos(yy / 23.0), (xx + yy) / 320.0]).astype(np.float32)
    out = _tile_field(field, tile, overlap)
    assert out.dtype == np.uint8 and out.shape == field.shape
    assert np.abs(out / 255.0 - field).max() <= 1 / 255 + 1e-6


def test_tiles_that_disagree_are_blended_by_distance_from_their_centre() -> None:
    s = Stitcher(96, 32, 1, 64, 32)  # two tiles side by side, overlapping over x 32..63
    s.add(0, 0, np.zeros((1, 64, 64), np.float32))
    s.add(32, 0, np.ones((1, 64, 64), np.float32))
    row = s.finish()[0, 10] / 255.0
    assert row[:32].max() == 0 and row[64:].min() == 1  # each tile alone outside the overlap
    assert np.all(np.diff(row[32:64]) >= 0) and abs(row[47] - 0.5) < 0.1  # a ramp, no step at a seam


def test_rows_no_tile_reached_stay_zero() -> None:
    s = Stitcher(64, 200, 1, 64, 0)
    s.add(0, 0, np.ones((1, 64, 64), np.float32))
    s.add(0, 136, np.ones((1, 64, 64), np.float32))
    out = s.finish()[0]
    assert out[:64].min() == 255 and out[64:136].max() == 0 and out[136:].min() == 255


def test_tiles_out_of_row_order_are_refused() -> None:
    s = Stitcher(64, 128, 1, 64, 0)
    s.add(0, 64, np.ones((1, 64, 64), np.float32))
    with pytest.raises(ValueError, match="non-decreasing y"):
        s.add(0, 0, np.ones((1, 64, 64), np.float32))


def test_a_canvas_too_large_for_memory_is_a_file_mapping_with_the_same_pixels(monkeypatch, tmp_path) -> None:
    import torch

    from nervedet import stitch

    yy, xx = np.mgrid[0:150, 0:170]
    field = np.stack([0.5 + 0.4 * np.sin(xx / 17.0), (xx + yy) / 320.0]).astype(np.float32)
    in_memory = _tile_field(field, 64, 16)
    monkeypatch.setattr(stitch, "IN_MEMORY_BYTES", 1000)
    s = Stitcher(170, 150, 2, 64, 16, workdir=tmp_path)
    assert isinstance(s.canvas, np.memmap)
    mapped = _tile_field(field, 64, 16)
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, in_memory)
    # tiles given as tensors (as inference gives them) stitch to the same pixels
    s = Stitcher(64, 64, 2, 64, 0)
    s.add(0, 0, torch.from_numpy(field[:, :64, :64].copy()))
    assert np.array_equal(s.finish(), _tile_field(field[:, :64, :64].copy(), 64, 0))


def test_a_tile_added_in_parts_at_their_offsets_equals_the_whole_tile() -> None:
    rng = np.random.default_rng(0)
    tiles = rng.random((2, 2, 64, 64), np.float32)
    whole, parts = Stitcher(112, 64, 2, 64, 16), Stitcher(112, 64, 2, 64, 16)
    for k, x in enumerate((0, 48)):
        whole.add(x, 0, tiles[k])
        parts.add(x, 0, tiles[k][:, :, :32], offset=(0, 0))
        parts.add(x, 0, tiles[k][:, 16:, 32:], offset=(32, 16))  # the rest of the tile minus a top strip
        parts.add(x, 0, tiles[k][:, :16, 32:], offset=(32, 0))
    assert np.array_equal(whole.finish(), parts.finish())
    with pytest.raises(ValueError, match="inside a 64-px tile"):
        Stitcher(112, 64, 1, 64, 16).add(0, 0, np.ones((1, 32, 48), np.float32), offset=(32, 0))


@pytest.mark.parametrize("tile,overlap,width,height", [(64, 16, 170, 150), (96, 32, 200, 97), (64, 0, 130, 64),
                                                       (128, 48, 300, 260)])
def test_on_a_grid_the_tiles_own_pixels_go_straight_to_the_canvas_with_the_same_result(
        tile: int, overlap: int, width: int, height: int) -> None:
    rng = np.random.default_rng(tile + overlap)
    stride = tile - overlap
    plain, fast = Stitcher(width, height, 2, tile, overlap), Stitcher(width, height, 2, tile, overlap, on_grid=True)
    for y in range(0, height, stride):
        for x in range(0, width, stride):
            if rng.random() < 0.15:
                continue  # a tile not run (no tissue): its neighbours' ramps stand alone
            probs = rng.random((2, tile, tile), dtype=np.float32)
            if rng.random() < 0.4:  # a crop: part of the tile, at its offset
                cx, cy = (int(v) for v in rng.integers(0, tile // 2, 2))
                cw, ch = (int(v) for v in rng.integers(8, tile // 2 + 1, 2))
                part, offset = probs[:, cy:cy + ch, cx:cx + cw], (cx, cy)
            else:
                part, offset = probs, (0, 0)
            plain.add(x, y, part, offset=offset)
            fast.add(x, y, torch.from_numpy(part.copy()), offset=offset)
    a, b = plain.finish(), fast.finish()
    assert a.any() and np.array_equal(a, b)


def test_a_tile_off_the_grid_is_refused_when_on_a_grid() -> None:
    s = Stitcher(200, 200, 1, 64, 16, on_grid=True)
    s.add(48, 0, np.ones((1, 64, 64), np.float32))
    with pytest.raises(ValueError, match="off the grid"):
        s.add(50, 0, np.ones((1, 64, 64), np.float32))
