"""Training data: label masks, immune points and heatmaps, regions, QuPath input, sampling, splits,
augmentation alignment and negatives (nervedet.train.data and nervedet.train.augment)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
import torch
from scipy import ndimage
from shapely.geometry import Point, box, mapping

from nervedet.geojson import Feature, read_geojson, write_geojson
from nervedet.model import ModelConfig
from nervedet.synth import SynthSettings, make_synthetic_slide
from nervedet.train.augment import build_augment, hed_from_rgb, rgb_from_hed
from nervedet.train.data import IGNORE, MAX_POINTS, NOT_NERVE, AnnotatedSlide, Patch, SamplingWeights, SlideSpec
from nervedet.train.dataset import PatchDataset, describe, render_heatmap, split_by_slide
from tests.conftest import real_data_dir

CFG = ModelConfig(tile_size=256)  # the patch geometry below is laid out for 256-px patches
NERVE, TUMOR = CFG.class_index("Nerve"), CFG.class_index("Tumor")
SIGMA_PX = CFG.heatmap_sigma_um / CFG.analysis_mpp


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_data")
    result = make_synthetic_slide(out, SynthSettings(seed=1, width_mm=0.6, height_mm=0.6, mpp=0.5))
    return result


@pytest.fixture(scope="module")
def truth(synth):
    feats = read_geojson(synth.truth_path)
    nerves = [f.geometry for f in feats if f.classification and f.classification.startswith("Nerve")]
    tumors = [f.geometry for f in feats if f.classification == "Tumor"]
    points = np.array([f.centroid for f in feats if f.classification == "Immune cells"])
    return {"features": feats, "nerves": nerves, "tumors": tumors, "points": points}


@pytest.fixture(scope="module")
def annotated(synth):
    return AnnotatedSlide(SlideSpec(synth.slide_path, synth.truth_path), CFG)


def _expected(truth, x, y, t, scale):
    """Nerve and tumour masks from shapely contains at pixel centres (nerve wins, except over tumour that lies
    inside a nerve)."""
    cols, rows = np.meshgrid(np.arange(t) + x + 0.5, np.arange(t) + y + 0.5)
    X, Y = cols / scale, rows / scale  # level-0 px
    nerves = shapely.union_all(truth["nerves"])
    inner = [g for g in truth["tumors"] if g.intersection(nerves).area >= 0.5 * g.area]
    outer = [g for g in truth["tumors"] if g.intersection(nerves).area < 0.5 * g.area]
    nested = shapely.contains_xy(shapely.union_all(inner), X, Y) if inner else np.zeros(X.shape, bool)
    nerve = shapely.contains_xy(nerves, X, Y) & ~nested
    tumor = (shapely.contains_xy(shapely.union_all(outer), X, Y) & ~nerve & ~nested) | nested
    return nerve, tumor


def _dice(a, b):
    return 2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


@pytest.mark.parametrize("analysis_mpp", [0.5, 1.0])
def test_patch_labels_match_truth_polygons(synth, truth, analysis_mpp):
    cfg = ModelConfig(analysis_mpp=analysis_mpp, tile_size=128)
    a = AnnotatedSlide(SlideSpec(synth.slide_path, synth.truth_path), cfg)
    scale = synth.mpp / analysis_mpp
    got_n, exp_n, got_t, exp_t = [], [], [], []
    for g in truth["nerves"] + truth["tumors"]:
        c = g.centroid
        x, y = math.floor(c.x * scale) - 64, math.floor(c.y * scale) - 64
        p = a.patch(x, y)
        assert p.image.shape == (128, 128, 3) and p.image.dtype == np.uint8
        assert p.mask.shape == (128, 128) and p.mask.dtype == np.uint8
        nerve, tumor = _expected(truth, x, y, 128, scale)
        inside = box(0, 0, synth.width * scale, synth.height * scale)
        cols, rows = np.meshgrid(np.arange(128) + x + 0.5, np.arange(128) + y + 0.5)
        in_slide = shapely.contains_xy(inside, cols, rows)
        assert np.all(p.mask[in_slide] != IGNORE)  # no region: the whole slide is labelled
        assert np.all(p.mask[~in_slide] == IGNORE)
        got_n.append(p.mask == NERVE), exp_n.append(nerve), got_t.append(p.mask == TUMOR), exp_t.append(tumor)
    assert np.concatenate(exp_n).sum() > 1000 and np.concatenate(exp_t).sum() > 1000
    assert _dice(np.concatenate(got_n), np.concatenate(exp_n)) >= 0.98
    assert _dice(np.concatenate(got_t), np.concatenate(exp_t)) >= 0.98
    a.close()


def test_immune_points_are_heatmap_peaks(annotated, truth):
    pts = truth["points"]
    # the 128 px window (from a 32 px grid) holding most immune cells
    best = max(((x, y) for x in range(0, 1072, 32) for y in range(0, 1072, 32)),
               key=lambda o: np.sum((pts[:, 0] >= o[0]) & (pts[:, 0] < o[0] + 128)
                                    & (pts[:, 1] >= o[1]) & (pts[:, 1] < o[1] + 128)))
    x, y = best[0] - 64, best[1] - 64
    ds = PatchDataset([annotated], CFG, length=1, seed=0)
    item = ds.make_item(annotated, x, y)
    t = CFG.tile_size
    sel = (pts[:, 0] >= x) & (pts[:, 0] < x + t) & (pts[:, 1] >= y) & (pts[:, 1] < y + t)
    want = pts[sel] - [x, y]
    n = int(item["n_points"])
    assert n == len(want) >= 10
    got = item["points"][:n].numpy()
    assert np.all(item["points"][n:].numpy() == -1) and item["points"].shape == (MAX_POINTS, 2)
    np.testing.assert_allclose(got[np.lexsort(got.T)], want[np.lexsort(want.T)], atol=1e-3)
    heat = item["heatmap"][0].numpy()
    assert heat.max() == pytest.approx(1.0)
    for px, py in got:
        c, r = int(px), int(py)
        assert heat[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2].max() == pytest.approx(1.0)
    # well separated points: exactly one local maximum each, with the configured sigma
    maxima, k = ndimage.label((heat == ndimage.maximum_filter(heat, size=3)) & (heat > 0.5))
    nn = np.array([np.sort(np.hypot(*(got - q).T))[1] if n > 1 else np.inf for q in got])
    isolated = got[nn > 5 * SIGMA_PX]
    assert len(isolated) >= 3
    for px, py in isolated:
        c, r = int(px), int(py)
        assert heat[r, c] == pytest.approx(1.0)
        assert len(np.unique(maxima[max(r - 4, 0) : r + 5, max(c - 4, 0) : c + 5])) == 2  # 0 and one label
        if 3 <= c < t - 3:
            assert heat[r, c + 2] == pytest.approx(math.exp(-4 / (2 * SIGMA_PX**2)), abs=1e-4)
    assert k <= n


def test_render_heatmap_one_peak_per_separated_point():
    rng = np.random.default_rng(3)
    grid = np.stack(np.meshgrid(np.arange(20, 240, 25), np.arange(20, 240, 25)), -1).reshape(-1, 2)
    pts = grid + rng.uniform(0, 1, grid.shape)
    heat = render_heatmap(pts, (256, 256), SIGMA_PX)
    _, k = ndimage.label((heat == ndimage.maximum_filter(heat, size=3)) & (heat > 0.5))
    assert k == len(pts)
    assert np.all(heat[pts[:, 1].astype(int), pts[:, 0].astype(int)] == 1.0)


@pytest.mark.parametrize("region_class", ["Region*", None])
def test_region_bounds_the_labelled_area(synth, truth, annotated, tmp_path, region_class):
    region = box(300.0, 250.0, 760.0, 820.0)  # level-0 px (= analysis px here)
    hole = box(320.0, 600.0, 420.0, 700.0)  # QuPath's Ignore* class: unlabelled
    rect = region.difference(hole)
    feats = list(truth["features"]) + [Feature(region, "annotation", region_class),
                                       Feature(hole, "annotation", "Ignore*")]
    path = write_geojson(tmp_path / "with_region.geojson", feats)
    a = AnnotatedSlide(SlideSpec(synth.slide_path, path), CFG)
    pts = truth["points"]
    inside = shapely.contains_xy(rect, pts[:, 0], pts[:, 1])
    assert 0 < inside.sum() < len(pts)
    assert a.count("immune") == inside.sum()
    assert shapely.contains_xy(rect, a.points[:, 0], a.points[:, 1]).all()
    for x, y in ((200, 150), (600, 700), (250, 560)):
        p, full = a.patch(x, y), annotated.patch(x, y)
        cols, rows = np.meshgrid(np.arange(256) + x + 0.5, np.arange(256) + y + 0.5)
        within = shapely.contains_xy(rect, cols, rows)
        assert within.any() and (~within).any()
        assert np.all(p.mask[~within] == IGNORE) and not p.heat_valid[~within].any()
        assert np.array_equal(p.mask[within], full.mask[within]) and np.all(p.mask[within] != IGNORE)
        assert np.all(full.mask != IGNORE)  # without the region the whole patch is labelled
        assert shapely.contains_xy(rect, p.points[:, 0] + x, p.points[:, 1] + y).all()
        assert len(p.points) < len(full.points)
    # tissue tiles overlap the labelled area
    rng = np.random.default_rng(0)
    tissue_only = SamplingWeights.only("tissue")
    for ox, oy in a.sample_origins(rng, 40, tissue_only):
        assert np.any(a.mask_at(ox, oy) != IGNORE)
    a.close()


def test_qupath_style_input_gives_the_same_labels(synth, truth, annotated, tmp_path):
    raw = []
    for f in truth["features"]:
        if f.classification == "Immune cells":
            x, y = f.centroid  # a hexagonal nucleus outline, centred on the point
            ang = np.arange(6) * np.pi / 3
            ring = np.c_[x + 3 * np.cos(ang), y + 3 * np.sin(ang)]
            geom = {"type": "Polygon", "coordinates": [ring.tolist() + [ring[0].tolist()]]}
            props = {"object_type": "detection", "classification": {"names": ["Immune cells"]}}
        else:
            geom = mapping(f.geometry)
            props = {"object_type": "annotation", "classification": {"names": f.classification.split(": ")}}
        raw.append({"type": "Feature", "geometry": geom, "properties": props})
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps(raw))  # a bare array, as QuPath's "export as array" writes
    b = AnnotatedSlide(SlideSpec(synth.slide_path, path), CFG)
    assert b.count("nerve") == annotated.count("nerve") and b.count("tumor") == annotated.count("tumor")
    pa, pb = annotated.points, b.points
    assert len(pb) == len(pa)
    np.testing.assert_allclose(pb[np.lexsort(pb.T)], pa[np.lexsort(pa.T)], atol=1e-3)
    for x, y in ((0, 0), (300, 500), (944, 944)):
        assert np.array_equal(b.mask_at(x, y), annotated.mask_at(x, y))
    b.close()


def test_sampling_favours_nerves_per_object(annotated):
    rng = np.random.default_rng(1)
    only_nerve = SamplingWeights.only("nerve")
    t = CFG.tile_size
    origins = annotated.sample_origins(rng, 120, only_nerve)
    with_nerve = [np.any(annotated.mask_at(x, y) == NERVE) for x, y in origins]
    assert np.mean(with_nerve) >= 0.95
    n_obj = annotated.count("nerve")
    areas = np.array([g.area for g in annotated.objects["nerve"]])
    assert areas.max() > 3 * areas.min()  # the test needs small and large nerves
    def tally(weights: SamplingWeights, category: str, n: int) -> np.ndarray:
        counts = np.zeros(n_obj)
        for _ in range(n):
            s = annotated.sample(rng, weights)
            assert s.category == category
            assert annotated.objects["nerve"][s.index].intersects(box(s.x, s.y, s.x + t, s.y + t))
            counts[s.index] += 1
        return counts

    counts = tally(only_nerve, "nerve", 600)
    expected = 600 / n_obj
    assert np.all(np.abs(counts - expected) < 0.35 * expected), counts  # area-weighting would fail this
    with pytest.raises(ValueError, match="stroma"):
        SamplingWeights.only("stroma")
    by_area = SamplingWeights.only("nerve_area")
    counts = tally(by_area, "nerve_area", 1200)
    expected = 1200 * areas / areas.sum()
    assert np.all(np.abs(counts - expected) < 0.25 * expected + 3 * np.sqrt(expected)), (counts, expected)
    only_tumour = SamplingWeights.only("tumor")
    tumour = annotated.sample_origins(rng, 40, only_tumour)
    assert np.mean([np.any(annotated.mask_at(x, y) == TUMOR) for x, y in tumour]) >= 0.95


def test_tumour_inside_a_nerve_is_tumour_and_a_tumour_area_around_a_nerve_is_not(synth, tmp_path):
    # level-0 px = analysis px here (slide at 0.5 µm/px)
    nerve_a, nested = Point(300, 300).buffer(80), Point(310, 300).buffer(25)  # intraneural invasion
    nerve_b, area = Point(800, 800).buffer(60), box(650, 650, 950, 950)  # a tumour area drawn around a nerve
    far = Point(300, 900).buffer(50)  # a nerve with no tumour near it
    feats = [Feature(g, "annotation", c) for g, c in
             ((nerve_a, "Nerve"), (nested, "Tumor"), (nerve_b, "Nerve"), (area, "Tumor"), (far, "Nerve"))]
    a = AnnotatedSlide(SlideSpec(synth.slide_path, write_geojson(tmp_path / "nested.geojson", feats)), CFG)
    m = a.mask_at(172, 172)  # covers nerve A
    assert m[310 - 172, 310 - 172] == TUMOR and m[300 - 172, 240 - 172] == NERVE  # nest centre; nerve beside it
    assert a.mask_at(672, 672)[800 - 672, 800 - 672] == NERVE  # nerve B wins over the area around it
    assert a.mask_at(672, 672)[10, 10] == TUMOR
    assert a.annotation_counts == {"nerve": 3, "tumor": 2}
    assert a.count("pni") == 2  # nerves A and B; the far nerve has no tumour near it
    rng = np.random.default_rng(0)
    only_pni = SamplingWeights.only("pni")
    for x, y in a.sample_origins(rng, 30, only_pni):
        mk = a.mask_at(x, y)
        assert np.any(mk == TUMOR) and np.any(mk == NERVE)
        assert not box(x, y, x + CFG.tile_size, y + CFG.tile_size).intersects(far)


def test_split_by_slide_and_fixed_validation(synth, annotated):
    specs = [SlideSpec(Path(f"/data/s{i}.svs"), Path(f"/data/s{i}.geojson")) for i in range(6)]
    specs += [SlideSpec(Path("/data/s2.svs"), Path("/data/s2_more.geojson")),  # a second label file
              SlideSpec(Path("/data/neg0.png"), None, 0.5, True), SlideSpec(Path("/data/neg1.png"), None, 0.5, True)]
    for seed in range(10):
        train, val = split_by_slide(specs, 0.3, seed)
        assert len(train) + len(val) == len(specs) and set(train) | set(val) == set(specs)
        assert not {s.slide for s in train} & {s.slide for s in val}
        assert val and any(not s.negative for s in train)
    assert split_by_slide(specs, 0.3, 4) == split_by_slide(specs, 0.3, 4)
    assert split_by_slide(specs, 0.0, 4) == (specs, [])

    spec = SlideSpec(synth.slide_path, synth.truth_path)
    d1 = PatchDataset([spec], CFG, length=4, seed=7)
    d2 = PatchDataset([AnnotatedSlide(spec, CFG)], CFG, length=4, seed=7)
    d3 = PatchDataset([annotated], CFG, length=4, seed=8)
    differs = False
    for i in range(4):
        a, b, c = d1[i], d2[i], d3[i]
        for key in a:
            assert torch.equal(a[key], b[key]), key
        differs |= not torch.equal(a["image"], c["image"])
        assert a["image"].dtype == torch.float32 and a["mask"].dtype == torch.int64
        assert a["heatmap"].shape == a["heat_valid"].shape == (1, CFG.tile_size, CFG.tile_size)
    assert differs


class _StubSlide:
    """A slide stand-in that returns one fixed patch (for the augmentation checks)."""

    immune_labelled = True

    def __init__(self, patch: Patch):
        self._patch = patch

    def patch(self, x, y):
        return self._patch


PALETTE = np.array([[220, 80, 80], [80, 200, 80], [80, 80, 220]], np.float32)


def _test_patch():
    t = CFG.tile_size
    mask = np.zeros((t, t), np.uint8)
    cv2.circle(mask, (170, 90), 55, NERVE, -1)
    mask[150:230, 30:140] = TUMOR
    image = PALETTE[mask].astype(np.uint8)
    g = np.arange(24, t - 16, 26)
    pts = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2).astype(np.float32) + 0.5  # pixel centres
    for px, py in pts.astype(int):
        image[py - 1 : py + 2, px - 1 : px + 2] = 0  # 3x3 black dot centred on the point
    return Patch(image, mask, pts, np.ones((t, t), bool))


def test_augmentation_keeps_image_mask_points_aligned(annotated):
    patch = _test_patch()
    stub = _StubSlide(patch)
    ds = PatchDataset([annotated], CFG, length=1, seed=0, augment=build_augment(CFG))
    mean = torch.tensor(CFG.mean).view(3, 1, 1)
    std = torch.tensor(CFG.std).view(3, 1, 1)
    saw_ignore = saw_change = False
    for seed in range(24):
        item = ds.make_item(stub, 0, 0, np.random.default_rng(seed))
        img = ((item["image"] * std + mean) * 255).permute(1, 2, 0).numpy()
        mask = item["mask"].numpy()
        n = int(item["n_points"])
        pts = item["points"][:n].numpy()
        assert 0 < n <= len(patch.points)
        saw_change |= not np.array_equal(mask, patch.mask)
        # dots sit on the transformed points, and the heatmap peaks there
        grey = img.mean(axis=2)
        heat = item["heatmap"][0].numpy()
        for px, py in pts:
            c, r = int(px), int(py)
            assert heat[r, c] == pytest.approx(1.0)
            if not (4 <= c < 252 and 4 <= r < 252):
                continue
            win = grey[r - 3 : r + 4, c - 3 : c + 4]
            ring = np.concatenate([win[0], win[-1], win[1:-1, 0], win[1:-1, -1]])
            w = np.clip(np.median(ring) - 25.0 - win, 0, None)  # darkness of the dot over its surroundings
            assert w.sum() > 0, (seed, px, py)
            yy, xx = np.mgrid[r - 3 : r + 4, c - 3 : c + 4] + 0.5  # pixel centres
            cx, cy = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
            assert math.hypot(cx - px, cy - py) < 0.5, (seed, px, py, cx, cy)
        # colours match the mask classes away from borders and dots
        dots = np.zeros(mask.shape, np.uint8)
        for px, py in pts.astype(int):
            cv2.circle(dots, (int(px), int(py)), 5, 1, -1)
        for cls in (0, TUMOR, NERVE):
            core = cv2.erode((mask == cls).astype(np.uint8), np.ones((7, 7), np.uint8)) & (dots == 0)
            if core.sum() < 50:
                continue
            d = np.linalg.norm(img[core > 0][:, None, :] - PALETTE[None], axis=2)
            assert np.mean(np.argmin(d, axis=1) == cls) >= 0.99, (seed, cls)
        # invented borders are IGNORE in the mask and white in the image
        border = cv2.erode((mask == IGNORE).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        if border.any():
            saw_ignore = True
            assert img[border].mean() > 200 and not item["heat_valid"][0].numpy()[mask == IGNORE].any()
    assert saw_ignore and saw_change


def test_affine_border_is_ignore():
    import albumentations as A

    aug = build_augment(CFG)
    affine = next(t for t in aug.transforms if isinstance(t, A.Affine))
    only = A.Compose([A.Affine(**{**affine.get_transform_init_args(), "rotate": (15, 15), "p": 1.0})],
                     keypoint_params=A.KeypointParams(format="xy"))
    patch = _test_patch()
    out = only(image=patch.image, mask=patch.mask, keypoints=patch.points - 0.5)
    for r, c in ((0, 0), (0, 255), (255, 0), (255, 255)):
        assert out["mask"][r, c] == IGNORE and out["image"][r, c].min() == 255


def test_hed_roundtrip_is_exact():
    rng = np.random.default_rng(0)
    rgb = rng.integers(1, 256, size=(64, 64, 3), dtype=np.uint8)
    assert np.abs(rgb_from_hed(hed_from_rgb(rgb)).astype(int) - rgb).max() <= 1


def _negative_image(tmp_path) -> Path:
    root = real_data_dir()
    found = sorted((root / "negatives").glob("*.png")) if root else []
    if found:
        return found[0]
    img = np.full((600, 700, 3), 245, np.uint8)
    cv2.ellipse(img, (350, 300), (300, 250), 0, 0, 360, (200, 110, 170), -1)
    rng = np.random.default_rng(0)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    path = tmp_path / "negative.png"
    cv2.imwrite(str(path), img[..., ::-1])
    return path


def test_negative_is_not_nerve_without_heat(tmp_path, synth):
    path = _negative_image(tmp_path)
    spec = SlideSpec(path, None, mpp=0.5, negative=True)
    a = AnnotatedSlide(spec, CFG)
    assert a.count("nerve") == a.count("immune") == 0
    rng = np.random.default_rng(0)
    sample = a.sample(rng)  # nerve/tumour/immune have no objects: tissue
    assert sample.category == "tissue"
    w, h = a.bounds[2], a.bounds[3]
    for x, y in ((0, 0), (sample.x, sample.y), (int(w) - 128, int(h) - 128)):
        p = a.patch(x, y)
        cols, rows = np.meshgrid(np.arange(256) + x + 0.5, np.arange(256) + y + 0.5)
        inside = (cols < w) & (rows < h) & (cols > 0) & (rows > 0)
        assert np.all(p.mask[inside] == NOT_NERVE) and np.all(p.mask[~inside] == IGNORE)
        assert not p.heat_valid.any() and len(p.points) == 0
    ds = PatchDataset([spec], CFG, length=3, seed=0, augment=build_augment(CFG))
    item = ds[0]
    assert set(np.unique(item["mask"].numpy())) <= {NOT_NERVE, IGNORE}
    assert item["heat_valid"].sum() == 0 and item["heatmap"].sum() == 0 and int(item["n_points"]) == 0
    summary = describe([SlideSpec(synth.slide_path, synth.truth_path), spec])
    assert summary["slides"] == 2 and summary["negatives"] == 1
    assert summary["nerves"] == synth.nerve_count and summary["tumor_regions"] == synth.tumor_count
    assert summary["immune_cells"] == synth.immune_count
    assert summary["labelled_area_mm2"] == pytest.approx(0.36 + w * h * 0.25e-6, rel=1e-3)
    a.close()


def test_light_elastic_moves_points_with_the_image():
    import albumentations as A

    from nervedet.train.augment import LightElastic

    patch = _test_patch()
    warp = A.Compose([LightElastic(amplitude=4.0, spacing=32, p=1.0)],
                     keypoint_params=A.KeypointParams(format="xy", remove_invisible=True))
    moved = 0.0
    for seed in range(3):
        warp.set_random_seed(seed)
        out = warp(image=patch.image, mask=patch.mask, keypoints=patch.points - 0.5)
        grey = out["image"].astype(np.float32).mean(axis=2)
        assert len(out["keypoints"]) == len(patch.points)
        for (px, py), (ox, oy) in zip(np.asarray(out["keypoints"]) + 0.5, patch.points):
            c, r = int(px), int(py)
            if not (4 <= c < 252 and 4 <= r < 252):
                continue
            win = grey[r - 3 : r + 4, c - 3 : c + 4]
            w = np.clip(100.0 - win, 0, None)
            yy, xx = np.mgrid[r - 3 : r + 4, c - 3 : c + 4] + 0.5
            cx, cy = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
            assert math.hypot(cx - px, cy - py) < 0.5
            moved = max(moved, math.hypot(px - ox, py - oy))
    assert moved > 2.0  # the warp did move the points
