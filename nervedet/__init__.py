"""nervedet: nerves, perineural invasion and immune cells in H&E whole-slide images (the public API)."""

from nervedet._version import __version__
from nervedet.evaluate import EvaluationReport, evaluate_paths
from nervedet.geojson import Feature, read_geojson, write_geojson
from nervedet.pni import PniResult, PniSettings, grade_nerve
from nervedet.slide import Slide, SlideError, TileSpec, open_slide
from nervedet.synth import SynthSettings, make_synthetic_slide
from nervedet.tissue import TissueMask, TissueSettings, detect_tissue, tile_grid

__all__ = [
    "__version__", "open_slide", "Slide", "SlideError", "TileSpec", "detect_tissue", "tile_grid", "TissueMask",
    "TissueSettings", "read_geojson", "write_geojson", "Feature", "grade_nerve", "PniSettings", "PniResult",
    "make_synthetic_slide", "SynthSettings", "evaluate_paths", "EvaluationReport",
]
