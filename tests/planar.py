"""A test helper shared by several test modules (tests/ is on sys.path, rootdir-relative import)."""

import math

import numpy as np


def similarity(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """``(3, 3)`` homogeneous in-plane similarity: rotation by ``angle_deg``, ``scale``, then ``shift``."""
    a = math.radians(angle_deg)
    m = np.eye(3)
    m[:2, :2] = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    m[:2, 2] = shift
    return m
