"""Files written whole or not at all: a temporary name beside the target, renamed onto it when complete."""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path``; renamed onto it when the block succeeds, removed when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are for everyone
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, synced to disk before the rename."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    return path


def remove_stale(path: Path, suffix: str = ".tmp") -> list[Path]:
    """Remove the temporary files that writes of ``path`` left when their process was killed (call it only
    when no other process may be writing ``path``). Returns what was removed."""
    stale = sorted(path.parent.glob(f".{glob.escape(path.name)}.*{suffix}"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale
