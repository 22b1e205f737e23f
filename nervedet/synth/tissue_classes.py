"""Tissue classes of the synthetic renderer, with each class's base stain densities (haematoxylin, eosin)."""

GLASS, STROMA, TUMOR, NERVE, PERI, FAT, VWALL, LUMEN, MUSCLE, WAVY, GLAND_LUMEN, EPI = range(12)

# Optical densities, calibrated so that mean tissue and nucleus colours match the real samples.
BASE_H = {GLASS: 0.0, STROMA: 0.05, TUMOR: 0.32, NERVE: 0.05, PERI: 0.08, FAT: 0.0, VWALL: 0.08,
          LUMEN: 0.0, MUSCLE: 0.10, WAVY: 0.07, GLAND_LUMEN: 0.03, EPI: 0.06}
BASE_E = {GLASS: 0.0, STROMA: 0.80, TUMOR: 0.62, NERVE: 0.52, PERI: 1.05, FAT: 0.02, VWALL: 1.0,
          LUMEN: 0.05, MUSCLE: 1.1, WAVY: 0.92, GLAND_LUMEN: 0.08, EPI: 1.0}
