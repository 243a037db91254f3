"""Built-in example pairs: synthetic torso phantoms with a known deformation.

The repository ships no patient data, so examples, tests and the CLI demo use pairs generated
here. Each pair is rendered analytically: organs are ellipses (2D) or ellipsoids (3D) defined
in world millimetres relative to the centre of the grid, with smooth sinusoidal textures.

The moving image is the same anatomy seen through a smooth, invertible map
``S(y) = y + v(y)`` (moving → fixed, ``v`` a sum of Gaussian bumps in mm), i.e.
``moving(y) = phantom(S(y))``. Rendering the moving image and labels at ``S(y)`` directly is
equivalent to warping the fixed phantom (labels with nearest neighbour) but does not add a
second interpolation. The ground truth returned is the inverse, ``T = S⁻¹``, sampled on the
fixed grid: the fixed→moving transform of :mod:`fmreg.transforms.displacement`, so
``warp(moving, true_field) ≈ fixed`` and ``warp_labels(moving_labels, true_field) ≈
fixed_labels``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from fmreg.transforms.displacement import DisplacementField
from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image

__all__ = ["LABEL_NAMES", "PhantomPair", "make_pair", "phantom_grid"]

#: Label value → structure name, identical in 2D and 3D.
LABEL_NAMES: dict[int, str] = {1: "lungs", 2: "myocardium", 3: "blood pool", 4: "kidney", 5: "spine"}

#: Largest displacement (mm) of the true deformation anywhere on the grid.
MAX_DISPLACEMENT_MM = 6.0


@dataclass
class PhantomPair:
    """A synthetic registration pair with its ground truth.

    Attributes:
        fixed: Fixed image, float32 intensities roughly in [0, 1].
        moving: Moving image on the same grid as ``fixed``: the fixed anatomy deformed, with
            a mild intensity change (gain, offset, smooth shading) and different noise.
        fixed_labels: int64 label map on the fixed grid, values 0 (background) and 1..5
            (see :data:`LABEL_NAMES`).
        moving_labels: int64 label map on the moving grid.
        true_field: The fixed→moving transform ``T`` on the fixed grid, physical mm.
    """

    fixed: Image
    moving: Image
    fixed_labels: Image
    moving_labels: Image
    true_field: DisplacementField


# ---------------------------------------------------------------------------- geometry
def _rotation(axis: int, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def phantom_grid(ndim: int) -> Grid:
    """The grid of :func:`make_pair`.

    2D: 160×160 pixels at 1×1 mm, identity direction, origin 0 (like a PNG slice).
    3D: shape ``(10, 96, 96)`` (array order) at 1.6×1.6×8 mm, a cine-MR-like stack whose
    slices are tilted (8° about world z, 6° about world x) and whose origin is not zero.
    """
    if ndim == 2:
        return Grid((160, 160), (1.0, 1.0))
    if ndim == 3:
        direction = _rotation(2, 8.0) @ _rotation(0, 6.0)
        return Grid((10, 96, 96), (1.6, 1.6, 8.0), (-71.5, -88.0, -31.0), tuple(direction.ravel()))
    raise ValueError(f"phantoms are 2D or 3D, got ndim={ndim}")


@dataclass(frozen=True)
class _Ellipsoid:
    """An ellipsoid in phantom coordinates (mm from the grid centre, world axes x, y, z).

    ``angle`` rotates it about z (degrees); ``semi`` are semi-axes in mm along its own axes.
    In 2D only x and y matter.
    """

    centre: tuple[float, float, float]
    semi: tuple[float, float, float]
    angle: float = 0.0

    def radius(self, q: np.ndarray, planar: bool = False) -> np.ndarray:
        """Normalised radius of points ``q`` ``(N, 3)``: < 1 inside, 1 on the surface.

        ``planar`` ignores z: the cross-section through the ellipsoid's centre.
        """
        d = q - np.asarray(self.centre)
        a = math.radians(self.angle)
        c, s = math.cos(a), math.sin(a)
        u = (c * d[:, 0] + s * d[:, 1]) / self.semi[0]
        v = (-s * d[:, 0] + c * d[:, 1]) / self.semi[1]
        w = 0.0 if planar else d[:, 2] / self.semi[2]
        return np.sqrt(u * u + v * v + w * w)


# Anatomy in LPS-like world axes: +x = patient left (drawn on the right of the picture),
# +y = posterior (drawn at the bottom), +z = superior. The body is a long elliptic cylinder
# so every slice of the 3D stack cuts it; the kidney sits low so only some slices show it.
_BODY = _Ellipsoid((0.0, 5.0, 0.0), (70.0, 52.0, 1e4))
_LUNGS = (
    _Ellipsoid((-34.0, -2.0, 6.0), (23.0, 33.0, 60.0), -8.0),
    _Ellipsoid((36.0, 0.0, 6.0), (21.0, 31.0, 60.0), 10.0),
)
_MYOCARDIUM = _Ellipsoid((10.0, -14.0, 4.0), (28.0, 24.0, 38.0), 30.0)
_BLOOD_POOL = _Ellipsoid((11.0, -13.0, 4.0), (16.0, 13.0, 28.0), 30.0)
_KIDNEY = _Ellipsoid((-38.0, 34.0, -20.0), (18.0, 11.0, 28.0), 25.0)
_SPINE = _Ellipsoid((0.0, 40.0, 0.0), (13.0, 12.0, 1e4))


@dataclass(frozen=True)
class _Waves:
    """A smooth random texture: a sum of plane waves, evaluable at any point in mm."""

    k: np.ndarray  # (n, 3) angular wave vectors, rad/mm
    phase: np.ndarray  # (n,)

    @staticmethod
    def draw(rng: np.random.Generator, n: int, wavelength: tuple[float, float], ndim: int) -> "_Waves":
        dirs = rng.normal(size=(n, 3))
        if ndim == 2:
            dirs[:, 2] = 0.0
        else:
            # Keep most variation in-plane: 8 mm slices would alias through-plane ripples.
            dirs[:, 2] *= 0.3
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        lam = rng.uniform(*wavelength, size=n)
        k = dirs * (2 * math.pi / lam)[:, None]
        return _Waves(k.astype(np.float32), rng.uniform(0, 2 * math.pi, size=n).astype(np.float32))

    def __call__(self, q: np.ndarray) -> np.ndarray:
        """Texture at ``q`` ``(N, 3)``, values in about [-1, 1]."""
        # float32 halves the cost of the cosines; texture needs no more precision.
        return np.cos(q.astype(np.float32) @ self.k.T + self.phase).mean(axis=1) * math.sqrt(2.0)


@dataclass(frozen=True)
class _Textures:
    body: _Waves
    lung: _Waves
    organ: _Waves

    @staticmethod
    def draw(rng: np.random.Generator, ndim: int) -> "_Textures":
        return _Textures(
            _Waves.draw(rng, 4, (14.0, 30.0), ndim),
            _Waves.draw(rng, 6, (4.0, 8.0), ndim),
            _Waves.draw(rng, 4, (6.0, 12.0), ndim),
        )


def _render(q: np.ndarray, tex: _Textures, planar: bool) -> tuple[np.ndarray, np.ndarray]:
    """Intensity and label of the phantom at points ``q`` ``(N, 3)`` (mm from grid centre).

    ``planar`` renders the 2D phantom: every organ is cut through its own centre, so the
    single slice shows all of them. Later structures overwrite earlier ones, so the heart
    lies over the lungs and so on.
    """
    img = np.zeros(len(q), dtype=np.float32)
    lab = np.zeros(len(q), dtype=np.int64)

    def fill(shape: _Ellipsoid, label: int, rim: float, rim_value: float, base: float, waves: _Waves, amp: float) -> None:
        """Paint ``shape``: ``base + amp·waves`` inside, ``rim_value`` beyond normalised
        radius ``rim`` (``rim`` = 1: no rim); label 0 leaves the labels alone."""
        r = shape.radius(q, planar)
        m = r <= 1
        inner = base + amp * waves(q[m])
        img[m] = np.where(r[m] > rim, rim_value, inner) if rim < 1 else inner
        if label:
            lab[m] = label

    # The body's bright rim is subcutaneous fat, as on SSFP cine images.
    fill(_BODY, 0, 0.88, 0.72, 0.40, tex.body, 0.05)
    for lung in _LUNGS:
        fill(lung, 1, 1.0, 0.0, 0.10, tex.lung, 0.05)
    fill(_KIDNEY, 4, 0.75, 0.66, 0.50, tex.organ, 0.06)
    fill(_SPINE, 5, 0.80, 0.88, 0.58, tex.organ, 0.04)
    fill(_MYOCARDIUM, 2, 1.0, 0.0, 0.27, tex.organ, 0.02)
    fill(_BLOOD_POOL, 3, 1.0, 0.0, 0.86, tex.organ, 0.03)
    return img, lab


# ---------------------------------------------------------------------------- deformation
@dataclass(frozen=True)
class _Bumps:
    """``v(p) = Σ_i g_i(p) · (w_i + G_i (p − c_i))``: Gaussian-windowed displacements in mm.

    Bump ``i`` has centre ``c_i`` (mm from the grid centre), width ``sigma_i`` (mm), a shift
    ``w_i`` (mm) and a diagonal radial gain ``G_i`` (unitless; positive values make the
    anatomy around ``c_i`` look smaller in the moving image, like the heart between end
    diastole and end systole).
    """

    centre: np.ndarray  # (n, 3)
    sigma: np.ndarray  # (n,)
    shift: np.ndarray  # (n, 3)
    gain: np.ndarray  # (n, 3)

    def __call__(self, q: np.ndarray) -> np.ndarray:
        """``v`` at points ``q`` ``(N, 3)`` in mm, same dtype as ``q``."""
        out = np.zeros_like(q)
        for c, s, w, g in zip(self.centre, self.sigma, self.shift, self.gain):
            d = q - c.astype(q.dtype)
            weight = np.exp(np.einsum("ij,ij->i", d, d) * (-0.5 / (s * s)))[:, None]
            out += weight * (w.astype(q.dtype) + g.astype(q.dtype) * d)
        return out

    def scaled(self, factor: float) -> "_Bumps":
        return _Bumps(self.centre, self.sigma, self.shift * factor, self.gain * factor)

    def lipschitz_bound(self) -> float:
        """An upper bound on the operator norm of ``∇v`` anywhere in space.

        For a shift bump ``‖∇(g w)‖ = ‖w‖ r/σ² · g ≤ ‖w‖ e^{-1/2}/σ``; for a radial bump
        ``∇(g G d) = g G (I − d dᵀ/σ²)`` whose norm is at most ``max|G|``. Below one,
        ``S = id + v`` is a diffeomorphism (its Jacobian ``I + ∇v`` cannot be singular), so
        ``T = S⁻¹`` exists, is smooth and has a positive Jacobian determinant everywhere.
        """
        shifts = np.linalg.norm(self.shift, axis=1) * math.exp(-0.5) / self.sigma
        gains = np.abs(self.gain).max(axis=1)
        return float((shifts + gains).sum())


def _draw_bumps(rng: np.random.Generator, ndim: int) -> _Bumps:
    n_random = 3
    # Through-plane motion is kept small: on 8 mm slices it would otherwise move structures
    # between slices, which no 2D-slice method could recover.
    z_gain = 0.0 if ndim == 2 else 0.1
    centres = [np.asarray(_MYOCARDIUM.centre)]
    sigmas = [20.0]
    shifts = [np.zeros(3)]
    gains = [np.array([1.0, 1.0, z_gain]) * rng.uniform(0.25, 0.32)]
    for _ in range(n_random):
        ang = rng.uniform(0, 2 * math.pi)
        rad = math.sqrt(rng.uniform(0, 1))  # uniform over the body's cross-section
        centres.append(np.array([
            _BODY.centre[0] + 0.8 * _BODY.semi[0] * rad * math.cos(ang),
            _BODY.centre[1] + 0.8 * _BODY.semi[1] * rad * math.sin(ang),
            rng.uniform(-20, 20) if ndim == 3 else 0.0,
        ]))
        direction = rng.normal(size=3) * np.array([1.0, 1.0, z_gain])
        shifts.append(direction / np.linalg.norm(direction) * rng.uniform(2.0, 5.0))
        sigmas.append(rng.uniform(18.0, 30.0))
        gains.append(np.zeros(3))
    return _Bumps(np.array(centres), np.array(sigmas), np.array(shifts), np.array(gains))


def _invert_at(bumps: _Bumps, q: np.ndarray, iterations: int = 100, tol: float = 1e-3) -> np.ndarray:
    """``u`` with ``q + u + v(q + u) = q``, i.e. ``T(q) = q + u = S⁻¹(q)`` (mm, ``(N, 3)``).

    Fixed-point iteration on the analytic ``v``; it converges because ``v`` is a contraction
    (:meth:`_Bumps.lipschitz_bound` < 1). ``tol`` is in mm.
    """
    u = -bumps(q)
    for _ in range(iterations):
        new = -bumps(q + u)
        delta = float(np.abs(new - u).max())
        u = new
        if delta < tol:
            break
    return u


# ---------------------------------------------------------------------------- rendering
def _points(grid: Grid) -> np.ndarray:
    """World positions (mm, ``(N, 3)``, z = 0 in 2D) of the voxel centres of ``grid``,
    relative to the world position of the grid's central voxel, in array (C) order."""
    n = grid.ndim
    mesh = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in grid.shape], indexing="ij")
    index = np.stack([m.ravel() for m in reversed(mesh)], axis=1)  # components x, y[, z]
    index -= (np.asarray(grid.size, dtype=np.float64) - 1) / 2
    world = index @ grid.index_to_world_matrix()[:n, :n].T
    return np.pad(world, ((0, 0), (0, 3 - n)))


