"""Small per-process thread pools for work whose heavy parts release the GIL (JPEG decoding, OpenSlide, GEOS
through shapely, OpenCV, NumPy): reading a batch's tiles, and the post-processing steps that handle many
objects or image bands at once. On the CPU the network keeps every core busy while it runs; everything else
runs between its batches or after them, single-threaded unless it is spread like this.

A task given to a pool must not wait on the same pool (with two threads that could deadlock).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import shapely

T = TypeVar("T")
R = TypeVar("R")

READ_THREADS = 2  # a batch's tiles are read by two threads (more gained nothing on 2 cores)
_POOLS: dict[tuple[int, str], ThreadPoolExecutor] = {}  # per process: a forked reader process makes its own


def default_threads() -> int:
    """One thread per CPU this process may run on (its affinity mask, not the machine's count), up to 4."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, usable))


def pool(name: str, threads: int | None = None) -> ThreadPoolExecutor:
    """This process's pool called ``name`` (made on first use, with ``threads`` or default_threads())."""
    key = (os.getpid(), name)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(max_workers=threads or default_threads(),
                                         thread_name_prefix=f"nervedet-{name}")
    return _POOLS[key]


def thread_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]`` spread over the "work" pool, in order; one item runs here."""
    items = list(items)
    if len(items) < 2:
        return [fn(x) for x in items]
    return list(pool("work").map(fn, items))


def _chunks(cost: np.ndarray, parts: int) -> list[np.ndarray]:
    """Indices 0..len(cost) - 1 in ``parts`` groups of about equal total cost: the costliest first, each to
    the cheapest group so far (a slide's few large nerves in one group left the other threads idle)."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    load = [0.0] * parts
    for i in np.argsort(-cost, kind="stable"):
        k = load.index(min(load))
        groups[k].append(int(i))
        load[k] += float(cost[i])
    return [np.array(g) for g in groups if g]


def buffer_all(geoms: list, distance: float | np.ndarray, **kwargs) -> np.ndarray:
    """``shapely.buffer`` of each geometry by ``distance`` (one for all, or one each), an object array in
    order; the geometries shared out over the threads by their cost: the vertex count, three times that to
    shrink (GEOS shrinks a large wiggly outline about three times slower than it grows it)."""
    arr = np.empty(len(geoms), dtype=object)
    arr[:] = geoms
    dist = np.broadcast_to(np.asarray(distance, dtype=float), arr.shape)
    cost = shapely.get_num_coordinates(arr) * np.where(dist < 0, 3.0, 1.0)
    out = np.empty(len(geoms), dtype=object)
    groups = _chunks(cost, default_threads()) if len(arr) else []
    for g, b in zip(groups, thread_map(lambda g: shapely.buffer(arr[g], dist[g], **kwargs), groups)):
        out[g] = b
    return out
