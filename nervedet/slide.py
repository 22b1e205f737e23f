"""Open a whole-slide image or a plain image, know its pixel size, and read any region at any mpp.

OpenSlide reads every format it knows (SVS, NDPI, MRXS, SCN, BIF, generic tiled TIFF, DICOM); tifffile reads
other TIFFs (OME-TIFF, incl. OME pyramids); Pillow reads PNG and JPEG. Coordinates are level-0 pixels of the
file as OpenSlide shows it; sizes passed to :meth:`Slide.read_region` are output pixels at the requested mpp.
"""

from __future__ import annotations

import logging
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import cv2
import numpy as np
import openslide
import tifffile
from PIL import Image

from nervedet.jpeg_tiles import JpegTiles, scale_for

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

LEVEL_MPP_TOLERANCE = 0.01  # a level up to 1% coarser than the requested mpp still counts as fine enough
MAX_TIFF_MPP = 50.0  # TIFF resolution tags saying coarser than this are a writer's default dpi, not a size
_BAND_PIXELS = 1 << 24  # OpenSlide reads larger than this are made in horizontal bands
_EPS = 1e-6
_OME_UNITS_UM = {"µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "Å": 1e-4, "pm": 1e-6,
                 "mm": 1e3, "cm": 1e4, "m": 1e6}


class SlideError(ValueError):
    """A slide that cannot be opened or has no pixel size; the message is one line naming the file."""


@dataclass(frozen=True)
class TileSpec:
    """One tile: its level-0 rectangle (x0, y0, w0, h0) and its output size (w, h) at `mpp` µm/px."""

    x0: int
    y0: int
    w0: int
    h0: int
    w: int
    h: int
    mpp: float

    @property
    def location(self) -> tuple[int, int]:
        return self.x0, self.y0

    @property
    def size(self) -> tuple[int, int]:
        return self.w, self.h


