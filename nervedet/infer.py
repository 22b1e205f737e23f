"""Whole-slide inference: tiles over the tissue (each run only over its tissue and a margin: crops.py), run on
the CPU by one stream per core (cpu_streams.py) or read by a DataLoader (reader processes, or JPEG tiles
decoded on the device), the model in batches on the device (AMP where it is safe), blended stitching of
tumour and nerve probabilities into a canvas at the analysis mpp, and immune-cell peaks found per tile, each
kept only by the tile that owns its position.

The canvas covers the tissue's bounding box at the model's analysis mpp: canvas pixel (x, y) is level-0 pixel
``origin + (x, y) * scale``. Tiles step by ``tile_size - overlap``; a tile owns the canvas pixels nearer to its
centre than to any neighbour's (its own cell of the grid), so a cell on a seam is counted once.
"""

from __future__ import annotations

import logging
import math
import os
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from nervedet import conv_relu
from nervedet.allocator import keep_large_buffers, release_freed_memory
from nervedet.cpu_streams import stream_count, stream_results
from nervedet.crops import tile_crops
from nervedet.device_jpeg import DEVICE_DECODE_MODES, device_tiles
from nervedet.model import normalize
from nervedet.peaks import DEFAULT_THRESHOLD, find_peaks
from nervedet.slide import Slide, SlideError, one_line, open_slide
from nervedet.stitch import Stitcher
from nervedet.threads import READ_THREADS, pool
from nervedet.tissue import TissueMask, split_regions
from nervedet.weights import Model, cpu_bf16_supported

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AGREEMENT = 0.99  # reduced precision is used on the CPU only if its class map agrees this well with float32


