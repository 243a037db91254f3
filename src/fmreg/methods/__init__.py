"""Registration methods: fmreg's own and the peers it is compared with.

Importing this package fills the method registry. Peers whose packages are optional
(elastix, ANTs) import those packages only when they run.
"""

from fmreg.methods.base import Method, RegistrationResult, available_methods, get_method, add_method
from fmreg.methods import gradicon, identity, mask_guided, samreg  # noqa: F401  (registry entries)
from fmreg.methods.peers import ants, demons, elastix  # noqa: F401  (registry entries)

__all__ = ["Method", "RegistrationResult", "available_methods", "get_method", "add_method"]
