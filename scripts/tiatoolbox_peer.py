"""Peer benchmark: nervedet's network and weights run by TIAToolbox 2.x's SemanticSegmentor (issue 5 item 6).

Runs INSIDE a TIAToolbox venv (see scripts/bench_tiatoolbox.sh), never in nervedet's own venv, and does not
import nervedet: the network is rebuilt here exactly as nervedet.model.build_network does, from the config JSON
stored in the safetensors metadata.

    python scripts/tiatoolbox_peer.py SLIDE OUT_JSON [--weights W] [--workers N] [--batch-size 1] [--tile 768]
        [--overlap 64] [--no-tissue-mask]

Writes OUT_JSON = {"seconds", "peak_rss_gb", "mask_npy", "tiatoolbox_version", "torch_version", ...} and, next
to it, <stem>_nerve.npy: the argmax==Nerve mask (uint8 0/1) over the whole slide at the analysis mpp from
level-0 (0, 0). "seconds" is the wall time of SemanticSegmentor.run alone (reading, inference, merging and
writing the probability zarr), not of building the network; peak RSS is getrusage maxrss of this process
plus its (DataLoader) children.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
DEFAULT_WEIGHTS = HERE.parent / "weights" / "nervedet-default.safetensors"


def read_config(weights: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        sys.exit(f"{weights}: no 'config' in the safetensors metadata")
    return json.loads(meta["config"])


def build_unet(cfg: dict, weights: Path) -> torch.nn.Module:
    import segmentation_models_pytorch as smp
    from safetensors.torch import load_file

    arch = cfg["architecture"]
    net = smp.Unet(encoder_name=arch["encoder"], encoder_weights=None, in_channels=3,
                   classes=len(cfg["classes"]) + 1, decoder_channels=list(arch["decoder_channels"]))
    state = {k: (t.float() if t.is_floating_point() else t) for k, t in load_file(str(weights)).items()}
    net.load_state_dict(state, strict=True)
    return net.eval()


def make_model_class():
    from tiatoolbox.models.models_abc import ModelABC

    class NervedetUNet(ModelABC):
        """nervedet's U-Net as a TIAToolbox model: uint8 RGB NHWC in, class probabilities NHWC out."""

        def __init__(self, net: torch.nn.Module, mean, std, num_classes: int, class_names) -> None:
            super().__init__()
            self.net = net
            self.num_classes = num_classes
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
            self.class_dict = dict(enumerate(class_names))

        def forward(self, imgs: torch.Tensor) -> torch.Tensor:  # NCHW float 0..1
            return self.net((imgs - self.mean) / self.std)

        @staticmethod
        def infer_batch(model: torch.nn.Module, batch_data, *, device: str) -> np.ndarray:
            model.eval()
            x = torch.as_tensor(batch_data).to(device=device).permute(0, 3, 1, 2).float() / 255.0
            with torch.inference_mode():
                logits = model(x)
                probs = F.softmax(logits[:, : model.num_classes], dim=1)
            return probs.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    return NervedetUNet


def peak_rss_gb() -> tuple[float, float, float]:
    """(self + children, self, largest child) maxrss in GiB; children counts only waited-for subprocesses."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return own + kids, own, kids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide", type=Path)
    ap.add_argument("out_json", type=Path)
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader workers (default: 0 on 20x slides, 1 on 40x ones, like nervedet)")
    ap.add_argument("--batch-size", type=int, default=1)  # nervedet's default on the CPU for 768-px tiles
    ap.add_argument("--tile", type=int, default=768)  # nervedet's default tile
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--no-tissue-mask", action="store_true", help="run every patch (auto_get_mask=False)")
    args = ap.parse_args()

    import tiatoolbox
    from tiatoolbox.models.engine.io_config import IOSegmentorConfig
    from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor
    from tiatoolbox.wsicore.wsireader import WSIReader

    torch.set_grad_enabled(False)
    cfg = read_config(args.weights)
    mpp = float(cfg["analysis_mpp"])
    names = [c["name"] for c in cfg["classes"]]
    nerve = names.index("Nerve")
    model = make_model_class()(build_unet(cfg, args.weights), cfg["normalization"]["mean"],
                               cfg["normalization"]["std"], len(names), names)

    base_mpp = float(np.mean(WSIReader.open(args.slide).info.mpp))
    workers = args.workers if args.workers is not None else (1 if base_mpp < 0.375 else 0)

    t, stride = args.tile, args.tile - args.overlap
    ioconfig = IOSegmentorConfig(
        input_resolutions=[{"units": "mpp", "resolution": mpp}],
        output_resolutions=[{"units": "mpp", "resolution": mpp}],
        patch_input_shape=(t, t), patch_output_shape=(t, t), stride_shape=(stride, stride),
        save_resolution={"units": "mpp", "resolution": mpp},
    )
    seg = SemanticSegmentor(model=model, batch_size=args.batch_size, num_workers=workers, device="cpu",
                            verbose=False)
    work = Path(tempfile.mkdtemp(prefix="tia_peer_", dir=args.out_json.parent))
    save_dir = work / "out"
    t0 = time.perf_counter()
    out = seg.run([args.slide], patch_mode=False, ioconfig=ioconfig, save_dir=save_dir, overwrite=True,
                  output_type="zarr", return_probabilities=True, auto_get_mask=not args.no_tissue_mask,
                  device="cpu", batch_size=args.batch_size, num_workers=workers)
    seconds = time.perf_counter() - t0
    rss, rss_self, rss_children = peak_rss_gb()

    import zarr

    path = out[args.slide] if isinstance(out, dict) else out
    path = path[0] if isinstance(path, (list, tuple)) else path
    z = zarr.open(str(path), mode="r")
    probs = np.asarray(z["probabilities"][:])  # (H, W, C) at the analysis mpp over the whole slide
    mask = (probs.argmax(axis=-1) == nerve).astype(np.uint8)
    mask_npy = args.out_json.with_name(args.out_json.stem + "_nerve.npy")
    np.save(mask_npy, mask)
    shutil.rmtree(work, ignore_errors=True)

    result = {"seconds": seconds, "peak_rss_gb": rss, "peak_rss_self_gb": rss_self,
              "peak_rss_children_gb": rss_children, "mask_npy": str(mask_npy),
              "tiatoolbox_version": tiatoolbox.__version__, "torch_version": torch.__version__,
              "workers": workers, "batch_size": args.batch_size, "tile": t, "stride": stride, "mpp": mpp,
              "tissue_mask": not args.no_tissue_mask, "mask_shape": list(mask.shape),
              "nerve_fraction": float(mask.mean()), "torch_threads": torch.get_num_threads()}
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
