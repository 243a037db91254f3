"""fmreg: medical image registration with vision foundation models."""

from .errors import FmregError
from .grid import Frame, Grid
from .image import Image

__version__ = "0.1.0"
__all__ = ["FmregError", "Frame", "Grid", "Image", "__version__"]