@dataclass(frozen=True)
class InferSettings:
    # px at the analysis mpp (the network is fully convolutional: any multiple of 32). 768, not the 512 of
    # the training patches: a large nerve (0.1 mm², ~350 µm across) then fits in one tile, and the network
    # calls its epineurium nerve more consistently; chosen on the validation slides (choose_postprocess.py)
    tile_size: int = 768
    overlap: int = 64  # px shared by neighbouring tiles, blended with a raised cosine
    batch_size: int | None = None  # tiles per batch; None: default_batch_size(device, tile_size)
    workers: int | None = None  # DataLoader processes reading tiles (0: the main process; None: auto_workers)
    precision: str = "auto"  # auto: fp16 on CUDA; bf16 on a CPU with native bf16 that agrees with fp32; else fp32
    min_tissue_fraction: float = 0.01  # tiles with less tissue are not run (their canvas stays background)
    # each tile is run only over the part that holds tissue (as the tissue mask sees it) and CROP_MARGIN_PX
    # around it, in sizes that are multiples of CROP_QUANTUM_PX: on a sparse slide the network's work then
    # follows the tissue area, not the tiles' (crops.py)
    crop_to_tissue: bool = True
    immune_threshold: float = DEFAULT_THRESHOLD
    peak_min_distance_um: float = 4.0  # immune-cell peaks closer than this to a stronger one are dropped
    # A canvas over all the tissue larger than this (MiB: 1 byte per pixel and class) is split into regions,
    # each with its own canvas, so memory follows the largest region and not how far the tissue is spread;
    max_canvas_mb: float = 512.0
    region_gap_um: float = 500.0  # and tissue pieces nearer than this to each other stay in one region
    compile: bool = False  # torch.compile the network (once per model and process): for long runs on a GPU
    # JPEG tiles decoded on the model's device (device_jpeg.py): auto = on CUDA; "on" also on the CPU; "off"
    device_decode: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.tile_size % 32 or self.tile_size <= 0:
            raise ValueError(f"tile size must be a positive multiple of 32, got {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size // 2:
            raise ValueError(f"overlap must be in [0, tile_size / 2), got {self.overlap}")
        if self.max_canvas_mb <= 0 or self.region_gap_um < 0:
            raise ValueError("max_canvas_mb must be positive and region_gap_um not negative")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.device_decode not in DEVICE_DECODE_MODES:
            raise ValueError(f"device_decode must be one of {', '.join(DEVICE_DECODE_MODES)}, "
                             f"got {self.device_decode!r}")


@dataclass(frozen=True)
class CanvasGrid:
    """The analysis canvas over the tissue and its tile grid (tile origins in canvas px)."""

    origin: tuple[float, float]  # level-0 px of canvas pixel (0, 0)'s corner
    scale: float  # level-0 px per canvas px
    width: int
    height: int
    tile_size: int
    overlap: int
    nx: int
    ny: int
    tiles: tuple[tuple[int, int], ...]  # (column, row) of the tiles that are run, row-major
    # per tile, the part run: (x, y, width, height) in the tile's px; empty: every tile whole
    crops: tuple[tuple[int, int, int, int], ...] = ()

    def crop(self, i: int) -> tuple[int, int, int, int]:
        """The part of tile ``i`` that is run: (x, y, width, height) in the tile's px."""
        return self.crops[i] if self.crops else (0, 0, self.tile_size, self.tile_size)

    def crop_origin(self, i: int) -> tuple[int, int]:
        """Canvas px of the top-left corner of the part of tile ``i`` that is run."""
        x, y = self.tile_origin(*self.tiles[i])
        cx, cy = self.crop(i)[:2]
        return x + cx, y + cy

    @property
    def pixels(self) -> int:
        """Pixels the network runs over the grid (the crops' areas)."""
        return sum(w * h for _, _, w, h in self.crops) if self.crops else len(self.tiles) * self.tile_size**2

    @property
    def stride(self) -> int:
        return self.tile_size - self.overlap

    def tile_origin(self, col: int, row: int) -> tuple[int, int]:
        return col * self.stride, row * self.stride

    def owner(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The grid cell (column, row) that owns canvas positions x, y."""
        half = self.overlap / 2
        col = np.clip(np.floor((x - half) / self.stride), 0, self.nx - 1).astype(np.int64)
        row = np.clip(np.floor((y - half) / self.stride), 0, self.ny - 1).astype(np.int64)
        return col, row


@dataclass(frozen=True, eq=False)
class InferenceOutput:
    """What the network saw: stitched probabilities and immune-cell peaks, in canvas px."""

    grid: CanvasGrid
    class_names: tuple[str, ...]  # names of the probability channels (Tumor, Nerve)
    probs: np.ndarray  # (len(class_names), H, W) uint8, probability × 255
    immune_xy: np.ndarray  # (N, 2) canvas px (pixel-centre coordinates)
    immune_p: np.ndarray  # (N,)
    analysis_mpp: float
    precision: str
    seconds: float
    decode: str = "reader"  # where the JPEG tiles were decoded: "device" (device_jpeg.py) or "reader" (normal)

    def immune_level0(self) -> np.ndarray:
        g = self.grid
        return np.asarray(g.origin) + self.immune_xy * g.scale


def canvas_grid(slide: Slide, tissue: TissueMask, mpp: float, settings: InferSettings) -> CanvasGrid:
    """A canvas at ``mpp`` over the tissue's bounding box and the tiles that hold tissue."""
    scale = mpp / slide.mpp
    ys, xs = np.nonzero(tissue.mask)
    if len(xs) == 0:
        return CanvasGrid((0.0, 0.0), scale, 0, 0, settings.tile_size, settings.overlap, 0, 0, ())
    s = tissue.scale
    x0, y0 = xs.min() * s, ys.min() * s
    x1 = min((xs.max() + 1) * s, slide.dimensions[0])
    y1 = min((ys.max() + 1) * s, slide.dimensions[1])
    width, height = math.ceil((x1 - x0) / scale), math.ceil((y1 - y0) / scale)
    t, stride = settings.tile_size, settings.tile_size - settings.overlap
    nx = max(1, math.ceil(max(width - settings.overlap, 1) / stride))
    ny = max(1, math.ceil(max(height - settings.overlap, 1) / stride))
    cols, rows = np.meshgrid(np.arange(nx), np.arange(ny))
    cols, rows = cols.ravel(), rows.ravel()
    size0 = np.full(cols.shape, t * scale)
    frac = tissue.fractions(x0 + cols * stride * scale, y0 + rows * stride * scale, size0, size0)
    keep = frac >= settings.min_tissue_fraction
    tiles = tuple((int(c), int(r)) for c, r in zip(cols[keep], rows[keep]))
    crops = tile_crops(tissue, x0 + cols[keep] * stride * scale, y0 + rows[keep] * stride * scale, scale, t) if (
        settings.crop_to_tissue) else ()
    return CanvasGrid((float(x0), float(y0)), scale, width, height, t, settings.overlap, nx, ny, tiles, crops)


def canvas_regions(slide: Slide, tissue: TissueMask, mpp: float, settings: InferSettings,
                   channels: int = 2) -> list[TissueMask]:
    """The tissue as one region when its canvas fits in ``settings.max_canvas_mb``, else split into regions
    (tissue.split_regions) whose bounding boxes are disjoint, each to be run with its own canvas."""
    grid = canvas_grid(slide, tissue, mpp, settings)
    size = grid.width * grid.height * channels
    if size <= settings.max_canvas_mb * 2**20:
        return [tissue]
    regions = split_regions(tissue, settings.region_gap_um) or [tissue]
    log.info("%s: a canvas over all the tissue would take %.0f MiB: %d regions with a canvas each",
             slide.path.name, size / 2**20, len(regions))
    return regions


class TileDataset(Dataset):
    """The grid's tiles (their crops: CanvasGrid.crop) as uint8 (3, h, w) tensors. Each worker process opens the
    slide itself."""

    def __init__(self, slide: Slide, grid: CanvasGrid, mpp: float) -> None:
        self.path, self.slide_mpp, self.grid, self.mpp = Path(slide.path), slide.mpp, grid, mpp
        self._slide: Slide | None = slide
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.grid.tiles)

    def _open(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():  # a forked worker must not share the handle
            self._slide, self._pid = open_slide(self.path, mpp=self.slide_mpp), os.getpid()
        return self._slide

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        """The tile, its index and "" ; or a blank tile and the one-line reason it could not be read (a worker's
        exception would reach the main process as a multi-line traceback, not as a message naming the file)."""
        g = self.grid
        (x, y), (cw, ch) = g.crop_origin(i), g.crop(i)[2:]
        loc = (g.origin[0] + x * g.scale, g.origin[1] + y * g.scale)
        try:
            rgb = self._open().read_region(loc, (cw, ch), self.mpp)
        except Exception as exc:  # noqa: BLE001 - reported by the main process as one SlideError
            text = one_line(exc)
            if str(self.path) not in text:
                text = f"{self.path}: cannot read the tile at level-0 ({loc[0]:.0f}, {loc[1]:.0f}): {text}"
            return torch.zeros((3, ch, cw), dtype=torch.uint8), i, text
        return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1), i, ""

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int, str]]:
        """A batch's tiles read by two threads (the DataLoader calls this instead of one ``__getitem__`` per
        tile): JPEG decoding and OpenSlide release the GIL, and the network leaves a core idle meanwhile
        (81 tiles of a 3 mm slide: 0.62 -> 0.40 s at 20x, 0.93 -> 0.58 s at 40x)."""
        if len(indices) < 2:
            return [self[i] for i in indices]
        self._open()  # once, before the threads: both would open the slide in a new reader process
        return list(pool("read", READ_THREADS).map(self.__getitem__, indices))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_slide"] = None  # workers started by spawn reopen the slide
        return state


