"""nervedet: nerves, perineural invasion and immune cells in H&E whole-slide images (the public API)."""

from nervedet._version import __version__
from nervedet.evaluate import EvaluationReport, evaluate_paths
from nervedet.geojson import Feature, read_geojson, write_geojson
from nervedet.pni import PniResult, PniSettings, grade_nerve
from nervedet.slide import Slide, SlideError, TileSpec, open_slide
from nervedet.synth import SynthSettings, make_synthetic_slide
from nervedet.tissue import TissueMask, TissueSettings, detect_tissue, tile_grid

_LAZY = {"load_model": "nervedet.weights", "Model": "nervedet.weights", "WeightsError": "nervedet.weights",
         "ModelConfig": "nervedet.model", "analyze_slide": "nervedet.analyze", "AnalysisSettings": "nervedet.analyze",
         "InferSettings": "nervedet.infer", "PostprocessSettings": "nervedet.postprocess",
         "run_cohort": "nervedet.cohort", "SlideResult": "nervedet.results", "NerveRecord": "nervedet.results",
         "SlideMetrics": "nervedet.results", "CohortRow": "nervedet.results"}


def __getattr__(name: str):
    """The torch-based parts load on first use, so that `import nervedet` stays quick."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nervedet' has no attribute {name!r}")


__all__ = [
    "EvaluationReport",
    "Feature",
    "PniResult",
    "PniSettings",
    "Slide",
    "SlideError",
    "SynthSettings",
    "TileSpec",
    "TissueMask",
    "TissueSettings",
    "__version__",
    "detect_tissue",
    "evaluate_paths",
    "grade_nerve",
    "make_synthetic_slide",
    "open_slide",
    "read_geojson",
    "tile_grid",
    "write_geojson",
    *sorted(_LAZY),
]
