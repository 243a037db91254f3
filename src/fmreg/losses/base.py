"""The record every loss returns: its total and named terms."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class LossRecord:
    """A loss value with the named terms it is made of.

    Attributes:
        total: Scalar tensor to minimise (differentiable).
        terms: Named scalar values for reports and loss curves (e.g. an unweighted similarity
            beside the weighted term that enters ``total``).
    """

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)

    def __add__(self, other: "LossRecord") -> "LossRecord":
        return LossRecord(self.total + other.total, {**self.terms, **other.terms})

    def floats(self) -> dict[str, float]:
        """The terms as plain floats (detached)."""
        return {k: float(v.detach()) for k, v in self.terms.items()}
