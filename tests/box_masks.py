"""A test helper shared by several test modules (tests/ is on sys.path, rootdir-relative import)."""

import torch


def box(shape, r0, r1, c0, c1):
    """``(H, W)`` bool mask, True on rows ``r0:r1`` and columns ``c0:c1``."""
    m = torch.zeros(shape, dtype=torch.bool)
    m[r0:r1, c0:c1] = True
    return m
