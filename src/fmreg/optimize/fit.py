"""ROI pairs (and images) → a dense diffeomorphic field (paper 002, Eq. 10), multi-resolution.

The fit minimises, over a stationary velocity field ``v`` (physical mm, world axes),

    L(v) = Σ_k w_k [ w_mse · MSE(M_k^fixed, M_k^moving ∘ T) + w_dice · (1 − Dice(·, ·)) ]
           + w_image · D(I^fixed, I^moving ∘ T)        (D: MSE or 1 − LNCC)
           + λ · mean ‖∇v‖²  (mm/mm, physical derivatives)

with ``T = A ∘ exp(v)`` (:class:`~fmreg.transforms.sequential.SequentialTransform` of a
:class:`~fmreg.transforms.velocity.StationaryVelocity` and an
:class:`~fmreg.transforms.affine.AffineTransform`), so the result is a diffeomorphism up to
interpolation error. The pair weights ``w_k`` (match similarities) sum to one, so ``λ`` keeps
its meaning whatever the number of pairs (the paper writes a plain sum). The paper uses
equal-weight MSE + Dice and the L2 norm of the field gradient; the image term is fmreg's hybrid.

Stages: an optional affine stage, then one deformable stage per pyramid level
(:mod:`fmreg.optimize.pyramid`). With the image term on and ``verify_dice`` set (the default),
the pyramid first fits the images alone, the pairs whose Dice under that transform is too low
are dropped, and the rest refine the finest optimised level. Otherwise every stage uses every
pair (the paper). The loss terms are :mod:`fmreg.losses`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from fmreg.core.grid import Grid
from fmreg.core.image import Image
from fmreg.core.intensity import normalize
from fmreg.errors import FmregError
from fmreg.optimize.initialization import moments_affine
from fmreg.optimize.stages import Fitter, Stage
from fmreg.transforms.affine import AffineTransform
from fmreg.transforms.displacement import DisplacementField

log = logging.getLogger("fmreg")


@dataclass
class FitOptions:
    """Settings of the dense fit (how the defaults were measured: ``docs/benchmarks.md``).

    Attributes:
        levels: Number of pyramid levels (in-plane factor 2 each; axes whose spacing is over
            twice the finest are never shrunk, so a 7-slice cardiac stack keeps its 7 slices).
        iterations: Adam steps per level, coarsest first (one value per level, or one value).
        lr: Adam step size in mm of velocity.
        control_spacing: Spacing (mm) of the velocity control grid; the velocity is
            interpolated linearly between control points, which bounds how local it can be.
        reg_weight: λ, weight of the mean squared physical gradient of the velocity.
        mse_weight, dice_weight: Weights of the two ROI terms (paper: equal); low by default
            because the classical backend's ROIs are not reliable enough to outweigh the images.
        image_weight: Weight of the image term (0 turns the hybrid off).
        image_metric: ``"auto"`` (``"mind"`` when the images anti-correlate under the start,
            else ``"mse"``: :func:`resolve_image_metric`), ``"mse"`` (intensities normalised
            to [0, 1] by robust percentiles; same-modality pairs), ``"lncc"`` (local normalised cross-correlation: any
            monotone intensity relation) or ``"mind"`` (MSE of MIND-SSC descriptors computed
            on each level: local structure, whatever the contrasts; every stage then uses it).
        centroid_weight: Weight of a sparse term pulling ``T(fixed ROI centroid)`` onto the
            moving ROI centroid (squared distance in units of 10 mm).
        lncc_window_mm: LNCC window edge in mm (per axis at least 3 voxels).
        squaring_steps: Most scaling-and-squaring steps; a velocity that moves no point by more
            than a few control voxels gets fewer (half a voxel after scaling: ITK's automatic rule).
        verify_dice: With the image term on, the pyramid first fits the images alone; every
            ROI pair whose Dice under that transform is below this value is then dropped (a
            pair the images contradict is most likely a wrong match) and the kept pairs
            refine the finest optimised level for ``refine_iterations`` more steps. None
            uses every pair at every level (the paper's single-stage fit).
        affine_iterations: Steps of an affine stage (coarsest level, same terms as the first
            deformable stage) before the deformable ones; 0 turns it off.
        affine_lr: Adam step size of the affine parameters (normalized units).
        affine_metric: Image term of the affine stage (None: ``image_metric``).
        match_histogram: Map the moving intensities onto the fixed image's histogram before
            the fit, so the MSE term compares like with like.
        refine_iterations: Steps of the verified-pairs refinement.
        max_fit_voxels: Levels with more voxels than this are not optimised (the last
            optimised level's velocity is still integrated on the full grid): the finest
            level of a 3D volume costs most and adds least.
        initialize: ``"moments"`` starts from the affine map that matches the centroids and
            per-axis extents of the imaged objects (:mod:`fmreg.optimize.initialization`)
            when both images show one whole; otherwise, and with ``"identity"``, the fit
            starts from the identity.
        fine_control_spacing, fine_image_weight: Control spacing (mm; never below two voxels
            of the level) and image weight of the finest optimised level, used when the images
            agree there (see ``fine_min_correlation``); None keeps ``control_spacing`` /
            ``image_weight``.
        pyramid_sigma: Anti-aliasing of the images on the coarser levels, in level voxels
            (:func:`fmreg.optimize.pyramid.antialias`); the finest optimised level is never
            smoothed.
        fine_min_correlation: The fine settings apply only when the correlation of the fixed
            and the warped moving image (intensities as read, where the start maps the fixed
            image into the moving one), on the finest optimised level before it is fitted,
            is at least this (None: always, with the image term on); the value is reported as
            ``fine_correlation``.
    """

    levels: int = 4
    iterations: Sequence[int] | int = (60, 40, 30, 20)
    lr: float = 1.0
    control_spacing: float = 7.0
    reg_weight: float = 0.15
    mse_weight: float = 0.1
    dice_weight: float = 0.1
    image_weight: float = 0.5
    image_metric: str = "auto"
    centroid_weight: float = 0.0
    lncc_window_mm: float = 9.0
    squaring_steps: int = 7
    verify_dice: float | None = 0.7
    affine_iterations: int = 0
    affine_lr: float = 0.005
    affine_metric: str | None = "lncc"
    match_histogram: bool = False
    refine_iterations: int = 15
    max_fit_voxels: int = 250_000
    initialize: str = "moments"
    fine_control_spacing: float | None = 2.0
    pyramid_sigma: float = 1.0
    fine_image_weight: float | None = 2.0
    fine_min_correlation: float | None = 0.96

    def to_dict(self) -> dict:
        d = asdict(self)
        d["iterations"] = list(self.iterations) if not isinstance(self.iterations, int) else self.iterations
        return d

    def iterations_per_level(self) -> list[int]:
        iters = [self.iterations] * self.levels if isinstance(self.iterations, int) else list(self.iterations)
        if len(iters) != self.levels:
            raise FmregError(f"iterations has {len(iters)} values for {self.levels} levels")
        return iters

    def check(self) -> None:
        """Raise :class:`FmregError` for option values the fit cannot use."""
        if self.image_metric not in ("auto", "lncc", "mse", "mind"):
            raise FmregError(f"unknown image_metric '{self.image_metric}': choose auto, lncc, mse or mind")
        if self.affine_metric not in (None, "lncc", "mse", "mind"):
            raise FmregError(f"unknown affine_metric '{self.affine_metric}': choose lncc, mse or mind")
        if self.initialize not in ("moments", "identity"):
            raise FmregError(f"unknown initialize '{self.initialize}': choose moments or identity")


@dataclass
class FitReport:
    """What happened during the fit (JSON-serialisable)."""

    levels: list[dict] = field(default_factory=list)
    kept_pairs: list[int] | None = None
    affine: dict | None = None
    initial_affine_mm: list | None = None
    fine_correlation: float | None = None
    #: ``{"metric", "start", "end"}``: the image dissimilarity before and after the fit, on the
    #: finest optimised level (None without the image term).
    image_term: dict | None = None
    #: With ``image_metric="auto"``: the correlation of the images under the start that chose
    #: the metric (:func:`resolve_image_metric`); the metric used is in ``image_term``.
    start_correlation: float | None = None


def finest_level(opt: FitOptions, grids: Sequence[Grid]) -> int:
    """Index of the finest pyramid level the fit optimises (levels over ``max_fit_voxels`` are not)."""
    return max(lv for lv, g in enumerate(grids) if lv == 0 or g.numel <= opt.max_fit_voxels)


def plan_stages(opt: FitOptions, grids: Sequence[Grid], n_pairs: int, verify: bool) -> list[Stage]:
    """The stages of a fit, in order (see the module docstring)."""
    iters = opt.iterations_per_level()
    active = [lv for lv, g in enumerate(grids) if lv == 0 or g.numel <= opt.max_fit_voxels]
    finest = active[-1]
    roi_everywhere = n_pairs > 0 and not verify
    stages = [Stage(lv, iters[lv], roi_everywhere, finest=lv == finest) for lv in active]
    if verify:
        stages.append(Stage(finest, opt.refine_iterations, True, finest=True, verify=True))
    if opt.affine_iterations > 0:
        stages.insert(0, Stage(active[0], opt.affine_iterations, roi_everywhere, affine=True, finest=active[0] == finest))
    return stages


def _pair_weights(pair_weights: Tensor | None, k: int) -> Tensor:
    weights = torch.ones(k) if pair_weights is None else pair_weights.float().clamp_min(0)
    return weights / weights.sum().clamp_min(1e-6)


def fit_field(
    fixed_grid: Grid,
    fixed_masks: Tensor,
    moving_masks: Tensor,
    moving_grid: Grid,
    options: FitOptions | None = None,
    fixed_image: Tensor | None = None,
    moving_image: Tensor | None = None,
    pair_weights: Tensor | None = None,
    slice_axis: int | None = None,
    initial_affine: np.ndarray | None = None,
) -> tuple[DisplacementField, FitReport]:
    """Fit a diffeomorphic field to ROI pairs (and optionally the images).

    Args:
        fixed_grid: Grid of the fixed image; the field is returned on it.
        fixed_masks: ``(K, *fixed_grid.shape)`` bool/float ROI masks in the fixed image.
        moving_masks: ``(K, *moving_grid.shape)`` bool/float masks; pair ``k`` is
            ``(fixed_masks[k], moving_masks[k])``.
        moving_grid: Grid of the moving image.
        options: Fit settings.
        fixed_image: ``(*fixed_grid.shape)`` intensities for the hybrid image term, or None.
        moving_image: ``(*moving_grid.shape)`` intensities, or None.
        pair_weights: ``(K,)`` non-negative weights of the pairs (e.g. match similarity).
        slice_axis: For ROIs segmented slice by slice in 3D (Alg. 1): the array axis the
            slices were cut along. Each pair then constrains only the in-plane mapping of its
            fixed slice(s): the moving mask is extruded along the axis and the ROI terms are
            evaluated on the fixed mask's slices only. Otherwise a single-slice moving mask
            would fade under any through-plane motion and pin the heart's base in place.
        initial_affine: ``(ndim+1, ndim+1)`` map of fixed physical mm to moving physical mm to
            start from (e.g. picked by :func:`choose_start`); None starts as
            ``options.initialize`` says.

    Returns:
        The fixed→moving displacement in physical mm on ``fixed_grid``, and a report.
    """
    opt = options or FitOptions()
    k = int(fixed_masks.shape[0])
    if moving_masks.shape[0] != k:
        raise FmregError(f"{k} fixed ROI masks but {moving_masks.shape[0]} moving ones")
    use_image = opt.image_weight > 0 and fixed_image is not None and moving_image is not None
    opt.check()
    report = FitReport()
    start = initial_affine
    if start is None and opt.initialize == "moments" and fixed_image is not None and moving_image is not None:
        start = moments_affine(Image(fixed_image.float(), fixed_grid), Image(moving_image.float(), moving_grid))
    if k == 0 and not use_image:
        log.warning("no ROI pairs and no image term: returning the %s", "start" if start is not None else "identity")
        if start is None:
            return DisplacementField.identity(fixed_grid), report
        report.initial_affine_mm = np.asarray(start).tolist()
        with torch.no_grad():
            return AffineTransform.from_physical(np.asarray(start, dtype=np.float64), fixed_grid).field(fixed_grid), report
    if use_image:
        opt, report.start_correlation = resolve_image_metric(
            Image(fixed_image, fixed_grid), Image(moving_image, moving_grid), start, opt, chosen=True)
    elif opt.image_metric == "auto":
        opt = replace(opt, image_metric="mse")  # no image term: nothing to decide
    fitter = Fitter(opt, fixed_grid, moving_grid, report, slice_axis=slice_axis, use_image=use_image)
    fitter.set_pairs(fixed_masks, moving_masks, _pair_weights(pair_weights, k))
    if use_image:
        fitter.set_images(fit_intensities(fixed_image), fit_intensities(moving_image), (fixed_image, moving_image))
    if start is not None:
        fitter.start_from_affine(np.asarray(start, dtype=np.float64))
        report.initial_affine_mm = np.asarray(start).tolist()
    verify = use_image and k > 0 and opt.verify_dice is not None
    transform = fitter.run(plan_stages(opt, fitter.grids, k, verify))
    with torch.no_grad():
        return transform.field(fixed_grid), report


def fit_intensities(data: Tensor) -> Tensor:
    """``(*shape)`` intensities in [0, 1] for the fit's image term: the 1st to 99th percentile
    window of the values above the image's minimum (a padding frame in one image of a pair
    would otherwise shift its window against the other's), clipped outside it."""
    return normalize(data, max_samples=200_000, above_minimum=True)


def _comparing(opt: FitOptions) -> FitOptions:
    """The options under which two starts are compared: the fit's own metric, except LNCC,
    whose ``1 − LNCC`` is near 1 for any start far from the answer (0.96 against 0.99 on the
    known-similarity pairs), so no ratio of two of them passes :data:`START_MARGIN`; starts are
    then compared with MIND-SSC descriptors, which, like LNCC, do not assume one contrast."""
    return replace(opt, image_metric="mind") if opt.image_metric == "lncc" else opt


def _start_terms(fixed: Image, moving: Image, starts: list[np.ndarray], opt: FitOptions) -> list[float]:
    """The image term under each start (:meth:`Fitter.start_terms`), compared as
    :func:`_comparing` says, on the level :func:`_start_level` says."""
    opt = _comparing(opt)
    fitter = Fitter(opt, fixed.grid, moving.grid, FitReport(), slice_axis=None, use_image=True)
    fitter.set_images(fit_intensities(fixed.data), fit_intensities(moving.data))
    return fitter.start_terms(starts, _start_level(opt, fitter.grids))


def _start_level(opt: FitOptions, grids: Sequence[Grid]) -> int:
    """The pyramid level on which starts are compared: the finest optimised one, or the coarsest
    with ``image_metric="mind"``, whose descriptors see a few voxels only, so that on a fine
    level a start a few voxels off looks as bad as one far off (set C lung seed 1: the right
    consensus won by 1.16× on the finest level, short of the margin)."""
    return 0 if opt.image_metric == "mind" else finest_level(opt, grids)


def _usual_start(fixed: Image, moving: Image, opt: FitOptions) -> np.ndarray | None:
    """The moments start where ``opt.initialize`` asks for it and the images allow one, else None."""
    if opt.initialize != "moments":
        return None
    return moments_affine(Image(fixed.data.float(), fixed.grid), Image(moving.data.float(), moving.grid))


def resolve_image_metric(fixed: Image, moving: Image, start: np.ndarray | None, options: FitOptions | None = None,
                         chosen: bool = False) -> tuple[FitOptions, float | None]:
    """``options`` with ``image_metric="auto"`` made concrete, and the correlation that decided it.

    ``"mind"`` when the two images, as read, anti-correlate under the start, else ``"mse"``: MSE
    of intensities assumes one contrast, and on a pair of inverted contrasts it deforms the image
    until the intensities agree (known-transform pairs: 84 px mean, worse than the identity's
    38). The start is found with the descriptors, which do not depend on the contrast: the
    choice between ``start`` (a candidate, e.g. the ROI consensus) and the usual start, or with
    ``chosen`` the start already chosen (None: the identity). Measured under that start, the correlation was above
    0.54 on every same-contrast pair of ``pairs.csv`` and the known-transform sets, and below
    −0.5 on every inverted one. Other metrics come back unchanged, with None.
    """
    opt = options or FitOptions()
    if opt.image_metric != "auto":
        return opt, None
    mind = replace(opt, image_metric="mind")
    if chosen:
        where = start  # None: the identity
    elif start is None:
        where = _usual_start(fixed, moving, mind)
    else:
        where = choose_start(fixed, moving, start, mind).affine
    r = round(start_correlation(fixed, moving, where, opt), 4)
    log.info("fit: the images correlate at %.3f under the start: image term %s", r, "mind" if r < 0 else "mse")
    return replace(opt, image_metric="mind" if r < 0 else "mse"), r


#: A start other than the usual one must leave the images at least this many times less
#: different (the fit's image term, finest optimised level, before the fit): the usual start is
#: the simpler explanation, and look-alike regions of two subjects can vote for a global move
#: that the images like only a little better. Chosen on the 12 pairs of ``pairs.csv`` and eight
#: known-similarity pairs, confirmed on others (``docs/benchmarks.md``).
START_MARGIN = 1.5


@dataclass
class StartChoice:
    """The start :func:`choose_start` picked (``candidate`` or ``usual``), its ``(ndim+1,
    ndim+1)`` physical affine (None: the usual start is the identity) and both image terms."""

    name: str
    affine: np.ndarray | None
    terms: dict


def choose_start(fixed: Image, moving: Image, candidate: np.ndarray, options: FitOptions | None = None) -> StartChoice:
    """Start from ``candidate`` (a fixed → moving physical affine, e.g. the ROI consensus) or from
    the usual start (``options.initialize``: the moments start where the images allow one, else
    the identity): the candidate wins when the images disagree :data:`START_MARGIN` times less
    under it."""
    opt, _ = resolve_image_metric(fixed, moving, candidate, options)
    candidate = np.asarray(candidate, dtype=np.float64)
    usual = _usual_start(fixed, moving, opt)
    starts = [candidate, np.eye(fixed.ndim + 1) if usual is None else usual]
    cand_term, usual_term = _start_terms(fixed, moving, starts, opt)
    terms = {"candidate": round(cand_term, 6), "usual": round(usual_term, 6)}
    if cand_term * START_MARGIN < usual_term:
        log.info("fit: starting from the candidate global transform (image terms %s)", terms)
        return StartChoice("candidate", candidate, terms)
    return StartChoice("usual", usual, terms)


def start_correlation(fixed: Image, moving: Image, start: np.ndarray | None, options: FitOptions | None = None) -> float:
    """Correlation of the fixed and the moving image as read, under the physical fixed → moving
    affine ``start`` (None: identity), on the coarsest pyramid level, over the start's overlap."""
    # Intensities only: the correlation reads the images as they are, whatever the metric.
    opt = replace(options or FitOptions(), image_metric="mse")
    fitter = Fitter(opt, fixed.grid, moving.grid, FitReport(), slice_axis=None, use_image=True)
    fitter.set_images(fit_intensities(fixed.data), fit_intensities(moving.data), (fixed.data, moving.data))
    if start is not None:
        fitter.start_from_affine(np.asarray(start, dtype=np.float64))
    return fitter.start_correlation()


#: Adam steps of :func:`refine_start`'s affine stage (coarsest level).
REFINE_ITERATIONS = 100


def refine_start(fixed: Image, moving: Image, choice: StartChoice, options: FitOptions | None = None) -> StartChoice:
    """``choice`` with its affine refined on the images, if the images agree
    :data:`START_MARGIN` times better under the refined affine (the rule that lets a start
    replace a simpler one); else ``choice`` unchanged.

    The refinement is an affine stage of the fit (coarsest pyramid level, the fit's image
    metric, no ROI terms) from the chosen start: it recovers what neither start has (a 10°
    rotation that the moments start leaves, a consensus a few degrees off), and the margin keeps
    it from reshaping pairs that need no global change (two subjects, two cardiac phases).
    ``choice.terms`` gets the refined image term (``refined``) and whether it was taken.
    """
    opt, _ = resolve_image_metric(fixed, moving, choice.affine, options, chosen=True)
    opt = replace(opt, affine_metric=None, affine_iterations=REFINE_ITERATIONS)
    fitter = Fitter(opt, fixed.grid, moving.grid, FitReport(), slice_axis=None, use_image=True)
    fitter.set_images(fit_intensities(fixed.data), fit_intensities(moving.data))
    start = np.eye(fixed.ndim + 1) if choice.affine is None else np.asarray(choice.affine, dtype=np.float64)
    fitter.start_from_affine(start)
    fitter.run([Stage(0, opt.affine_iterations, False, affine=True, finest=False)])  # level 0: the coarsest
    refined = fitter.affine.to_physical()
    start_term, refined_term = _start_terms(fixed, moving, [start, refined], opt)
    taken = refined_term * START_MARGIN < start_term
    terms = {**choice.terms, "refined": round(refined_term, 6), "refined_taken": taken}
    if taken:
        log.info("fit: the affine refinement of the %s start is taken (image terms %s)", choice.name, terms)
        return StartChoice(choice.name, refined, terms)
    return StartChoice(choice.name, choice.affine, terms)
