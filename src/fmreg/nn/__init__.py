"""Registration networks (batch-first tensors, transforms from :mod:`fmreg.transforms`)."""
