"""Pictures people look at: registration overviews, ROI pairs, label overlays, Jacobian maps.

Methods return data; this package draws it (it imports nothing from ``fmreg.app`` or
``fmreg.methods``). Every picture is a PNG written atomically, drawn with Pillow and NumPy only.

* :mod:`~fmreg.figures.layout`: what all figures share (slices, screen scale, panels, text,
  composing rows, the atomic write) and the conventions they follow.
* :mod:`~fmreg.figures.overview`: :func:`save_overview`, a registration result at a glance.
* :mod:`~fmreg.figures.roi_pairs`: :class:`RoiPairView`, :func:`save_roi_pairs`.
* :mod:`~fmreg.figures.label_overlay`: :func:`save_label_overlay`, fixed and warped labels.
* :mod:`~fmreg.figures.jacobian`: :func:`jacobian_colours`, :func:`save_jacobian_map`.
"""

from fmreg.figures.jacobian import FOLD_COLOUR, NAN_COLOUR, NEUTRAL_COLOUR, jacobian_colours, save_jacobian_map
from fmreg.figures.label_overlay import save_label_overlay
from fmreg.figures.overview import save_overview
from fmreg.figures.roi_pairs import RoiPairView, save_roi_pairs

__all__ = [
    "FOLD_COLOUR",
    "NAN_COLOUR",
    "NEUTRAL_COLOUR",
    "RoiPairView",
    "jacobian_colours",
    "save_jacobian_map",
    "save_label_overlay",
    "save_overview",
    "save_roi_pairs",
]
