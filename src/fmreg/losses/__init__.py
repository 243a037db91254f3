"""Loss terms: plain functions (the functional core) and thin modules returning a :class:`LossRecord`.

* :mod:`~fmreg.losses.image` — image dissimilarities (MSE, LNCC) and image correlation.
* :mod:`~fmreg.losses.overlap` — soft Dice and the ROI-pair terms of SAMReg (paper 002, Eq. 10).
* :mod:`~fmreg.losses.regularization` — smoothness of a velocity or displacement field.
* :mod:`~fmreg.losses.gradicon` — GradICON's bidirectional similarity + inverse-consistency loss.
"""

from fmreg.losses.base import LossRecord
from fmreg.losses.image import LNCC, MSE, GaussianLNCC, correlation, gaussian_lncc, lncc, mse
from fmreg.losses.overlap import SoftDice, roi_pair_loss, soft_dice
from fmreg.losses.regularization import Diffusion, diffusion

__all__ = ["LossRecord", "MSE", "LNCC", "GaussianLNCC", "mse", "lncc", "gaussian_lncc", "correlation", "SoftDice", "soft_dice",
           "roi_pair_loss", "Diffusion", "diffusion"]
