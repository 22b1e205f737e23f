import numpy as np
import shapely
from shapely.geometry import Point

from nervedet.threads import _chunks, buffer_all


def test_buffer_all_keeps_the_order_and_each_geometrys_own_distance() -> None:
    # sizes that differ widely, so the groups by cost are not the list's order
    geoms = [Point(i * 100, 0).buffer(5 + 10 * (i % 3), quad_segs=4 * (1 + i % 4)) for i in range(11)]
    dist = np.array([(-1.0) ** i * (1 + i % 3) for i in range(11)])
    got = buffer_all(geoms, dist, quad_segs=8)
    want = [shapely.buffer(g, d, quad_segs=8) for g, d in zip(geoms, dist)]
    assert len(got) == len(geoms)
    assert all(a.equals_exact(b, 1e-9) for a, b in zip(got, want))
    same = buffer_all(geoms, 3.0, quad_segs=8)  # one distance for all
    assert all(a.equals_exact(shapely.buffer(g, 3.0, quad_segs=8), 1e-9) for a, g in zip(same, geoms))


def test_chunks_share_out_every_index_once_by_cost() -> None:
    cost = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 6.0])
    groups = _chunks(cost, 2)
    assert sorted(np.concatenate(groups).tolist()) == list(range(7))
    # the costliest first: 6 against six 1s (in the list's order: 3 against 3 + 6)
    assert sorted(float(cost[g].sum()) for g in groups) == [6.0, 6.0]
