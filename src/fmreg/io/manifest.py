"""Pair manifests (``pairs.csv``) and landmark files.

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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fmreg.errors import FmregError
from fmreg.evaluate.metrics import binarize_fg

__all__ = [
    "LabelSpec",
    "PairSpec",
    "read_landmark_pair",
    "read_landmarks",
    "read_manifest",
]

REQUIRED_COLUMNS = ("name", "fixed", "moving")
OPTIONAL_PATH_COLUMNS = ("fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks")


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

    def prepare(self, labels: Tensor) -> Tensor:
        """Turn a raw label map as read from file into the map that is scored.

        Args:
            labels: Label map, any shape; for ``fg`` the raw 0..255 mask (apply once only).

        Returns:
            The binarized ``int64`` map for ``fg`` (see :func:`fmreg.evaluate.metrics.binarize_fg`),
            else ``labels`` unchanged.
        """
        return binarize_fg(labels) if self.fg else labels

    def __str__(self) -> str:
        return "fg" if self.fg else " ".join(map(str, self.values))


@dataclass(frozen=True)
class PairSpec:
    """One row of a pair manifest, with absolute paths.

    Registration maps fixed-image coordinates to moving-image coordinates (pull-back): the
    moving image and labels are warped onto the fixed grid and compared with the fixed ones.

    Attributes:
        name: Unique pair name.
        fixed, moving: Image files.
        fixed_labels, moving_labels: Label maps on the grid of their image, or ``None``.
        fixed_landmarks, moving_landmarks: Landmark CSV files, or ``None``.
        labels: Which label values to score (empty when there are no label maps).
    """

    name: str
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    fixed_landmarks: Path | None = None
    moving_landmarks: Path | None = None
    labels: LabelSpec = LabelSpec()

    @property
    def has_labels(self) -> bool:
        return self.fixed_labels is not None and self.moving_labels is not None

    @property
    def has_landmarks(self) -> bool:
        return self.fixed_landmarks is not None and self.moving_landmarks is not None

    def scored_values(self) -> tuple[int, ...]:
        """Label values to score (``(1,)`` for ``fg`` pairs; empty without labels)."""
        return self.labels.scored_values()


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


def read_manifest(path: str | os.PathLike) -> list[PairSpec]:
    """Read and validate a pair manifest.

    Args:
        path: The manifest CSV. Paths in it are relative to its folder.

    Returns:
        The pairs in file order.

    Raises:
        FmregError: When the file is missing or empty, a required column (``name``, ``fixed``,
            ``moving``) is absent, a row has the wrong number of fields or an empty required
            cell, a pair name repeats, a referenced file does not exist, ``labels`` does not
            parse, or labels/landmarks are given for only one side or without the other.
    """
    path = Path(path)
    if not path.is_file():
        raise FmregError(f"manifest not found: {path}")
    base = Path(os.path.abspath(path.parent))
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

    pairs: list[PairSpec] = []
    seen: dict[str, int] = {}
    for line, row in rows[1:]:
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

        files: dict[str, Path | None] = {}
        for col in REQUIRED_COLUMNS[1:] + OPTIONAL_PATH_COLUMNS:
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

        try:
            labels = LabelSpec.parse(cells.get("labels", ""))
        except FmregError as exc:
            raise FmregError(f"pair {name!r}: {exc}") from None
        for col_a, col_b in (
            ("fixed_labels", "moving_labels"),
            ("fixed_landmarks", "moving_landmarks"),
        ):
            _check_both(name, files[col_a], files[col_b], col_a, col_b)
        has_label_maps = files["fixed_labels"] is not None
        if has_label_maps and labels.empty:
            raise FmregError(
                f"pair {name!r} has label maps but no labels to score: write 'fg' or label "
                "values such as '1 2 3' in the labels column"
            )
        if not has_label_maps and not labels.empty:
            raise FmregError(f"pair {name!r} lists labels {str(labels)!r} but has no label maps")

        pairs.append(PairSpec(name=name, labels=labels, **files))
    return pairs


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
