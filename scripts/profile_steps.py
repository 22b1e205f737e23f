"""Where a slide's CPU time goes, step by step: the pipeline's steps run one after the other on one thread, each
timed on its own (the tiles as run_inference runs them, then the post-processing of what they gave), in
core-seconds.

    python scripts/profile_steps.py SLIDE [--precision auto] [--repeat 2]

In the pipeline the steps overlap on all the cores (cpu_streams.py, threads in post-processing); here they are
apart, so their sum is the work to be done, and the network's share of it bounds `pipeline_to_model_ratio` on a
CPU whose cores the network fills (scripts/benchmark.py; BENCHMARKS.md). The last of ``--repeat`` passes is
printed (the first also pays one-time costs). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from nervedet.infer import (  # noqa: E402
    InferenceOutput,
    InferSettings,
    TileDataset,
    _inputs,
    _owned_peaks,
    _run,
    canvas_grid,
    choose_precision,
    inference_network,
    kept_channels,
    peak_radius_px,
)
from nervedet.peaks import find_peaks  # noqa: E402
from nervedet.postprocess import postprocess  # noqa: E402
from nervedet.slide import SlideError, open_slide  # noqa: E402
from nervedet.stitch import Stitcher  # noqa: E402
from nervedet.tissue import detect_tissue  # noqa: E402
from nervedet.weights import load_model  # noqa: E402

STEPS = ("tissue", "reading", "normalising", "network", "softmax", "peaks", "stitching", "post-processing")


def one_pass(model, path: Path, settings: InferSettings, precision: str) -> dict[str, float]:
    """CPU seconds of each step over the slide (the process's, all its threads: the post-processing's thread
    pools included), one step at a time."""
    cfg, device = model.config, model.device
    t = dict.fromkeys(STEPS, 0.0)
    with open_slide(path) as slide:
        a = time.process_time()
        tissue = detect_tissue(slide)
        t["tissue"] = time.process_time() - a
        grid = canvas_grid(slide, tissue, cfg.analysis_mpp, settings)
        dataset = TileDataset(slide, grid, cfg.analysis_mpp)
        net = inference_network(model, precision)
        keep, kept = kept_channels(cfg)  # as run_inference takes them
        radius = peak_radius_px(settings, cfg.analysis_mpp)
        stitcher = Stitcher(grid.width, grid.height, len(keep), grid.tile_size, grid.overlap, None, on_grid=True)
        found = []
        for i, (col, row) in enumerate(grid.tiles):
            marks = [time.process_time()]
            tile = dataset[i][0]
            marks.append(time.process_time())
            x = _inputs([tile], cfg, device)
            marks.append(time.process_time())
            out = _run(net, x, device, precision)
            marks.append(time.process_time())
            probs = torch.softmax(out[:, : cfg.num_classes], 1)[:, kept].cpu()
            marks.append(time.process_time())
            peaks = find_peaks(out[:, cfg.num_classes], settings.immune_threshold, radius, logits=True)
            marks.append(time.process_time())
            stitcher.add(*grid.tile_origin(col, row), probs[0], offset=grid.crop(i)[:2])
            found.append(_owned_peaks(peaks[0], grid, i))
            marks.append(time.process_time())
            for step, a, b in zip(STEPS[1:7], marks, marks[1:]):
                t[step] += b - a
        a = time.process_time()
        canvas = stitcher.finish()
        t["stitching"] += time.process_time() - a
        pts = np.concatenate(found) if found else np.zeros((0, 3))  # as run_inference gives them
        names = tuple(cfg.class_names[k] for k in keep)
        out = InferenceOutput(grid, names, canvas, pts[:, :2], pts[:, 2], cfg.analysis_mpp, precision, 0.0, "reader")
        a = time.process_time()
        postprocess(out, tissue)
        t["post-processing"] = time.process_time() - a
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("slide", type=Path, help="the slide to profile")
    ap.add_argument("--precision", default="auto", help="auto, fp32, bf16 (default auto, as the pipeline)")
    ap.add_argument("--repeat", type=int, default=2, help="passes; the last is printed (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model()
    settings = InferSettings(progress=False, precision=args.precision)
    try:
        with open_slide(args.slide) as slide:  # the precision the pipeline would choose for this slide
            grid = canvas_grid(slide, detect_tissue(slide), model.config.analysis_mpp, settings)
            if not grid.tiles:
                raise SlideError(f"{args.slide}: no tissue found")
            first = TileDataset(slide, grid, model.config.analysis_mpp)[0][0]
        precision = choose_precision(model, lambda: _inputs([first], model.config, model.device), args.precision)
        for _ in range(args.repeat):
            t = one_pass(model, args.slide, settings, precision)
    except SlideError as exc:
        print(f"profile_steps: {exc}", file=sys.stderr)
        return 1
    around = sum(v for k, v in t.items() if k != "network")
    for step, v in t.items():
        print(f"{step:16s} {v:7.2f} core-s")
    print(f"{'around network':16s} {around:7.2f} core-s ({precision}; network {t['network']:.2f}: "
          f"{t['network'] / (t['network'] + around):.3f} of the work)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
