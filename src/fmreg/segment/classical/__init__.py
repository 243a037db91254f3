"""The weight-free SAMReg backend: classical region proposals and handcrafted features.

* :mod:`.segmenter`: :class:`ClassicalSegmenter`, segment everything with multi-scale
  region proposals (built from :mod:`.partitions` and :mod:`.candidates`), a stand-in for
  SAM's "everything" mode (paper 002, Eq. 4);
* :mod:`.encoder`: :class:`ClassicalEncoder`, dense handcrafted features for prototypes, a
  stand-in for SAM's image encoder (Eq. 3), with the image descriptor :func:`mind_ssc`.
"""

from fmreg.segment.classical.encoder import (
    ClassicalEncoder,
    classical_features,
    gaussian_blur,
    mind_ssc,
    soft_histogram,
)
from fmreg.segment.classical.segmenter import (
    RECOMMENDED_MIN_SCORE,
    RECOMMENDED_MIN_STABILITY,
    ClassicalSegmenter,
    propose_regions,
)

__all__ = [
    "RECOMMENDED_MIN_SCORE",
    "RECOMMENDED_MIN_STABILITY",
    "ClassicalEncoder",
    "ClassicalSegmenter",
    "classical_features",
    "gaussian_blur",
    "mind_ssc",
    "propose_regions",
    "soft_histogram",
]
