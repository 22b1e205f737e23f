"""Write a pyramidal tiled JPEG slide (Aperio SVS or generic TIFF) from a tile renderer, in bounded memory.

Level 0 is rendered strip by strip and written as it comes; each strip is also block-averaged by 4 into a
disk-backed array for the next level, and so on down the pyramid, so memory does not grow with the slide.
The file is written under a temporary name and renamed when complete.

Tiles are JPEG-encoded here, exactly as tifffile would encode them, and handed to tifffile as bytes, so that
tiles equal to the renderer's repeated glass tile (if it has one) are encoded once per level and reused.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import tifffile

log = logging.getLogger(__name__)

TILE = 256
STRIP = 1024  # level-0 rows rendered at a time (a multiple of TILE and of DOWNSAMPLE); 512 on wide slides
WIDE = 40_000  # px: slides wider than this use half-height strips to bound memory
CHUNK = 1024  # level-0 columns rendered at a time
DOWNSAMPLE = 4
MIN_LEVEL_SIZE = 512
JPEG_QUALITY = 88
SUBSAMPLING = (2, 2)  # tifffile's default for JPEG RGB (stored as YCbCr), set explicitly so tags and tiles agree

RenderFn = Callable[[int, int, int, int], np.ndarray]  # (x0, y0, w, h) -> RGB uint8 (h, w, 3)


def _tiles(img: np.ndarray) -> Iterator[np.ndarray]:
    """The TILE×TILE tiles of a strip whose height is a multiple of TILE (edge tiles padded white)."""
    h, w = img.shape[:2]
    for ty in range(0, h, TILE):
        for tx in range(0, w, TILE):
            t = img[ty:ty + TILE, tx:tx + TILE]
            if t.shape[0] != TILE or t.shape[1] != TILE:
                t = np.pad(t, ((0, TILE - t.shape[0]), (0, TILE - t.shape[1]), (0, 0)), constant_values=255)
            yield np.ascontiguousarray(t)


def _downsample(strip: np.ndarray) -> np.ndarray:
    """Block-average by DOWNSAMPLE (an exact area downsample, rounded half up; incomplete edge blocks dropped).

    Integer sums (column block by column block, to bound the temporaries): the same numbers as a float32 mean
    of the 16 pixels plus 0.5, truncated, since those sums and that division by 16 are exact in float32.
    """
    d = DOWNSAMPLE
    h, w = strip.shape[0] // d, strip.shape[1] // d
    out = np.empty((h, w, 3), np.uint8)
    step = 2048
    for c0 in range(0, w, step):
        c1 = min(w, c0 + step)
        rows = strip[: h * d, c0 * d: c1 * d].reshape(h, d, (c1 - c0) * d * 3)
        acc = rows[:, 0].astype(np.uint16)
        for i in range(1, d):
            acc += rows[:, i]
        acc = acc.reshape(h, c1 - c0, d, 3)
        tot = acc[:, :, 0].copy()
        for i in range(1, d):
            tot += acc[:, :, i]
        tot += d * d // 2
        tot //= d * d
        out[:, c0:c1] = tot
    return out


def _glass_refs(glass: np.ndarray | None, n: int) -> list[np.ndarray | None]:
    """The tile that bare glass becomes at each of ``n`` levels, if level 0 repeats the TILE² ``glass`` tile."""
    if glass is None:
        return [None] * n
    if glass.shape != (TILE, TILE, 3) or glass.dtype != np.uint8:
        raise ValueError(f"the glass tile must be {TILE}x{TILE} RGB uint8, not {glass.shape} {glass.dtype}")
    refs, p = [], glass
    for _ in range(n):
        refs.append(np.tile(p, (TILE // p.shape[0], TILE // p.shape[1], 1)))
        if min(p.shape[:2]) >= DOWNSAMPLE:  # a period of 1 px (constant glass) stays constant
            p = _downsample(p)
    return refs


def _jpeg(tile: np.ndarray) -> bytes:
    """A tile's JPEG bytes, encoded as tifffile does for ``compression="jpeg"`` of RGB with these arguments."""
    return imagecodecs.jpeg_encode(tile, level=JPEG_QUALITY, subsampling=SUBSAMPLING, colorspace="RGB",
                                   outcolorspace="YCBCR")


def _encoded(tiles: Iterator[np.ndarray], glass: np.ndarray | None) -> Iterator[bytes]:
    """JPEG bytes of each tile; tiles equal to ``glass`` get the bytes encoded once."""
    glass_bytes = None
    for t in tiles:
        if glass is not None and np.array_equal(t[0], glass[0]) and np.array_equal(t, glass):
            if glass_bytes is None:
                glass_bytes = _jpeg(glass)
            yield glass_bytes
        else:
            yield _jpeg(t)


