"""One slide, end to end: slide → tissue → inference → postprocessing → :class:`SlideResult` with its metrics."""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from nervedet._version import __version__
from nervedet.infer import InferSettings, canvas_grid, canvas_regions, run_inference
from nervedet.paths import slide_stem
from nervedet.postprocess import Objects, PostprocessSettings, merge_objects, postprocess
from nervedet.results import SlideMetrics, SlideResult
from nervedet.slide import Slide, open_slide
from nervedet.tissue import TissueMask, TissueSettings, detect_tissue
from nervedet.weights import Model, load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysisSettings:
    infer: InferSettings = field(default_factory=InferSettings)
    post: PostprocessSettings = field(default_factory=PostprocessSettings)
    tissue: TissueSettings = field(default_factory=TissueSettings)
    tissue_mpp: float = 8.0  # µm/px of the tissue mask
    overlay_max_px: int = 2048  # the overlay's longer side at most
    overlay_min_mpp: float = 1.0  # and its pixels no finer than this (µm)
    overlay_coarser: float = 1.5  # a pyramid level up to this factor coarser is read as it is (Slide.thumbnail)

    def result_settings(self) -> dict[str, Any]:
        """The settings that change the results (not batch size, workers, compilation, the progress bar, or
        where JPEG tiles are decoded: it changes pixels by the decoders' rounding only, and run.json records
        the path used as "decode")."""
        d = asdict(self)
        for k in ("batch_size", "workers", "progress", "compile", "device_decode"):
            d["infer"].pop(k)
        return d

    def fingerprint(self, weights_sha256: str, mpp: float | None) -> str:
        text = json.dumps({"weights": weights_sha256, "mpp": mpp, "settings": self.result_settings()},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def slide_metrics(slide: Slide, objs: Objects, model: Model, settings: AnalysisSettings,
                  runtime_s: float) -> SlideMetrics:
    """DESIGN.md's metrics.json from the objects of one slide."""
    nerves, zone = objs.nerves, settings.post.zone_um
    near = [n for n in nerves if n.distance_to_tumor_um <= zone]
    tissue = objs.tissue_area_mm2
    za, zc = objs.zone_area_mm2, objs.zone_count
    return SlideMetrics(
        slide=slide.path.name, mpp=slide.mpp, analysis_mpp=model.config.analysis_mpp, tissue_area_mm2=tissue,
        tumor_area_mm2=objs.tumor_area_mm2, nerve_count=len(nerves),
        nerve_density_per_mm2=_ratio(len(nerves), tissue),
        intratumoral_nerve_count=sum(n.intratumoral for n in nerves),
        nerve_area_fraction=_ratio(sum(n.area_um2 for n in nerves) / 1e6, tissue),
        median_nerve_min_diameter_um=statistics.median(n.min_diameter_um for n in nerves) if nerves else None,
        pni_count=sum(n.is_pni for n in nerves), pni_fraction=_ratio(sum(n.is_pni for n in near), len(near)),
        immune_cell_count=len(objs.immune_xy), immune_density_per_mm2=_ratio(len(objs.immune_xy), tissue),
        immune_density_intratumoral_per_mm2=_ratio(zc["intratumoral"], za["intratumoral"]),
        immune_density_peritumoral_per_mm2=_ratio(zc["peritumoral"], za["peritumoral"]),
        immune_density_perineural_per_mm2=_ratio(zc["perineural"], za["perineural"]),
        weights_sha256=model.sha256, nervedet_version=__version__, runtime_s=round(runtime_s, 2))


def _infer_regions(model: Model, slide: Slide, tissue: TissueMask, settings: AnalysisSettings,
                   workdir: Path | None) -> tuple[Objects, dict[str, Any]]:
    """Inference and post-processing region by region (one region unless the tissue is spread far: see
    infer.canvas_regions), so only one region's canvas is held at a time; the objects merged."""
    mpp, s = model.config.analysis_mpp, settings.infer
    regions = canvas_regions(slide, tissue, mpp, s)
    total = sum(len(canvas_grid(slide, r, mpp, s).tiles) for r in regions)
    parts, tiles, pixels, seconds, precision, decode = [], 0, 0, 0.0, "none", "none"
    with tqdm(total=total, desc=slide.path.name, unit="tile", disable=not s.progress, leave=False,
              dynamic_ncols=True) as bar:
        for region in regions:
            out = run_inference(model, slide, region, s, workdir, bar=bar)
            parts.append(postprocess(out, region, settings.post))
            tiles, pixels, seconds = tiles + len(out.grid.tiles), pixels + out.grid.pixels, seconds + out.seconds
            precision = out.precision if out.precision != "none" else precision
            decode = out.decode if out.grid.tiles else decode
            del out  # the region's canvas goes before the next one is made
    stats = {"precision": precision, "decode": decode, "tiles": tiles, "network_mpx": round(pixels / 1e6, 3),
             "inference_s": round(seconds, 2),
             "regions": len(regions)}
    return merge_objects(parts), stats


def analyze_slide(slide: str | Path | Slide, model: Model | None = None, device: str = "auto",
                  mpp: float | None = None, settings: AnalysisSettings | None = None,
                  workdir: Path | None = None) -> SlideResult:
    """Find nerves, PNI, tumour and immune cells on one slide. ``slide`` is a path or an open Slide; ``mpp``
    overrides (or supplies) its pixel size; ``model`` defaults to the bundled weights on ``device``."""
    t0 = time.perf_counter()
    settings = settings or AnalysisSettings()
    model = model or load_model(None, device=device)
    own = not isinstance(slide, Slide)
    s = open_slide(slide, mpp=mpp) if own else slide
    try:
        tissue = detect_tissue(s, settings.tissue_mpp, settings.tissue)
        objs, inferred = _infer_regions(model, s, tissue, settings, workdir)
        overlay, overlay_mpp = s.thumbnail(max_size=settings.overlay_max_px, mpp=settings.overlay_min_mpp,
                                               coarser=settings.overlay_coarser)
        metrics = slide_metrics(s, objs, model, settings, time.perf_counter() - t0)
        return SlideResult(
            slide_path=s.path, stem=slide_stem(s.path), slide_metrics=metrics, nerves=objs.nerves,
            tumors=objs.tumors, immune_cells=objs.immune_xy, immune_probabilities=objs.immune_p, offset=s.offset,
            overlay=overlay, overlay_mpp=overlay_mpp,
            settings={"fingerprint": settings.fingerprint(model.sha256, mpp), **inferred,
                      **settings.result_settings()})
    finally:
        if own:
            s.close()
