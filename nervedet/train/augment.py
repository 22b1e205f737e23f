"""Training augmentation: albumentations over image + label mask + immune-cell keypoints.

Geometry (flips, 90° rotations, a small affine, a light elastic warp) moves image, mask and points together;
colour (H&E stain jitter in HED space, brightness/contrast, blur, JPEG artefacts) touches the image only.
Borders that a warp invents are white in the image and IGNORE in the mask, so they are never learned.

Keypoints follow albumentations' convention (pixel centres at integer coordinates, format "xy");
:class:`nervedet.train.data.PatchDataset` converts from and to its own +0.5 convention around the call.

Two transforms are our own rather than albumentations':
- :class:`HEDJitter`: ``A.HEStain`` projects the image on two stain vectors and drops the residual, so even
  with no jitter it changes the colours (mean 11, max 88 grey levels on a real H&E tile). HEDJitter uses the
  full 3×3 Ruifrok-Johnston H/E/DAB basis: with no jitter it gives back the image exactly.
- :class:`LightElastic`: ``A.ElasticTransform`` moves keypoints either through an index mask (points within
  two pixels of each other are lost) or through a pure-Python inverse map (about 1 s per 256² tile).
  LightElastic inverts its smooth displacement field at the keypoints by fixed-point iteration.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np

from nervedet.model import ModelConfig
from nervedet.train.data import IGNORE

__all__ = ["HEDJitter", "LightElastic", "build_augment", "rgb_from_hed", "hed_from_rgb"]

WHITE = (255, 255, 255)

# Ruifrok & Johnston (2001) stain vectors, rows H, E, DAB (as in skimage.color), normalised to unit length.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


def hed_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB → (..., 3) float32 stain amounts H, E, DAB (optical density units)."""
    od = -np.log(np.maximum(rgb.astype(np.float32), 1.0) / 255.0)
    return (od @ _HED_FROM_RGB.astype(np.float32)).astype(np.float32)


