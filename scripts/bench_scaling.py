"""Cohort throughput with 1 and more ranks (`nervedet infer --devices N`), in slides per hour, on synthetic
slides it makes itself (cached in --out), through the real CLI; checks that every run wrote the same GeoJSON.

    python scripts/bench_scaling.py [--slides 6] [--size-mm 1.0] [--devices 1 2] [--device auto]

Not part of the test suite. On a CPU the ranks share the cores (torch threads split between them); on a
machine with GPUs each rank takes one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nervedet.synth import SynthSettings, cached_synthetic_slide  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=6, help="cohort size (default 6)")
    ap.add_argument("--size-mm", type=float, default=1.0, help="side of each slide, mm (default 1.0)")
    ap.add_argument("--mpp", type=float, default=0.5, help="level-0 µm/px of the slides (default 0.5: 20x)")
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2], help="ranks to compare (default 1 2)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/scaling", help="slides and results folder")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    slides = args.out / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    for seed in range(9600, 9600 + args.slides):
        s = SynthSettings(seed=seed, width_mm=args.size_mm, height_mm=args.size_mm, mpp=args.mpp)
        cached_synthetic_slide(slides, s)
    res: dict = {"slides": args.slides, "size_mm": args.size_mm, "mpp": args.mpp, "device": args.device, "runs": {}}
    reference = None
    for n in args.devices:
        out = args.out / f"devices{n}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "nervedet.cli", "infer", str(slides), "--out", str(out), "--no-progress",
               "--device", args.device, "--devices", str(n)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        seconds = time.perf_counter() - t0
        geojson = {p.name: p.read_bytes() for p in sorted(out.glob("*/*.geojson"))}
        same = reference is None or geojson == reference
        reference = reference or geojson
        res["runs"][n] = {"seconds": round(seconds, 1), "slides_per_hour": round(args.slides * 3600 / seconds, 1),
                          "same_geojson_as_first": same}
        print(f"--devices {n}: {args.slides} slides in {seconds:.1f} s = {args.slides * 3600 / seconds:.1f} "
              f"slides/h (wall time, model loading included); GeoJSON same as the first run: {same}", flush=True)
    first = res["runs"][args.devices[0]]["seconds"]
    for n in args.devices[1:]:
        res["runs"][n]["speedup"] = round(first / res["runs"][n]["seconds"], 3)
        print(f"--devices {n} vs {args.devices[0]}: {first / res['runs'][n]['seconds']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
