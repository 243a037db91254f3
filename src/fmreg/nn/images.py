"""Images into a network and its map back out, through fmreg's geometry.

Each image is brought to the network's input size over its *own* extent (as uniGradICON does),
so the network maps the fixed image's ``NORMALIZED`` frame to the moving image's;
:func:`physical_field` turns that map into a physical displacement on the fixed grid.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image
from fmreg.core.intensity import foundation_normalize, resize
from fmreg.transforms.base import Transform
from fmreg.transforms.displacement import DisplacementField


def network_input(image: Image, size: tuple[int, ...], modality: str = "auto") -> Tensor:
    """``(1, 1, *size)`` intensities in [0, 1], resampled over the image's own extent.

    Args:
        image: A 2D or 3D image (its grid's extent is kept: the network sees the whole image).
        size: Network input shape, array order.
        modality: ``"ct"``, ``"mr"`` or ``"auto"`` (:func:`fmreg.core.intensity.foundation_normalize`).
    """
    data = foundation_normalize(image.data, modality)
    return resize(data[None], size)[None]


def physical_field(transform: Transform, fixed: Grid, moving: Grid) -> DisplacementField:
    """A network's map (fixed → moving ``NORMALIZED`` frames) as a physical field on ``fixed``.

    Args:
        transform: Unbatched map from the fixed image's normalized frame to the moving one's.
        fixed, moving: The images' grids (any shapes, spacings, directions).

    Returns:
        ``T(x) − x`` in mm on ``fixed`` (``T(x)`` a physical point of the moving image).
    """
    with torch.no_grad():
        pts = transform.normalized_points(fixed.shape)[0].double()
    world = moving.convert_points(pts, Frame.NORMALIZED, Frame.PHYSICAL)
    u = world.movedim(-1, 0) - fixed.coordinates(Frame.PHYSICAL, dtype=torch.float64)
    return DisplacementField(u.float(), fixed, Frame.PHYSICAL)


#: The instance-optimisation grid holds at most this many times the network input's voxels.
REFINE_VOXELS = 4


def refinement_inputs(fixed: Image, moving: Image, size: tuple[int, ...], axis: int | None = None,
                      modality: str = "auto") -> tuple[Tensor, Tensor]:
    """The pair as :func:`network_input` (or :func:`stack_inputs`) gives it, at a finer size.

    The size is the fixed image's own (in-plane for a stack), but not below the network's input
    size nor above :data:`REFINE_VOXELS` times its voxel count (twice per axis in 2D): the
    network saw the images resampled to its input size, a correction of its map can use
    the detail that resampling took away.

    Args:
        fixed, moving: The images.
        size: The network's input shape, array order.
        axis: The slice axis of a 3D stack a 2D network registers (None: whole images).
        modality: As :func:`network_input`.

    Returns:
        ``(fixed, moving)``, each ``(B, 1, *io_size)`` (``B`` = 1, or the fixed slice count).
    """
    shape = [n for j, n in enumerate(fixed.grid.shape) if j != axis]
    most = REFINE_VOXELS ** (1 / len(size))
    io_size = tuple(int(min(max(n, s), s * most)) for n, s in zip(shape, size))
    if axis is None:
        return network_input(fixed, io_size, modality), network_input(moving, io_size, modality)
    f, m, _ = stack_inputs(fixed, moving, io_size, axis, modality)
    return f, m


def _slice_positions(n: int) -> Tensor:
    """``NORMALIZED`` coordinates of the ``n`` slices of an axis (``align_corners=True``; 0 for one)."""
    return torch.linspace(-1.0, 1.0, n) if n > 1 else torch.zeros(1)


def stack_inputs(fixed: Image, moving: Image, size: tuple[int, int], axis: int,
                 modality: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """A 3D pair as a batch of 2D slice pairs for a 2D network.

    Fixed slice ``j`` is paired with the moving slice nearest to the same ``NORMALIZED``
    through-plane position (slice ``j`` when both stacks have as many slices). Intensities are
    normalised over each whole stack, then every slice is resampled over its own in-plane extent.

    Args:
        fixed, moving: 3D images.
        size: The network's 2D input shape, array order.
        axis: The array axis the stacks are sliced along (e.g. :func:`~fmreg.core.grid.through_plane_axis`).
        modality: As :func:`network_input`.

    Returns:
        ``(fixed_slices, moving_slices, moving_positions)``: ``(S, 1, *size)`` each, ``S`` the
        fixed slice count, and the ``(S,)`` ``NORMALIZED`` through-plane coordinates of the
        moving slices used.
    """
    n_fixed, n_moving = fixed.grid.shape[axis], moving.grid.shape[axis]
    index = ((_slice_positions(n_fixed) + 1) / 2 * (n_moving - 1)).round().long().clamp(0, n_moving - 1)

    def slices(image: Image, pick: Tensor) -> Tensor:
        data = foundation_normalize(image.data, modality).movedim(axis, 0)[pick]
        return resize(data, size)[:, None]

    return slices(fixed, torch.arange(n_fixed)), slices(moving, index), _slice_positions(n_moving)[index]


def slicewise_field(transform: Transform, fixed: Grid, moving: Grid, axis: int, moving_positions: Tensor) -> DisplacementField:
    """A 2D network's per-slice maps (fixed slice → moving slice, in-plane ``NORMALIZED``
    frames) as one physical field on the 3D fixed grid.

    Each fixed slice maps into the moving slice it was paired with (:func:`stack_inputs`):
    in-plane as the network says, through-plane onto that slice's position.

    Args:
        transform: Map batched over the ``S`` fixed slices.
        fixed, moving: The 3D grids.
        axis: The slice axis (array order).
        moving_positions: ``(S,)`` ``NORMALIZED`` through-plane coordinates of the moving slices.

    Returns:
        ``T(x) − x`` in mm on ``fixed``.
    """
    in_plane = [j for j in range(3) if j != axis]
    with torch.no_grad():
        pts2 = transform.normalized_points([fixed.shape[j] for j in in_plane]).double()  # (S, a, b, 2)
    pts = torch.empty((*pts2.shape[:3], 3), dtype=torch.float64)
    # Component c of a NORMALIZED point runs along array axis ndim − 1 − c.
    pts[..., 2 - in_plane[1]] = pts2[..., 0]
    pts[..., 2 - in_plane[0]] = pts2[..., 1]
    pts[..., 2 - axis] = moving_positions.double().reshape(-1, 1, 1)
    world = moving.convert_points(pts.movedim(0, axis), Frame.NORMALIZED, Frame.PHYSICAL)
    u = world.movedim(-1, 0) - fixed.coordinates(Frame.PHYSICAL, dtype=torch.float64)
    return DisplacementField(u.float(), fixed, Frame.PHYSICAL)
