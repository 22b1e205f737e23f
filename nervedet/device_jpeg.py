"""Grid tiles of a JPEG-tiled TIFF/SVS level decoded on the model's device (nvJPEG through torchvision on CUDA).

Beside a GPU the tile readers' JPEG decoding on the CPU limits throughput (about 30 Mpx/s per reader process).
Here the readers only read bytes: for each grid tile the complete JPEG streams of the level tiles that cover
it (:meth:`JpegTiles.stream`). The main process decodes a whole batch of streams at once with
``torchvision.io.decode_jpeg(..., device=device)``, pastes them into the level-pixel window on the device and
shrinks that to the analysis mpp with exact area averaging, following :meth:`Slide.read_region`'s arithmetic
(its level, its level-pixel window, and ``_fit``'s output size and crop: the full-decode branch), so the tiles
equal the normal path's up to the decoders' rounding. A tile that starts at a fractional level pixel is
handled the way ``_fit`` handles it (the offset rounded to whole output pixels).

It is used only where it agrees: at first use per slide and device, one level tile decoded here is compared
with OpenSlide's read of it (nvJPEG may ignore the Adobe marker that says the components are R, G, B); on
disagreement a warning is logged once and the slide's tiles are read the normal way.
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from nervedet import jpeg_tiles
from nervedet.jpeg_tiles import JpegTiles
from nervedet.slide import Slide, SlideError, is_tiff, one_line

if TYPE_CHECKING:
    from nervedet.infer import CanvasGrid

log = logging.getLogger(__name__)

DEVICE_DECODE_MODES = ("auto", "on", "off")
_EPS = 1e-6  # as slide.read_region
MIN_FACTOR = 0.99  # level px per output px: below this read_region enlarges (bilinear), which is not done here
_AGREES: weakref.WeakKeyDictionary[Slide, dict[tuple[int, str], bool]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Piece:
    """The part of one level tile inside a grid tile's window: tile (col, row), where the part starts in the
    decoded tile (sx, sy) and in the window (dx, dy), and its size."""

    col: int
    row: int
    sx: int
    sy: int
    dx: int
    dy: int
    w: int
    h: int


@dataclass(frozen=True)
class Axis:
    """One axis of ``_fit``: the window's ``raw`` level px are resized to ``big`` px (area), then ``crop``
    big px are skipped and ``size`` kept."""

    raw: int
    big: int
    crop: int
    size: int


@dataclass(frozen=True)
class TilePlan:
    """How one grid tile is made from its level's tiles: the pieces, pasted into a window, and the resize."""

    pieces: tuple[Piece, ...]
    x: Axis
    y: Axis


def _axis(start0: float, size: int, scale: float, d: float) -> tuple[int, Axis]:
    """read_region's level-pixel window and _fit's resize along one axis: (first level px, Axis)."""
    a, b = start0 / d, (start0 + size * scale) / d
    ia = math.floor(a + _EPS)
    ib = max(math.ceil(b - _EPS), ia + 1)
    f = (b - a) / size  # level px per output px
    crop = round((a - ia) / f)
    return ia, Axis(ib - ia, max(round((ib - ia) / f), crop + size), crop, size)


