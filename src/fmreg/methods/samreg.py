"""SAMReg as a registration method: ``samreg`` (default), ``samreg-sam``, ``samreg-medsam``,
``samreg-labels``.

* ``samreg``: classical segment-everything + classical encoder; needs no weights.
* ``samreg-sam``: Segment Anything (transformers ``SamModel``) for both ROIs and prototypes;
  the model folder comes from ``model=PATH`` or the ``FMREG_SAM_MODEL`` environment variable;
  ``sam_<option>=value`` sets a :class:`fmreg.segment.segment_anything.SamBackend` option.
* ``samreg-medsam``: LiteMedSAM (fmreg's own implementation) for both ROIs and prototypes,
  with the released LiteMedSAM weights (the ``medsam`` extra) or ``model=PATH``;
  ``medsam_<option>=value`` sets a :class:`fmreg.segment.medsam.LiteMedSamBackend` option.
* ``samreg-labels``: the paper's Case 1, pairs taken from the label maps: an upper bound that
  sees the ground truth, hence its own name.

Any segmenter pairs with any encoder: ``segmenter=sam encoder=classical``,
``segmenter=classical encoder=medsam`` and so on.

The method is :func:`samreg` (paper 002, Alg. 1 + Eq. 10): ROI pairs from
:func:`fmreg.correspond.pairs.find_roi_pairs`, then the dense fit of
:func:`fmreg.optimize.fit.fit_field` (:func:`fit_pairs`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

from fmreg.core.grid import Frame, through_plane_axis
from fmreg.core.intensity import resize
from fmreg.core.image import Image, check_pair
from fmreg.correspond.labels import label_roi_pairs
from fmreg.correspond.pairs import Correspondences, RoiPair, SamRegOptions, find_correspondences
from fmreg.errors import FmregError
from fmreg.methods.base import Extra, RegistrationResult, add_method
from fmreg.methods.params import check_params, declare, with_defaults
from fmreg.methods.samreg_params import FIT_PARAMS, MEDSAM_BACKEND_PARAMS, ROI_PARAMS, SAM_BACKEND_PARAMS
from fmreg.optimize.fit import FitOptions, choose_start, fit_field, refine_start, resolve_image_metric
from fmreg.optimize.pyramid import working_image
from fmreg.segment.base import Encoder, Segmenter
from fmreg.segment.filtering import MIN_SCORE, MIN_STABILITY
from fmreg.segment.medsam.model import WEIGHTS_PACKAGE
from fmreg.transforms.displacement import DisplacementField

__all__ = ["SamRegOptions", "SamRegResult", "fit_pairs", "samreg"]


@dataclass
class SamRegResult:
    """What :func:`samreg` found and fitted.

    Attributes:
        field: The dense displacement on the fixed grid.
        pairs: The ROI pairs the fit used.
        timings: Stage durations in seconds (``segment_embed``, ``match``, ``fit``).
        fit_report: The fit's report as a JSON-ready dict.
    """

    field: DisplacementField
    pairs: list[RoiPair]
    timings: dict[str, float] = field(default_factory=dict)
    fit_report: dict = field(default_factory=dict)


def fit_pairs(
    fixed: Image, moving: Image, pairs: list[RoiPair], fit_options: FitOptions | None = None,
    initial_affine=None,
) -> tuple[DisplacementField, dict]:
    """Dense field from ROI pairs (Eq. 10), pair weights = similarity.

    Returns:
        The displacement on the fixed grid and the fit report as a dict. Pairs found slice by
        slice (all with a ``fixed_slice``) are fitted knowing the through-plane axis.
    """
    if pairs:
        fm = torch.stack([p.fixed_mask for p in pairs])
        mm = torch.stack([p.moving_mask for p in pairs])
        w = torch.tensor([p.similarity for p in pairs])
    else:
        fm = torch.zeros((0, *fixed.grid.shape))
        mm = torch.zeros((0, *moving.grid.shape))
        w = None
    sliced = [p.fixed_slice is not None for p in pairs]
    slice_axis = through_plane_axis(fixed.grid) if pairs and all(sliced) else None
    u, report = fit_field(
        fixed.grid, fm, mm, moving.grid, fit_options, fixed.data, moving.data, w, slice_axis, initial_affine
    )
    return u, asdict(report)


#: In-plane sides above this are registered on a resampled copy (ROIs, prototypes and the fit)
#: and the field is resampled back (the ROI pairs keep the copy's grids): the fit optimises at
#: most ``max_fit_voxels`` per level anyway, and a 3000² photograph segmented at full size took
#: 24 GB.
MAX_WORKING_SIDE = 512

#: Volumes of more voxels than this are registered on a resampled copy as well (every axis
#: whose spacing is within twice the finest shrinks): ROI pairs hold a mask of the whole grid
#: each, and a 1 mm brain volume (160×192×224) with a few hundred pairs took over 24 GB (now
#: 3.3 GB). ACDC (256×208×7) and a 2 mm brain (80×96×112) stay as they are.
MAX_WORKING_VOXELS = 1 << 20


def samreg(
    fixed: Image,
    moving: Image,
    segmenter: Segmenter,
    encoder: Encoder,
    options: SamRegOptions | None = None,
    fit_options: FitOptions | None = None,
) -> SamRegResult:
    """Training-free registration (Alg. 1 + Eq. 10): ROI pairs, then the dense fit.

    Raises:
        FmregError: The pair fails :func:`~fmreg.core.image.check_pair` (e.g. an image without contrast).
    """
    check_pair(fixed, moving)
    timings: dict[str, float] = {}
    axis = through_plane_axis(fixed.grid) if fixed.ndim == 3 else None
    work_fixed, work_moving = (working_image(im, MAX_WORKING_SIDE, axis, MAX_WORKING_VOXELS) for im in (fixed, moving))
    found = find_correspondences(work_fixed, work_moving, segmenter, encoder, options, timings)
    t = time.perf_counter()
    pairs, u, report = _fit_from_best_start(work_fixed, work_moving, found, fit_options)
    if work_fixed is not fixed or work_moving is not moving:
        u = DisplacementField(resize(u.to(Frame.PHYSICAL).data, fixed.grid.shape), fixed.grid)
        pairs = [replace(p, grids=(work_fixed.grid, work_moving.grid)) for p in pairs]
        report["working_shape"] = {"fixed": list(work_fixed.grid.shape), "moving": list(work_moving.grid.shape)}
    timings["fit"] = time.perf_counter() - t
    return SamRegResult(u, pairs, timings, report)


def _fit_from_best_start(fixed: Image, moving: Image, found: Correspondences, fit_options: FitOptions | None):
    """Fit from the ROI consensus (with the pairs gated after it) when the images agree with it
    clearly better than with the usual start (:func:`~fmreg.optimize.fit.choose_start`), else
    from the usual start with the local pairs; with the image term off, from the consensus.
    """
    if found.global_affine is None:
        u, report = fit_pairs(fixed, moving, found.local_pairs, fit_options)
        return found.local_pairs, u, _with_consensus(report, found, None, None)
    opt = fit_options or FitOptions()
    if opt.image_weight <= 0:
        u, report = fit_pairs(fixed, moving, found.global_pairs, opt, found.global_affine)
        return found.global_pairs, u, _with_consensus(report, found, "consensus", None)
    # Once for the whole pair: the start choice, its refinement and the fit then use one metric.
    opt, correlation = resolve_image_metric(fixed, moving, found.global_affine, opt)
    choice = refine_start(fixed, moving, choose_start(fixed, moving, found.global_affine, opt), opt)
    pairs, name = (found.global_pairs, "consensus") if choice.name == "candidate" else (found.local_pairs, "usual")
    # choose_start already found the moments start, when there is one; the fit need not redo it.
    u, report = fit_pairs(fixed, moving, pairs, opt, choice.affine)
    if correlation is not None:
        report["start_correlation"] = correlation
    return pairs, u, _with_consensus(report, found, name, choice.terms)


def _with_consensus(report: dict, found: Correspondences, start: str | None, ends: dict | None) -> dict:
    if found.global_match is not None:
        report["roi_consensus"] = {**found.global_match.summary(), "start": start or "usual",
                                   **({"start_image_terms": ends} if ends else {})}
    return report


_ROI_KEYS = {f.name for f in fields(SamRegOptions)}
_FIT_KEYS = {f.name for f in fields(FitOptions)}


def _split_params(params: dict[str, Any]) -> tuple[SamRegOptions, FitOptions, dict[str, Any]]:
    # Types and ranges were checked against the methods' PARAMS by get_method.
    roi = {k: v for k, v in params.items() if k in _ROI_KEYS}
    fit = {k: v for k, v in params.items() if k in _FIT_KEYS}
    rest = {k: v for k, v in params.items() if k not in _ROI_KEYS | _FIT_KEYS}
    return SamRegOptions(**roi), FitOptions(**fit), rest


#: SamBackend thresholds: the paper's (Sec. 4.2) rather than SAM's own defaults.
SAM_DEFAULTS = {"pred_iou_thresh": MIN_SCORE, "stability_score_thresh": MIN_STABILITY}


#: LiteMedSamBackend's own defaults (already the paper's thresholds), for result.json.
MEDSAM_DEFAULTS = {p.name[len("medsam_"):]: p.default for p in MEDSAM_BACKEND_PARAMS}

#: The backends a segmenter or encoder can be.
BACKENDS = ("classical", "sam", "medsam")


def make_backend(kind: str, model: str | None, role: str, cache: dict, sam_options: dict | None = None,
                 medsam_options: dict | None = None):
    """The ``classical``, ``sam`` or ``medsam`` segmenter/encoder (``role``); one model serves
    both roles via ``cache``. ``model`` names the SAM folder or the LiteMedSAM weights file."""
    if kind == "classical":
        from fmreg.segment.classical import ClassicalEncoder, ClassicalSegmenter

        return ClassicalSegmenter() if role == "segmenter" else ClassicalEncoder()
    if kind == "sam":
        if "sam" not in cache:
            from fmreg.segment.segment_anything import SamBackend

            path = model or os.environ.get("FMREG_SAM_MODEL")
            if not path:
                raise FmregError(
                    "the sam backend needs a Segment Anything model folder: pass --param model=PATH "
                    "or set FMREG_SAM_MODEL (e.g. a local copy of facebook/sam-vit-base)"
                )
            cache["sam"] = SamBackend(path, **{**SAM_DEFAULTS, **(sam_options or {})})
        return cache["sam"]
    if kind == "medsam":
        if "medsam" not in cache:
            from fmreg.segment.medsam import LiteMedSamBackend

            # None: the released weights (the medsam extra).
            cache["medsam"] = LiteMedSamBackend(model, **(medsam_options or {}))
        return cache["medsam"]
    raise FmregError(f"unknown {role} '{kind}': choose {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")


class SamRegMethod:
    """SAMReg: ROI pairs from classical segment-everything (no weights), then a diffeomorphic fit.

    Any segmenter pairs with any encoder (see the module docstring); ``sam_<option>`` sets a
    :class:`SamBackend` option, ``medsam_<option>`` a :class:`LiteMedSamBackend` option.
    """

    name = "samreg"
    uses_labels = False

    def __init__(self, segmenter: str = "classical", encoder: str | None = None,
                 model: str | None = None, **params: Any) -> None:
        # sam_<option>=value reaches SamBackend (e.g. sam_points_per_side=16), medsam_<option>
        # LiteMedSamBackend.
        self.sam_options = {k[4:]: params.pop(k) for k in list(params) if k.startswith("sam_")}
        self.medsam_options = {k[7:]: params.pop(k) for k in list(params) if k.startswith("medsam_")}
        self.roi_options, self.fit_options, rest = _split_params(params)
        check_params(self.name, self.PARAMS, rest)  # built directly, not through get_method
        self.segmenter_kind = segmenter
        self.encoder_kind = encoder or segmenter
        self.model = model
        if model and {"sam", "medsam"} <= {self.segmenter_kind, self.encoder_kind}:
            raise FmregError(
                "model=PATH names one model, but the segmenter and encoder use both sam and medsam: "
                "leave model unset (sam then takes $FMREG_SAM_MODEL, medsam its packaged weights)"
            )

    PARAMS = declare(__init__, {
        "segmenter": (BACKENDS, "what proposes the ROIs"),
        "encoder": (BACKENDS, "what embeds the ROIs as prototypes (null: as segmenter)"),
        "model": (None, "sam: model folder or hub id (null: $FMREG_SAM_MODEL); medsam: lite_medsam.pth "
                        "(null: the released weights of the medsam extra)"),
    }) + ROI_PARAMS + FIT_PARAMS + with_defaults(
        SAM_BACKEND_PARAMS, {f"sam_{k}": v for k, v in SAM_DEFAULTS.items()}) + MEDSAM_BACKEND_PARAMS

    def parameters(self) -> dict[str, Any]:
        return {
            "segmenter": self.segmenter_kind,
            "encoder": self.encoder_kind,
            **({"model": str(self.model)} if self.model else {}),
            **({"sam": {**SAM_DEFAULTS, **self.sam_options}} if "sam" in (self.segmenter_kind, self.encoder_kind) else {}),
            **({"medsam": {**MEDSAM_DEFAULTS, **self.medsam_options}} if "medsam" in (self.segmenter_kind, self.encoder_kind) else {}),
            "roi": asdict(self.roi_options),
            "fit": self.fit_options.to_dict(),
        }

    def register(self, fixed: Image, moving: Image, fixed_labels=None, moving_labels=None) -> RegistrationResult:
        cache: dict = {}
        seg = make_backend(self.segmenter_kind, self.model, "segmenter", cache, self.sam_options, self.medsam_options)
        enc = make_backend(self.encoder_kind, self.model, "encoder", cache, self.sam_options, self.medsam_options)
        out = samreg(fixed, moving, seg, enc, self.roi_options, self.fit_options)
        return _result(self.name, self.parameters(), out.field, out.pairs, out.timings, out.fit_report)


def _result(name, parameters, field, pairs, timings, fit_report) -> RegistrationResult:
    return RegistrationResult(field, name, parameters, roi_pairs=list(pairs), fit_report=fit_report,
                              stage_seconds=dict(timings))


class SamRegSamMethod(SamRegMethod):
    """SAMReg with Segment Anything for ROIs and prototypes (model=PATH or $FMREG_SAM_MODEL)."""

    name = "samreg-sam"
    EXTRA = Extra("sam", "transformers")
    DEFAULTS = {"segmenter": "sam"}
    PARAMS = with_defaults(SamRegMethod.PARAMS, DEFAULTS)

    def __init__(self, **params: Any) -> None:
        super().__init__(**{**self.DEFAULTS, **params})


class SamRegMedSamMethod(SamRegMethod):
    """SAMReg with LiteMedSAM for ROIs (box prompts) and prototypes (weights: the released ones of the medsam extra, or model=PATH)."""

    name = "samreg-medsam"
    EXTRA = Extra("medsam", WEIGHTS_PACKAGE)
    DEFAULTS = {"segmenter": "medsam"}
    PARAMS = with_defaults(SamRegMethod.PARAMS, DEFAULTS)

    def __init__(self, **params: Any) -> None:
        super().__init__(**{**self.DEFAULTS, **params})


class SamRegLabelsMethod:
    """SAMReg with ROI pairs from the label maps (the paper's Case 1): an upper bound that sees ground truth."""

    name = "samreg-labels"
    uses_labels = True

    #: Case 1 trusts its pairs: the paper's equal-weight MSE + Dice and no verification; the
    #: image term stays on to place everything the labels do not cover. Measured on ACDC 068:
    #: mean Dice 0.893 with these, 0.845 without the image term (which also folds 0.1 %).
    DEFAULTS = {"mse_weight": 1.0, "dice_weight": 1.0, "verify_dice": None, "reg_weight": 0.1, "affine_iterations": 0}
    #: Only the fit's: the pairs come from the labels, not from the ROI stage.
    PARAMS = with_defaults(FIT_PARAMS, DEFAULTS)

    def __init__(self, **params: Any) -> None:
        self.roi_options, self.fit_options, rest = _split_params({**self.DEFAULTS, **params})
        check_params(self.name, self.PARAMS, rest)  # built directly, not through get_method

    def register(self, fixed: Image, moving: Image, fixed_labels: Image | None = None,
                 moving_labels: Image | None = None) -> RegistrationResult:
        if fixed_labels is None or moving_labels is None:
            raise FmregError("samreg-labels needs both label maps (--fixed-labels and --moving-labels)")
        check_pair(fixed, moving)
        pairs = label_roi_pairs(fixed_labels, moving_labels)
        t = time.perf_counter()
        field, report = fit_pairs(fixed, moving, pairs, self.fit_options)
        timings = {"fit": time.perf_counter() - t}
        params = {"segmenter": "labels", "fit": self.fit_options.to_dict()}
        return _result(self.name, params, field, pairs, timings, report)


add_method("samreg")(SamRegMethod)
add_method("samreg-sam")(SamRegSamMethod)
add_method("samreg-medsam")(SamRegMedSamMethod)
add_method("samreg-labels")(SamRegLabelsMethod)