ACTIVATION_FACTOR = 32  # peak memory of a ResNet-18 U-Net forward pass ≈ this × the float32 input (measured: ~95 MB
#                         per 512-px tile on the CPU, 3 MB of input)


def default_batch_size(device: torch.device, tile_size: int = InferSettings.tile_size) -> int:
    """As many tiles as hold the pixels of 8 tiles of 512 px on a GPU, 2 on the CPU (at least one): on the CPU a
    bigger batch is slower per pixel once its activations outgrow the caches (network alone, 2 cores, 768-px
    tiles: bf16 7.7 Mpx/s at batch 1 against 5.3 at 2; float32 2.03 against 1.85; 256-px tiles: 3.9 at batch 1,
    7.2 at 8) and each 512-px tile's activations take about 95 MB. 768-px tiles: 4 on a GPU, 1 on the CPU."""
    tiles_of_512 = 8 if device.type == "cuda" else 2
    return max(1, round(tiles_of_512 * 512**2 / tile_size**2))


def batch_size_for(settings: InferSettings, device: torch.device) -> int:
    return settings.batch_size or default_batch_size(device, settings.tile_size)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a batch: CUDA's free memory, or the system's MemAvailable (None when unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_batch_fits(settings: InferSettings, device: torch.device, channels: int = 3) -> None:
    """Refuse a batch size whose forward pass cannot fit in the device's free memory (ValueError saying the
    largest one that would), before hours of a cohort are spent finding out."""
    free = available_memory(device)
    if free is None:
        return
    per_tile = ACTIVATION_FACTOR * channels * settings.tile_size**2 * 4
    batch = batch_size_for(settings, device)
    if batch * per_tile > free:
        most = max(1, free // per_tile)
        raise ValueError(f"--batch-size {batch} with {settings.tile_size}-px tiles needs about "
                         f"{batch * per_tile / 2**30:.1f} GiB for one batch, but {device} has "
                         f"{free / 2**30:.1f} GiB free: use --batch-size {most} or less")


def auto_workers(slide: Slide, mpp: float, device: torch.device) -> int:
    """Tile-reading processes when none are set. On a GPU the CPU is free: up to 4 (leaving one core). On the
    CPU the model already uses every core, and a reader process pays only where reading is heavy: where tiles
    are decoded in full from a finer level and shrunk. Measured on 2 cores, 40x slide: 0.71 -> 0.84 of the
    model's speed with one reader when tiles were decoded in full. Where they are decoded at half scale in the
    DCT domain (JPEG-tiled TIFF/SVS, jpeg_tiles.py: 30-40 Mpx/s, 2-3% of the time) a reader process gains
    nothing measurable (a 3 mm 40x slide: 58/78 s without, 61/72 s with) and holds 0.5-1 GB more: none."""
    cores = os.cpu_count() or 1
    if device.type != "cpu":
        return max(1, min(4, cores - 1))
    level = slide.level_for_mpp(mpp)
    shrunk = mpp / slide.level_mpps[level] >= 1.5
    return 1 if shrunk and not slide.decodes_reduced(mpp) else 0


_PRECISION_CACHE: dict[tuple[str, str], str] = {}


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


_COMPILED: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()
# per network: per fused precision (None: not fused), the weights' versions and the network made from them
_INFERENCE: weakref.WeakKeyDictionary[torch.nn.Module, dict[str | None, tuple[tuple[int, ...], torch.nn.Module]]] = (
    weakref.WeakKeyDictionary())


def inference_network(model: Model, precision: str | None = None) -> torch.nn.Module:
    """The network as inference runs it: in eval mode, each BatchNorm folded into the convolution before it
    (torch.fx; the same function to float rounding, one pass over the activations fewer per layer: BatchNorm
    was 10% of the U-Net's CPU time), in channels_last; given the ``precision`` it runs in on the CPU, each
    convolution and its ReLU also as one oneDNN operation (conv_relu.py: the same values to the bit, about 20%
    faster). Made once per network, precision and process, and again when its weights have changed since
    (tensor versions). A network fx cannot trace runs as it is."""
    net = model.network
    versions = tuple(t._version for t in (*net.parameters(), *net.buffers()))
    key = precision if precision is not None and conv_relu.available(model.device, precision) else None
    made = _INFERENCE.get(net, {}).get(key)
    if made is None or made[0] != versions:
        if key is None:
            net.eval()
            try:
                fast = fuse_batchnorm(net)
            except Exception as exc:  # noqa: BLE001 - any tracing failure only means "not folded"
                log.debug("BatchNorm not folded (%s): running the network as it is", one_line(exc))
                fast = net
            fast = fast.eval().to(memory_format=torch.channels_last)
        else:
            base = inference_network(model)
            fast = base
            if isinstance(base, torch.fx.GraphModule):
                fast, fused = conv_relu.fuse_conv_relu(base, key)
                log.debug("%d convolutions run with their ReLU (%s)", fused, key)
                if fused and not _same_outputs(base, fast, model.device, key):
                    fast = base
        made = _INFERENCE.setdefault(net, {})[key] = (versions, fast)
    return made[1]


def _same_outputs(base: torch.nn.Module, fused: torch.nn.Module, device: torch.device, precision: str) -> bool:
    """Whether the fused network runs here and gives the base network's outputs on a small random input (to
    rounding: oneDNN may pick other kernels on other CPUs); if not, it is not used (a warning says why)."""
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    try:
        want, got = _run(base, x, device, precision), _run(fused, x, device, precision)
    except Exception as exc:  # noqa: BLE001 - a platform whose oneDNN lacks the operation: run unfused
        log.warning("convolutions not fused with their ReLUs: %s", one_line(exc))
        return False
    tol = 1e-4 if precision == "fp32" else 0.05
    if not torch.allclose(got, want, atol=tol, rtol=tol):
        log.warning("convolutions not fused with their ReLUs: outputs %.3g apart on a test input",
                    float((got - want).abs().max()))
        return False
    return True


def fuse_batchnorm(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of an eval-mode network with every BatchNorm that follows a convolution folded into it."""
    from torch.fx.experimental.optimization import fuse

    return fuse(net, inplace=False)


def compiled(net: torch.nn.Module) -> torch.nn.Module:
    """The network through torch.compile (TorchInductor), compiled once per network and process: the first
    batch of each shape pays the compilation (about a minute), later slides run the compiled kernels."""
    if net not in _COMPILED:
        log.info("compiling the network with torch.compile (the first batch takes longer)")
        _COMPILED[net] = torch.compile(net)
    return _COMPILED[net]


def _run(net: torch.nn.Module, x: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    with torch.inference_mode(), _autocast(device, precision):
        return net(x).float()


def choose_precision(model: Model, sample: Callable[[], torch.Tensor], setting: str) -> str:
    """The precision to run in: as set, or for "auto" fp16 on CUDA; on a CPU with native bf16, bf16 when its
    class map agrees with float32's on (up to two tiles of) the input batch ``sample()`` gives, such as a
    slide's first tile (checked once per weights file: the sample is made only then); else fp32."""
    device = model.device
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "fp16"
    if not cpu_bf16_supported():
        return "fp32"
    key = (model.sha256, device.type)
    if key not in _PRECISION_CACHE:
        c, x = model.config.num_classes, sample()[:2]  # two tiles tell; float32 is the slow part
        net = inference_network(model)
        ref = _run(net, x, device, "fp32")[:, :c].argmax(1)
        low = _run(net, x, device, "bf16")[:, :c].argmax(1)
        agree = float((ref == low).float().mean())
        _PRECISION_CACHE[key] = "bf16" if agree >= AGREEMENT else "fp32"
        log.info("bf16 agrees with fp32 on %.2f%% of pixels: running in %s", 100 * agree, _PRECISION_CACHE[key])
    return _PRECISION_CACHE[key]


def collate_tiles(batch: list[tuple[torch.Tensor, int, str]]) -> tuple[list[torch.Tensor], torch.Tensor,
                                                                       tuple[str, ...]]:
    """A group of tiles as a list (their crops differ in size), their indices and their read errors."""
    return [b[0] for b in batch], torch.tensor([b[1] for b in batch]), tuple(b[2] for b in batch)


def _owned_peaks(peaks: torch.Tensor, grid: CanvasGrid, i: int) -> np.ndarray:
    """(K, 3) canvas [x, y, p] of tile ``i``'s peaks (found in its crop) that lie in its own grid cell and on
    the canvas."""
    pts = peaks.cpu().numpy().astype(np.float64)
    if not len(pts):
        return pts.reshape(0, 3)
    col, row = grid.tiles[i]
    x0, y0 = grid.crop_origin(i)
    pts[:, 0] += x0
    pts[:, 1] += y0
    c, r = grid.owner(pts[:, 0], pts[:, 1])
    keep = (c == col) & (r == row) & (pts[:, 0] < grid.width) & (pts[:, 1] < grid.height)
    return pts[keep]


def _inputs(tiles: list[torch.Tensor], cfg, device: torch.device) -> torch.Tensor:
    """uint8 (3, h, w) tiles of one size as the network's normalised channels-last batch on ``device``. The
    reader's tiles are (h, w, 3) arrays seen as (3, h, w): stacked as they lie, they are a channels-last batch
    already (stacking them channels-first and converting back made normalising 2.4x as slow)."""
    hwc = torch.stack([t.permute(1, 2, 0) for t in tiles]).permute(0, 3, 1, 2)
    return normalize(hwc.to(device, non_blocking=True), cfg, torch.channels_last)


def index_runs(grid: CanvasGrid, batch: int, indices: list[int] | None = None) -> list[list[int]]:
    """Tile indices (default: all the grid's) in order, in runs of one crop size at most ``batch`` long (one
    batch each; the order is kept: the stitcher takes tiles row by row)."""
    runs: list[list[int]] = []
    for i in range(len(grid.tiles)) if indices is None else indices:
        if runs and len(runs[-1]) < batch and grid.crop(runs[-1][-1])[2:] == grid.crop(i)[2:]:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _loader_results(dataset: Dataset, grid: CanvasGrid, cfg, device: torch.device, workers: int, batch: int,
                    on_device, predict) -> Iterator[tuple[list[int], torch.Tensor, list[torch.Tensor]]]:
    """(indices, probabilities, peaks) per batch, in tile order, from tiles read by a DataLoader (in reader
    processes when ``workers``, in groups of at least two read by two threads otherwise), or decoded on the
    device (device_jpeg.py)."""
    # tiles are read in groups of at least two (TileDataset.__getitems__ reads a group with two threads) and
    # run through the network ``batch`` at a time
    group = batch if on_device else max(batch, 2)
    loader = DataLoader(on_device.dataset() if on_device else dataset,
                        batch_size=group, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=False, prefetch_factor=2 if workers else None,
                        collate_fn=on_device.collate if on_device else collate_tiles)
    for images, idx, errors in loader:
        if problem := next((e for e in errors if e), None):
            raise SlideError(problem)
        if on_device:  # whole tiles decoded on the device: their crops cut out there
            images = on_device.decode(images, idx)
            images = [im[:, cy:cy + ch, cx:cx + cw] for im, (cx, cy, cw, ch) in
                      zip(images, (grid.crop(i) for i in idx.tolist()))]
        by_index = dict(zip(idx.tolist(), images))
        for run in index_runs(grid, batch, idx.tolist()):
            yield run, *predict(_inputs([by_index[i] for i in run], cfg, device))


def kept_channels(cfg) -> tuple[list[int], slice | list[int]]:
    """The output channels of the classes the canvas keeps (all but background), as a list and as the index to
    take them by: a slice where they are consecutive (a view: indexing by a list copies them)."""
    keep = [cfg.class_index(n) for n in cfg.class_names if n != cfg.class_names[0]]
    return keep, slice(keep[0], keep[-1] + 1) if keep == list(range(keep[0], keep[-1] + 1)) else keep


def peak_radius_px(settings: InferSettings, mpp: float) -> int:
    """Immune-cell peaks' minimum distance in px at the analysis mpp."""
    return max(1, round(settings.peak_min_distance_um / mpp))


def run_inference(model: Model, slide: Slide, tissue: TissueMask, settings: InferSettings = InferSettings(),
                  workdir: Path | None = None, bar: tqdm | None = None) -> InferenceOutput:
    """Run the model over the slide's tissue (or one region of it); see the module docstring for the canvas
    and the peaks. ``bar``: a progress bar to advance (by default one of its own)."""
    t0 = time.perf_counter()
    cfg, device = model.config, model.device
    if device.type == "cpu":
        keep_large_buffers()  # the network's activations reused tile after tile, not faulted in again (allocator.py)
    grid = canvas_grid(slide, tissue, cfg.analysis_mpp, settings)
    keep, kept = kept_channels(cfg)
    names = tuple(cfg.class_names[k] for k in keep)
    stitcher = Stitcher(grid.width, grid.height, len(keep), grid.tile_size, grid.overlap, workdir, on_grid=True)
    workers = settings.workers if settings.workers is not None else auto_workers(slide, cfg.analysis_mpp, device)
    batch = batch_size_for(settings, device)
    on_device = device_tiles(slide, grid, cfg.analysis_mpp, device, settings.device_decode)
    radius = peak_radius_px(settings, cfg.analysis_mpp)

    def predict(x: torch.Tensor, precision: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = _run(net, x, device, precision)
        probs = torch.softmax(out[:, : cfg.num_classes], 1)[:, kept].cpu()
        return probs, find_peaks(out[:, cfg.num_classes], settings.immune_threshold, radius, logits=True)

    found: list[np.ndarray] = []
    own_bar = bar is None
    if bar is None:
        bar = tqdm(total=len(grid.tiles), desc=slide.path.name, unit="tile", disable=not settings.progress,
                   leave=False, dynamic_ncols=True)
    dataset = TileDataset(slide, grid, cfg.analysis_mpp)

    def first_tile() -> torch.Tensor:  # read only when the precision is checked (once per weights file)
        tile, _, problem = dataset[0]
        if problem:
            raise SlideError(problem)
        return _inputs([tile], cfg, device)

    precision, results, net = None, None, None
    try:
        if grid.tiles:
            precision = choose_precision(model, first_tile, settings.precision)
            # compiled as it is, or the network for that precision (its convolutions fused with their ReLUs)
            net = compiled(inference_network(model)) if settings.compile else inference_network(model, precision)
        # CPU streams (cpu_streams.py); not for a compiled network (its first call compiles: one thread only)
        if device.type == "cpu" and not workers and not on_device and not settings.compile and grid.tiles:
            results = stream_results(index_runs(grid, batch), dataset.__getitem__,
                                     lambda tiles: predict(_inputs(tiles, cfg, device), precision), stream_count())
        else:  # a DataLoader: reader processes, or JPEG tiles decoded on the device
            results = _loader_results(dataset, grid, cfg, device, workers, batch, on_device,
                                      lambda x: predict(x, precision))
        for run, probs, peaks in results:
            for k, i in enumerate(run):
                col, row = grid.tiles[i]
                stitcher.add(*grid.tile_origin(col, row), probs[k], offset=grid.crop(i)[:2])
                found.append(_owned_peaks(peaks[k], grid, i))
            bar.update(len(run))
    finally:
        if results is not None:
            results.close()  # on an error: the streams' remaining tiles are dropped, torch's threads restored
        if own_bar:
            bar.close()
        if on_device:
            on_device.close()
    canvas = stitcher.finish()
    release_freed_memory()  # what the streams' malloc arenas keep for the next tile (allocator.py)
    pts = np.concatenate(found) if found else np.zeros((0, 3))
    seconds = time.perf_counter() - t0
    decode = "device" if on_device else "reader"
    log.info("%s: %d tiles of %d px (%.1f Mpx run: crops) in %.1f s (%.1f tiles/s, %s, decoded by the %s), "
             "%d immune-cell peaks", slide.path.name, len(grid.tiles), grid.tile_size, grid.pixels / 1e6, seconds,
             len(grid.tiles) / max(seconds, 1e-9), precision or "-", decode, len(pts))
    return InferenceOutput(grid, names, canvas, pts[:, :2], pts[:, 2], cfg.analysis_mpp, precision or "none",
                           seconds, decode)
