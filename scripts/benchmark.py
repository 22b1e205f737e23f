"""Speed and memory of the whole-slide engine, measured side by side in one run, on synthetic slides it makes
itself (cached in --out), with the bundled weights on the device given.

1. model ceiling: the network alone on preloaded tiles (batch size and precision as the pipeline uses), in
   megapixels per second at the analysis mpp (tiles x tile² / s), the faster of one stream with all of torch's
   threads and the CPU streams the pipeline runs; measured before and after each pipeline run (the mean; their
   spread is reported, as this CPU's speed drifts by several percent);
2. pipeline: `analyze_slide` end to end (tissue, reading, network, stitching, peaks, post-processing) on a slide
   fully covered with tissue, in the same unit (the pixels the network ran: the tiles' crops, run.json's
   `network_mpx`, per second of the whole run); `pipeline_to_model_ratio` on a 20x slide (level 0 at
   0.5 µm/px) and `pipeline_to_model_ratio_40x` on a 40x slide in Aperio's layout (0.25 µm/px, pyramid steps
   of 4, so every tile is decoded at level 0 and halved). The ceiling is measured right before and after each.
   Both are measured warm: the ceiling after a warm-up pass, the pipeline on its second run of the slide (a
   process's first slide also pays one-time costs: the bf16 agreement check once per weights file, kernels for
   the crops' new shapes, thread pools, the heap's growth; a cohort pays them once). The first run's figures are
   reported too (`..._cold`). On a CPU, where the network and the work around it share the cores, the run's
   core-seconds are split too: `network_core_seconds` (its pixels at the ceiling's speed, on all the cores the
   ceiling used), `around_network_core_seconds` (the rest of the process's CPU time: reading, normalising,
   softmax, peaks, stitching, post-processing, the network's slowdown beside them) and
   `pipeline_to_model_ratio_never_idle` (the first over all: the ratio if the cores were never idle). Where the
   pipeline runs bf16 on a CPU, the 20x slide is also measured in float32 (here a network 4.5x slower, the same
   work around it): `pipeline_to_model_ratio_fp32` and its split (`..._fp32`);
3. reading: raw OpenSlide `read_region` of level-0 tile-sized regions against the reader's tiles at the analysis
   mpp (decoding and resizing included), both in megapixels of output per second;
4. background: the same slide size at 10%, 50% and 100% tissue; `background_share` = (time at 10% - 0.1 x time
   at 100%) / time at 10%: the share of a sparse slide's time not spent on its tissue;
   `background_share_network_px`, the same formula on the pixels the network ran (`background_network_mpx`: the
   tissue, its context margin and the crops' rounding, crops.py): the share the tiles' geometry alone sets;
5. memory: peak RSS (the process and its reader processes) of `analyze_slide` on slides of 20k² (and 50k² and
   100k² without --quick) level-0 px at 0.25 µm/px with sparse tissue, each in its own process.

    python scripts/benchmark.py [--quick] [--json FILE] [--device auto] [--out runs/benchmark]

Prints a table and writes the JSON (default OUT/benchmark.json). Not part of the test suite: timings belong
here, not in tests. The peer (TIAToolbox) runs in its own venv (scripts/bench_tiatoolbox.sh); give its JSON with
--tiatoolbox-json to add the comparison, else its keys are null. The peer runs in float32; where our precision
is not float32 (bf16 on a CPU with native bf16), our first float32 run of the 20x slide gives
`tiatoolbox_speedup_fp32`, the engines compared alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from nervedet.analyze import AnalysisSettings, analyze_slide  # noqa: E402
from nervedet.cpu_streams import stream_count, torch_threads  # noqa: E402
from nervedet.infer import (  # noqa: E402
    InferSettings,
    TileDataset,
    _run,
    auto_workers,
    canvas_grid,
    choose_precision,
    default_batch_size,
    inference_network,
    run_inference,
)
from nervedet.model import normalize  # noqa: E402
from nervedet.postprocess import class_masks  # noqa: E402
from nervedet.slide import open_slide  # noqa: E402
from nervedet.synth import SynthSettings, cached_synthetic_slide  # noqa: E402
from nervedet.tissue import detect_tissue  # noqa: E402
from nervedet.weights import load_model  # noqa: E402

TILE = InferSettings.tile_size  # the pipeline's default tile (768 px); batch: its default for the tile and device


def make_slide(out: Path, name: str, size_mm: float, mpp: float, tissue: float, seed: int = 9400) -> Path:
    s = SynthSettings(seed=seed, width_mm=size_mm, height_mm=size_mm, mpp=mpp, tissue_fraction=tissue, name=name)
    return cached_synthetic_slide(out, s)[0]


def _tiles(path: Path, model, n: int) -> torch.Tensor:
    """``n`` real tiles of the slide (uint8, as the reader gives them), for the ceiling."""
    slide = open_slide(path)
    grid = canvas_grid(slide, detect_tissue(slide), model.config.analysis_mpp, InferSettings(tile_size=TILE))
    ds = TileDataset(slide, grid, model.config.analysis_mpp)
    return torch.stack([ds[i % len(ds)][0] for i in range(n)])


def _throughput(net, x: torch.Tensor, device, precision: str, seconds: float, streams: int) -> float:
    """Megapixels per second of ``streams`` threads running the network on ``x`` over and over, each with its
    share of torch's threads (one stream: all of them), as cpu_streams.py runs it."""
    counts = [0] * streams
    stop = time.perf_counter() + seconds

    def loop(k: int) -> None:
        while time.perf_counter() < stop:
            _run(net, x, device, precision)
            counts[k] += x.shape[0]

    t0 = time.perf_counter()
    if streams == 1:
        loop(0)
    else:
        with torch_threads(max(1, torch.get_num_threads() // streams)), ThreadPoolExecutor(streams) as ex:
            list(ex.map(loop, range(streams)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return sum(counts) * x.shape[2] * x.shape[3] / (time.perf_counter() - t0) / 1e6


def model_ceiling(model, path: Path, seconds: float, precision: str = "auto") -> tuple[float, str]:
    """Megapixels per second of the network alone on preloaded tiles, and the precision it ran in (``precision``
    as the pipeline chooses it): the faster of one stream with all of torch's threads and the CPU streams the
    pipeline runs (cpu_streams.py), so the ratio is taken against the model's best on this machine."""
    cfg, device = model.config, model.device
    batch = default_batch_size(device, TILE)
    x = normalize(_tiles(path, model, batch).to(device), cfg, torch.channels_last)
    precision = choose_precision(model, lambda: x, precision)
    net = inference_network(model, precision)  # the network exactly as the pipeline runs it
    _run(net, x, device, precision)  # warm-up
    ways = [1] + ([stream_count()] if device.type == "cpu" and stream_count() > 1 else [])
    return max(_throughput(net, x, device, precision, seconds / len(ways), n) for n in ways), precision


def pipeline(model, path: Path, precision: str = "auto") -> dict:
    """One run of `analyze_slide`: its wall time and the process's CPU time (all its threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    infer = InferSettings(tile_size=TILE, progress=False, precision=precision)
    r = analyze_slide(path, model=model, settings=AnalysisSettings(infer=infer))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    tiles, mpx = r.settings["tiles"], r.settings["network_mpx"]  # the pixels the network ran (tiles' crops)
    return {"seconds": seconds, "cpu_seconds": cpu, "tiles": tiles, "network_mpx": mpx, "mpx_s": mpx / seconds,
            "tissue_mm2": r.metrics["tissue_area_mm2"]}


def side_by_side(model, path: Path, seconds: float, precision: str = "auto") -> tuple[dict, dict, float, float, str]:
    """The pipeline's first and second runs of the slide in ``precision`` and the network's ceiling measured
    before and after the second (this CPU's speed drifts): (first run, second run, the ceiling's mean, the
    spread of the two ceilings over their mean, the precision run)."""
    cold = pipeline(model, path, precision)  # the first run: one-time costs included
    before, chosen = model_ceiling(model, path, seconds, precision)
    run = pipeline(model, path, precision)
    after, _ = model_ceiling(model, path, seconds, precision)
    ceiling = (before + after) / 2
    return cold, run, ceiling, abs(before - after) / ceiling, chosen


def core_budget(run: dict, ceiling: float, device: torch.device) -> dict:
    """Where a CPU run's core-seconds went: the network's share at the ceiling's speed (the ceiling keeps all
    of torch's threads busy), the work around it, and the ratio if the cores were never idle. On a CPU the network
    and the work around it share the cores, so nothing hides behind the network: the ratio is at most the
    network's core-seconds over all of them, and a ratio of r needs the work around the network within
    (1/r - 1) of the network's core-seconds."""
    if device.type != "cpu":
        return {}
    network = run["network_mpx"] / ceiling * torch.get_num_threads()
    return {"pipeline_cpu_seconds": round(run["cpu_seconds"], 2), "network_core_seconds": round(network, 2),
            "around_network_core_seconds": round(run["cpu_seconds"] - network, 2),
            "pipeline_to_model_ratio_never_idle": round(network / run["cpu_seconds"], 3)}


def reading(path: Path, analysis_mpp: float, n: int = 48) -> dict:
    """Raw OpenSlide reads of level-0 regions against the reader's tiles at the analysis mpp."""
    import openslide

    slide = open_slide(path)
    grid = canvas_grid(slide, detect_tissue(slide), analysis_mpp, InferSettings(tile_size=TILE))
    ds = TileDataset(slide, grid, analysis_mpp)
    handle = openslide.OpenSlide(str(path))
    w, h = handle.dimensions
    rng = np.random.default_rng(0)
    xy = [(int(rng.integers(0, max(1, w - TILE))), int(rng.integers(0, max(1, h - TILE)))) for _ in range(n)]
    t0 = time.perf_counter()
    for x, y in xy:
        handle.read_region((x, y), 0, (TILE, TILE))
    raw = n * TILE * TILE / (time.perf_counter() - t0) / 1e6
    t0 = time.perf_counter()
    for i in range(n):
        ds[i % len(ds)]
    tiles = n * TILE * TILE / (time.perf_counter() - t0) / 1e6
    return {"read_raw_mpx_s": raw, "read_tiles_mpx_s": tiles, "level0_mpp": slide.mpp,
            "read_level_mpp": slide.level_mpps[slide.level_for_mpp(analysis_mpp)]}


def peer_mask_dice(model, path: Path, mask_npy: Path) -> float:
    """Dice of nervedet's and the peer's nerve pixel masks on the same slide (argmax of the class probabilities
    at the analysis mpp, before any post-processing): the check that both ran the same network the same way."""
    peer = np.load(mask_npy).astype(bool)
    with open_slide(path) as slide:
        out = run_inference(model, slide, detect_tissue(slide), InferSettings(tile_size=TILE, progress=False))
    g = out.grid
    nerve = class_masks(out, 0)["Nerve"]  # the pipeline's own class map, without its smoothing
    ours = np.zeros_like(peer)
    x0, y0 = round(g.origin[0] / g.scale), round(g.origin[1] / g.scale)
    h, w = min(nerve.shape[0], peer.shape[0] - y0), min(nerve.shape[1], peer.shape[1] - x0)
    ours[y0:y0 + h, x0:x0 + w] = nerve[:h, :w]
    return float(2 * (ours & peer).sum() / max(ours.sum() + peer.sum(), 1))


def _status_gb() -> dict[str, float]:
    """This process's memory figures in Linux /proc/self/status (VmHWM, RssAnon, RssFile, ...) in GB; empty
    where there is no such file."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return {}
    fields = (line.split() for line in status.read_text().splitlines())
    return {f[0].rstrip(":"): int(f[1]) / 2**20 for f in fields if len(f) == 3 and f[2] == "kB"}  # kB -> GB


class RssKinds:
    """The highest anonymous and file-backed resident memory of this process (Linux /proc/self/status RssAnon
    and RssFile, in GB), sampled every ``interval`` s by a thread while the block runs. The peak RSS is their sum
    at its highest; the file-backed part is pages of the shared libraries (torch's CUDA build maps several
    hundred MB) and of files, which the kernel may drop at any time and whose amount depends on what its page
    cache holds: it varies from run to run and machine to machine while the process's own memory does not."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.peak, self._stop = interval, {"RssAnon": 0.0, "RssFile": 0.0}, threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = _status_gb()
            for key in self.peak:
                self.peak[key] = max(self.peak[key], now.get(key, 0.0))

    def __enter__(self) -> RssKinds:
        if _status_gb():
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()


def own_peak_rss_gb() -> float:
    """This process's peak RSS in GB: on Linux its VmHWM, the high-water mark of its memory since it started its
    program. Not ``ru_maxrss``: Linux carries the high-water mark of the memory a process had before ``exec``
    into it, and a child made by fork or vfork had its parent's, so a child's ``ru_maxrss`` is at least its
    parent's peak (this benchmark's own 2.2 GB, after its float32 runs, showed as the 20k² slide's peak)."""
    hwm = _status_gb().get("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory_one(path: Path, device: str) -> dict:
    """Run in a process of its own: analyse ``path`` and report the peak RSS of it (own_peak_rss_gb) and its
    reader processes, and (Linux) the highest anonymous and file-backed parts of the main process's (RssKinds).

    The reader processes' figure is RUSAGE_CHILDREN's maximum RSS, which a forked child starts with its parent's
    (see own_peak_rss_gb; ``import torch`` itself runs a short-lived child, which so shows 0.42 GB before any slide
    is opened): it counts only when the pipeline starts reader processes, and is then an upper bound."""
    model = load_model(device=device)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # kB -> GB
    with open_slide(path) as slide:
        readers = auto_workers(slide, model.config.analysis_mpp, model.device)
    loaded = own_peak_rss_gb()  # the peak before the slide's analysis (imports, the model)
    t0 = time.perf_counter()
    with RssKinds() as kinds:
        r = analyze_slide(path, model=model, settings=AnalysisSettings(infer=InferSettings(progress=False)))
    own = own_peak_rss_gb()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20 if readers else 0.0
    return {"seconds": time.perf_counter() - t0, "tiles": r.settings["tiles"], "regions": r.settings["regions"],
            "reader_processes": readers, "peak_rss_gb": own + kids, "peak_rss_gb_main": own,
            "peak_rss_gb_reader": kids, "rss_gb_import_children": before,
            "peak_rss_gb_main_before": loaded,
            "peak_rss_anon_gb_main": kinds.peak["RssAnon"], "peak_rss_file_gb_main": kinds.peak["RssFile"]}


def _table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller slides, memory up to 20k² px (about 5 min here)")
    ap.add_argument("--json", type=Path, help="write the figures here (default OUT/benchmark.json)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/benchmark", help="slides and results folder")
    ap.add_argument("--tiatoolbox-json", type=Path,
                    help="the JSON of scripts/bench_tiatoolbox.sh on OUT/full_<size>mm_0.5.svs: adds "
                         "tiatoolbox_speedup (its time / our first run of the slide) and tiatoolbox_peak_rss_gb")
    ap.add_argument("--memory-one", type=Path, help=argparse.SUPPRESS)  # internal: one memory run
    args = ap.parse_args()
    if args.memory_one:
        print(json.dumps(memory_one(args.memory_one, args.device)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    size = 1.5 if args.quick else 3.0
    model = load_model(device=args.device)
    res: dict = {"device": str(model.device), "quick": args.quick, "cpu": platform.processor() or platform.machine(),
                 "cores": os.cpu_count(), "torch": torch.__version__, "tile_size": TILE,
           "batch_size": default_batch_size(model.device, TILE)}
    seconds = 8 if args.quick else 20

    for key, mpp in (("", 0.5), ("_40x", 0.25)):
        path = make_slide(args.out, f"full_{size:g}mm_{mpp:g}", size, mpp, 1.0)
        cold, run, ceiling, spread, precision = side_by_side(model, path, seconds)
        res[f"pipeline_seconds_cold{key}"] = round(cold["seconds"], 1)
        res[f"pipeline_to_model_ratio_cold{key}"] = round(cold["mpx_s"] / ceiling, 3)
        res[f"model_ceiling_spread{key}"] = round(spread, 3)
        res[f"model_ceiling_mpx_s{key}"] = round(ceiling, 4)
        res[f"pipeline_mpx_s{key}"] = round(run["mpx_s"], 4)
        res[f"pipeline_to_model_ratio{key}"] = round(run["mpx_s"] / ceiling, 3)
        res[f"pipeline_seconds{key}"] = round(run["seconds"], 1)
        res[f"tiles{key}"] = run["tiles"]
        res.update({f"{k}{key}": v for k, v in core_budget(run, ceiling, model.device).items()})
        res["precision"] = precision
        print(f"{path.name}: ceiling {ceiling:.3f} Mpx/s, pipeline {run['mpx_s']:.3f} Mpx/s "
              f"({run['tiles']} tiles, {run['seconds']:.1f} s; first run {cold['seconds']:.1f} s): "
              f"ratio {run['mpx_s'] / ceiling:.3f}", flush=True)
        res.update({f"{k}{key}": round(v, 4) for k, v in reading(path, model.config.analysis_mpp).items()})
        if model.device.type == "cpu" and not key and precision != "fp32":
            # the 20x slide in float32 too, a slower network: does the work around it hide then?
            cold32, run32, top, _, _ = side_by_side(model, path, seconds, "fp32")
            res["pipeline_seconds_fp32"] = round(cold32["seconds"], 1)  # the first run, as the peer's one run
            res["pipeline_seconds_fp32_warm"] = round(run32["seconds"], 1)
            res["model_ceiling_mpx_s_fp32"] = round(top, 4)
            res["pipeline_to_model_ratio_fp32"] = round(run32["mpx_s"] / top, 3)
            res.update({f"{k}_fp32": v for k, v in core_budget(run32, top, model.device).items()})
            print(f"{path.name} in float32: ceiling {top:.3f} Mpx/s, pipeline {run32['mpx_s']:.3f} Mpx/s "
                  f"({run32['seconds']:.1f} s): ratio {run32['mpx_s'] / top:.3f}", flush=True)

    times, mpx = {}, {}
    for frac in (0.1, 0.5, 1.0):
        path = make_slide(args.out, f"bg_{size:g}mm_{frac:g}", size, 0.25, frac, seed=9410)
        run = pipeline(model, path)
        times[frac], mpx[frac] = run["seconds"], run["network_mpx"]
        print(f"{path.name}: {run['tissue_mm2']:.2f} mm² tissue, {run['tiles']} tiles, {run['network_mpx']:.1f} "
              f"Mpx run, {run['seconds']:.1f} s", flush=True)
    res["background_seconds"] = {f"{int(f * 100)}%": round(t, 2) for f, t in times.items()}
    res["background_share"] = round((times[0.1] - 0.1 * times[1.0]) / times[0.1], 3)
    # the same formula on the pixels the network ran (tissue, its context margin, the crops' rounding): the
    # share the tiles' geometry alone sets, were time to follow those pixels with no cost per slide
    res["background_network_mpx"] = {f"{int(f * 100)}%": round(v, 2) for f, v in mpx.items()}
    res["background_share_network_px"] = round((mpx[0.1] - 0.1 * mpx[1.0]) / mpx[0.1], 3)

    sizes = (20_000,) if args.quick else (20_000, 50_000, 100_000)
    res["memory"] = {}
    for px in sizes:
        path = make_slide(args.out, f"sparse_{px // 1000}k", px * 0.25 / 1000, 0.25, 0.05, seed=9500)
        p = subprocess.run([sys.executable, __file__, "--memory-one", str(path), "--device", args.device],
                           capture_output=True, text=True, check=True)
        m = json.loads(p.stdout.strip().splitlines()[-1])
        res["memory"][f"{px}"] = {k: round(v, 3) for k, v in m.items()}
        print(f"{path.name}: {px}² px, {m['tiles']} tiles, {m['seconds']:.1f} s, peak RSS {m['peak_rss_gb']:.2f} GB "
              f"(main {m['peak_rss_gb_main']:.2f}: at most {m['peak_rss_anon_gb_main']:.2f} anonymous, "
              f"{m['peak_rss_file_gb_main']:.2f} file-backed; reader {m['peak_rss_gb_reader']:.2f})", flush=True)
    res["largest_slide_level0_px"] = sizes[-1] ** 2
    res["peak_rss_gb_largest"] = res["memory"][f"{sizes[-1]}"]["peak_rss_gb"]
    res["tiatoolbox_speedup"] = res["tiatoolbox_peak_rss_gb"] = None
    if args.tiatoolbox_json:  # the peer's run of the same 20x slide (scripts/bench_tiatoolbox.sh, its own venv)
        peer = json.loads(args.tiatoolbox_json.read_text())
        ours = (TILE, res["batch_size"])
        if (peer.get("tile"), peer.get("batch_size")) != ours:  # the race is fair only on the same work
            raise SystemExit(f"{args.tiatoolbox_json}: the peer ran {peer.get('tile')}-px tiles in batches of "
                             f"{peer.get('batch_size')}, nervedet {ours[0]} in batches of {ours[1]}: run "
                             f"scripts/bench_tiatoolbox.sh with --tile {ours[0]} --batch-size {ours[1]}")
        # the peer's time is its one and only run: against our first run of the slide, not the warm one
        res["tiatoolbox_speedup"] = round(peer["seconds"] / res["pipeline_seconds_cold"], 3)
        res["tiatoolbox_peak_rss_gb"] = round(peer.get("peak_rss_self_gb", peer["peak_rss_gb"]), 3)
        res["tiatoolbox_seconds"] = round(peer["seconds"], 1)
        path = make_slide(args.out, f"full_{size:g}mm_0.5", size, 0.5, 1.0)  # the 20x slide the peer ran
        if res["precision"] != "fp32":  # the peer runs float32: our time in float32 too, for the engines alone
            if "pipeline_seconds_fp32" not in res:
                res["pipeline_seconds_fp32"] = round(pipeline(model, path, "fp32")["seconds"], 1)
            res["tiatoolbox_speedup_fp32"] = round(peer["seconds"] / res["pipeline_seconds_fp32"], 3)
        if Path(peer.get("mask_npy", "")).is_file():
            res["tiatoolbox_nerve_mask_dice"] = round(peer_mask_dice(model, path, Path(peer["mask_npy"])), 4)

    rows = [("figure", "value", "goal"),
            ("model ceiling, 20x slide (Mpx/s)", res["model_ceiling_mpx_s"], ""),
            ("pipeline, 20x slide (Mpx/s)", res["pipeline_mpx_s"], ""),
            ("pipeline_to_model_ratio (20x)", res["pipeline_to_model_ratio"], ">= 0.90"),
            ("pipeline_to_model_ratio_40x", res["pipeline_to_model_ratio_40x"], ">= 0.75"),
            ("the ratio if the cores were never idle (20x)", res.get("pipeline_to_model_ratio_never_idle"), ""),
            ("core-s: network / around it (20x)",
             f"{res.get('network_core_seconds')} / {res.get('around_network_core_seconds')}", ""),
            ("pipeline_to_model_ratio_fp32 (20x, float32)", res.get("pipeline_to_model_ratio_fp32"), ""),
            ("raw OpenSlide read, 40x level 0 (Mpx/s)", res["read_raw_mpx_s_40x"], ""),
            ("reader tiles at 0.5 µm/px, 40x (Mpx/s)", res["read_tiles_mpx_s_40x"], ""),
            ("background_share", res["background_share"], "<= 0.05"),
            ("the same on the network's pixels", res["background_share_network_px"], ""),
            (f"peak RSS at {sizes[-1]:,}² px (GB)", res["peak_rss_gb_largest"], "< 2.5 at 100k²"),
            ("tiatoolbox_speedup (its time / ours, 20x slide)", res["tiatoolbox_speedup"], ">= 2"),
            ("the same, both in float32", res.get("tiatoolbox_speedup_fp32"), ""),
            ("TIAToolbox peak RSS (GB, its process)", res["tiatoolbox_peak_rss_gb"], "no less than ours"),
            ("nerve mask Dice, nervedet vs TIAToolbox", res.get("tiatoolbox_nerve_mask_dice"), ">= 0.98")]
    print(_table(rows))
    out = args.json or args.out / "benchmark.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
