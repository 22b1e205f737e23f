"""Slide file names: which files are slides, and a slide's stem (the name its outputs are filed under)."""

from __future__ import annotations

from pathlib import Path

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".dcm", ".vms", ".vmu", ".svslide",
                    ".ome.tif", ".ome.tiff")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # plain images (need --mpp)


def slide_stem(name: str | Path) -> str:
    """``a.svs`` → ``a``; ``b.ome.tiff`` → ``b`` (compound extensions count as one)."""
    name = Path(name).name
    lower = name.lower()
    for ext in sorted(SLIDE_EXTENSIONS + IMAGE_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


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