def rgb_from_hed(hed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`hed_from_rgb` (rounded, clipped to uint8)."""
    od = hed.astype(np.float32) @ _RGB_FROM_HED.astype(np.float32)
    return np.clip(np.rint(255.0 * np.exp(-od)), 0, 255).astype(np.uint8)


class HEDJitter(A.ImageOnlyTransform):
    """H&E stain jitter (Tellez et al. 2018): in HED space, H ← H·a_H + b_H and E ← E·a_E + b_E with
    a ~ U(1 - scale, 1 + scale), b ~ U(-shift, shift); the DAB/residual channel is kept, so the identity
    jitter returns the image unchanged."""

    def __init__(self, scale: float = 0.2, shift: float = 0.03, p: float = 0.5):
        super().__init__(p=p)
        self.scale, self.shift = float(scale), float(shift)

    def get_params(self) -> dict[str, Any]:
        r = self.py_random
        return {"alpha": np.array([r.uniform(1 - self.scale, 1 + self.scale) for _ in range(2)], np.float32),
                "beta": np.array([r.uniform(-self.shift, self.shift) for _ in range(2)], np.float32)}

    def apply(self, img: np.ndarray, alpha: np.ndarray, beta: np.ndarray, **params: Any) -> np.ndarray:
        hed = hed_from_rgb(img)
        hed[..., :2] = hed[..., :2] * alpha + beta
        return rgb_from_hed(hed)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale", "shift")


class LightElastic(A.DualTransform):
    """A smooth random warp: displacements drawn on a grid of `spacing` px (standard deviation `amplitude`
    px), upsampled bicubically. Image: linear, white outside; mask: nearest, `fill_mask` outside;
    keypoints: moved exactly (the displacement field is inverted at each point by fixed-point iteration)."""

    def __init__(self, amplitude: float = 2.0, spacing: int = 32, fill_mask: int = IGNORE, p: float = 0.1):
        super().__init__(p=p)
        self.amplitude, self.spacing, self.fill_mask = float(amplitude), int(spacing), int(fill_mask)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        gh, gw = max(2, round(h / self.spacing) + 1), max(2, round(w / self.spacing) + 1)
        coarse = self.random_generator.normal(0.0, self.amplitude, size=(2, gh, gw)).astype(np.float32)
        dx = cv2.resize(coarse[0], (w, h), interpolation=cv2.INTER_CUBIC)
        dy = cv2.resize(coarse[1], (w, h), interpolation=cv2.INTER_CUBIC)
        return {"dx": dx, "dy": dy}

    @staticmethod
    def _maps(dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = dx.shape
        gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        return gx + dx, gy + dy

    def apply(self, img: np.ndarray, dx: np.ndarray, dy: np.ndarray, **params: Any) -> np.ndarray:
        mx, my = self._maps(dx, dy)
        fill = WHITE[: img.shape[2]] if img.ndim == 3 else 255
        return cv2.remap(img, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=fill)

    def apply_to_mask(self, mask: np.ndarray, dx: np.ndarray, dy: np.ndarray, **params: Any) -> np.ndarray:
        mx, my = self._maps(dx, dy)
        return cv2.remap(mask, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=self.fill_mask)

    def apply_to_keypoints(self, keypoints: np.ndarray, dx: np.ndarray, dy: np.ndarray,
                           **params: Any) -> np.ndarray:
        # Output pixel q shows source pixel q + d(q); a point p moves to the q with q + d(q) = p.
        if not len(keypoints):
            return keypoints
        out = keypoints.copy()
        p = keypoints[:, :2].astype(np.float32)
        q = p.copy()
        for _ in range(8):
            d = np.stack([_bilinear(dx, q), _bilinear(dy, q)], axis=1)
            q = p - d
        out[:, :2] = q
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("amplitude", "spacing", "fill_mask")


def _bilinear(field: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear samples of a (h, w) field at (x, y) points (integer = pixel centre), clamped at the edges."""
    h, w = field.shape
    x = np.clip(xy[:, 0], 0, w - 1)
    y = np.clip(xy[:, 1], 0, h - 1)
    x0, y0 = np.minimum(np.floor(x).astype(np.intp), w - 2), np.minimum(np.floor(y).astype(np.intp), h - 2)
    x0, y0 = np.maximum(x0, 0), np.maximum(y0, 0)
    fx, fy = x - x0, y - y0
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    return (field[y0, x0] * (1 - fx) * (1 - fy) + field[y0, x1] * fx * (1 - fy)
            + field[y1, x0] * (1 - fx) * fy + field[y1, x1] * fx * fy)


def build_augment(config: ModelConfig, strength: float = 1.0) -> A.Compose:
    """The training augmentation for a model config; `strength` scales every non-dihedral transform
    (0: flips and 90° rotations only). Call as ``aug(image=rgb_uint8, mask=uint8, keypoints=(N, 2))``."""
    s = max(0.0, float(strength))
    transforms: list[Any] = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=1.0)]
    if s > 0:
        sigma_px = config.heatmap_sigma_um / config.analysis_mpp
        transforms += [
            A.Affine(scale=(1 - 0.1 * s, 1 + 0.1 * s), rotate=(-15 * s, 15 * s), interpolation=cv2.INTER_LINEAR,
                     mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, fill=WHITE,
                     fill_mask=IGNORE, p=min(1.0, 0.5 * s)),
            LightElastic(amplitude=max(1.0, sigma_px) * s, spacing=max(16, config.tile_size // 8),
                         fill_mask=IGNORE, p=min(1.0, 0.1 * s)),
            HEDJitter(scale=0.2 * s, shift=0.03 * s, p=min(1.0, 0.8 * s)),
            A.RandomBrightnessContrast(brightness_limit=0.1 * s, contrast_limit=0.1 * s, p=min(1.0, 0.5 * s)),
            A.GaussianBlur(blur_limit=0, sigma_limit=(0.1, 0.2 + 0.8 * s), p=min(1.0, 0.2 * s)),
            A.ImageCompression(quality_range=(60, 95), p=min(1.0, 0.3 * s)),
        ]
    return A.Compose(
        transforms,
        keypoint_params=A.KeypointParams(format="xy", remove_invisible=True),
        mask_interpolation=cv2.INTER_NEAREST,
    )
