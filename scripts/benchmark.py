"""Speed and memory of whole-slide inference, measured in one run (each configuration in its own process so
that its peak memory is its own). Prints a table; writes runs/benchmark/benchmark.json.

Configurations, on synthetic slides at 0.25 µm/px (a 40x scan) with the bundled weights on the CPU:
  * 2 × 2 mm, default settings (512-px tiles, batch 8, 1 reader worker), and with 0 workers;
  * 1 × 1 mm and 3 × 3 mm (does memory grow with the slide? it should not, beyond the small canvas);
  * bf16 against fp32 on the network alone, 2 tiles of 512 px (auto uses bf16 only where it is faster).

    .venv/bin/python scripts/benchmark.py [--out runs/benchmark]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "2mm": {"size": 2.0, "workers": 1},
    "2mm_workers0": {"size": 2.0, "workers": 0},
    "1mm": {"size": 1.0, "workers": 1},
    "3mm": {"size": 3.0, "workers": 1},
}


def _slide(out: Path, size: float) -> Path:
    from nervedet.synth import SynthSettings, make_synthetic_slide

    s = SynthSettings(seed=9300, width_mm=size, height_mm=size, mpp=0.25, name=f"bench_{size:g}mm")
    path = out / f"{s.stem}.svs"
    if not path.exists():
        make_synthetic_slide(out, s)
    return path


def run_one(name: str, out: Path) -> dict:
    from nervedet.analyze import AnalysisSettings, analyze_slide
    from nervedet.infer import InferSettings
    from nervedet.weights import load_model

    cfg = CONFIGS[name]
    path = _slide(out, cfg["size"])
    model = load_model()
    t0 = time.perf_counter()
    r = analyze_slide(path, model=model, settings=AnalysisSettings(infer=InferSettings(workers=cfg["workers"],
                                                                                          progress=False)))
    seconds = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    tiles = r.settings["tiles"]
    return {"config": name, "slide_mm": cfg["size"], "workers": cfg["workers"], "tiles": tiles,
            "seconds": round(seconds, 1), "inference_s": r.settings["inference_s"],
            "tiles_per_s": round(tiles / r.settings["inference_s"], 2),
            "tissue_mm2_per_min": round(r.metrics["tissue_area_mm2"] / seconds * 60, 2),
            "peak_rss_mb": round(rss_mb), "peak_worker_rss_mb": round(child_mb), "precision": r.settings["precision"]}


def precision_ratio() -> dict:
    import torch

    from nervedet.weights import cpu_bf16_supported, load_model

    net = load_model().network.eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 512, 512).contiguous(memory_format=torch.channels_last)
    times = {}
    with torch.inference_mode():
        for prec in ("fp32", "bf16", "fp32", "bf16"):  # the second round counts (the first warms up)
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                net(x)
            times[prec] = time.perf_counter() - t
    return {"fp32_s_per_2_tiles": round(times["fp32"], 2), "bf16_s_per_2_tiles": round(times["bf16"], 2),
            "bf16_speedup": round(times["fp32"] / times["bf16"], 2), "cpu_bf16_native": cpu_bf16_supported()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs/benchmark")
    ap.add_argument("--one", choices=sorted(CONFIGS), help=argparse.SUPPRESS)  # internal: one configuration
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(run_one(args.one, args.out)))
        return 0
    results = []
    for name in CONFIGS:
        p = subprocess.run([sys.executable, __file__, "--one", name, "--out", str(args.out)], capture_output=True,
                           text=True, check=True)
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    ratio = precision_ratio()
    base = next(r for r in results if r["config"] == "2mm")
    w0 = next(r for r in results if r["config"] == "2mm_workers0")
    head = ("config", "tiles", "seconds", "tiles/s", "tissue mm²/min", "peak RSS MB", "worker RSS MB")
    rows = [(r["config"], r["tiles"], r["seconds"], r["tiles_per_s"], r["tissue_mm2_per_min"], r["peak_rss_mb"],
             r["peak_worker_rss_mb"]) for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for row in (head, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    print(f"1 reader worker vs 0: {w0['seconds'] / base['seconds']:.2f}x faster per slide")
    print(f"bf16 vs fp32 (network, 2 tiles of 512 px): {ratio['bf16_speedup']:.2f}x "
          f"(native bf16 on this CPU: {ratio['cpu_bf16_native']}; auto uses bf16 only then)")
    (args.out / "benchmark.json").write_text(json.dumps({"runs": results, "precision": ratio}, indent=2) + "\n")
    print(f"written {args.out / 'benchmark.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
