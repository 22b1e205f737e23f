#!/usr/bin/env python3
"""Choose the nerve detection score (`PostprocessSettings.min_nerve_probability`) and the inference tile
size (`InferSettings.tile_size`) for a weights file on validation slides, never on the test slides.

A nerve instance is kept when the mean nerve probability of its pixels reaches the score. The right score
depends on how the network is calibrated, so it is chosen again for every new weights file:

1. makes six ~2 × 2 mm synthetic validation slides (seeds 9200-9205: SVS and generic TIFF, 0.25 and 0.5
   µm/px), never used for training (seeds 1000+, 2000+, 3000+) nor for the test figures of
   `scripts/accuracy.py` (seeds 9100-9102);
2. analyses each slide once per tile size as `nervedet infer` does, keeping every nerve candidate (a
   tile sees the context around a pixel, which matters for nerves larger than a small tile);
3. for each tile size and score, drops the nerves under the score and evaluates against the truth as
   `nervedet evaluate` does, pooled over the six slides.

Prints a table (pooled nerve P / R / F1, nerve Dice, PNI F1 per tile size and score) and the pair with
the highest sum of pooled nerve F1 and nerve Dice (the two nerve targets), and writes it as JSON.

    .venv/bin/python scripts/choose_postprocess.py [--weights FILE] [--out DIR] [--tile-sizes 512,768]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nervedet.analyze import AnalysisSettings, analyze_slide  # noqa: E402
from nervedet.evaluate import SlideCounts, evaluate_slide  # noqa: E402
from nervedet.geojson import read_geojson  # noqa: E402
from nervedet.infer import InferSettings  # noqa: E402
from nervedet.postprocess import PostprocessSettings  # noqa: E402
from nervedet.report import result_features  # noqa: E402
from nervedet.synth import SynthSettings, cached_synthetic_slide  # noqa: E402
from nervedet.weights import load_model  # noqa: E402

VALIDATION = ((9200, "svs", 0.25), (9201, "tiff", 0.25), (9202, "svs", 0.5), (9203, "svs", 0.5),
              (9204, "tiff", 0.5), (9205, "svs", 0.25))
SCORES = (0.0, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)


def score_row(results: list, tile: int, score: float) -> dict:
    """Pooled figures over the validation slides when the nerves under ``score`` are dropped."""
    pooled, per_slide = SlideCounts(), []
    for result, truth, mpp in results:
        kept = dataclasses.replace(result, nerves=[n for n in result.nerves if n.probability >= score])
        counts = evaluate_slide(result_features(kept), truth, mpp)
        pooled = pooled + counts
        per_slide.append(round(counts.metrics()["nerve_f1"], 3))
    m = pooled.metrics()
    return {"tile_size": tile, "score": score, **{k: round(float(m[k]), 4) for k in (
        "nerve_precision", "nerve_recall", "nerve_f1", "dice_nerve", "pni_f1", "dice_tumor")},
        "nerve_f1_per_slide": per_slide}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, help="weights file (default: the bundled weights)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/validation",
                    help="folder for the validation slides and the JSON (default runs/validation)")
    ap.add_argument("--size-mm", type=float, default=2.0, help="slide width and height in mm (default 2)")
    ap.add_argument("--tile-sizes", default="512,768,1024",
                    help="inference tile sizes to compare, comma-separated (default 512,768,1024)")
    args = ap.parse_args()
    tile_sizes = [int(t) for t in args.tile_sizes.split(",")]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    model = load_model(args.weights)
    slides = args.out / "slides"
    truths = []
    for seed, fmt, mpp in VALIDATION:
        s = SynthSettings(seed=seed, width_mm=args.size_mm, height_mm=args.size_mm, mpp=mpp, fmt=fmt,
                          name=f"val_{seed}_{fmt}_{mpp:g}")
        path, truth = cached_synthetic_slide(slides, s)
        truths.append((path, read_geojson(truth), mpp))

    rows = []
    for tile in tile_sizes:
        settings = AnalysisSettings(infer=InferSettings(tile_size=tile, progress=False),
                                    post=PostprocessSettings(min_nerve_probability=0.0))
        results = []
        for path, truth, mpp in truths:
            result = analyze_slide(path, model=model, settings=settings)
            results.append((result, truth, mpp))
            print(f"analysed {path.name} with {tile}-px tiles: {len(result.nerves)} nerve candidates", flush=True)
        rows += [score_row(results, tile, score) for score in SCORES]
    print(f"{'tile':>5} {'score':>6} {'nerve P':>8} {'R':>6} {'F1':>6} {'Dice':>6} {'PNI F1':>7}  nerve F1 per slide")
    for r in rows:
        print(f"{r['tile_size']:5d} {r['score']:6.2f} {r['nerve_precision']:8.3f} {r['nerve_recall']:6.3f} "
              f"{r['nerve_f1']:6.3f} {r['dice_nerve']:6.3f} {r['pni_f1']:7.3f}  {r['nerve_f1_per_slide']}")
    best = max(rows, key=lambda r: r["nerve_f1"] + r["dice_nerve"])  # the two nerve targets, equally
    print(f"best: tile size {best['tile_size']}, score {best['score']:.2f} (highest pooled nerve F1 + nerve Dice)")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"scores_{model.sha256[:12]}.json"
    out.write_text(json.dumps({"weights": str(model.path), "sha256": model.sha256, "slides": [
        f"{seed} {fmt} {mpp}" for seed, fmt, mpp in VALIDATION], "rows": rows, "best": best["score"],
        "best_tile_size": best["tile_size"]}, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
