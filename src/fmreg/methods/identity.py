"""The identity transform: the baseline every method must beat."""

from __future__ import annotations

from fmreg.transforms.displacement import DisplacementField
from fmreg.core.image import Image
from fmreg.methods.base import RegistrationResult, add_method


@add_method("identity")
class IdentityMethod:
    """``u = 0``: the moving image resampled on the fixed grid at the same world points."""

    name = "identity"
    uses_labels = False

    def register(self, fixed: Image, moving: Image, fixed_labels=None, moving_labels=None) -> RegistrationResult:
        return RegistrationResult(DisplacementField.identity(fixed.grid), self.name)
