"""QuPath class names and colours shared by export, training labels, synthetic truth and evaluation."""

from __future__ import annotations

NERVE = "Nerve"
NERVE_PNI = "Nerve: PNI"
TUMOR = "Tumor"
IMMUNE = "Immune cells"
REGION = "Region*"

# Colours as QuPath shows them ([r, g, b]); Tumor, Immune cells and Region* are QuPath's own defaults.
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    NERVE: (255, 200, 0),
    NERVE_PNI: (255, 0, 255),
    TUMOR: (200, 0, 0),
    IMMUNE: (160, 90, 160),
    REGION: (0, 0, 180),
}

NERVE_CLASSES = (NERVE, NERVE_PNI)


def is_nerve(name: str | None) -> bool:
    """True for `Nerve` and its derived classes (`Nerve: PNI`, `Nerve: anything`)."""
    return bool(name) and (name == NERVE or name.startswith(NERVE + ":"))


def is_region(name: str | None) -> bool:
    """True for QuPath's `Region*` class and other classes that name a labelled region."""
    return bool(name) and name.lower().startswith("region")


def color_of(name: str | None) -> tuple[int, int, int]:
    """The colour of a class; unknown classes get a stable grey-ish colour from their name."""
    if name in CLASS_COLORS:
        return CLASS_COLORS[name]
    if is_nerve(name):
        return CLASS_COLORS[NERVE]
    h = sum((i + 1) * ord(c) for i, c in enumerate(name or "")) % 0xFFFFFF
    return ((h >> 16) & 0xFF, (h >> 8) & 0xFF, h & 0xFF)
