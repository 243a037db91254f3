"""fmreg: medical image registration with vision foundation models."""

from fmreg.errors import FmregError

__version__ = "0.1.0"
__all__ = ["FmregError", "Frame", "Grid", "Image", "__version__"]

# Grid, Frame and Image import torch (seconds): they load on first use, so that `import fmreg`
# (and with it the `fmreg` command's entry point) starts at once and can handle Ctrl-C.
_LAZY = {"Frame": "fmreg.core.grid", "Grid": "fmreg.core.grid", "Image": "fmreg.core.image"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fmreg' has no attribute {name!r}")
