"""Path helpers shared by the readers and writers: absolute paths, file suffixes, same-file tests."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["absolute", "is_same_path", "suffix_of"]


def absolute(path: str | os.PathLike) -> Path:
    """Absolute path without resolving symlinks."""
    # abspath, not resolve(): keep symlinked data folders as the user named them in messages.
    return Path(os.path.abspath(os.fspath(path)))


def suffix_of(path: str | Path) -> str:
    """Lower-case file suffix that chooses the format; ``.nii.gz`` counts as one suffix."""
    name = str(path).lower()
    for suf in (".nii.gz",):
        if name.endswith(suf):
            return suf
    return Path(name).suffix


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def is_same_path(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name the same file (same absolute path, or a link to it)."""
    return absolute(a) == absolute(b) or _same_file(a, b)