class _Backend(Protocol):
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray: ...  # RGB, white outside
    def close(self) -> None: ...


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite straight (non-premultiplied) RGBA onto white."""
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    return ((rgba[..., :3] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """(h, w[, s]) of any dtype → (h, w, 3) uint8; grey is repeated, alpha composited onto white."""
    if arr.dtype.kind == "f":
        scale = 255.0 if np.nanmax(arr, initial=0) <= 1 else 1.0
        arr = np.clip(np.nan_to_num(arr) * scale, 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = (arr.astype(np.float64) * (255.0 / np.iinfo(arr.dtype).max)).round().astype(np.uint8)
    arr = arr[..., None] if arr.ndim == 2 else arr
    if arr.shape[2] <= 2:  # grey, or grey + alpha
        arr = np.concatenate([np.repeat(arr[..., :1], 3, axis=2), arr[..., 1:]], axis=2)
    return _over_white(arr[..., :4]) if arr.shape[2] >= 4 else np.ascontiguousarray(arr)


def _window(arr: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """A (h, w, 3) window of an RGB array; white where it falls outside."""
    out = np.full((h, w, 3), 255, np.uint8)
    H, W = arr.shape[:2]
    xa, ya, xb, yb = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if xb > xa and yb > ya:
        out[ya - y : yb - y, xa - x : xb - x] = arr[ya:yb, xa:xb]
    return out


class _OpenSlideBackend:
    def __init__(self, handle: openslide.OpenSlide, path: Path | None = None) -> None:
        self.handle = handle
        self.level_dimensions = tuple(handle.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in handle.level_downsamples)
        self._path = path if path is not None and is_tiff(path) else None
        self._jpeg: JpegTiles | None = None
        self._fast: dict[int, bool] = {}  # level -> jpeg_tiles.py's decodes agree with OpenSlide

    def decodes_scaled(self, level: int) -> bool:
        """Whether ``level``'s JPEG tiles can be decoded by jpeg_tiles.py, at full or reduced scale (checked
        once: one tile against OpenSlide's)."""
        if level not in self._fast:
            self._fast[level] = False
            if self._path is not None:
                try:
                    self._jpeg = self._jpeg or JpegTiles(self._path)
                    lv = self._jpeg.levels.get(self.level_dimensions[level])
                    if lv is not None:
                        x = (lv.width // 2 // lv.tile_w) * lv.tile_w
                        y = (lv.height // 2 // lv.tile_h) * lv.tile_h
                        w, h = min(lv.tile_w, lv.width - x), min(lv.tile_h, lv.height - y)
                        self._fast[level] = self._jpeg.agrees(self.level_dimensions[level],
                                                              self.read(level, x, y, w, h), x, y)
                except Exception as exc:  # noqa: BLE001 - optional: OpenSlide reads whatever this cannot
                    log.debug("%s: no reduced-scale JPEG reads: %s", self._path, exc)
        return self._fast[level]

    def read_scaled(self, level: int, x: int, y: int, w: int, h: int, scale: int) -> np.ndarray | None:
        """``w`` × ``h`` px of the level decoded at 1/``scale`` from scaled px (x, y); None where not possible."""
        if not self.decodes_scaled(level):
            return None
        assert self._jpeg is not None
        return self._jpeg.read(self.level_dimensions[level], x, y, w, h, scale)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        d = self.level_downsamples[level]
        out = np.empty((h, w, 3), np.uint8)
        band = max(1, _BAND_PIXELS // max(w, 1))
        for by in range(0, h, band):
            bh = min(band, h - by)
            loc = (round(x * d), round((y + by) * d))
            rgba = np.asarray(self.handle.read_region(loc, level, (w, bh)))
            out[by : by + bh] = _over_white(rgba)
        return out

    def close(self) -> None:
        self.handle.close()
        if self._jpeg is not None:
            self._jpeg.close()


class _ArrayBackend:
    """Levels held in memory as RGB arrays, each loaded on first use by `load(level)`."""

    def __init__(self, dims: list[tuple[int, int]], load: Callable[[int], np.ndarray]) -> None:
        self.level_dimensions = tuple(dims)
        self.level_downsamples = tuple((dims[0][0] / w + dims[0][1] / h) / 2 for w, h in dims)
        self._load, self._levels = load, {}

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        if level not in self._levels:
            self._levels[level] = self._load(level)
        return _window(self._levels[level], x, y, w, h)

    def close(self) -> None:
        self._levels.clear()


class _TiffBackend(_ArrayBackend):
    """tifffile: the levels of series[0]; tiled RGB levels are read tile by tile, others whole."""

    def __init__(self, tif: tifffile.TiffFile) -> None:
        self.tif, self.series = tif, tif.series[0].levels
        axes = [s.axes.upper() for s in self.series]
        dims = [(s.shape[a.index("X")], s.shape[a.index("Y")]) for s, a in zip(self.series, axes)]
        super().__init__(dims, self._whole)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        s = self.series[level]
        page = s.keyframe
        simple = s.axes.upper() in ("YX", "YXS") and len(s.pages) == 1 and page.imagedepth == 1
        if not (simple and page.is_tiled and page.planarconfig == 1):  # read whole, once
            return super().read(level, x, y, w, h)
        page, out = s.pages[0], np.full((h, w, 3), 255, np.uint8)
        tw, th = page.tilewidth, page.tilelength
        W, H = self.level_dimensions[level]
        across = math.ceil(W / tw)
        for ty in range(max(y, 0) // th, min(math.ceil((y + h) / th), math.ceil(H / th))):
            for tx in range(max(x, 0) // tw, min(math.ceil((x + w) / tw), across)):
                i = ty * across + tx
                self.tif.filehandle.seek(page.dataoffsets[i])
                data = self.tif.filehandle.read(page.databytecounts[i]) if page.databytecounts[i] else None
                seg = page.decode(data, i, jpegtables=page.jpegtables)[0]
                if seg is None:  # an empty tile stays white
                    continue
                tile = _to_rgb(np.asarray(seg).reshape(*np.shape(seg)[-3:-1], -1))
                xa, ya = max(x, tx * tw), max(y, ty * th)
                xb, yb = min(x + w, tx * tw + tile.shape[1], W), min(y + h, ty * th + tile.shape[0], H)
                tile = tile[ya - ty * th : yb - ty * th, xa - tx * tw : xb - tx * tw]
                out[ya - y : yb - y, xa - x : xb - x] = tile
        return out

    def _whole(self, level: int) -> np.ndarray:
        s = self.series[level]
        arr, axes = s.asarray(), s.axes.upper()
        colour = "C" if "S" not in axes and "C" in axes else "S"  # planar colour channels, or samples
        for i in reversed(range(len(axes))):  # the first plane of every other axis
            if axes[i] not in ("Y", "X", colour):
                arr, axes = np.take(arr, 0, axis=i), axes[:i] + axes[i + 1 :]
        return _to_rgb(np.transpose(arr, [axes.index(a) for a in ("Y", "X", colour) if a in axes]))

    def close(self) -> None:
        super().close()
        self.tif.close()


def _tiff_mpp(path: Path) -> tuple[float, float] | None:
    """Pixel size of a TIFF: OME-XML PhysicalSizeX/Y first, then the resolution tags (inch or centimetre)."""
    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_ome and tif.ome_metadata:
                root = ET.fromstring(tif.ome_metadata)
                px = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
                got = ([(px.get(f"PhysicalSize{a}"), px.get(f"PhysicalSize{a}Unit", "µm")) for a in "XY"]
                       if px is not None else [])
                if got and all(v and float(v) > 0 and u in _OME_UNITS_UM for v, u in got):
                    (x, ux), (y, uy) = got
                    return float(x) * _OME_UNITS_UM[ux], float(y) * _OME_UNITS_UM[uy]
            tags = tif.pages.first.tags
            unit, xr, yr = (tags.get(n) for n in ("ResolutionUnit", "XResolution", "YResolution"))
            um = {2: 25400.0, 3: 10000.0}.get(int(unit.value)) if unit and xr and yr else None  # inch, cm
            if um is None:
                return None
            res = [v[0] / v[1] if isinstance(v, tuple) else float(v) for v in (xr.value, yr.value)]
            mpp = (um / res[0], um / res[1]) if min(res) > 0 else None
    except Exception as exc:  # noqa: BLE001 - unreadable metadata just means no pixel size from it
        log.debug("%s: no TIFF pixel size (%s)", path, exc)
        return None
    if mpp and max(mpp) > MAX_TIFF_MPP:
        log.info("%s: ignoring TIFF resolution tags (%.1f µm/px, a writer's default dpi)", path, mpp[0])
        return None
    return mpp


class _Collect(logging.Handler):
    """Keeps the messages of a library's logger for a moment (tifffile logs what it finds broken)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _tifffile_message(text: str) -> str:
    return " ".join(re.sub(r"<[^>]*>", "", text).split())


MAX_TIFF_SIDE = 1 << 20  # px: no scanner makes an image a million pixels wide; a corrupt header may claim it
MAX_TIFF_TILE = 1 << 14  # px: tiles are 240-1024 px; a corrupt tile size makes OpenSlide abort the process


def _page_problem(page: tifffile.TiffPage) -> str | None:
    """Why a TIFF directory cannot describe a real image (corrupt sizes that would exhaust memory or abort
    OpenSlide), or None: sizes within bounds, and as many tiles or strips as the sizes need."""
    w, h = int(page.imagewidth), int(page.imagelength)
    where = f"corrupt TIFF: directory {page.index}"
    if w > MAX_TIFF_SIDE or h > MAX_TIFF_SIDE:
        return f"{where} claims an image of {w:,} x {h:,} px"
    if page.is_tiled and (not 0 < page.tilewidth <= MAX_TIFF_TILE or not 0 < page.tilelength <= MAX_TIFF_TILE):
        return f"{where} claims tiles of {page.tilewidth:,} x {page.tilelength:,} px"
    needed, listed = int(np.prod(page.chunked)), len(page.dataoffsets)
    if needed != listed:
        return f"{where}: a {w:,} x {h:,} px image needs {needed:,} tiles or strips but lists {listed:,}"
    return None


def _open_tiff(path: Path) -> tifffile.TiffFile:
    """tifffile's view of a file with a TIFF signature, every directory read and checked once: SlideError when
    the file is truncated or corrupt (a copy cut short keeps its first directories but points past its end;
    tifffile notices and logs it, and the image data must lie inside the file), tifffile's own exception when
    it cannot parse the file at all (OpenSlide may still read it)."""
    size = path.stat().st_size
    logger = logging.getLogger("tifffile")
    collect, propagate = _Collect(), logger.propagate
    logger.addHandler(collect)
    logger.propagate = False  # its warnings become our one-line error, not noise on stderr
    tif = None
    try:
        tif = tifffile.TiffFile(path)
        end = 0
        for page in tif.pages:
            if problem := _page_problem(page):
                raise SlideError(f"{path}: {problem}")
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
            end = max(end, *ends) if ends else end
        broken = [m for m in collect.messages if "offset" in m.lower()]
        if end > size:
            raise SlideError(f"{path}: truncated: its image data runs to byte {end:,} but the file ends at byte "
                             f"{size:,}")
        if broken:
            raise SlideError(f"{path}: truncated or corrupt TIFF: {_tifffile_message(broken[0])} (the file has "
                             f"{size:,} bytes)")
        return tif
    except SlideError:
        tif.close()
        raise
    except Exception as exc:
        if tif is not None:
            tif.close()
        if collect.messages:
            raise SlideError(f"{path}: truncated or corrupt TIFF: {_tifffile_message(collect.messages[0])} "
                             f"(the file has {size:,} bytes)") from exc
        raise
    finally:
        logger.removeHandler(collect)
        logger.propagate = propagate


def is_tiff(path: Path) -> bool:
    """Whether the file starts with a TIFF (or BigTIFF) signature."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


class Slide:
    """An open slide: pixel size, pyramid levels, and reads at any mpp. Use `open_slide` to make one."""

    def __init__(self, path: Path, backend: _Backend, mpp_x: float, mpp_y: float, vendor: str,
                 properties: dict[str, str] | None = None) -> None:
        self.path = path
        self._backend = backend
        self.mpp_x, self.mpp_y = float(mpp_x), float(mpp_y)
        self.mpp = (self.mpp_x + self.mpp_y) / 2
        self.vendor = vendor
        self.properties: dict[str, str] = dict(properties or {})
        self.level_dimensions: tuple[tuple[int, int], ...] = backend.level_dimensions
        self.level_downsamples: tuple[float, ...] = backend.level_downsamples
        self.level_count = len(self.level_dimensions)
        self.dimensions: tuple[int, int] = self.level_dimensions[0]
        self.level_mpps: tuple[float, ...] = tuple(self.mpp * d for d in self.level_downsamples)
        p = self.properties
        bx, by = int(p.get("openslide.bounds-x", 0)), int(p.get("openslide.bounds-y", 0))
        self.offset: tuple[int, int] = (bx, by)  # QuPath shows the image cropped to this origin
        bw = int(p.get("openslide.bounds-width", self.dimensions[0] - bx))
        bh = int(p.get("openslide.bounds-height", self.dimensions[1] - by))
        self.bounds: tuple[int, int, int, int] = (bx, by, bw, bh)  # the non-empty area
        # Reads of JPEG-tiled TIFF levels are decoded by jpeg_tiles.py (at ½-⅛ scale in the DCT domain where
        # they shrink) where that agrees with OpenSlide's decode; False: OpenSlide decodes, at full size.
        self.fast_jpeg = True

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, mpp={self.mpp:.4g}, dimensions={self.dimensions})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._backend.close()

    def level_for_mpp(self, mpp: float) -> int:
        """The coarsest level whose pixels are no coarser than `mpp` (within 1%); level 0 if none is."""
        fine = [i for i, m in enumerate(self.level_mpps) if m <= mpp * (1 + LEVEL_MPP_TOLERANCE)]
        return max(fine, key=lambda i: self.level_mpps[i]) if fine else 0

    def read_region(self, location: tuple[int, int], size: tuple[int, int],
                    mpp: float | None = None) -> np.ndarray:
        """RGB uint8 (h, w, 3): `size` output px at `mpp` (default: level-0 mpp) from level-0 `location`."""
        mpp = self.mpp if mpp is None else float(mpp)
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0 or mpp <= 0:
            raise ValueError(f"read_region needs a positive size and mpp, got size={size}, mpp={mpp}")
        scale = mpp / self.mpp  # level-0 px per output px
        level = self.level_for_mpp(mpp)
        d = self.level_downsamples[level]
        x0, y0 = location[0] / d, location[1] / d  # wanted area in level px
        x1, y1 = (location[0] + w * scale) / d, (location[1] + h * scale) / d
        ix0, iy0 = math.floor(x0 + _EPS), math.floor(y0 + _EPS)
        ix1, iy1 = max(math.ceil(x1 - _EPS), ix0 + 1), max(math.ceil(y1 - _EPS), iy0 + 1)
        r = scale_for((x1 - x0) / w) if self.fast_jpeg else 1  # level px per output px -> DCT reduction
        read_scaled = getattr(self._backend, "read_scaled", None)
        aligned = max(abs(v / r - round(v / r)) for v in (x0, y0)) < _EPS  # on the reduced grid (as tiles are)
        # JPEG tiles are decoded here, at reduced scale where one is asked for, else at full scale (twice as
        # fast as OpenSlide's decode to premultiplied ARGB and back); OpenSlide reads everything else
        if self.fast_jpeg and aligned and read_scaled is not None:
            sx0, sy0 = math.floor(x0 / r + _EPS), math.floor(y0 / r + _EPS)
            sx1, sy1 = max(math.ceil(x1 / r - _EPS), sx0 + 1), max(math.ceil(y1 / r - _EPS), sy0 + 1)
            raw = read_scaled(level, sx0, sy0, sx1 - sx0, sy1 - sy0, r)
            if raw is not None:
                return _fit(raw, (x0 / r - sx0, y0 / r - sy0), ((x1 - x0) / r, (y1 - y0) / r), (w, h))
        raw = self._backend.read(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
        return _fit(raw, (x0 - ix0, y0 - iy0), (x1 - x0, y1 - y0), (w, h))

    def decodes_reduced(self, mpp: float) -> bool:
        """Whether reads at ``mpp`` that shrink a finer level are decoded at reduced scale in the DCT domain
        (cheap: jpeg_tiles.py) rather than decoded at full size and resized."""
        level = self.level_for_mpp(mpp)
        fast = getattr(self._backend, "decodes_scaled", None)  # OpenSlide-read TIFFs only
        return bool(self.fast_jpeg and fast is not None and scale_for(mpp / self.level_mpps[level]) > 1
                    and fast(level))

    def read_tile(self, spec: TileSpec) -> np.ndarray:
        return self.read_region(spec.location, spec.size, spec.mpp)

    def thumbnail(self, max_size: int | None = None, mpp: float | None = None,
                  coarser: float = 1.0) -> tuple[np.ndarray, float]:
        """The whole image at a coarse mpp: `mpp`, or the mpp that fits `max_size` px (the coarser of both).

        Read from the best pyramid level. With ``coarser`` > 1, a pyramid level up to that factor coarser than
        the mpp asked is taken as it is instead of shrinking a finer level (a small slide's overlay at 1.5 µm/px
        from a 20x scan would otherwise decode its whole level 0; its 2 µm/px level costs a sixteenth); so is a
        level decoded at ½, ¼ or ⅛ scale in the DCT domain where its JPEG tiles allow it (``decodes_reduced``).
        Returns the image and its mpp. Default: max_size 1024.
        """
        w0, h0 = self.dimensions
        if mpp is None and max_size is None:
            max_size = 1024
        mpps = [float(mpp)] if mpp else []
        if max_size:
            mpps.append(self.mpp * max(w0, h0) / max_size)
        thumb_mpp = max(mpps)
        # pyramid levels, and where JPEG tiles decode at reduced scale, their halves, quarters and eighths (whose
        # one-time agreement check reads a tile: made only for those in range, so never with coarser = 1)
        near = [m * f for m in self.level_mpps for f in (1, 2, 4, 8)
                if thumb_mpp < m * f <= thumb_mpp * coarser and (f == 1 or self.decodes_reduced(m * f))]
        if near:
            thumb_mpp = min(near)
        f = self.mpp / thumb_mpp
        size = (max(1, math.ceil(w0 * f - _EPS)), max(1, math.ceil(h0 * f - _EPS)))
        return self.read_region((0, 0), size, thumb_mpp), thumb_mpp


def _fit(raw: np.ndarray, offset: tuple[float, float], span: tuple[float, float],
         size: tuple[int, int]) -> np.ndarray:
    """Resample `raw` so that its sub-area at `offset` with extent `span` (raw px) becomes `size` px."""
    w, h = size
    rh, rw = raw.shape[:2]
    if (rw, rh) == (w, h) and max(map(abs, offset)) < _EPS and abs(span[0] - w) + abs(span[1] - h) < _EPS:
        return raw
    fx, fy = span[0] / w, span[1] / h  # raw px per output px
    cx, cy = round(offset[0] / fx), round(offset[1] / fy)
    big_w, big_h = max(round(rw / fx), cx + w), max(round(rh / fy), cy + h)
    interp = cv2.INTER_AREA if fx >= 1 and fy >= 1 else cv2.INTER_LINEAR
    big = cv2.resize(raw, (big_w, big_h), interpolation=interp)
    return np.ascontiguousarray(big[cy : cy + h, cx : cx + w])


def _open_backend(path: Path) -> tuple[_Backend, str, dict[str, str]]:
    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001 - OpenSlide could not even look at it; the other readers say why
        fmt = None
    tif = None
    if is_tiff(path):
        try:
            tif = _open_tiff(path)
        except SlideError:
            raise
        except Exception as exc:
            if fmt is None:
                raise SlideError(f"{path}: cannot open TIFF: {one_line(exc)}") from exc
    if fmt is not None and not (fmt == "generic-tiff" and tif is not None and tif.is_ome):
        if tif is not None:
            tif.close()
        try:
            handle = openslide.OpenSlide(str(path))
        except Exception as exc:
            raise SlideError(f"{path}: cannot open ({fmt}): {one_line(exc)}") from exc
        props = dict(handle.properties)
        return _OpenSlideBackend(handle, path), props.get("openslide.vendor", fmt), props
    if tif is not None:
        try:
            return _TiffBackend(tif), "ome-tiff" if tif.is_ome else "tiff", {}
        except Exception as exc:
            tif.close()
            raise SlideError(f"{path}: cannot open TIFF: {one_line(exc)}") from exc
    try:
        with Image.open(path) as im:
            vendor = (im.format or "image").lower()
            arr = _to_rgb(np.asarray(im.convert("RGBA" if "A" in im.getbands() or im.mode == "P" else "RGB")))
    except Exception as exc:
        detail = one_line(exc).replace(f"'{path}'", "").replace(str(path), "").strip()
        why = "not a slide or image that OpenSlide, tifffile or Pillow can read" + (f" ({detail})" if detail else "")
        raise SlideError(f"{path}: cannot open: {why}") from exc
    return _ArrayBackend([(arr.shape[1], arr.shape[0])], lambda _: arr), vendor, {}


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a slide or image. `mpp` (µm/px) overrides the file's pixel size; it is required when the file
    has none. Raises SlideError (one line, naming the file) when the file cannot be used."""
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if path.is_dir() and path.suffix.lower() != ".dcm":
        raise SlideError(f"{path}: a folder, not a slide file")
    if path.is_file() and path.stat().st_size == 0:
        raise SlideError(f"{path}: empty file (0 bytes)")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise SlideError(f"{path}: mpp must be a positive number, got {mpp}")
    backend, vendor, props = _open_backend(path)
    file_mpp = None
    if float(props.get("openslide.mpp-x", 0)) > 0 and float(props.get("openslide.mpp-y", 0)) > 0:
        file_mpp = (float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"]))
    elif is_tiff(path):
        file_mpp = _tiff_mpp(path)
    if mpp is not None:
        if file_mpp and abs(file_mpp[0] - mpp) > 0.01 * mpp:
            log.warning("%s: using the given mpp %.4g, not %.4g from the file", path, mpp, file_mpp[0])
        file_mpp = (float(mpp), float(mpp))
    if file_mpp is None:
        backend.close()
        raise SlideError(f"{path}: no pixel size (mpp) in the file; give it with --mpp")
    slide = Slide(path, backend, file_mpp[0], file_mpp[1], vendor, props)
    log.debug("opened %r (%s)", slide, vendor)
    return slide
