"""H&E colour by Beer–Lambert mixing of haematoxylin and eosin optical densities, with a seeded stain jitter."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Optical-density vectors (R, G, B) of haematoxylin and eosin: the reference H&E vectors of Macenko et al.
# (2009), closer to real scans than Ruifrok's; checked against the real samples (docs/synth_vs_real.png).
H_OD = np.array([0.5626, 0.7201, 0.4062])
E_OD = np.array([0.2159, 0.8012, 0.5581])


@dataclass(frozen=True)
class Stain:
    h_vector: tuple[float, float, float]
    e_vector: tuple[float, float, float]
    h_scale: float
    e_scale: float
    background: tuple[float, float, float]  # glass brightness per channel (0..255)

    @classmethod
    def jittered(cls, seed: int, amount: float = 1.0) -> Stain:
        """A scanner-and-lab stain: vectors, strengths and glass colour jittered from a seed."""
        rng = np.random.default_rng([seed, 31])

        def vec(v: np.ndarray) -> tuple[float, float, float]:
            w = np.clip(v + rng.normal(0, 0.05 * amount, 3), 0.01, None)
            return tuple(float(c) for c in w / np.linalg.norm(w))

        return cls(
            h_vector=vec(H_OD),
            e_vector=vec(E_OD),
            h_scale=float(rng.uniform(1 - 0.18 * amount, 1 + 0.18 * amount)),
            e_scale=float(rng.uniform(1 - 0.22 * amount, 1 + 0.22 * amount)),
            background=tuple(float(c) for c in rng.uniform(236, 247) + rng.normal(0, 2.0, 3)),
        )

    def to_rgb(self, h: np.ndarray, e: np.ndarray, rng: np.random.Generator, noise: float = 1.6,
               window: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """RGB uint8 from haematoxylin and eosin optical-density maps (H×W float).

        ``window`` (top, left, height, width): only that part, bit for bit as if cropped from the whole (the
        noise is drawn row-major for the whole width, up to the window's last row).
        """
        top, left, hh, ww = window or (0, 0, *h.shape)
        n = rng.standard_normal((top + hh, h.shape[1], 3), dtype=np.float32)[top:, left:left + ww]
        h, e = h[top:top + hh, left:left + ww], e[top:top + hh, left:left + ww]
        hv = np.asarray(self.h_vector, np.float32) * self.h_scale
        ev = np.asarray(self.e_vector, np.float32) * self.e_scale
        od = h[..., None] * hv + e[..., None] * ev
        rgb = np.asarray(self.background, np.float32) * np.exp(-od.astype(np.float32))
        rgb += n * np.float32(noise)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)

    def glass_rgb(self, rng: np.random.Generator, h: int, w: int, top: int = 0, left: int = 0,
                  width: int | None = None, noise: float = 1.6) -> np.ndarray:
        """What ``to_rgb`` gives where both densities are 0 (bare glass), for the (h, w) window at (top, left) of
        an image ``width`` px wide, bit for bit, without the densities: the same float32 operations on the
        same noise draws (only the rows up to the window's last are drawn: the draws fill the image row-major)."""
        width = w if width is None else width
        n = rng.standard_normal((top + h, width, 3), dtype=np.float32)[top:, left:left + w]
        rgb = n * np.float32(noise)
        rgb += np.asarray(self.background, np.float32)  # background * exp(-0) is the background exactly
        rgb += np.float32(0.5)
        return np.clip(rgb, 0, 255, out=rgb).astype(np.uint8)
