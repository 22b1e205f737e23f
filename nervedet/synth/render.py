"""Render any rectangle of a synthetic slide from its layout: tissue classes, textures, nuclei, H&E colour.

Everything is a function of global coordinates and the seed, so tiles rendered separately join seamlessly
and a slide of any size is made tile by tile in bounded memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import shapely
from scipy.spatial import cKDTree
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from nervedet.synth import nuclei as N
from nervedet.synth import tissue_classes as C
from nervedet.synth.layout import Layout
from nervedet.synth.stain import Stain
from nervedet.synth.texture import NoiseBank, orientation_field, oriented_fibres

MARGIN_UM = 16.0  # rendered around each tile so nuclei and blur cross tile borders seamlessly
IMMUNE_BLOCK_UM = 256.0
TEXTURE_UM = 0.8  # finer pixels than half this get their textures on a 2x coarser grid
GLASS_TILE = 256  # px: the repeat of tiled glass (the pyramid's tile size, so its glass tiles are all alike)


@dataclass(frozen=True)
class Frame:
    """Local fibre frame of a lengthwise nerve or a bundle: fibres follow its wavy centre line."""

    axis: float
    origin: tuple[float, float]
    wave: tuple[float, float, float]  # the bundle's own waviness (amplitude, wavelength, phase)
    fine: tuple[float, float]  # fibre crimp (amplitude, wavelength) µm
    scale: tuple[float, float]  # texel size along and across the fibres, µm
    contrast: float
    texture: int


@dataclass(frozen=True)
class Item:
    cls: int
    geom: BaseGeometry
    frame: Frame | None = None


def _items(lay: Layout) -> list[Item]:
    """Paint items in drawing order (later ones paint over earlier ones)."""
    items = [Item(C.STROMA, lay.tissue)]
    items += [Item(C.FAT, f) for f in lay.fat]
    items += [Item(C.MUSCLE, b.outline, Frame(b.axis, b.origin, b.wave, (0.3, 40.0), (30.0, 2.2), 0.22, 2))
              for b in lay.muscle]
    items += [Item(C.WAVY, b.outline, Frame(b.axis, b.origin, b.wave, (3.5, 28.0), (16.0, 1.6), 0.45, 1))
              for b in lay.wavy]
    for v in lay.vessels:
        items += [Item(C.VWALL, v.outline), Item(C.LUMEN, v.lumen)]
    for n in lay.nerves:
        multi = len(n.fascicles) > 1
        items.append(Item(C.EPI if multi else C.PERI, n.outline))
        frame = (Frame(n.axis, n.origin, n.wave, (2.0, 22.0), (14.0, 0.9), 0.35, 3)
                 if n.longitudinal else None)
        for f in n.fascicles:
            if multi:
                items.append(Item(C.PERI, f))
            inner = f.buffer(-n.perineurium_um)
            if not inner.is_empty:
                items.append(Item(C.NERVE, inner, frame))
    for t in lay.tumors:
        items.append(Item(C.TUMOR, t))
        items += [Item(C.GLAND_LUMEN, shapely.Polygon(r)) for r in getattr(t, "interiors", [])]
    return items


def _fill(canvas: np.ndarray, geom: BaseGeometry, value: int, ox: float, oy: float, mpp: float) -> None:
    """Fill a (multi)polygon, holes kept, into ``canvas`` whose pixel (0, 0) corner sits at µm (ox, oy)."""
    shift = 4
    rings = []
    for poly in getattr(geom, "geoms", [geom]):
        if poly.geom_type != "Polygon" or poly.is_empty:
            continue
        for ring in (poly.exterior, *poly.interiors):
            xy = np.asarray(ring.coords)
            rings.append((((xy - (ox, oy)) / mpp - 0.5) * (1 << shift)).round().astype(np.int32))
    if rings:
        cv2.fillPoly(canvas, rings, int(value), cv2.LINE_8, shift)


class TileRenderer:
    """Renders RGB pixels of a layout at a pixel size (µm/px)."""

    def __init__(self, layout: Layout, mpp: float, stain: Stain | None = None, tiled_glass: bool = False):
        self.lay, self.mpp = layout, mpp
        self.stain = stain or Stain.jittered(layout.seed)
        self.bank = NoiseBank(layout.seed)
        self.items = _items(layout)
        self.frames = [it.frame for it in self.items]
        self.tree = shapely.STRtree([it.geom for it in self.items])
        self.fat = cKDTree(layout.fat_seeds) if len(layout.fat_seeds) >= 2 else None
        self.immune_blocks: dict[tuple[int, int], np.ndarray] = {}
        keys = np.floor(layout.immune / IMMUNE_BLOCK_UM).astype(int)
        for key in {tuple(k) for k in keys}:
            self.immune_blocks[key] = layout.immune[(keys[:, 0] == key[0]) & (keys[:, 1] == key[1])]
        self.lut_h = np.array([C.BASE_H[i] for i in range(len(C.BASE_H))], np.float32)
        self.lut_e = np.array([C.BASE_E[i] for i in range(len(C.BASE_E))], np.float32)
        # Tiled glass: bare-glass rectangles repeat one GLASS_TILE² patch of sensor noise, aligned to the global
        # pixel grid, instead of drawing fresh noise, so a pyramid writer can encode all its glass tiles once.
        self.glass_tile = (self.stain.glass_rgb(np.random.default_rng([layout.seed, 6]), GLASS_TILE, GLASS_TILE)
                           if tiled_glass else None)

    def is_glass(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        """Whether the µm rectangle holds no tissue and no cell: ``render`` would give bare glass there."""
        area = box(x0, y0, x1, y1)
        for i in self.tree.query(area):
            geom = self.items[i].geom
            shapely.prepare(geom)
            if shapely.intersects(geom, area):
                return False
        return not len(self._immune(x0, y0, x1, y1))

    def _immune(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Immune cell centres (N×2 µm) in the rectangle [x0, x1) × [y0, y1)."""
        B = IMMUNE_BLOCK_UM
        imm = [self.immune_blocks.get((i, j)) for j in range(int(y0 // B), int(y1 // B) + 1)
               for i in range(int(x0 // B), int(x1 // B) + 1)]
        imm = [p for p in imm if p is not None]
        if not imm:
            return np.zeros((0, 2))
        pts = np.concatenate(imm)
        return pts[(pts[:, 0] >= x0) & (pts[:, 1] >= y0) & (pts[:, 0] < x1) & (pts[:, 1] < y1)]

    def render(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of the level-0 pixel rectangle at (x0, y0)."""
        mpp = self.mpp
        m = int(math.ceil(MARGIN_UM / mpp))
        W, H = w + 2 * m, h + 2 * m
        ox, oy = (x0 - m) * mpp, (y0 - m) * mpp
        if self.is_glass(ox, oy, ox + W * mpp, oy + H * mpp):  # the common case on sparse slides: no tissue
            if self.glass_tile is not None:
                g, P = self.glass_tile, GLASS_TILE
                ty, tx = y0 % P, x0 % P
                return np.tile(g, (-(-(ty + h) // P), -(-(tx + w) // P), 1))[ty:ty + h, tx:tx + w]
            # exactly what the full path below gives with no tissue: densities 0, only the sensor noise
            return self.stain.glass_rgb(np.random.default_rng([self.lay.seed, 5, x0, y0]), h, w, m, m, W)
        cls = np.zeros((H, W), np.uint8)
        fid = np.zeros((H, W), np.uint16)
        area = box(ox, oy, ox + W * mpp, oy + H * mpp)
        for i in sorted(self.tree.query(area)):
            it = self.items[i]
            geom = it.geom if area.contains(it.geom.envelope) else it.geom.intersection(area)
            _fill(cls, geom, it.cls, ox, oy, mpp)
            if it.frame is not None:
                _fill(fid, geom, i + 1, ox, oy, mpp)
        # Textures vary on a scale of a micrometre or more: at a fine pixel size they are computed on a grid of
        # every k-th pixel and interpolated, which changes nothing visible and saves most of the time.
        k = 2 if mpp < TEXTURE_UM / 2 else 1
        Xc = (ox + (np.arange(0, W, k, dtype=np.float32) + 0.5) * mpp)[None, :]
        Yc = (oy + (np.arange(0, H, k, dtype=np.float32) + 0.5) * mpp)[:, None]
        Xc, Yc = np.broadcast_to(Xc, (Yc.shape[0], Xc.shape[1])), np.broadcast_to(Yc, (Yc.shape[0], Xc.shape[1]))
        hb, e, theta, phi = self._textures(cls[::k, ::k], fid[::k, ::k], Xc, Yc)
        grain = self.bank.sample(2, Xc / 0.5, Yc / 0.5)  # fine granularity of any stained tissue
        thick = 1.0 + 0.12 * self.bank.sample(5, Xc / 40.0, Yc / 40.0)  # section thickness varies slowly
        e = e * (1.0 + 0.18 * grain) * thick
        hb = hb * thick
        if k > 1:
            hb, e, thick = (cv2.resize(a, (W, H), interpolation=cv2.INTER_LINEAR) for a in (hb, e, thick))
        nuc = self._nuclei(cls, fid, theta, phi, ox, oy, k)
        hn = np.zeros_like(hb)
        mask = np.zeros_like(hb)
        N.draw(nuc, hn, e, mask, ox, oy, mpp)
        on = mask > 0
        if on.any():  # chromatin texture inside nuclei
            ys, xs = np.nonzero(on)
            hn[on] *= (0.85 + 0.15 * self.bank.sample(0, (ox + (xs + 0.5) * mpp) / 0.6,
                                                     (oy + (ys + 0.5) * mpp) / 0.6)) * thick[on]
        h_od = hb * (1 - mask) + hn
        e_od = e * (1 - 0.85 * mask)
        sigma = 0.3 / mpp
        h_od = cv2.GaussianBlur(h_od, (0, 0), sigma)
        e_od = cv2.GaussianBlur(e_od, (0, 0), sigma)
        rng = np.random.default_rng([self.lay.seed, 5, x0, y0])
        return self.stain.to_rgb(h_od, e_od, rng, window=(m, m, h, w))

    def _textures(self, cls, fid, X, Y):
        bank = self.bank
        hb = self.lut_h[cls]
        e = self.lut_e[cls]
        theta = orientation_field(bank, X, Y)
        phi = theta.copy()
        stroma = (cls == C.STROMA) | (cls == C.EPI)
        if stroma.any():
            coll = oriented_fibres(bank, X, Y, theta, 10.0, 0.8, 1.5, 45.0)
            clefts = bank.sample(4, X / 2.5, Y / 2.5)
            e[stroma] *= np.clip(0.8 + 0.22 * coll[stroma], 0.25, 1.5) * np.where(
                (coll[stroma] < -1.0) & (clefts[stroma] > 0.3), 0.35, 1.0)
        for c, k, scale, amp in ((C.TUMOR, 0, 1.2, 0.12), (C.NERVE, 1, 0.8, 0.3), (C.PERI, 2, 2.5, 0.1),
                                 (C.VWALL, 3, 2.0, 0.15), (C.MUSCLE, 2, 3.0, 0.1)):
            sel = cls == c
            if sel.any():
                t = bank.sample(k, X[sel] / scale, Y[sel] / scale)
                e[sel] *= np.clip(1.0 + amp * t, 0.3, 1.6)
                if c == C.NERVE:  # cut axons: small clear bubbles in the pale fibrillar interior
                    e[sel] *= np.where(t > 1.3, 0.55, 1.0)
                if c == C.TUMOR:
                    hb[sel] *= np.clip(1.0 + 0.25 * t, 0.5, 1.5)
        for f in np.unique(fid):
            if f == 0:
                continue
            it = self.items[int(f) - 1]
            sel = (fid == f) & (cls == it.cls)
            if not sel.any():
                continue
            fr = it.frame
            dx, dy = X[sel] - fr.origin[0], Y[sel] - fr.origin[1]
            c, s = math.cos(fr.axis), math.sin(fr.axis)
            u, v = dx * c + dy * s, -dx * s + dy * c
            amp, lam, ph = fr.wave
            v = v - amp * np.sin(2 * math.pi * u / lam + ph) + fr.fine[0] * np.sin(2 * math.pi * u / fr.fine[1])
            t = bank.sample(fr.texture, u / fr.scale[0], v / fr.scale[1])
            base = self.lut_e[it.cls]
            e[sel] = base * np.clip(1.0 + fr.contrast * t, 0.25, 1.8)
            if it.cls == C.NERVE:
                e[sel] *= np.where(t < -1.2, 0.5, 1.0)  # clefts between fibres
            phi[sel] = fr.axis + np.arctan(amp * 2 * math.pi / lam * np.cos(2 * math.pi * u / lam + ph))
        fat = cls == C.FAT
        if fat.any() and self.fat is not None:
            pts = np.c_[X[fat], Y[fat]]
            d, _ = self.fat.query(pts, k=2)
            membrane = (d[:, 1] - d[:, 0]) < 1.4
            e[fat] = np.where(membrane, 0.42, e[fat])
            hb[fat] = np.where(membrane, 0.04, hb[fat])
        return hb, e, theta, phi

    def _nuclei(self, cls, fid, theta, phi, ox, oy, k: int = 1) -> N.Nuclei:
        """Nuclei whose centres fall in the padded tile; ``theta``/``phi`` are on the k-times coarser grid."""
        mpp = self.mpp
        H, W = cls.shape
        B = N.BLOCK_UM
        parts = []
        for by in range(int(oy // B), int((oy + H * mpp) // B) + 1):
            for bx in range(int(ox // B), int((ox + W * mpp) // B) + 1):
                x, y, rng = N.candidates(self.lay.seed, bx, by)
                n = len(x)
                acc, ang, u3 = rng.uniform(size=n), rng.uniform(0, math.pi, n), rng.uniform(size=(n, 3))
                ix, iy = ((x - ox) / mpp).astype(int), ((y - oy) / mpp).astype(int)
                inside = (ix >= 0) & (iy >= 0) & (ix < W) & (iy < H)
                ix, iy = np.clip(ix, 0, W - 1), np.clip(iy, 0, H - 1)
                c = cls[iy, ix]
                p = np.array([N.ACCEPT.get(int(k), 0.0) for k in c])
                keep = inside & (acc < p)
                if not keep.any():
                    continue
                c = c[keep]
                kind = np.array([N.KIND[int(k)] for k in c])
                framed = fid[iy[keep], ix[keep]] > 0
                kind[(c == C.NERVE) & ~framed] = N.SCHWANN_OVAL
                angle = ang[keep].copy()
                along = np.isin(c, (C.STROMA, C.EPI))
                cy_, cx_ = iy[keep] // k, ix[keep] // k
                angle[along] = theta[cy_, cx_][along] + (ang[keep][along] - math.pi / 2) * 0.15
                follow = np.isin(c, (C.WAVY, C.MUSCLE)) | ((c == C.NERVE) & framed)
                angle[follow] = phi[cy_, cx_][follow]
                a, b, dark = N.shape(kind, u3[keep])
                parts.append(N.Nuclei(x[keep], y[keep], kind, a, b, angle, dark))
        pts = self._immune(ox, oy, ox + W * mpp, oy + H * mpp)
        if len(pts):
            # per-cell randomness from the cell's own position, so every tile draws it the same way
            h = (np.floor(pts[:, 0] * 13.0) * 7919 + np.floor(pts[:, 1] * 17.0) * 104729) % 10007 / 10007.0
            u3 = np.c_[h, (h * 7.31) % 1.0, (h * 3.17) % 1.0]
            kind = np.full(len(pts), N.IMMUNE)
            a, b, dark = N.shape(kind, u3)
            parts.append(N.Nuclei(pts[:, 0], pts[:, 1], kind, a, b, h * math.pi, dark))
        return N.Nuclei.concat(parts)
