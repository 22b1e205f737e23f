"""Tissue classes of the synthetic renderer, with each class's base stain densities (haematoxylin, eosin)."""

GLASS, STROMA, TUMOR, NERVE, PERI, FAT, VWALL, LUMEN, MUSCLE, WAVY, GLAND_LUMEN, EPI = range(12)

BASE_H = {GLASS: 0.0, STROMA: 0.03, TUMOR: 0.16, NERVE: 0.03, PERI: 0.05, FAT: 0.0, VWALL: 0.05,
          LUMEN: 0.0, MUSCLE: 0.06, WAVY: 0.04, GLAND_LUMEN: 0.02, EPI: 0.04}
BASE_E = {GLASS: 0.0, STROMA: 0.42, TUMOR: 0.38, NERVE: 0.30, PERI: 0.62, FAT: 0.015, VWALL: 0.55,
          LUMEN: 0.04, MUSCLE: 0.62, WAVY: 0.50, GLAND_LUMEN: 0.06, EPI: 0.55}
