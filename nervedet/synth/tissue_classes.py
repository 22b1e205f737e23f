"""Tissue classes of the synthetic renderer, with each class's base stain densities (haematoxylin, eosin)."""

GLASS, STROMA, TUMOR, NERVE, PERI, FAT, VWALL, LUMEN, MUSCLE, WAVY, GLAND_LUMEN, EPI = range(12)

# Optical densities, calibrated so that mean tissue and nucleus colours match the real samples.
BASE_H = {GLASS: 0.0, STROMA: 0.22, TUMOR: 0.55, NERVE: 0.15, PERI: 0.2, FAT: 0.0, VWALL: 0.2,
          LUMEN: 0.0, MUSCLE: 0.22, WAVY: 0.2, GLAND_LUMEN: 0.03, EPI: 0.2}
BASE_E = {GLASS: 0.0, STROMA: 0.9, TUMOR: 0.55, NERVE: 0.55, PERI: 1.1, FAT: 0.02, VWALL: 1.05,
          LUMEN: 0.05, MUSCLE: 1.15, WAVY: 1.0, GLAND_LUMEN: 0.08, EPI: 1.05}