def plan_tile(lv_size: tuple[int, int], tile: tuple[int, int], location: tuple[float, float], size: int,
              scale: float, d: float) -> TilePlan:
    """The plan of a ``size`` px grid tile at level-0 ``location`` (``scale`` level-0 px per output px) on a
    level of ``lv_size`` px with tiles of ``tile`` px and downsample ``d``. Level tiles outside the image
    are left out (white), as OpenSlide gives white there."""
    (W, H), (tw, th) = lv_size, tile
    ix0, ax = _axis(location[0], size, scale, d)
    iy0, ay = _axis(location[1], size, scale, d)
    ix1, iy1 = ix0 + ax.raw, iy0 + ay.raw
    pieces = []
    for row in range(max(iy0, 0) // th, min(math.ceil(iy1 / th), math.ceil(H / th))):
        for col in range(max(ix0, 0) // tw, min(math.ceil(ix1 / tw), math.ceil(W / tw))):
            xa, ya = max(ix0, col * tw), max(iy0, row * th)
            xb, yb = min(ix1, (col + 1) * tw, W), min(iy1, (row + 1) * th, H)
            if xb > xa and yb > ya:
                pieces.append(Piece(col, row, xa - col * tw, ya - row * th, xa - ix0, ya - iy0, xb - xa, yb - ya))
    return TilePlan(tuple(pieces), ax, ay)


def area_weights(axes: list[Axis], n_in: int, device: torch.device) -> torch.Tensor:
    """(B, size, n_in) weights that average, for each output px, the source interval it covers after
    ``_fit``'s area resize and crop (exact box overlaps, as cv2.INTER_AREA when shrinking; plain 2×2 means
    for a factor of 2): applied on both axes, one batched matrix product does resize and crop at once."""
    out = []
    src = torch.arange(n_in, device=device, dtype=torch.float64)
    for ax in axes:
        step = ax.raw / ax.big  # source px per big px
        lo = (torch.arange(ax.size, device=device, dtype=torch.float64) + ax.crop) * step
        hi = lo + step
        overlap = (torch.minimum(hi[:, None], src[None] + 1) - torch.maximum(lo[:, None], src[None])).clamp(min=0)
        out.append(overlap / overlap.sum(1, keepdim=True))
    return torch.stack(out).float()


def _factor(plans: list[TilePlan]) -> int | None:
    """The whole number k when every tile's window is shrunk by exactly k on both axes (40x read at 0.5)."""
    k = plans[0].x.raw // plans[0].x.big
    exact = all(a.raw == k * a.big for p in plans for a in (p.x, p.y))
    return k if k >= 1 and exact else None


def shrink(window: torch.Tensor, plans: list[TilePlan]) -> torch.Tensor:
    """Float (B, 3, T, T): the uint8 windows (B, 3, H, W) resized and cropped as ``_fit`` does. A whole factor
    is a k × k mean (avg_pool2d: cheap on any device); any other a batched product with area_weights (about
    20 GFLOP a batch of four 512-px tiles: nothing on a GPU, a second on two CPU cores)."""
    k = _factor(plans)
    if k is not None:
        big = torch.nn.functional.avg_pool2d(window.float(), k) if k > 1 else window.float()
        return torch.stack([big[i, :, p.y.crop:p.y.crop + p.y.size, p.x.crop:p.x.crop + p.x.size]
                            for i, p in enumerate(plans)])
    wy = area_weights([p.y for p in plans], window.shape[2], window.device)
    wx = area_weights([p.x for p in plans], window.shape[3], window.device)
    return wy[:, None] @ window.float() @ wx.transpose(1, 2)[:, None]


def decode_streams(streams: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """RGB uint8 (3, h, w) images of JPEG streams, decoded together on ``device`` (nvJPEG on CUDA)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not streams:
        return []
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(streams, mode=ImageReadMode.RGB, device=device)


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class StreamDataset(Dataset):
    """For each grid tile: the JPEG streams of its plan's pieces (None for an empty level tile), its index
    and "" ; or no streams and the one-line reason they could not be read (as infer.TileDataset)."""

    def __init__(self, jpeg: JpegTiles, lv_size: tuple[int, int], plans: list[TilePlan]) -> None:
        self.jpeg, self.lv_size, self.plans = jpeg, lv_size, plans

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor | None], int, str]:
        try:
            data = [self.jpeg.stream(self.lv_size, p.col, p.row) for p in self.plans[i].pieces]
        except Exception as exc:  # noqa: BLE001 - reported by the main process as one SlideError
            return [], i, f"{self.jpeg.path}: cannot read the JPEG tiles of grid tile {i}: {one_line(exc)}"
        return [None if b is None else _as_tensor(b) for b in data], i, ""


def collate(batch: list[tuple[list[torch.Tensor | None], int, str]]) -> tuple[list, torch.Tensor, tuple[str, ...]]:
    """Streams stay lists (their lengths differ); indices and errors as the default collation gives them."""
    return [b[0] for b in batch], torch.tensor([b[1] for b in batch]), tuple(b[2] for b in batch)


class DeviceTiles:
    """The grid's tiles of one slide made on ``device`` from JPEG streams: :meth:`dataset` for the readers,
    :meth:`collate` for the DataLoader, :meth:`decode` for each batch (uint8 (B, 3, T, T) on the device)."""

    collate = staticmethod(collate)

    def __init__(self, slide: Slide, jpeg: JpegTiles, level: int, grid: CanvasGrid, mpp: float,
                 device: torch.device) -> None:
        self.slide, self.jpeg, self.level, self.device = slide, jpeg, level, torch.device(device)
        self.lv_size = slide.level_dimensions[level]
        lv = jpeg.levels[self.lv_size]
        d, scale, t = slide.level_downsamples[level], mpp / slide.mpp, grid.tile_size
        self.plans = []
        for col, row in grid.tiles:
            x, y = grid.tile_origin(col, row)
            loc = (grid.origin[0] + x * grid.scale, grid.origin[1] + y * grid.scale)
            self.plans.append(plan_tile(self.lv_size, (lv.tile_w, lv.tile_h), loc, t, scale, d))

    def dataset(self) -> StreamDataset:
        return StreamDataset(self.jpeg, self.lv_size, self.plans)

    def decode(self, streams: list[list[torch.Tensor | None]], idx: torch.Tensor) -> torch.Tensor:
        """The batch's grid tiles: all streams decoded at once, pasted into white windows, area-shrunk."""
        plans = [self.plans[i] for i in idx.tolist()]
        flat = [s for tile in streams for s in tile if s is not None]
        try:
            images = iter(decode_streams(flat, self.device))
        except RuntimeError as exc:
            raise SlideError(f"{self.slide.path}: cannot decode its JPEG tiles on {self.device}: "
                             f"{one_line(exc)}") from exc
        hmax, wmax = max(p.y.raw for p in plans), max(p.x.raw for p in plans)
        window = torch.full((len(plans), 3, hmax, wmax), 255, dtype=torch.uint8, device=self.device)
        for k, (plan, tile) in enumerate(zip(plans, streams)):
            for piece, s in zip(plan.pieces, tile):
                if s is None:
                    continue
                img = next(images)
                h, w = min(piece.h, img.shape[1] - piece.sy), min(piece.w, img.shape[2] - piece.sx)
                window[k, :, piece.dy:piece.dy + h, piece.dx:piece.dx + w] = \
                    img[:, piece.sy:piece.sy + h, piece.sx:piece.sx + w]
        return shrink(window, plans).add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)  # halves up, as cv2

    def agrees(self) -> bool:
        """Whether a level tile that the grid uses (one of the middle grid tile's), decoded on the device, matches
        OpenSlide's read of it within jpeg_tiles.AGREEMENT (mean absolute difference, 0-255)."""
        lv, d = self.jpeg.levels[self.lv_size], self.slide.level_downsamples[self.level]
        for piece in self.plans[len(self.plans) // 2].pieces:
            data = self.jpeg.stream(self.lv_size, piece.col, piece.row)
            if data is not None:
                break
        else:
            return True  # only empty (white) tiles there: nothing is decoded
        x, y = piece.col * lv.tile_w, piece.row * lv.tile_h
        w, h = min(lv.tile_w, lv.width - x), min(lv.tile_h, lv.height - y)
        mine = decode_streams([_as_tensor(data)], self.device)[0][:, :h, :w].permute(1, 2, 0).cpu().numpy()
        ref = self.slide.read_region((x * d, y * d), (w, h), self.slide.level_mpps[self.level])
        return jpeg_tiles.agree(mine, ref, f"{self.slide.path.name}: level {self.level} decoded on {self.device}")

    def close(self) -> None:
        self.jpeg.close()


def _unsuitable(slide: Slide, mpp: float) -> tuple[str | None, JpegTiles | None, int]:
    """Why the slide's tiles at ``mpp`` cannot be made on the device (None when they can), its JPEG levels and
    the level read."""
    level = slide.level_for_mpp(mpp)
    if mpp / slide.level_mpps[level] < MIN_FACTOR:
        return "its finest level is coarser than the analysis mpp (tiles are enlarged)", None, level
    if not is_tiff(slide.path):
        return "not a TIFF file", None, level
    try:
        jpeg = JpegTiles(slide.path)
    except Exception as exc:  # noqa: BLE001 - optional: the normal path reads whatever this cannot
        return f"its tiles cannot be located ({one_line(exc)})", None, level
    if slide.level_dimensions[level] not in jpeg.levels:
        return f"level {level} is not tiled with RGB JPEG", None, level
    return None, jpeg, level


def device_tiles(slide: Slide, grid: CanvasGrid, mpp: float, device: torch.device, mode: str) -> DeviceTiles | None:
    """The device path for this slide's grid, or None for the normal path: ``mode`` "off"; "auto" on a device
    other than CUDA; a slide whose level is not JPEG-tiled (logged at INFO); or a device decode that disagrees
    with OpenSlide's (a warning, once per slide and device)."""
    device = torch.device(device)
    if mode == "off" or (mode == "auto" and device.type != "cuda") or not grid.tiles:
        return None
    why, jpeg, level = _unsuitable(slide, mpp)
    if why is not None:
        log.info("%s: tiles decoded by the readers, not on %s: %s", slide.path.name, device, why)
        return None
    tiles = DeviceTiles(slide, jpeg, level, grid, mpp, device)
    known = _AGREES.setdefault(slide, {})
    key = (level, str(device))
    if key not in known:
        try:
            known[key] = tiles.agrees()
        except Exception as exc:  # noqa: BLE001 - a decoder that fails here is one that disagrees
            log.debug("%s: device decode check failed: %s", slide.path.name, one_line(exc))
            known[key] = False
        if not known[key]:
            log.warning("%s: JPEG tiles decoded on %s differ from OpenSlide's decode (colour convention?): "
                        "decoding them in the readers instead", slide.path.name, device)
    if not known[key]:
        jpeg.close()
        return None
    log.info("%s: JPEG tiles of level %d decoded on %s", slide.path.name, level, device)
    return tiles
