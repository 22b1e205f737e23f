"""Tiles of a JPEG-compressed tiled TIFF level decoded straight to ½, ¼ or ⅛ scale in the DCT domain.

A 40x slide read at 0.5 µm/px has no level at that size (Aperio pyramids step by 4), so every tile would be
decoded at full size and then halved. libjpeg-turbo can decode at a reduced scale for a fraction of the work
(Pillow's ``draft``), which is what this module does, reading the tiles' bytes itself (tifffile tells where
they are). It is used only where it agrees with OpenSlide: at opening, one tile decoded here is compared with
OpenSlide's read of it (colour conventions of JPEG-in-TIFF vary between writers), else OpenSlide reads.
Tiles wanted at full scale are decoded here too: Pillow's decode straight to RGB takes half the time of
OpenSlide's (which decodes to premultiplied ARGB, then has to be composited back to RGB).

Decoded tiles are kept in a small cache (CACHE_BYTES, least recently used out): the network's tiles overlap
and rarely line up with the file's tiles, so neighbouring reads share JPEG tiles, each decoded once instead of
about 1.8 times (768-px reads of 256-px JPEG tiles at a stride of 704 px).
"""

from __future__ import annotations

import io
import logging
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

log = logging.getLogger(__name__)

SCALES = (8, 4, 2)  # the reductions libjpeg decodes directly
AGREEMENT = 2.0  # mean absolute difference (0-255) from OpenSlide's decode at which a level is used
CACHE_BYTES = 16 << 20  # decoded tiles kept per file (16, 32 and 48 MB read a 3 mm slide equally fast)
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"  # APP14, version 100, transform 0


@dataclass(frozen=True)
class _Level:
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    tables: bytes | None
    rgb: bool  # components stored as R, G, B (TIFF photometric RGB, as Aperio writes), not YCbCr


def agree(mine: np.ndarray, reference: np.ndarray, what: str) -> bool:
    """Whether a decode (RGB uint8) matches OpenSlide's ``reference`` within AGREEMENT (mean absolute
    difference, 0-255); ``what`` names the decode in the debug log."""
    diff = float(np.abs(mine.astype(np.int16) - reference.astype(np.int16)).mean())
    log.debug("%s differs from OpenSlide by %.2f", what, diff)
    return diff <= AGREEMENT


def scale_for(factor: float) -> int:
    """The largest DCT reduction that still keeps at least the resolution asked for (1 = none)."""
    return next((s for s in SCALES if factor >= s * (1 - 1e-6)), 1)


class JpegTiles:
    """Reduced-scale reads of the JPEG-tiled levels of one TIFF file, by level size (width, height)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.levels: dict[tuple[int, int], _Level] = {}
        with tifffile.TiffFile(self.path) as tif:
            for page in tif.pages:
                if page.is_tiled and page.compression == 7 and page.samplesperpixel == 3 and page.planarconfig == 1:
                    lv = _Level(int(page.imagewidth), int(page.imagelength), int(page.tilewidth),
                                int(page.tilelength), tuple(map(int, page.dataoffsets)),
                                tuple(map(int, page.databytecounts)), page.jpegtables or None,
                                int(page.photometric) == 2)
                    self.levels.setdefault((lv.width, lv.height), lv)
        self._fd: int | None = None
        self._pid = -1
        self._cache: OrderedDict[tuple[tuple[int, int], int, int], np.ndarray | None] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()  # readers in threads share the cache

    def _bytes(self, offset: int, count: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():  # a forked reader process opens its own descriptor
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return os.pread(self._fd, count, offset)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
        with self._lock:
            self._cache.clear()
            self._cached_bytes = 0

    def _stream(self, lv: _Level, index: int) -> bytes | None:
        count = lv.counts[index]
        if not count:
            return None
        data = self._bytes(lv.offsets[index], count)
        if lv.tables:  # abbreviated tile stream: the shared tables (without EOI), then the tile (without SOI)
            data = lv.tables[:-2] + data[2:]
        if lv.rgb:  # an Adobe marker saying "no colour transform", or libjpeg would take R, G, B for YCbCr
            data = data[:2] + _ADOBE_RGB + data[2:]
        return data

    def stream(self, size: tuple[int, int], col: int, row: int) -> bytes | None:
        """The complete JPEG stream (tables merged, colour convention marked) of tile (col, row) of the level of
        ``size``, that any JPEG decoder can read on its own; None for an empty tile (white)."""
        lv = self.levels[size]
        return self._stream(lv, row * math.ceil(lv.width / lv.tile_w) + col)

    def _tile(self, lv: _Level, index: int, scale: int) -> np.ndarray | None:
        """Tile ``index`` decoded at 1/``scale`` (read-only; None: an empty tile), from the cache if it is there."""
        key = ((lv.width, lv.height), index, scale)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        tile = self._decode(lv, index, scale)  # outside the lock: two threads decode at once
        if tile is not None:
            tile.flags.writeable = False
        with self._lock:
            if key not in self._cache:
                self._cache[key] = tile
                self._cached_bytes += tile.nbytes if tile is not None else 0
                while self._cached_bytes > CACHE_BYTES and len(self._cache) > 1:
                    old = self._cache.popitem(last=False)[1]
                    self._cached_bytes -= old.nbytes if old is not None else 0
        return tile

    def _decode(self, lv: _Level, index: int, scale: int) -> np.ndarray | None:
        data = self._stream(lv, index)
        if data is None:
            return None
        with Image.open(io.BytesIO(data)) as im:
            if scale > 1:
                im.draft("RGB", (math.ceil(lv.tile_w / scale), math.ceil(lv.tile_h / scale)))
            im.load()
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # one copy (tobytes); no conversion

    def read(self, size: tuple[int, int], x: int, y: int, w: int, h: int, scale: int) -> np.ndarray:
        """RGB of the level of ``size``: the level-pixel rectangle starting at scaled pixel (x, y) of the
        1/``scale`` image, ``w`` × ``h`` scaled pixels (white outside the image)."""
        lv = self.levels[size]
        tw, th = math.ceil(lv.tile_w / scale), math.ceil(lv.tile_h / scale)
        sw, sh = math.ceil(lv.width / scale), math.ceil(lv.height / scale)
        across = math.ceil(lv.width / lv.tile_w)
        out = np.full((h, w, 3), 255, np.uint8)
        for ty in range(max(y, 0) // th, min(math.ceil((y + h) / th), math.ceil(lv.height / lv.tile_h))):
            for tx in range(max(x, 0) // tw, min(math.ceil((x + w) / tw), across)):
                tile = self._tile(lv, ty * across + tx, scale)
                if tile is None:
                    continue
                xa, ya = max(x, tx * tw), max(y, ty * th)
                xb, yb = min(x + w, tx * tw + tile.shape[1], sw), min(y + h, ty * th + tile.shape[0], sh)
                if xb > xa and yb > ya:
                    out[ya - y:yb - y, xa - x:xb - x] = tile[ya - ty * th:yb - ty * th, xa - tx * tw:xb - tx * tw]
        return out

    def agrees(self, size: tuple[int, int], reference: np.ndarray, x: int, y: int) -> bool:
        """True when the full-scale decode of the region at level px (x, y) matches ``reference`` (OpenSlide's)."""
        h, w = reference.shape[:2]
        return agree(self.read(size, x, y, w, h, 1), reference, f"{self.path}: level {size} decoded here")

