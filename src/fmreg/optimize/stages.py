"""The stages of the SAMReg dense fit (see :mod:`fmreg.optimize.fit` for the objective).

A :class:`Fitter` holds the fit's state: the velocity ``v`` (physical mm on a control grid)
and the affine ``A`` (normalized frame of the fixed grid) of ``T = A ∘ exp(v)``, and runs one
:class:`Stage` after another. Each stage resamples the data onto its pyramid level, builds the
transform from the current parameters and lets Adam lower a :class:`~fmreg.losses.LossRecord`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from fmreg.core.descriptors import mind_ssc
from fmreg.core.grid import Frame, Grid, mask_centroids
from fmreg.core.image import Image
from fmreg.core.intensity import match_histogram, resize
from fmreg.core.sampling import sample, sample_normalized, sample_vectors
from fmreg.core.view import shared_frame_views
from fmreg.losses import LNCC, MSE, Diffusion, LossRecord, correlation, roi_pair_loss, soft_dice
from fmreg.optimize.adam import Adam
from fmreg.optimize.pyramid import Level, control_shape, level_grids, lncc_window, resample_images, resample_masks
from fmreg.transforms.affine import AffineTransform
from fmreg.transforms.base import Transform
from fmreg.transforms.sequential import SequentialTransform
from fmreg.transforms.velocity import StationaryVelocity

if TYPE_CHECKING:
    from fmreg.optimize.fit import FitOptions, FitReport

log = logging.getLogger("fmreg")

#: Stages with fewer voxels × warped channels than this run on one torch thread: small levels
#: are dominated by per-op overhead, which extra threads only add to (measured on ACDC: 6.1 s
#: with one thread vs 8.7 s with two for the image fit).
SINGLE_THREAD_WORK = 200_000


@dataclass
class Stage:
    """One optimisation stage: ``iterations`` Adam steps on pyramid level ``level``.

    Attributes:
        roi: The ROI-pair terms are on.
        affine: Optimise the affine (the velocity stays as it is) instead of the velocity.
        finest: The level is the finest optimised one (fine settings may apply).
        verify: First drop the ROI pairs that the transform so far contradicts.
    """

    level: int
    iterations: int
    roi: bool
    affine: bool = False
    finest: bool = False
    verify: bool = False

    @property
    def kind(self) -> str:
        return "affine" if self.affine else ("deformable +ROI" if self.roi else "deformable")


def _warp(x: Tensor, points: Tensor) -> Tensor:
    """``(C, *shape)`` data warped to ``(1, *shape, ndim)`` normalized points (zeros outside)."""
    return sample_normalized(x[None], points)[0]


def _warp_image(level: Level, points: Tensor) -> Tensor:
    """The level's moving image at ``(1, *shape, ndim)`` normalized points, ``(*shape)``.

    Beyond its grid the moving image continues its border: with zeros there, fixed anatomy that
    the moving field of view cut off is pulled towards the edge, and a pair whose fields of view
    differ is bent to match them.
    """
    image = level.moving_image
    if image.dim() > level.grid.ndim:  # a descriptor stack (C, *shape)
        return sample_normalized(image[None], points, padding="border")[0]
    return sample_normalized(image[None, None], points, padding="border")[0, 0]


def _image_loss(metric: str, level: Level, lncc_window_mm: float, mse_scale: float = 1.0):
    """``(warped) -> LossRecord`` against the level's fixed image: ``1 − LNCC``, or MSE (times
    ``mse_scale``; intensities or descriptor stacks) over the level's overlap weight."""
    if metric == "lncc":
        lncc = LNCC(lncc_window(level.grid, lncc_window_mm))
        return lambda warped: lncc(level.fixed_image, warped)
    mse = MSE(scale=mse_scale)
    return lambda warped: mse(level.fixed_image, warped, level.overlap)


def _centroids_normalized(masks: Tensor, grid: Grid) -> Tensor:
    """``(K, ndim)`` float32 centroids of ``(K, *shape)`` soft masks, normalized frame (0 if empty)."""
    return torch.nan_to_num(mask_centroids(masks, grid, Frame.NORMALIZED), nan=0.0).float()


