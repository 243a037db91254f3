"""LiteMedSAM (MedSAM on a laptop) as a SAMReg segmenter and encoder, in fmreg's own code.

* :mod:`.tiny_vit`: the TinyViT image encoder (256-pixel input, 256 x 64 x 64 embedding);
* :mod:`.decoder`: the box prompt encoder and SAM's mask decoder;
* :mod:`.model`: :class:`LiteMedSam` and :func:`load_lite_medsam`, which finds the weights
  released with LiteMedSAM (the ``medsam`` extra) without importing any package;
* :mod:`.prompts`: the model input and the box prompts of everything mode;
* :mod:`.backend`: :class:`LiteMedSamBackend`, the segmenter and encoder built from them.

Nothing here imports ``timm``, ``torchvision`` or ``transformers``.
"""

from fmreg.segment.medsam.backend import BOX_OVERLAP, BOX_SIZES, CLASSICAL_BOXES, LiteMedSamBackend
from fmreg.segment.medsam.model import (
    IMAGE_SIZE,
    INSTALL_HINT,
    WEIGHTS_PACKAGE,
    LiteMedSam,
    default_weights_path,
    load_lite_medsam,
)
from fmreg.segment.medsam.prompts import grid_boxes, mask_prompt_boxes, preprocess

__all__ = [
    "BOX_OVERLAP",
    "BOX_SIZES",
    "CLASSICAL_BOXES",
    "IMAGE_SIZE",
    "INSTALL_HINT",
    "WEIGHTS_PACKAGE",
    "LiteMedSam",
    "LiteMedSamBackend",
    "default_weights_path",
    "grid_boxes",
    "load_lite_medsam",
    "mask_prompt_boxes",
    "preprocess",
]
