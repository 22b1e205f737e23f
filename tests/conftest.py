"""Shared fixtures: the real sample data folder, and a writer for small pyramidal TIFF slides."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

BUNDLED_REAL = Path(__file__).resolve().parent / "data/real"


def real_data_dir() -> Path | None:
    """The real sample folder: $NERVEDET_REAL_DATA, the workplace's shared/data/real next to the repository
    or at /work/shared/data/real, else the copy of the few files the tests need in tests/data/real."""
    env = os.environ.get("NERVEDET_REAL_DATA")
    if env:
        return Path(env) if Path(env).is_dir() else None
    for path in (Path(__file__).resolve().parents[2] / "shared/data/real", Path("/work/shared/data/real"),
                 BUNDLED_REAL):
        if path.is_dir():
            return path
    return None


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real sample data folder (see :func:`real_data_dir`); tests skip with the reason when it is missing."""
    path = real_data_dir()
    if path is None:
        pytest.skip(f"real sample data folder not found (NERVEDET_REAL_DATA={os.environ.get('NERVEDET_REAL_DATA')})")
    return path


def write_pyramid_tiff(
    path: Path,
    levels: np.ndarray | Sequence[np.ndarray],
    mpp: float,
    n_levels: int = 3,
    compression: str = "jpeg",
    tile: int = 256,
) -> Path:
    """A generic tiled pyramidal TIFF that OpenSlide opens with its pyramid and mpp.

    `levels` is level 0 (reduced levels are 2× INTER_AREA steps) or the list of all levels. Reduced levels are
    written with subfiletype=1; resolution tags are in centimetres so OpenSlide reports openslide.mpp-x/y.
    """
    if isinstance(levels, np.ndarray):
        pyramid = [levels]
        for _ in range(n_levels - 1):
            h, w = pyramid[-1].shape[:2]
            pyramid.append(
                cv2.resize(pyramid[-1], (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
            )
    else:
        pyramid = list(levels)
    w0 = pyramid[0].shape[1]
    with tifffile.TiffWriter(path) as tw:
        for i, img in enumerate(pyramid):
            res = 1e4 / (mpp * w0 / img.shape[1])  # pixels per centimetre
            tw.write(
                img,
                tile=(tile, tile),
                compression=compression,
                photometric="rgb",
                subfiletype=1 if i else 0,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
    return path


@pytest.fixture(scope="session")
def pyramid_tiff() -> Callable[..., Path]:
    """`pyramid_tiff(path, level0_or_levels, mpp, n_levels=3, compression="jpeg", tile=256) -> path`."""
    return write_pyramid_tiff
