"""nervedet: nerves, perineural invasion and immune cells in H&E whole-slide images (the public API)."""

from nervedet._version import __version__
from nervedet.evaluate import EvaluationReport, evaluate_paths
from nervedet.geojson import Feature, read_geojson, write_geojson
from nervedet.pni import PniResult, PniSettings, grade_nerve
from nervedet.slide import Slide, SlideError, TileSpec, open_slide
from nervedet.synth import SynthSettings, make_synthetic_slide
from nervedet.tissue import TissueMask, TissueSettings, detect_tissue, tile_grid

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
]