def _rician(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude-MR noise: the modulus of a complex signal with Gaussian noise."""
    re = img + rng.normal(0, sigma, img.shape)
    im = rng.normal(0, sigma, img.shape)
    return np.sqrt(re * re + im * im)


def make_pair(ndim: int, seed: int = 0) -> PhantomPair:
    """Generate a synthetic fixed/moving pair with labels and the true transform.

    Args:
        ndim: 2 (160×160 at 1 mm) or 3 (``(10, 96, 96)`` at 1.6×1.6×8 mm, tilted slices,
            non-zero origin; see :func:`phantom_grid`).
        seed: Seeds the textures, the deformation and the noise; the same seed gives
            identical tensors.

    Returns:
        A :class:`PhantomPair` whose moving image lies on the fixed grid. The true
        displacement is at most :data:`MAX_DISPLACEMENT_MM` long and the transform is a
        diffeomorphism (positive Jacobian determinant everywhere).

    Raises:
        ValueError: ``ndim`` is not 2 or 3.
        RuntimeError: The drawn deformation could fold (a bug: the bump sizes are chosen so
            that it cannot).
    """
    grid = phantom_grid(ndim)
    rng = np.random.default_rng(seed)
    tex = _Textures.draw(rng, ndim)
    bumps = _draw_bumps(rng, ndim)
    q = _points(grid)
    planar = ndim == 2

    # Largest displacement exactly at the bound unless that would bring v close to folding.
    longest = float(np.linalg.norm(bumps(q), axis=1).max())
    bumps = bumps.scaled(min(MAX_DISPLACEMENT_MM / longest, 0.8 / bumps.lipschitz_bound()))
    if not bumps.lipschitz_bound() < 1:
        raise RuntimeError(f"phantom deformation for seed {seed} may fold")

    # Partial-volume blur at organ edges, in-plane only: through-plane the slice profile of
    # an 8 mm stack is not a small Gaussian, and leaving it out keeps slices distinct.
    spacing = np.asarray(grid.spacing_array)
    blur = np.where(spacing < 2 * spacing.min(), 0.6, 0.0)

    def render(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        img, lab = _render(points, tex, planar)
        img = ndimage.gaussian_filter(img.reshape(grid.shape), blur, mode="nearest")
        return img, lab.reshape(grid.shape)

    fixed_img, fixed_lab = render(q)
    moving_img, moving_lab = render(q + bumps(q))  # moving(y) = phantom(S(y))

    # Mild intensity change between acquisitions: gain, offset and coil shading across x.
    x = q[:, 0].reshape(grid.shape)
    shading = 1.0 + 0.06 * x / max(float(np.abs(x).max()), 1e-6)
    moving_img = (0.92 * moving_img + 0.03) * shading
    fixed_img = _rician(fixed_img, 0.01, rng)
    moving_img = _rician(moving_img, 0.02, rng)

    # World axes are the physical frame, so these displacements need no conversion.
    u = _invert_at(bumps, q.astype(np.float32))[:, :ndim]
    field = DisplacementField(
        torch.from_numpy(np.ascontiguousarray(u.T.reshape(ndim, *grid.shape), dtype=np.float32)),
        grid,
        Frame.PHYSICAL,
    )

    def image(arr: np.ndarray, name: str) -> Image:
        dtype = np.int64 if arr.dtype.kind == "i" else np.float32
        return Image(torch.from_numpy(np.ascontiguousarray(arr, dtype=dtype)), grid, f"phantom{ndim}d-{name}")

    return PhantomPair(
        fixed=image(fixed_img, "fixed"),
        moving=image(moving_img, "moving"),
        fixed_labels=image(fixed_lab, "fixed-labels"),
        moving_labels=image(moving_lab, "moving-labels"),
        true_field=field,
    )
