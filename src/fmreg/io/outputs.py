"""Writing outputs without ever leaving half of them behind, and the JSON they are reported in.

Two levels of atomicity:

* :func:`atomic_path`: one file is written under a temporary name beside its destination and
  renamed over it only when complete (every writer in :mod:`fmreg.io` and
  :mod:`fmreg.figures` uses it).
* :class:`Staging`: a whole set of outputs goes into a hidden folder inside the destination
  folder and is moved into place only after every file was written, so a command that fails
  half-way leaves the destination as it was.

:func:`check_writable` refuses, before any work, an output folder that cannot be written;
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

__all__ = ["Staging", "atomic_path", "check_outputs", "check_writable", "dump_json", "to_jsonable"]


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
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _why_not_writable(folder: Path) -> str:
    """The reason ``folder`` refuses writes, in the words a user knows."""
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except (OSError, AttributeError):  # pragma: no cover - statvfs is POSIX only
        pass
    return "permission denied"


def check_writable(folder: str | os.PathLike, what: str = "output folder") -> None:
    """Raise unless files can be written into ``folder`` (an existing one, or one to create).

    Called before any work, so that a folder that cannot take the results is reported at once
    rather than after a registration. An existing ``folder`` must be writable; a missing one
    needs its nearest existing ancestor to be a writable folder.

    Raises:
        FmregError: Naming ``folder`` (never a temporary path) and the reason.
    """
    folder = absolute(folder)
    if folder.exists():
        if not folder.is_dir():
            raise FmregError(f"{what} {folder} exists and is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise FmregError(f"cannot write into {what} {folder}: {_why_not_writable(folder)}")
        return
    anchor = _nearest_existing(folder)
    if not anchor.is_dir():
        raise FmregError(f"cannot create {what} {folder}: {anchor} is a file, not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise FmregError(f"cannot create {what} {folder}: {anchor} is not writable ({_why_not_writable(anchor)})")


class Staging:
    """A hidden temporary folder inside ``dest`` whose files move into ``dest`` on commit.

    Use as a context manager: files are written under :attr:`root` (same relative layout as
    in ``dest``); when the block succeeds they are moved into place, when it raises (or is
    interrupted) the staging folder is deleted and ``dest`` is left as it was (a ``dest`` the
    staging created is removed again). Staging inside ``dest`` needs write access to ``dest``
    only (never to its parent) and keeps every final move a rename within one folder tree,
    so one file system, where renames are atomic.

    Files listed with :meth:`remove_at_commit` (earlier outputs this result supersedes) are
    deleted from ``dest`` after the new files are in place.
    """

    def __init__(self, dest: str | os.PathLike, what: str = "output folder") -> None:
        self.dest = absolute(dest)
        self.what = what
        check_writable(self.dest, what)
        self.committed: list[Path] = []
        self._done = False
        self._stale: list[Path] = []
        self._created = self._make_dest()
        try:
            self.root = Path(tempfile.mkdtemp(prefix=".fmreg-staging-", dir=self.dest))
        except OSError as exc:  # e.g. a race with a permission change, or a full disk
            self._remove_created()
            raise FmregError(f"cannot write into {what} {self.dest}: {exc.strerror or exc}") from None

    def _make_dest(self) -> list[Path]:
        """Create ``dest`` and its missing parents; the folders created, outermost first."""
        missing = []
        p = self.dest
        while not p.exists():
            missing.append(p)
            p = p.parent
        created: list[Path] = []
        for d in reversed(missing):
            try:
                d.mkdir()
            except OSError as exc:
                self._created = created
                self._remove_created()
                raise FmregError(f"cannot create {self.what} {self.dest}: {exc.strerror or exc}") from None
            created.append(d)
        return created

    def _remove_created(self) -> None:
        # Only folders this staging made, and only while empty: nothing of anyone else goes.
        for d in reversed(self._created):
            with contextlib.suppress(OSError):
                d.rmdir()

    def path(self, relative: str | os.PathLike) -> Path:
        """Where to write the file that ends up at ``dest / relative``."""
        p = self.root / relative
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def files(self) -> list[Path]:
        """Staged files, relative to :attr:`root`."""
        return sorted(p.relative_to(self.root) for p in self.root.rglob("*") if p.is_file())

    def remove_at_commit(self, relative: Sequence[str | os.PathLike]) -> None:
        """Delete these files of ``dest`` (fmreg's own earlier outputs) once the commit is done.

        A file staged anew is replaced rather than deleted; folders left empty are removed.
        """
        self._stale += [Path(r) for r in relative]

    def commit(self) -> list[Path]:
        """Move every staged file into ``dest``; returns their final paths."""
        rel = self.files()
        for r in rel:
            # Checked for all first, so that a conflict moves nothing.
            if (self.dest / r).is_dir():
                raise FmregError(f"cannot write {self.dest / r}: a folder of that name exists")
        umask = _umask()
        for r in rel:
            os.chmod(self.root / r, 0o666 & ~umask)
            target = self.dest / r
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.root / r, target)
        self.committed = [self.dest / r for r in rel]
        self._done = True
        self._remove_stale(set(rel))
        return self.committed

    def _remove_stale(self, written: set[Path]) -> None:
        for r in self._stale:
            target = self.dest / r
            if r in written or not target.is_file():
                continue
            target.unlink()
            parent = target.parent
            while parent != self.dest and self.dest in parent.parents:
                if any(parent.iterdir()):
                    break
                parent.rmdir()
                parent = parent.parent

    def discard(self) -> None:
        """Delete the staging folder and whatever is still in it (and a ``dest`` it created
        that stayed empty)."""
        shutil.rmtree(self.root, ignore_errors=True)
        if not self._done:
            self._remove_created()

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
        except OSError as err:
            raise self._user_error(err, committing=True) or err from None
        finally:
            self.discard()
        if isinstance(exc, OSError):
            user = self._user_error(exc, committing=False)
            if user is not None:
                raise user from None

    def _user_error(self, err: OSError, committing: bool) -> FmregError | None:
        """An OS error (disk full, permission) on a staged file, in one line naming where the
        file was going, never the hidden staging path it had; ``None`` for any other path."""
        name = getattr(err, "filename", None)
        if not name:
            if not committing:
                return None
            return FmregError(f"cannot write into {self.what} {self.dest}: {err.strerror or err}")
        try:
            where = self.dest / Path(os.fsdecode(name)).relative_to(self.root)
        except ValueError:
            return None
        return FmregError(f"cannot write {where}: {err.strerror or err}")


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
