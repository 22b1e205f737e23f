#!/usr/bin/env python3
"""Reproduce the bundled weights and measure them: `python scripts/train_default.py`.

1. trains with configs/default.yaml (synthetic slides, seeds 1000-1023; with --with-negatives also four of
   the real non-nerve images in shared/data/real/negatives as "no nerve here" examples);
2. measures the weights on held-out synthetic slides (seeds 9000-9005, never used in training): nerve Dice and
   immune-cell F1 at tile level, with class-balanced and with uniform tissue tiles;
3. measures the share of tissue called nerve on the six real non-nerve images;
4. writes heldout.json beside the weights file (the numbers quoted in weights/README.md).

`--evaluate-only` skips step 1 and measures the current weights file. Options: --minutes, --steps, --set.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nervedet.synth import SynthSettings, cached_synthetic_slide  # noqa: E402
from nervedet.train.config import load_train_config  # noqa: E402
from nervedet.train.data import SamplingWeights, SlideSpec  # noqa: E402
from nervedet.train.run import synthetic_folder, train  # noqa: E402
from nervedet.train.validate import evaluate_tiles, nerve_fraction_on_negatives  # noqa: E402
from nervedet.weights import load_model, save_weights  # noqa: E402

TRAIN_NEGATIVES = ("adipose.png", "collagen_stroma.png", "colon_glands.png", "lung_tumour.png")
HELDOUT_NEGATIVES = ("spindle_stroma.png", "kather_stroma.tif")
HELDOUT_SEEDS = range(9000, 9006)


def real_folder() -> Path | None:
    for p in (ROOT.parent / "shared/data/real", Path("/work/shared/data/real")):
        if (p / "negatives").is_dir():
            return p
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evaluate-only", action="store_true", help="measure the existing weights file only")
    ap.add_argument("--minutes", type=float, help="training time limit (default: the config's)")
    ap.add_argument("--steps", type=int, help="training steps (default: the config's)")
    ap.add_argument("--tiles", type=int, default=256, help="held-out tiles per measurement (default 256)")
    ap.add_argument("--with-negatives", action="store_true",
                    help="also train on four of the real non-nerve images as 'no nerve here' examples")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a training-config override, as for `nervedet train --set` (e.g. init_weights=bundled)")
    ap.add_argument("--keep-float32", action="store_true", help="do not store the weights as float16")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    real = real_folder()
    overrides = []
    if real and args.with_negatives:
        negs = [str(real / "negatives" / n) for n in TRAIN_NEGATIVES]
        overrides.append(f"data.negatives={json.dumps(negs)}")
    if args.minutes:
        overrides.append(f"train.max_minutes={args.minutes}")
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    cfg = load_train_config(ROOT / "configs/default.yaml", [*overrides, *args.set])
    if not args.evaluate_only:
        result = train(cfg)
        print(f"trained: {result.steps} steps, {result.minutes:.1f} min, validation {result.metrics}")

    model = load_model(cfg.weights_path)
    with safe_open(cfg.weights_path, "pt") as f:
        stored = {f.get_slice(k).get_dtype() for k in f.keys()}
    if "F32" in stored and not args.keep_float32:
        # stored in float16 (half the size in the repository); loaded back as float32; measured as stored
        save_weights(cfg.weights_path, model.network, model.config, training=model.metadata.get("training"),
                     metrics=model.metadata.get("metrics"), dtype=torch.float16)
        model = load_model(cfg.weights_path)
    s = cfg.data.synthetic
    folder = synthetic_folder(s)  # held-out seeds share the cache folder; they are never in the training range
    specs = []
    for seed in HELDOUT_SEEDS:
        settings = SynthSettings(seed=seed, width_mm=s.width_mm, height_mm=s.height_mm, mpp=s.mpp,
                                 stain_jitter=s.stain_jitter, tissue_fraction=s.tissue_fraction)
        specs.append(SlideSpec(*cached_synthetic_slide(folder, settings)))
    balanced = evaluate_tiles(model, specs, args.tiles, seed=7)
    uniform = evaluate_tiles(model, specs, args.tiles, seed=8, weights=SamplingWeights.only("tissue"))
    report = {
        "weights": str(cfg.weights_path), "sha256": model.sha256,
        "heldout_seeds": list(HELDOUT_SEEDS), "slide_mm": [s.width_mm, s.height_mm], "slide_mpp": s.mpp,
        "class_balanced_tiles": balanced.as_dict(), "uniform_tissue_tiles": uniform.as_dict(),
        "training": model.metadata.get("training", {}), "validation": model.metadata.get("metrics", {}),
    }
    if real:
        images = [real / "negatives" / n for n in (*TRAIN_NEGATIVES, *HELDOUT_NEGATIVES)]
        fractions = nerve_fraction_on_negatives(model, images, mpp=0.5)
        trained_on_negatives = (model.metadata.get("training") or {}).get("negatives", 0) > 0  # the four above
        report["negatives_nerve_fraction"] = {
            name: {"fraction": round(v, 4), "seen_in_training": trained_on_negatives and name in TRAIN_NEGATIVES}
            for name, v in fractions.items()}
    out = Path(cfg.weights_path).parent / "heldout.json"  # beside the weights it measures
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("class_balanced_tiles", "uniform_tissue_tiles")}, indent=2))
    if "negatives_nerve_fraction" in report:
        print(json.dumps(report["negatives_nerve_fraction"], indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
