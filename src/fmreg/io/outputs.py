"""Writing outputs without ever leaving half of them behind, and the JSON they are reported in.

Two levels of atomicity:

* :func:`atomic_path`: one file is written under a temporary name beside its destination and
  renamed over it only when complete (every writer in :mod:`fmreg.io` and
  :mod:`fmreg.figures` uses it).
* :class:`Staging`: a whole set of outputs goes into a hidden folder beside the destination
  folder and is moved into place only after every file was written, so a command that fails
  half-way leaves the destination as it was.

:func:`check_outputs` refuses outputs that would overwrite inputs; :func:`dump_json` writes the
JSON documents (``result.json``, ``fmreg evaluate -o``) with NaN as ``null``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from torch import Tensor

from fmreg.errors import FmregError
from fmreg.io.paths import absolute, is_same_path, suffix_of

__all__ = ["Staging", "atomic_path", "check_outputs", "dump_json", "to_jsonable"]


def _umask() -> int:
    # Temporary files and folders are created private (mkstemp/mkdtemp: 0600/0700); results
    # get the permissions an ordinary open()/mkdir would have given them.
    umask = os.umask(0)
    os.umask(umask)
    return umask


# ---------------------------------------------------------------------------- one file
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that replaces ``path`` on success.

    The temporary name keeps the suffix so that writers choosing a format by extension
    (SimpleITK, Pillow) still do the right thing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fmreg-tmp-", suffix=suffix_of(path), dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# ---------------------------------------------------------------------------- a set of files
def _nearest_existing(path: Path) -> Path:
    path = absolute(path)
    while not path.exists():
        path = path.parent
    return path


class Staging:
    """A hidden temporary folder beside ``dest`` whose files move into ``dest`` on commit.

    Use as a context manager: files are written under :attr:`root` (same relative layout as
    in ``dest``); when the block succeeds they are moved into place, when it raises (or is
    interrupted) the staging folder is deleted and ``dest`` is left as it was. The folder lives
    in ``dest``'s parent (or its nearest existing ancestor, so that nothing is created on
    failure) to keep the final moves on one file system, where renames are atomic.
    """

    def __init__(self, dest: str | os.PathLike) -> None:
        self.dest = absolute(dest)
        if self.dest.exists() and not self.dest.is_dir():
            raise FmregError(f"output folder {self.dest} exists and is not a folder")
        anchor = _nearest_existing(self.dest.parent)
        if not os.access(anchor, os.W_OK):
            raise FmregError(f"cannot write into {anchor}: permission denied")
        self.root = Path(tempfile.mkdtemp(prefix=".fmreg-staging-", dir=anchor))
        self.committed: list[Path] = []

    def path(self, relative: str | os.PathLike) -> Path:
        """Where to write the file that ends up at ``dest / relative``."""
        p = self.root / relative
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def files(self) -> list[Path]:
        """Staged files, relative to :attr:`root`."""
        return sorted(p.relative_to(self.root) for p in self.root.rglob("*") if p.is_file())

    def commit(self) -> list[Path]:
        """Move every staged file into ``dest``; returns their final paths."""
        rel = self.files()
        umask = _umask()
        for r in rel:
            os.chmod(self.root / r, 0o666 & ~umask)
        if not self.dest.exists():
            # A fresh destination appears in one rename.
            for d in [self.root, *(p for p in self.root.rglob("*") if p.is_dir())]:
                os.chmod(d, 0o777 & ~umask)
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.root, self.dest)
        else:
            for r in rel:
                target = self.dest / r
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.is_dir():
                    raise FmregError(f"cannot write {target}: a folder of that name exists")
                os.replace(self.root / r, target)
        self.committed = [self.dest / r for r in rel]
        return self.committed

    def discard(self) -> None:
        """Delete the staging folder and whatever is still in it."""
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.discard()


def check_outputs(
    outputs: Sequence[Path],
    inputs: Sequence[Path | None],
    overwrite: bool,
) -> None:
    """Refuse outputs that would destroy inputs.

    * An output path that *is* an input file is always refused.
    * An existing output file in a folder that holds an input is refused unless ``overwrite``
      (writing results next to the data by mistake must not silently replace files there).

    Raises:
        FmregError: Naming the first offending path.
    """
    ins = [absolute(p) for p in inputs if p is not None]
    in_dirs = {p.parent for p in ins}
    for out in outputs:
        out = absolute(out)
        for i in ins:
            if is_same_path(out, i):
                raise FmregError(f"output {out} is an input file: choose another output path")
        if out.is_dir():
            raise FmregError(f"cannot write {out}: a folder of that name exists")
        if out.exists() and out.parent in in_dirs and not overwrite:
            raise FmregError(
                f"{out} exists in an input's folder and would be overwritten: choose another "
                "output folder or pass --overwrite"
            )


# ---------------------------------------------------------------------------- JSON
def to_jsonable(value: Any) -> Any:
    """A JSON-ready copy of ``value``: NaN/Inf become ``null`` (JSON has no NaN), tensors and
    arrays become lists, paths strings, dict keys strings."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "to_dict"):
        return to_jsonable(value.to_dict())
    return str(value)


def dump_json(doc: dict) -> str:
    """``doc`` as indented JSON text (see :func:`to_jsonable`), ending in a newline."""
    return json.dumps(to_jsonable(doc), indent=2, allow_nan=False) + "\n"
