"""Registration cases: pair manifests (``pairs.csv``), the :class:`Case` of one pair, landmark files.

A manifest lists one registration pair per row; its format is described in
``../shared/data/README.md``:

``name,fixed,moving[,fixed_labels,moving_labels,labels,fixed_landmarks,moving_landmarks]``

Paths are relative to the manifest's folder. ``labels`` is either ``fg`` (binary masks
thresholded at > 127, scored as label 1) or space-separated integer label values.

Landmark files are CSV with the header ``x,y`` (2D: pixel coordinates, x = column, y = row,
origin at the centre of the top-left pixel) or ``x,y,z`` (3D: physical mm); row ``i`` of the
fixed and moving files is the same anatomical point.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from fmreg.core.image import Image, check_label_grid, check_pair
from fmreg.errors import FmregError
from fmreg.io.images import is_2d_raster, read_image
from fmreg.io.paths import absolute

__all__ = [
    "Case",
    "LabelSpec",
    "ROLES",
    "read_landmark_pair",
    "read_landmarks",
    "read_manifest",
]

REQUIRED_COLUMNS = ("name", "fixed", "moving")


#: The manifest's ``fg`` convention: foreground is every value above this (anti-aliased PNG masks).
FG_THRESHOLD = 127


def binarize_fg(label_map: Tensor) -> Tensor:
    """Binary foreground of an anti-aliased mask (the manifest's ``fg`` label convention).

    Args:
        label_map: Raw mask as read from file, any shape, values 0..255 (e.g. a PNG render).
            Apply this to the *raw* map only: a map already binarized to 0/1 would come out
            all background.

    Returns:
        ``int64`` tensor of the same shape and device: 1 where ``label_map > 127``, else 0.
        Score it with label value 1.
    """
    return (torch.as_tensor(label_map) > FG_THRESHOLD).to(torch.int64)


@dataclass(frozen=True)
class LabelSpec:
    """Which label values of a pair to score.

    Attributes:
        fg: ``True`` for binary masks (the manifest's ``fg``): foreground is every voxel with
            value > 127 and is scored as label 1.
        values: Label values to score when ``fg`` is ``False`` (may include 0); empty when the
            pair has no labels to score.
    """

    fg: bool = False
    values: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        values = tuple(int(v) for v in self.values)
        if self.fg and values:
            raise FmregError("a label spec is either 'fg' or a list of label values, not both")
        if len(set(values)) != len(values):
            raise FmregError(f"label values {values} repeat a value")
        if any(v < 0 for v in values):
            raise FmregError(f"label values must be non-negative, got {values}")
        object.__setattr__(self, "values", values)

    @classmethod
    def parse(cls, text: str) -> "LabelSpec":
        """Parse a manifest ``labels`` cell: ``fg``, ``1 2 3`` or empty (nothing to score).

        Raises:
            FmregError: When the text is neither ``fg`` nor whitespace-separated non-negative
                integers without repeats.
        """
        tokens = text.split()
        if [t.lower() for t in tokens] == ["fg"]:
            return cls(fg=True)
        values = []
        for token in tokens:
            if not (token.isascii() and token.isdigit()):
                raise FmregError(
                    f"labels {text.strip()!r}: {token!r} is not a non-negative integer; write "
                    "'fg' or space-separated label values such as '1 2 3'"
                )
            values.append(int(token))
        if len(set(values)) != len(values):
            raise FmregError(f"labels {text.strip()!r} list a value twice")
        return cls(values=tuple(values))

    @property
    def empty(self) -> bool:
        """True when there is nothing to score."""
        return not self.fg and not self.values

    def scored_values(self) -> tuple[int, ...]:
        """Label values to pass to the metrics: ``(1,)`` for ``fg``, else :attr:`values`."""
        return (1,) if self.fg else self.values

    def prepare(self, label_map: Tensor) -> Tensor:
        """Turn a raw label map as read from file into the map that is scored.

        Args:
            label_map: Label map, any shape; for ``fg`` the raw 0..255 mask (apply once only).

        Returns:
            The binarized ``int64`` map for ``fg`` (see :func:`binarize_fg`),
            else ``label_map`` unchanged.
        """
        return binarize_fg(label_map) if self.fg else label_map

    def __str__(self) -> str:
        return "fg" if self.fg else " ".join(map(str, self.values))


#: The files of a case, in the order ``result.json`` lists them under ``"inputs"``.
ROLES = ("fixed", "moving", "fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks")


@dataclass(frozen=True)
class Case:
    """One registration pair: its files, what to score, and once loaded its data.

    Registration maps fixed-image coordinates to moving-image coordinates (pull-back): the
    moving image and labels are warped onto the fixed grid and compared with the fixed ones.
    A case is first a description (a manifest row, or the files named on the command line);
    :meth:`load` returns a copy that also holds the images, label maps and landmarks, read
    and checked against each other.

    Attributes:
        name: Pair name (unique in a manifest; empty for a pair named on the command line).
        paths: Absolute path per role of :data:`ROLES` (``None`` for a role not given).
        label_spec: Which label values to score; ``None`` to pick them from the fixed label
            map (:func:`fmreg.evaluate.scoring.default_label_spec`).
        fixed, moving: The images, on their own grids (after :meth:`load`).
        fixed_labels, moving_labels: Integer label maps on the grid of their image, or ``None``.
        fixed_landmarks, moving_landmarks: ``(N, ndim)`` float64 points, components
            ``(x, y[, z])`` (2D: pixels, 3D: mm; see :func:`read_landmarks`), or ``None``.
    """

    name: str
    paths: dict[str, Path | None]
    label_spec: LabelSpec | None = None
    fixed: Image | None = None
    moving: Image | None = None
    fixed_labels: Image | None = None
    moving_labels: Image | None = None
    fixed_landmarks: Tensor | None = None
    moving_landmarks: Tensor | None = None

    @classmethod
    def from_files(
        cls,
        fixed: str | os.PathLike,
        moving: str | os.PathLike,
        fixed_labels: str | os.PathLike | None = None,
        moving_labels: str | os.PathLike | None = None,
        fixed_landmarks: str | os.PathLike | None = None,
        moving_landmarks: str | os.PathLike | None = None,
        *,
        name: str = "",
        label_spec: LabelSpec | None = None,
    ) -> "Case":
        """A case from file names (relative names are taken from the working folder).

        Raises:
            FmregError: When landmarks are given for one side only.
        """
        given = (fixed, moving, fixed_labels, moving_labels, fixed_landmarks, moving_landmarks)
        paths = {role: absolute(p) if p else None for role, p in zip(ROLES, given)}
        if (paths["fixed_landmarks"] is None) != (paths["moving_landmarks"] is None):
            raise FmregError("give both --fixed-landmarks and --moving-landmarks, or neither")
        return cls(name, paths, label_spec)

    @property
    def has_labels(self) -> bool:
        """True when both label maps are given."""
        return self.paths.get("fixed_labels") is not None and self.paths.get("moving_labels") is not None

    @property
    def has_landmarks(self) -> bool:
        """True when both landmark files are given."""
        return self.paths.get("fixed_landmarks") is not None and self.paths.get("moving_landmarks") is not None

    @property
    def raster(self) -> bool:
        """True when the fixed image is a 2D picture file: outputs on its grid are PNG."""
        p = self.paths.get("fixed")
        return p is not None and is_2d_raster(p)

    @property
    def loaded(self) -> bool:
        """True once :meth:`load` has read the images."""
        return self.fixed is not None

    def scored_values(self) -> tuple[int, ...]:
        """Label values to score (``(1,)`` for ``fg`` pairs; empty without a label spec)."""
        return self.label_spec.scored_values() if self.label_spec is not None else ()

    def load(self, log: Callable[[str], None] = lambda message: None) -> "Case":
        """Read and validate the files (every check a registration needs before it starts).

        Args:
            log: Progress line naming the images read.

        Returns:
            A copy of this case holding the images, label maps and landmarks.

        Raises:
            FmregError: Missing/unreadable file, different dimensionality, NaN/Inf intensities,
                a label map off its image's grid, landmarks of the wrong dimensionality.
        """
        paths = self.paths
        log(f"reading {paths['fixed'].name} (fixed) and {paths['moving'].name} (moving)")
        fixed = read_image(paths["fixed"])
        moving = read_image(paths["moving"])
        check_pair(fixed, moving)
        label_maps = {}
        for role, image in (("fixed_labels", fixed), ("moving_labels", moving)):
            label_maps[role] = None
            if paths[role] is not None:
                label_maps[role] = read_image(paths[role], is_label=True)
                check_label_grid(label_maps[role], image)
        points = (None, None)
        if paths["fixed_landmarks"] is not None:
            points = read_landmark_pair(paths["fixed_landmarks"], paths["moving_landmarks"])
            if points[0].shape[1] != fixed.ndim:
                raise FmregError(
                    f"landmarks are {points[0].shape[1]}D but the images are {fixed.ndim}D: "
                    f"{paths['fixed_landmarks']}"
                )
        return replace(
            self, fixed=fixed, moving=moving, **label_maps, fixed_landmarks=points[0], moving_landmarks=points[1]
        )


def _resolve(base: Path, cell: str) -> Path:
    # abspath rather than resolve(): normalise ".." without replacing symlinked data folders
    # by their targets in the paths users see.
    return Path(os.path.abspath(base / cell))


def _check_both(pair: str, a: Path | None, b: Path | None, col_a: str, col_b: str) -> None:
    if (a is None) != (b is None):
        given, missing = (col_a, col_b) if a is not None else (col_b, col_a)
        raise FmregError(
            f"pair {pair!r}: {given} is given but {missing} is empty; give both or neither"
        )


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the non-blank rows (with their line numbers) of a manifest."""
    if not path.is_file():
        raise FmregError(f"manifest not found: {path}")
    # utf-8-sig: spreadsheet programs often save CSV with a byte-order mark.
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    rows = [(line, row) for line, row in enumerate(rows, start=1) if any(c.strip() for c in row)]
    if not rows:
        raise FmregError(f"manifest {path} is empty")
    _, header = rows[0]
    header = [h.strip() for h in header]
    for col in REQUIRED_COLUMNS:
        if col not in header:
            raise FmregError(f"manifest {path} lacks the required column {col!r}")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise FmregError(f"manifest {path} repeats the column {dupes[0]!r}")
    if len(rows) == 1:
        raise FmregError(f"manifest {path} lists no pairs")
    return header, rows[1:]


def _row_files(name: str, cells: dict[str, str], base: Path) -> dict[str, Path | None]:
    """The absolute path per role of one row; every named file must exist."""
    files: dict[str, Path | None] = {}
    for col in ROLES:
        cell = cells.get(col, "")
        if not cell:
            if col in REQUIRED_COLUMNS:
                raise FmregError(f"pair {name!r}: the {col!r} cell is empty")
            files[col] = None
            continue
        p = _resolve(base, cell)
        if not p.is_file():
            raise FmregError(f"pair {name!r}: {col} file not found: {p}")
        files[col] = p
    return files


def _row_label_spec(name: str, cells: dict[str, str], files: dict[str, Path | None]) -> LabelSpec | None:
    """The row's ``labels`` cell, checked against its label maps (``None`` without maps)."""
    try:
        spec = LabelSpec.parse(cells.get("labels", ""))
    except FmregError as exc:
        raise FmregError(f"pair {name!r}: {exc}") from None
    for col_a, col_b in (
        ("fixed_labels", "moving_labels"),
        ("fixed_landmarks", "moving_landmarks"),
    ):
        _check_both(name, files[col_a], files[col_b], col_a, col_b)
    has_label_maps = files["fixed_labels"] is not None
    if has_label_maps and spec.empty:
        raise FmregError(
            f"pair {name!r} has label maps but no labels to score: write 'fg' or label "
            "values such as '1 2 3' in the labels column"
        )
    if not has_label_maps and not spec.empty:
        raise FmregError(f"pair {name!r} lists labels {str(spec)!r} but has no label maps")
    return spec if has_label_maps else None


def read_manifest(path: str | os.PathLike) -> list[Case]:
    """Read and validate a pair manifest.

    Args:
        path: The manifest CSV. Paths in it are relative to its folder.

    Returns:
        One :class:`Case` per row in file order (not loaded; see :meth:`Case.load`).

    Raises:
        FmregError: When the file is missing or empty, a required column (``name``, ``fixed``,
            ``moving``) is absent, a row has the wrong number of fields or an empty required
            cell, a pair name repeats, a referenced file does not exist, ``labels`` does not
            parse, or labels/landmarks are given for only one side or without the other.
    """
    path = Path(path)
    header, rows = _read_rows(path)
    base = Path(os.path.abspath(path.parent))
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        if len(row) != len(header):
            raise FmregError(
                f"manifest {path} line {line} has {len(row)} fields but the header has "
                f"{len(header)}"
            )
        cells = {h: c.strip() for h, c in zip(header, row)}
        name = cells["name"]
        if not name:
            raise FmregError(f"manifest {path} line {line} has an empty name")
        if name in seen:
            raise FmregError(
                f"manifest {path}: pair name {name!r} is used on lines {seen[name]} and {line}"
            )
        seen[name] = line
        files = _row_files(name, cells, base)
        cases.append(Case(name, files, _row_label_spec(name, cells, files)))
    return cases


def read_landmarks(path: str | os.PathLike) -> Tensor:
    """Read a landmark CSV with header ``x,y`` (2D, pixels) or ``x,y,z`` (3D, mm).

    Args:
        path: The CSV file.

    Returns:
        ``(N, ndim)`` float64 tensor, components ``(x, y[, z])``: 2D points in pixel
        coordinates (x = column, y = row, origin at the centre of the top-left pixel), 3D
        points in physical mm.

    Raises:
        FmregError: When the file is missing, the header is not ``x,y`` / ``x,y,z``, a row has
            the wrong number of fields, a value is not a finite number, or there are no points.
    """
    path = Path(path)
    if not path.is_file():
        raise FmregError(f"landmark file not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = [(i, r) for i, r in enumerate(csv.reader(f), start=1) if any(c.strip() for c in r)]
    if not rows:
        raise FmregError(f"landmark file {path} is empty")
    header = [h.strip().lower() for h in rows[0][1]]
    if header not in (["x", "y"], ["x", "y", "z"]):
        raise FmregError(
            f"landmark file {path}: header must be 'x,y' or 'x,y,z', got {','.join(rows[0][1])!r}"
        )
    points = []
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise FmregError(
                f"landmark file {path} line {line} has {len(row)} values, expected {len(header)}"
            )
        point = []
        for cell in row:
            try:
                v = float(cell)
            except ValueError:
                v = math.nan
            if not math.isfinite(v):
                raise FmregError(
                    f"landmark file {path} line {line}: {cell.strip()!r} is not a finite number"
                )
            point.append(v)
        points.append(point)
    if not points:
        raise FmregError(f"landmark file {path} has no points")
    return torch.tensor(points, dtype=torch.float64)


def read_landmark_pair(
    fixed_path: str | os.PathLike, moving_path: str | os.PathLike
) -> tuple[Tensor, Tensor]:
    """Read matching fixed and moving landmark files.

    Returns:
        ``(fixed, moving)``, each ``(N, ndim)`` float64 (see :func:`read_landmarks`); row ``i``
        of both is the same point.

    Raises:
        FmregError: When either file is invalid, or the two differ in dimensionality or in
            number of points.
    """
    fixed = read_landmarks(fixed_path)
    moving = read_landmarks(moving_path)
    if fixed.shape[1] != moving.shape[1]:
        raise FmregError(
            f"fixed landmarks {fixed_path} are {fixed.shape[1]}D but moving landmarks "
            f"{moving_path} are {moving.shape[1]}D"
        )
    if fixed.shape[0] != moving.shape[0]:
        raise FmregError(
            f"fixed landmarks {fixed_path} have {fixed.shape[0]} points but moving landmarks "
            f"{moving_path} have {moving.shape[0]}: row i of both files must be the same point"
        )
    return fixed, moving
