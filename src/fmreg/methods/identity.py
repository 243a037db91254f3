"""The identity transform: the baseline every method must beat."""

from __future__ import annotations

from fmreg.transforms.displacement import DisplacementField
from fmreg.core.image import Image, check_pair
from fmreg.methods.base import RegistrationResult, add_method
from fmreg.methods.params import Param


@add_method("identity")
class IdentityMethod:
    """The identity transform (u = 0): the baseline every method must beat.

    The moving image is resampled on the fixed grid at the same world points.
    """

    name = "identity"
    uses_labels = False
    PARAMS: tuple[Param, ...] = ()

    def register(self, fixed: Image, moving: Image, fixed_labels=None, moving_labels=None) -> RegistrationResult:
        # An image without contrast is refused here too: the identity would look like a result.
        check_pair(fixed, moving)
        return RegistrationResult(DisplacementField.identity(fixed.grid), self.name)
