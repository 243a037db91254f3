"""ROI pairs from label maps: the paper's Case 1, an upper bound that sees the ground truth."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fmreg.core.image import Image
from fmreg.correspond.pairs import RoiPair
from fmreg.errors import FmregError

__all__ = ["label_roi_pairs"]


def label_roi_pairs(
    fixed_labels: Image, moving_labels: Image, values: Sequence[int] | None = None
) -> list[RoiPair]:
    """Case 1 of the paper: one pair per label value present in both maps (0 excluded).

    Args:
        fixed_labels, moving_labels: integer label maps (any dimensionality).
        values: label values to pair; None takes every non-zero value in both maps.

    Returns:
        Pairs of whole-image masks with similarity 1 and source ``"labels:<value>"``.

    Raises:
        FmregError: no value is present in both maps.
    """
    if values is None:
        present = [
            set(np.unique(lab.data.numpy()).tolist()) for lab in (fixed_labels, moving_labels)
        ]
        values = sorted(present[0] & present[1] - {0})
    pairs = []
    for v in values:
        fm, mm = fixed_labels.data == v, moving_labels.data == v
        if fm.any() and mm.any():
            pairs.append(RoiPair(fm, mm, 1.0, source=f"labels:{v}"))
    if not pairs:
        raise FmregError("the label maps share no non-zero label value: nothing to pair")
    return pairs