def _level_sizes(width: int, height: int) -> list[tuple[int, int]]:
    sizes = [(width, height)]
    while max(sizes[-1]) > MIN_LEVEL_SIZE and min(sizes[-1]) >= DOWNSAMPLE * 64:
        w, h = sizes[-1]
        sizes.append((w // DOWNSAMPLE, h // DOWNSAMPLE))
    return sizes


def _aperio_description(w: int, h: int, mpp: float, name: str, level: tuple[int, int] | None = None) -> str:
    size = f"{w}x{h} [0,0 {w}x{h}]" if level is None else f"{w}x{h} -> {level[0]}x{level[1]}"
    return (f"Aperio Image Library v12.0.15 \r\n{size} ({TILE}x{TILE}) JPEG/RGB Q={JPEG_QUALITY}"
            f"|AppMag = {10.0 / mpp:g}|MPP = {mpp:.4f}|Filename = {name}|ScanScope ID = NERVEDET-SYNTH")


def write_pyramid(
    path: Path,
    width: int,
    height: int,
    render: RenderFn,
    mpp: float,
    fmt: str = "svs",
    progress: Callable[[int], None] | None = None,
    glass: np.ndarray | None = None,
) -> list[tuple[int, int]]:
    """Render and write a slide; returns the level sizes. ``progress`` gets the level-0 rows done.

    ``glass``: the TILE×TILE RGB tile that ``render`` repeats (aligned to the tile grid) wherever the slide is
    bare glass, if it does: such tiles are encoded once per level. The output is the same with or without it.
    """
    path = Path(path)
    sizes = _level_sizes(width, height)
    refs = _glass_refs(glass, len(sizes))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    scratch = tempfile.TemporaryDirectory(prefix=".levels-", dir=path.parent)
    try:
        levels = [np.lib.format.open_memmap(Path(scratch.name) / f"l{i}.npy", mode="w+", dtype=np.uint8,
                                            shape=(h, w, 3)) for i, (w, h) in enumerate(sizes) if i > 0]
        res = (1e4 / mpp, 1e4 / mpp)
        # tiles are handed over JPEG-encoded (_jpeg); tifffile writes the tags for these settings
        common = dict(photometric="rgb", compression="jpeg", compressionargs={"level": JPEG_QUALITY},
                      subsampling=SUBSAMPLING, resolutionunit="CENTIMETER", metadata=None)
        big = width * height * 3 > 2**32 * 0.8
        with tifffile.TiffWriter(tmp_name, bigtiff=big) as tif:
            rows = STRIP if width <= WIDE else STRIP // 2

            # a chunk of bare (tiled) glass, and its downsample: chunks start on the tile grid, so a glass chunk is
            # a top-left part of this one, and its downsample the same part of that one
            glass0 = None if glass is None else np.tile(glass, (rows // TILE, -(-CHUNK // TILE), 1))[:, :CHUNK]
            glass1 = None if glass0 is None else _downsample(glass0)

            def level0() -> Iterator[np.ndarray]:
                for y0 in range(0, height, rows):
                    sh = min(rows, height - y0)
                    strip = np.full((rows, width, 3), 255, np.uint8)
                    for x0 in range(0, width, CHUNK):  # each chunk's block average goes straight to level 1
                        cw = min(CHUNK, width - x0)
                        img = strip[:sh, x0:x0 + cw]
                        img[...] = render(x0, y0, cw, sh)
                        if levels:
                            dh, dw = sh // DOWNSAMPLE, cw // DOWNSAMPLE
                            bare = glass0 is not None and np.array_equal(img, glass0[:sh, :cw])
                            d = glass1[:dh, :dw] if bare else _downsample(img)
                            r0, c0 = y0 // DOWNSAMPLE, x0 // DOWNSAMPLE
                            levels[0][r0:r0 + dh, c0:c0 + dw] = d
                    yield from _tiles(strip[: -(-sh // TILE) * TILE])
                    if progress:
                        progress(sh)

            desc = _aperio_description(width, height, mpp, path.stem) if fmt == "svs" else "nervedet synthetic slide"
            tif.write(_encoded(level0(), refs[0]), shape=(height, width, 3), dtype=np.uint8, tile=(TILE, TILE),
                      resolution=res, description=desc, subfiletype=0, **common)
            for i in range(2, len(sizes)):  # cascade the coarser levels from the previous one
                src, dst = levels[i - 2], levels[i - 1]
                for r in range(0, src.shape[0], STRIP):
                    d = _downsample(src[r:r + STRIP])
                    r1 = r // DOWNSAMPLE
                    dst[r1:r1 + d.shape[0]] = d[: dst.shape[0] - r1, : dst.shape[1]]
            if fmt == "svs":  # Aperio keeps a stripped thumbnail as the second image
                small = levels[-1] if levels else None
                if small is not None:
                    scale = min(1.0, 1024 / max(small.shape[:2]))
                    thumb = cv2.resize(np.asarray(small), None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
                    tif.write(thumb, photometric="rgb", compression="jpeg", metadata=None,
                              description=_aperio_description(width, height, mpp, path.stem, thumb.shape[1::-1]))
            for i, lvl in enumerate(levels, start=1):
                w, h = sizes[i]
                def tiles(lvl=lvl) -> Iterator[np.ndarray]:
                    for r in range(0, lvl.shape[0], TILE):
                        yield from _tiles(np.asarray(lvl[r:r + TILE]))
                desc = (_aperio_description(width, height, mpp, path.stem, (w, h)) if fmt == "svs"
                        else f"nervedet synthetic slide level {i}")
                tif.write(_encoded(tiles(), refs[i]), shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE),
                          resolution=(res[0] / DOWNSAMPLE**i, res[1] / DOWNSAMPLE**i), description=desc,
                          subfiletype=1 if fmt != "svs" else 0, **common)
            levels.clear()  # release the memory maps before the scratch folder goes
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    finally:
        scratch.cleanup()
    log.info("wrote %s (%d levels: %s)", path, len(sizes), sizes)
    return sizes