class Fitter:
    """State and stages of one fit (see the module docstring).

    Args:
        opt: Fit settings.
        fixed_grid, moving_grid: Grids of the two images.
        report: Filled in as the stages run.
        slice_axis: Array axis of slice-wise ROIs in 3D, or None.
        use_image: The image term is on.
    """

    def __init__(self, opt: "FitOptions", fixed_grid: Grid, moving_grid: Grid, report: "FitReport",
                 slice_axis: int | None, use_image: bool) -> None:
        self.opt, self.fixed_grid, self.moving_grid, self.report = opt, fixed_grid, moving_grid, report
        self.slice_axis, self.use_image = slice_axis, use_image
        self.grids = level_grids(fixed_grid, opt.levels)
        ndim = fixed_grid.ndim
        self.velocity: Tensor | None = None  # (ndim, *control_shape) physical mm
        self.affine = AffineTransform.identity(fixed_grid)
        self.k, self.weights = 0, torch.ones(0)
        self.fixed_masks = self.moving_masks = self.fixed_image = self.moving_image = None
        self.raw_images: tuple[Tensor, Tensor] | None = None
        self._views: tuple | None = None  # (views inside a frame both images share, or None), once asked
        self.fine_detail: bool | None = None  # decided once, before the finest optimised level
        # Slice ROIs say nothing about through-plane motion; without images nothing else does,
        # so the velocity is kept in-plane (each slice integrated on its own) rather than left
        # to drift: projected after every step, as Adam's steps are ~lr in size even for
        # vanishing gradients. (With images, ACDC's through-plane motion matters: 0.840 mean
        # Dice with it, 0.805 without.)
        self.in_plane_axis = slice_axis if slice_axis is not None and not use_image else None
        self.through = None
        if self.in_plane_axis is not None:
            axis = fixed_grid.direction_matrix()[:, ndim - 1 - self.in_plane_axis]
            self.through = torch.as_tensor(axis, dtype=torch.float32)

    # ------------------------------------------------------------------ inputs
    def set_pairs(self, fixed_masks: Tensor, moving_masks: Tensor, weights: Tensor) -> None:
        self.fixed_masks, self.moving_masks, self.weights = fixed_masks, moving_masks, weights
        self.k = int(fixed_masks.shape[0])

    def set_images(self, fixed: Tensor, moving: Tensor, raw: tuple[Tensor, Tensor] | None = None) -> None:
        """Intensities normalised to [0, 1] (optionally histogram-matched), and the images as
        read (``raw``, for the fine-detail decision; None: the normalised ones)."""
        if self.opt.match_histogram:
            moving = match_histogram(moving, fixed)
        self.fixed_image, self.moving_image = fixed, moving
        self.raw_images = raw
        self._views = None

    def start_from_affine(self, homogeneous: np.ndarray) -> None:
        """Start from a physical fixed → moving affine (``(ndim+1, ndim+1)``, mm)."""
        self.affine = AffineTransform.from_physical(homogeneous, self.fixed_grid)

    # ------------------------------------------------------------------ transforms
    def transform(self, velocity: Tensor | None, domain: Grid, affine: AffineTransform | None = None) -> Transform:
        """``T = A ∘ exp(v)`` over ``domain`` (any resampling of the fixed grid)."""
        a = self.affine if affine is None else affine
        a = AffineTransform(a.matrix, a.offset, domain)
        if velocity is None:
            return a
        v = StationaryVelocity(velocity, domain, Frame.PHYSICAL, self.opt.squaring_steps, self.in_plane_axis, True)
        return SequentialTransform(v, a)

    def final_transform(self) -> Transform:
        """The fitted transform over the fixed grid (detached parameters)."""
        v = None if self.velocity is None else self.velocity.detach()
        return self.transform(v, self.fixed_grid)

    # ------------------------------------------------------------------ stages
    def run(self, stages: list[Stage]) -> Transform:
        """Run ``stages`` in order and return the fitted transform.

        With the image term on, the report's ``image_term`` gets the term before the first and
        after the last stage (:meth:`_image_term`), so a fit that never improved the image
        agreement can be told from one that did.
        """
        self.n_threads = torch.get_num_threads()
        term_level = self._image_level(max((s.level for s in stages), default=0))
        try:
            start = self._image_term(term_level)
            for index, stage in enumerate(stages):
                if not self._run_stage(index, len(stages), stage):
                    break
            end = self._image_term(term_level)
        finally:
            torch.set_num_threads(self.n_threads)
        if start is not None:
            self.report.image_term = {"metric": self.opt.image_metric, "start": round(start, 6), "end": round(end, 6)}
        return self.final_transform()

    def start_terms(self, affines: list[np.ndarray], level_index: int) -> list[float]:
        """The image term (see :meth:`_image_term`) on pyramid level ``level_index`` under each
        physical fixed → moving affine (``(ndim+1, ndim+1)``, mm) with no deformation; the
        fitter's own affine is kept."""
        # Every start on the whole fixed image: a weight per start would favour a start that
        # maps much of the fixed image out of the moving one.
        level, kept = self._image_level(level_index, weighted=False), self.affine
        try:
            out = []
            for h in affines:
                self.start_from_affine(h)
                out.append(float(self._image_term(level)))
            return out
        finally:
            self.affine = kept

    def _image_level(self, level_index: int, weighted: bool = True) -> Level | None:
        """Both images on pyramid level ``level_index``, unsmoothed; None without the image term."""
        if not self.use_image:
            return None
        level = Level(self.grids[level_index])
        self._put_images(level, 0.0, weighted)
        return level

    def _put_images(self, level: Level, sigma: float, weighted: bool = True) -> None:
        """Both images on ``level`` (anti-aliased by ``sigma`` level voxels), as MIND-SSC
        descriptor stacks ``(C, *shape)`` with the ``"mind"`` metric, and (``weighted``) the
        overlap weight."""
        resample_images(level, self.fixed_image, self.fixed_grid, self.moving_image, self.moving_grid, sigma)
        if self.opt.image_metric == "mind":
            level.fixed_image = mind_ssc(level.fixed_image[None, None])[0]
            level.moving_image = mind_ssc(level.moving_image[None, None])[0]
        level.overlap = self._overlap(level.grid) if weighted else None

    def views(self) -> tuple[Tensor, Tensor] | None:
        """The two images' views inside a padding frame they share (:mod:`fmreg.core.view`),
        or None; found from the images as read (else the normalised ones) when first asked."""
        if self.fixed_image is None:
            return None
        if self._views is None:
            read = self.raw_images or (self.fixed_image, self.moving_image)
            self._views = (shared_frame_views(Image(read[0], self.fixed_grid), Image(read[1], self.moving_grid)),)
        return self._views[0]

    def _overlap(self, grid: Grid) -> Tensor | None:
        """Weight of each voxel of ``grid`` in the image term: 1 where the start affine maps it
        into the moving field of view, 0 beyond (linear in between); None when that is everywhere.
        Where the images share a padding frame (:mod:`fmreg.core.view`), the view is what lies
        inside the frame, in both images.

        Fixed anatomy that the moving image never showed has nothing to match, and continuing the
        moving border there bends the field towards it; a frame that stays put while the anatomy
        moves would pull towards the identity. The weight is fixed before the fit, so the
        deformation cannot lower the term by mapping voxels out of the overlap.
        """
        where = grid.coordinates(Frame.PHYSICAL)
        fixed_view, moving_view = self.views() or (None, torch.ones(self.moving_grid.shape))
        support = sample(moving_view, self.moving_grid, where, fill=0.0)
        with torch.no_grad():
            points = self.transform(None, grid).normalized_points(grid.shape)
            weight = _warp(support[None], points)[0]
        if fixed_view is not None:
            weight = weight * sample(fixed_view, self.fixed_grid, where, fill=0.0)
        return None if bool((weight >= 1.0 - 1e-6).all()) else weight

    def _image_term(self, level: Level | None) -> float | None:
        """The image dissimilarity (MSE, or 1 − LNCC) under the current transform on ``level``,
        without the stage's weight (MSE over the start's overlap, as the fit sees it); None
        without the image term.

        Measured on one level with fixed settings at both ends of the fit: the stages' own values
        come from different levels, smoothings and weights and do not compare.
        """
        if level is None:
            return None
        compare = _image_loss(self.opt.image_metric, level, self.opt.lncc_window_mm)
        with torch.no_grad():
            points = self.transform(self.velocity, self.fixed_grid).normalized_points(level.grid.shape)
            return float(compare(_warp_image(level, points)).total)

    def _level(self, stage: Stage) -> Level:
        level = Level(self.grids[stage.level])
        if self.k and stage.roi:  # image-only stages never look at the masks
            resample_masks(level, self.fixed_masks, self.moving_masks, self.moving_grid, self.slice_axis)
        if self.use_image:
            sigma = 0.0 if stage.finest else self.opt.pyramid_sigma  # the finest level keeps every detail
            self._put_images(level, sigma)
        return level

    def _decide_fine_detail(self, level: Level) -> None:
        """Local detail comes from the images, and only images whose intensities agree once the
        smooth levels have aligned them can be trusted for it: two CT windows or a different
        slice position would be chased voxel by voxel."""
        opt = self.opt
        self.fine_detail = self.use_image
        if self.use_image and opt.fine_min_correlation is not None:
            with torch.no_grad():
                loc = self.transform(self.velocity, self.fixed_grid).normalized_points(level.grid.shape)
                corr = self._raw_correlation(level, loc)
            self.fine_detail = corr >= opt.fine_min_correlation
            self.report.fine_correlation = round(corr, 4)
            log.info("fit: image correlation %.3f before the finest level: fine settings %s", corr,
                     "on" if self.fine_detail else "off")

    def start_correlation(self) -> float:
        """The images' correlation as read (:meth:`_raw_correlation`) under the current affine,
        with no deformation, on the coarsest level."""
        level = self._image_level(0)
        with torch.no_grad():
            points = self.transform(None, level.grid).normalized_points(level.grid.shape)
        return self._raw_correlation(level, points)

    def _raw_correlation(self, level: Level, points: Tensor) -> float:
        """Correlation of the fixed and the warped moving image as read (no intensity window: a
        correlation is blind to linear rescaling, and clipping would make it depend on the
        windows), over the start's overlap, on ``level`` under ``(1, *shape, ndim)`` points."""
        if self.raw_images is None:
            return correlation(level.fixed_image, _warp_image(level, points), level.overlap)
        raw = Level(level.grid)
        fixed, moving = (im.float() for im in self.raw_images)
        resample_images(raw, fixed, self.fixed_grid, moving, self.moving_grid, 0.0)
        return correlation(raw.fixed_image, _warp_image(raw, points), level.overlap)

    def _settings(self, stage: Stage, grid: Grid) -> tuple[float, float]:
        """Control spacing (mm) and image weight of ``stage``."""
        opt = self.opt
        spacing, image_weight = opt.control_spacing, opt.image_weight
        if stage.finest and self.fine_detail:
            # A control grid finer than two level voxels adds cost, not detail.
            spacing = max(opt.fine_control_spacing or spacing, 2 * min(grid.spacing))
            if opt.fine_image_weight is not None:
                image_weight = opt.fine_image_weight
        return spacing, image_weight

    def _verify_pairs(self, level: Level, velocity: Tensor) -> bool:
        """Drop the pairs the transform so far contradicts; False when none is left."""
        with torch.no_grad():
            loc = self.transform(velocity, level.grid).normalized_points(level.grid.shape)
            dice = soft_dice(*self._warped_rois(level, loc))
        keep = dice >= self.opt.verify_dice
        kept = torch.nonzero(keep).flatten()
        self.report.kept_pairs = [int(i) for i in kept]
        log.info("fit: %d of %d ROI pairs agree with the image fit (Dice >= %.2f)", len(kept), self.k,
                 self.opt.verify_dice)
        # Only the kept pairs go on: the dropped ones weigh nothing, but warping them each step
        # cost most of a 3D fit (8 kept of 328 on a brain volume: 46 s of 56).
        weights = self.weights[kept]
        self.weights = weights / weights.sum().clamp_min(1e-6)
        self.fixed_masks, self.moving_masks, self.k = self.fixed_masks[kept], self.moving_masks[kept], len(kept)
        for name in ("fixed_masks", "moving_masks", "support", "pair_slices"):
            if getattr(level, name) is not None:
                setattr(level, name, getattr(level, name)[kept])
        return bool(keep.any())

    @staticmethod
    def _warped_rois(level: Level, points: Tensor) -> tuple[Tensor, Tensor]:
        """The moving ROI masks warped by ``(1, *shape, ndim)`` points and the fixed ones, where
        the ROI terms look: everywhere, or (3D slice pairs) on each fixed ROI's own slice only.

        Returns ``(K, *shape)`` pairs, or ``(K, *in-plane shape)`` when every slice ROI lies on one
        slice of the level: the same sums and ratios as the masked volumes at a fraction of the cost.
        """
        if level.pair_slices is not None:
            ax = level.slice_axis
            idx = level.pair_slices
            pts = points[0].index_select(ax, idx).movedim(ax, 0)  # (K, *in-plane, ndim)
            warped = sample_normalized(level.moving_masks[:, None], pts[:, None])[:, 0, 0]
            fixed = level.fixed_masks.movedim(ax + 1, 1)[torch.arange(len(idx)), idx]
            return warped, fixed
        warped = _warp(level.moving_masks, points)
        return (warped if level.support is None else warped * level.support), level.fixed_masks

    def _run_stage(self, index: int, count: int, stage: Stage) -> bool:
        """Run one stage; False when the fit is to stop (no verified pair left)."""
        grid = self.grids[stage.level]
        work = grid.numel * (1 + (self.k if stage.roi else 0))
        torch.set_num_threads(1 if work < SINGLE_THREAD_WORK else self.n_threads)
        level = self._level(stage)
        if stage.finest and self.fine_detail is None:
            self._decide_fine_detail(level)
        spacing, image_weight = self._settings(stage, grid)
        ctrl_shape = control_shape(grid, spacing)
        ndim = grid.ndim
        init = torch.zeros((ndim, *ctrl_shape)) if self.velocity is None else resize(self.velocity.detach(), ctrl_shape)
        if stage.verify and not self._verify_pairs(level, init):
            return False
        terms = self._optimise(stage, level, init, ctrl_shape, image_weight)
        self.report.levels.append({"shape": list(grid.shape), "control_shape": ctrl_shape,
                                   "iterations": stage.iterations, "stage": stage.kind, **terms})
        log.info("fit stage %d/%d %s %s: %s", index + 1, count, "×".join(map(str, grid.shape)), stage.kind,
                 ", ".join(f"{a}={b:.4f}" for a, b in terms.items()))
        return True

    def _optimise(self, stage: Stage, level: Level, init: Tensor, ctrl_shape: list[int], image_weight: float) -> dict:
        """Adam on the velocity (or on the affine in an affine stage); returns the terms at the
        parameters it keeps: the evaluated iterate of lowest objective, not the last one.

        Adam's steps are about ``lr`` whatever the gradient's size, so near an optimum (and from
        the first step, where there is nothing to correct) it keeps moving; the best iterate is
        the stage's answer (identical ROI masks and no image term: the identity, exactly).
        """
        grid, opt = level.grid, self.opt
        if stage.affine:
            v = init
            affine = AffineTransform(self.affine.matrix.clone().requires_grad_(True),
                                     self.affine.offset.clone().requires_grad_(True), grid)
            params = [affine.matrix, affine.offset]
            optim = Adam(params, lr=opt.affine_lr)
        else:
            v = init.clone().requires_grad_(True)
            affine = self.affine
            params = [v]
            optim = Adam(params, lr=opt.lr)
        loss_fn = self._loss_terms(stage, level, grid.resized(ctrl_shape), image_weight)
        transform = self.transform(v, grid, affine)
        best_total, best_params, best_terms = float("inf"), None, {}
        for i in range(stage.iterations):
            optim.zero_grad()
            record = loss_fn(v, transform.normalized_points(grid.shape))
            record.total.backward()
            if float(record.total.detach()) < best_total:
                best_total, best_terms = float(record.total.detach()), {**record.floats(), "best_iteration": i}
                best_params = [p.detach().clone() for p in params]
            optim.step()
            if self.through is not None:
                with torch.no_grad():
                    t = self.through
                    v -= t.reshape(-1, *[1] * grid.ndim) * torch.einsum("c,c...->...", t, v)[None]
        if best_params is not None:
            with torch.no_grad():
                for p, kept in zip(params, best_params):
                    p.copy_(kept)
        if stage.affine:
            self._accept_affine(affine)
        else:
            self.velocity = v.detach()
        return best_terms

    def _accept_affine(self, affine: AffineTransform) -> None:
        matrix, offset = affine.matrix.detach(), affine.offset.detach()
        if float(torch.linalg.det(matrix)) <= 0:
            log.warning("fit: the affine stage flipped the image; it is discarded")
            matrix, offset = torch.eye(self.fixed_grid.ndim), torch.zeros(self.fixed_grid.ndim)
        self.affine = AffineTransform(matrix, offset, self.fixed_grid)
        self.report.affine = {"matrix_normalized": matrix.tolist(), "offset_normalized": offset.tolist()}

    def _loss_terms(self, stage: Stage, level: Level, ctrl_grid: Grid, image_weight: float):
        """The stage's objective: ``(v, T(x) normalized points) -> LossRecord``."""
        opt = self.opt
        reg = Diffusion(ctrl_grid.spacing_array, opt.reg_weight)
        if self.use_image:
            metric = (opt.affine_metric or opt.image_metric) if stage.affine else opt.image_metric
            if opt.image_metric == "mind":
                metric = "mind"  # the level holds descriptor stacks: every stage compares them
            # MSE ×10: about the scale of 1 − LNCC.
            image = _image_loss(metric, level, opt.lncc_window_mm, mse_scale=10.0)
        centroid = self._centroid_term(level) if self.k and opt.centroid_weight > 0 and stage.roi else None

        def loss(v: Tensor, points: Tensor) -> LossRecord:
            zero = v.new_zeros(())
            record = LossRecord(zero, {"reg": zero}) if stage.affine else reg(v)
            if stage.roi:
                warped, fixed = self._warped_rois(level, points)
                record = record + roi_pair_loss(warped, fixed, self.weights, opt.mse_weight, opt.dice_weight)
                if centroid is not None:
                    record = record + centroid(points)
            if self.use_image:
                term = image(_warp_image(level, points))
                record = LossRecord(record.total + image_weight * term.total, {**record.terms, **term.terms})
            return record

        return loss

    def _centroid_term(self, level: Level):
        """Squared distance (units of 10 mm) of ``T(fixed ROI centroid)`` to the moving centroid."""
        ndim = level.grid.ndim
        c_fixed = _centroids_normalized(level.fixed_masks, level.grid)
        c_moving = _centroids_normalized(level.moving_masks, level.grid)
        m = level.grid.frame_matrix(Frame.PHYSICAL, Frame.NORMALIZED)[:ndim, :ndim]
        to_mm = torch.linalg.inv(torch.as_tensor(m, dtype=torch.float32))
        weight = self.opt.centroid_weight

        def term(points: Tensor) -> LossRecord:
            mapped = sample_vectors(points, c_fixed.reshape(1, -1, *([1] * (ndim - 1)), ndim)).reshape(-1, ndim)
            err_mm = (mapped - c_moving) @ to_mm.T
            dist2 = (self.weights * (err_mm**2).sum(dim=1)).sum()
            return LossRecord(weight * (dist2 / 100.0), {"centroid_mm2": dist2})

        return term
