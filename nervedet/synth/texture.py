"""Seeded, tileable noise sampled in global µm coordinates, so neighbouring tiles join without seams."""

from __future__ import annotations

import math

import cv2
import numpy as np

PERIOD = 256  # texels of each tileable noise texture


def _tileable_noise(rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise on a torus (filtered in Fourier space), scaled to zero mean, unit std."""
    white = rng.normal(size=(PERIOD, PERIOD))
    f = np.fft.fftfreq(PERIOD)
    g = np.exp(-2 * (math.pi * sigma) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    tex = np.real(np.fft.ifft2(np.fft.fft2(white) * g))
    tex = (tex - tex.mean()) / (tex.std() + 1e-9)
    return tex.astype(np.float32)


def _wrap(a: np.ndarray) -> np.ndarray:
    """Bring texel coordinates into (-PERIOD, PERIOD) cheaply; remap's BORDER_WRAP does the rest."""
    a = np.asarray(a, np.float32)
    return a - np.trunc(a * np.float32(1.0 / PERIOD)) * np.float32(PERIOD)


class NoiseBank:
    """A few tileable noise textures; ``sample`` reads one at arbitrary (u, v) texel coordinates."""

    def __init__(self, seed: int, n: int = 6):
        rng = np.random.default_rng([seed, 7919])
        self.textures = [_tileable_noise(rng, s) for s in (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)[:n]]

    def sample(self, k: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Bilinear sample of texture ``k`` at texel coordinates (u = column, v = row), wrapping around."""
        shape = np.shape(u)
        n = int(np.prod(shape))
        cols = 4096 if n > 4096 else max(n, 1)
        pad = (-n) % cols
        uu = np.pad(_wrap(np.ravel(u)), (0, pad)).reshape(-1, cols)
        vv = np.pad(_wrap(np.ravel(v)), (0, pad)).reshape(-1, cols)
        out = cv2.remap(self.textures[k], uu, vv, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
        return out.ravel()[:n].reshape(shape)


def fibres(
    bank: NoiseBank,
    k: int,
    x: np.ndarray,
    y: np.ndarray,
    theta: float,
    along_um: float,
    across_um: float,
    wave_amp_um: float = 0.0,
    wave_len_um: float = 50.0,
    ox: float = 0.0,
    oy: float = 0.0,
) -> np.ndarray:
    """Fibre texture running along angle ``theta`` (radians) through µm coordinates (x, y) around (ox, oy).

    Coordinates are rotated into the fibre frame (u along, v across); v is bent by a sine along u for wavy
    fibres. A texel spans ``along_um`` along the fibres and ``across_um`` across them.
    """
    dx, dy = x - ox, y - oy
    c, s = math.cos(theta), math.sin(theta)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    if wave_amp_um:
        v = v + wave_amp_um * np.sin(2 * math.pi * u / wave_len_um)
    return bank.sample(k, u / along_um, v / across_um)


ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)


def oriented_fibres(
    bank: NoiseBank,
    x: np.ndarray,
    y: np.ndarray,
    theta: np.ndarray,
    along_um: float,
    across_um: float,
    wave_amp_um: float,
    wave_len_um: float,
) -> np.ndarray:
    """Fibres following a smoothly varying orientation field: four fixed orientations blended by angle.

    Fixed orientations in global coordinates keep the texture free of shear where the field bends.
    """
    out = np.zeros_like(x, dtype=np.float32)
    wsum = np.zeros_like(out)
    for i, a in enumerate(ANGLES):
        w = np.maximum(np.cos(2 * (theta - a)), 0.0) ** 2
        out += w * fibres(bank, i % 3, x, y, a, along_um, across_um, wave_amp_um, wave_len_um)
        wsum += w
    return out / np.maximum(wsum, 1e-6) * 1.6  # blending lowers the contrast; restore it


def orientation_field(bank: NoiseBank, x: np.ndarray, y: np.ndarray, scale_um: float = 400.0) -> np.ndarray:
    """A smooth orientation field (radians, modulo pi) over the slide."""
    return (bank.sample(5, x / scale_um * 8, y / scale_um * 8) * 1.2 + 0.3).astype(np.float32)
