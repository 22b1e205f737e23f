"""Ground truth of a synthetic slide as QuPath features: nerves graded by the one PNI rule, tumour, immune cells."""

from __future__ import annotations

import numpy as np
import shapely
from shapely.affinity import scale as scale_geom
from shapely.geometry import Point

from nervedet import classes
from nervedet.geojson import Feature
from nervedet.geometry import max_feret, min_feret
from nervedet.pni import PniSettings, grade_nerve, tumor_union
from nervedet.synth.layout import Layout


def _px(geom, mpp: float):
    return scale_geom(geom, 1 / mpp, 1 / mpp, origin=(0, 0))


def truth_features(layout: Layout, mpp: float, pni: PniSettings = PniSettings()) -> list[Feature]:
    """Features in level-0 pixels at ``mpp``: every nerve, tumour region and immune cell of the layout."""
    tumors_px = [_px(t, mpp) for t in layout.tumors]
    tumor = tumor_union(tumors_px)
    feats: list[Feature] = []
    for t in tumors_px:
        feats.append(Feature(t, "annotation", classes.TUMOR))
    immune = layout.immune / mpp
    tree = shapely.STRtree([Point(p) for p in immune]) if len(immune) else None
    for n in layout.nerves:
        g = _px(n.outline, mpp)
        res = grade_nerve(g, tumor, mpp, pni)
        near = 0
        if tree is not None:
            idx = tree.query(g.buffer(100.0 / mpp), predicate="intersects")
            near = len(idx)
        d_um = res.distance_um if np.isfinite(res.distance_um) else None
        m = {
            "Area µm^2": g.area * mpp * mpp,
            "Perimeter µm": g.length * mpp,
            "Min diameter µm": min_feret(g) * mpp,
            "Max diameter µm": max_feret(g) * mpp,
            "Tumor encirclement %": 100.0 * res.encirclement,
            "PNI grade": float(res.grade),
            "Immune cells within 100 µm": float(near),
        }
        if d_um is not None:
            m["Distance to tumor µm"] = d_um
        feats.append(Feature(g, "annotation", classes.NERVE_PNI if res.is_pni else classes.NERVE, m,
                             name=n.pni_case or None))
    for x, y in immune:
        feats.append(Feature(Point(x, y), "detection", classes.IMMUNE))
    return feats
