"""Slide file names: which files are slides, and a slide's stem (the name its outputs are filed under)."""

from __future__ import annotations

import re
from pathlib import Path

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".dcm", ".vms", ".vmu", ".svslide",
                    ".ome.tif", ".ome.tiff")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # plain images (need --mpp)


_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')  # path separators, control and Windows-reserved characters
MAX_STEM_BYTES = 200


def safe_name(stem: str) -> str:
    """A file or folder name that stays inside its parent whatever the slide was called: no separators or
    control characters, no leading dot (``.``, ``..`` and hidden names), at most 200 bytes."""
    clean = _UNSAFE.sub("_", stem).strip().lstrip(".").strip()
    while len(clean.encode("utf-8")) > MAX_STEM_BYTES:
        clean = clean[:-1]
    return clean or "slide"


def slide_stem(name: str | Path) -> str:
    """``a.svs`` → ``a``; ``b.ome.tiff`` → ``b`` (compound extensions count as one); made safe as a file name
    (:func:`safe_name`), since the outputs are filed under it."""
    name = Path(name).name
    lower = name.lower()
    for ext in sorted(SLIDE_EXTENSIONS + IMAGE_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return safe_name(name[: -len(ext)])
    return safe_name(Path(name).stem)


def is_slide_file(path: Path) -> bool:
    lower = path.name.lower()
    return path.is_file() and not lower.startswith(".") and lower.endswith(SLIDE_EXTENSIONS + IMAGE_EXTENSIONS)


def find_slides(inputs: list[Path]) -> list[Path]:
    """Slide files among ``inputs``: files as given (in order), folders scanned (not recursively), sorted."""
    out: list[Path] = []
    for p in inputs:
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if is_slide_file(f)))
        else:
            out.append(p)
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]
