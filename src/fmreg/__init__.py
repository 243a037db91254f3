"""fmreg: medical image registration with vision foundation models."""

from fmreg.errors import FmregError
from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image

__version__ = "0.1.0"
__all__ = ["FmregError", "Frame", "Grid", "Image", "__version__"]
