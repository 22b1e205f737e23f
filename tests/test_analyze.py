"""One slide end to end with a network whose answer is known: tissue spread far apart is run region by region,
each with its own canvas, and gives the same objects and metrics as one canvas over all of it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import nervedet.infer as infer
from nervedet.analyze import AnalysisSettings, analyze_slide
from nervedet.infer import InferSettings
from tests.fakes import GREEN, RED, TISSUE, draw_cells, fake_model

REAL_STITCHER = infer.Stitcher


@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    """Two pieces of tissue 1.1 mm apart on glass, at 0.5 µm/px, each with tumour, a nerve and immune cells."""
    img = np.full((2400, 2800, 3), 255, np.uint8)
    for x0, y0 in ((0, 0), (1800, 1500)):
        img[y0:y0 + 600, x0:x0 + 700] = TISSUE
        img[y0 + 40:y0 + 200, x0 + 300:x0 + 480] = RED
        img[y0 + 350:y0 + 420, x0 + 100:x0 + 260] = GREEN  # 70 µm from the tumour: in its peritumoral zone
        draw_cells(img, [(x0 + x, y0 + y) for x in range(20, 690, 45) for y in range(230, 330, 40)])
    path = tmp_path_factory.mktemp("analyze") / "spread.png"
    Image.fromarray(img).save(path)
    return path


def _analyze(path, max_canvas_mb: float, monkeypatch) -> tuple:
    canvases = []

    def recording(width, height, *args, **kwargs):
        canvases.append((width, height))
        return REAL_STITCHER(width, height, *args, **kwargs)

    monkeypatch.setattr(infer, "Stitcher", recording)
    settings = AnalysisSettings(infer=InferSettings(tile_size=256, overlap=64, workers=0, progress=False,
                                                    precision="fp32", max_canvas_mb=max_canvas_mb))
    return analyze_slide(path, model=fake_model(), mpp=0.5, settings=settings), canvases


def test_far_apart_tissue_gives_the_same_results_region_by_region_in_smaller_canvases(spread, monkeypatch) -> None:
    whole, one = _analyze(spread, 512.0, monkeypatch)
    split, two = _analyze(spread, 1.0, monkeypatch)  # 2 classes x 2400 x 2800 px > 1 MiB: split
    assert len(one) == 1 and one[0][0] >= 2500 and one[0][1] >= 2100
    assert len(two) == 2 and all(w < 800 and h < 700 for w, h in two)  # each region's own box
    assert whole.settings["regions"] == 1 and split.settings["regions"] == 2
    m1, m2 = whole.metrics, split.metrics
    for key in ("nerve_count", "pni_count", "immune_cell_count", "tissue_area_mm2", "tumor_area_mm2",
                "immune_density_peritumoral_per_mm2", "immune_density_perineural_per_mm2",
                "immune_density_intratumoral_per_mm2"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-9), key
    assert m1["nerve_count"] == 2 and m1["immune_cell_count"] == 2 * 15 * 3
    assert m1["immune_density_perineural_per_mm2"] > 0  # the zones were counted, in both regions
    for a, b in zip(whole.nerves, split.nerves):
        assert a.geometry.equals(b.geometry) and a.pni_grade == b.pni_grade
    assert np.array_equal(np.sort(whole.immune_cells, 0), np.sort(split.immune_cells, 0))
