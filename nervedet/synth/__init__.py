"""Synthetic H&E slides with exact ground truth: ``make_synthetic_slide`` (the `nervedet synth` command)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from nervedet.geojson import write_geojson
from nervedet.synth.layout import Layout, make_layout
from nervedet.synth.pyramid import write_pyramid
from nervedet.synth.render import TileRenderer
from nervedet.synth.stain import Stain
from nervedet.synth.truth import truth_features

log = logging.getLogger(__name__)

TILED_GLASS_PX = 2**30  # level-0 pixels (about 32800²) above which glass="auto" tiles the glass

__all__ = ["Stain", "SynthResult", "SynthSettings", "TileRenderer", "cached_synthetic_slide", "make_layout",
           "make_synthetic_slide"]


@dataclass(frozen=True)
class SynthSettings:
    seed: int = 1
    width_mm: float = 2.0
    height_mm: float = 2.0
    mpp: float = 0.25
    fmt: str = "svs"  # "svs" (Aperio) or "tiff" (generic pyramidal TIFF)
    tissue_fraction: float = 0.7
    stain_jitter: float = 1.0  # 0 = the reference stain; 1 = the usual lab-to-lab spread
    name: str | None = None
    # Bare glass: "exact" draws fresh sensor noise everywhere; "tiled" repeats one 256 px noise tile wherever no
    # tissue is near, which makes huge sparse slides several times faster to write; "auto" tiles slides of more
    # than TILED_GLASS_PX level-0 pixels only, so smaller slides stay exactly as they always were.
    glass: str = "auto"

    def __post_init__(self):
        if self.fmt not in ("svs", "tiff"):
            raise ValueError(f"format must be svs or tiff, not {self.fmt!r}")
        if not (0.0 < self.tissue_fraction <= 1.0):
            raise ValueError(f"tissue fraction must be in (0, 1], not {self.tissue_fraction}")
        if self.width_mm <= 0 or self.height_mm <= 0 or self.mpp <= 0:
            raise ValueError("width, height and mpp must be positive")
        if self.glass not in ("auto", "exact", "tiled"):
            raise ValueError(f"glass must be auto, exact or tiled, not {self.glass!r}")

    @property
    def stem(self) -> str:
        return self.name or f"synth_{self.seed}"


@dataclass(frozen=True)
class SynthResult:
    slide_path: Path
    truth_path: Path
    width: int
    height: int
    mpp: float
    level_sizes: list[tuple[int, int]]
    tissue_area_mm2: float
    nerve_count: int
    pni_count: int
    tumor_count: int
    immune_count: int


def make_synthetic_slide(out_dir: str | Path, settings: SynthSettings = SynthSettings(),
                         progress: bool = False) -> SynthResult:
    """Write ``<out_dir>/<name>.svs|.tiff`` and ``<out_dir>/<name>.geojson`` (truth in level-0 pixels)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = settings
    width, height = int(round(s.width_mm * 1000 / s.mpp)), int(round(s.height_mm * 1000 / s.mpp))
    layout: Layout = make_layout(s.seed, width * s.mpp, height * s.mpp, s.tissue_fraction)
    tiled = s.glass == "tiled" or (s.glass == "auto" and width * height > TILED_GLASS_PX)
    renderer = TileRenderer(layout, s.mpp, Stain.jittered(s.seed, s.stain_jitter), tiled_glass=tiled)
    slide_path = out / f"{s.stem}.{s.fmt}"
    with tqdm(total=height, unit="row", desc=f"synth {slide_path.name}", disable=not progress) as bar:
        sizes = write_pyramid(slide_path, width, height, renderer.render, s.mpp, s.fmt, progress=bar.update,
                              glass=renderer.glass_tile)
    feats = truth_features(layout, s.mpp)
    truth_path = write_geojson(out / f"{s.stem}.geojson", feats)
    pni = sum(1 for f in feats if f.classification == "Nerve: PNI")
    return SynthResult(slide_path, truth_path, width, height, s.mpp, sizes, layout.tissue_area_mm2,
                       len(layout.nerves), pni, len(layout.tumors), len(layout.immune))


def cached_synthetic_slide(out_dir: str | Path, settings: SynthSettings) -> tuple[Path, Path]:
    """The slide and truth paths of ``settings`` in ``out_dir``, made only when either file is missing (the
    truth is written last, so a slide cut short by an interruption is made again)."""
    out = Path(out_dir)
    slide, truth = out / f"{settings.stem}.{settings.fmt}", out / f"{settings.stem}.geojson"
    if not (slide.exists() and truth.exists()):
        log.info("making synthetic slide %s", slide)
        made = make_synthetic_slide(out, settings)
        slide, truth = made.slide_path, made.truth_path
    return slide, truth
