"""Training: labelled patches from slides and QuPath GeoJSON, augmentation, the Lightning module."""
