"""Scores of a network on a manifest during training (Dice and folding), never its training data."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from fmreg.errors import FmregError
from fmreg.evaluate.metrics import dice, folding_percent
from fmreg.io.manifest import read_manifest
from fmreg.nn.images import network_input, physical_field
from fmreg.transforms.displacement import jacobian_determinant
from fmreg.transforms.warp import warp_labels


def make_validator(manifest: str, dimension: int, size: tuple[int, ...]) -> Callable[[nn.Module], dict]:
    """``validate(model) -> {"dice", "folding_pct", "pairs"}`` over the labelled pairs of ``manifest``.

    The pairs are loaded once; each validation runs the network in eval mode without
    instance optimisation and puts it back in training mode.
    """
    cases = []
    for case in read_manifest(manifest):
        if case.has_labels:
            loaded = case.load()
            if loaded.fixed.ndim == dimension:
                cases.append((loaded, network_input(loaded.fixed, size), network_input(loaded.moving, size)))
    if not cases:
        raise FmregError(f"validation manifest {manifest} has no labelled {dimension}D pair")

    def validate(model: nn.Module) -> dict:
        scores, folds = [], []
        model.eval()
        try:
            with torch.no_grad():
                for case, f, m in cases:
                    field = physical_field(model(m, f), case.fixed.grid, case.moving.grid)
                    spec = case.label_spec
                    warped = warp_labels(case.moving_labels, field)
                    values = spec.scored_values()
                    d = dice(spec.prepare(warped.data), spec.prepare(case.fixed_labels.data), values)
                    scores.append(float(np.nanmean(list(d.values()))))
                    folds.append(folding_percent(jacobian_determinant(field)))
        finally:
            model.train()
        return {"dice": round(float(np.mean(scores)), 4), "folding_pct": round(float(np.mean(folds)), 4),
                "pairs": len(cases)}

    return validate
