"""What a training run is: its configuration, and the model and optimizer built from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch

from fmreg.errors import FmregError
from fmreg.nn.gradicon import GradICON
from fmreg.nn.unet import UNIGRADICON_DOWN, UNIGRADICON_UP
from fmreg.optimize.sharpness_aware import SharpnessAware

MODELS = ("gradicon", "mask-guided")
OPTIMIZERS = ("adam", "sharpness-aware", "adaptive-sharpness-aware")
SIMILARITIES = ("lncc", "squared-lncc", "mind-ssc")
#: Where a mask-guided run's training masks come from (see :class:`~fmreg.training.data.MaskChannels`).
MASK_SOURCES = ("labels", "segmenter", "mixed")
#: The paper-001 encoders' widths at 1, 1/2, 1/4 and 1/8 resolution.
MASK_GUIDED_WIDTHS = (8, 16, 32, 64)
#: Conventional ascent radii: SAM (Foret et al.) 0.05, ASAM (Kwon et al.) 0.5.
DEFAULT_RHO = {"sharpness-aware": 0.05, "adaptive-sharpness-aware": 0.5}


@dataclass
class TrainConfig:
    """Settings of ``fmreg train`` (JSON-serialisable; stored in every checkpoint).

    Attributes:
        model: ``gradicon`` (paper 000) or ``mask-guided`` (paper 001).
        dimension: 2 or 3.
        size: Network input shape, array order (images are resampled to it).
        width: Multiplier of the model's reference widths: uniGradICON's U-Net (1.0: the
            released 70.7 M model) or the mask-guided encoders' 8-16-32-64.
        unet_levels: Down/up levels of each U-Net (uniGradICON: 5).
        levels: Resolutions of the coarse-to-fine cascade (uniGradICON: 3).
        last_step: uniGradICON's fourth, full-resolution step.
        optimizer: ``adam``, ``sharpness-aware`` (SAM) or ``adaptive-sharpness-aware`` (ASAM).
        rho: Ascent radius; None takes :data:`DEFAULT_RHO`.
        lr: Adam learning rate.
        batch_size: Pairs per step (over all processes).
        micro_batch: Pairs per forward pass (BatchNorm statistics are per micro-batch, so one
            process and ``N`` processes give the same step); None: ``batch_size`` / processes.
        steps: Optimisation steps of the run.
        checkpoint_every: Steps between checkpoints.
        seed: Seeds the weights, the data stream and the GradICON sample points.
        lmbda: Weight λ of the inverse-consistency term.
        sigma: LNCC Gaussian window σ, voxels.
        similarity: ``lncc`` (uniGradICON's), ``mind-ssc`` (descriptor differences: contrast-
            independent) or ``squared-lncc`` (sign-blind: for pairs whose
            contrasts may invert).
        synthetic: Share of synthetic pairs in each batch (1: synthetic only, 0: manifest only).
        manifests: Training manifests (pairs of any kind; labels are not used for training).
        validation: Manifest scored every ``validate_every`` steps (Dice, folding).
        validate_every: Steps between validations (0: never).
        init: Weights to start from (a checkpoint of ``fmreg train`` or uniGradICON's
            ``regis_net`` state_dict), or None.
        mask_channels: ``K``, ROI mask channels of a mask-guided model.
        fusion: Mask-guided fusion: ``attention`` (cross-fusion transformer) or ``conv``.
        squaring_steps: Mask-guided: 0, each level outputs a displacement (the published
            code's); else a velocity integrated by this many scaling-and-squaring steps.
        mask_source: Mask-guided training masks: ``labels`` (the synthetic label maps: exact),
            ``segmenter`` (SAMReg's classical ROI pairs of the synthetic images: imperfect, as at
            registration) or ``mixed`` (each pair either, with equal odds).
        mask_inputs: False trains a mask-guided model that sees empty mask channels (the
            ablation's images-only row; the masks still enter the losses).
        labelled: Labelled images (:func:`~fmreg.training.labelled.read_labelled`) whose
            deformed copies make pairs (e.g. ``../shared/data/brain3d/test_scan.npz``).
        labelled_share: Share of each batch from ``labelled`` (when given).
        loss_weights: Mask-guided loss weights that replace
            :data:`~fmreg.losses.mask_guided.DEFAULT_WEIGHTS` entries.
    """

    model: str = "gradicon"
    dimension: int = 2
    size: tuple[int, ...] = (128, 128)
    width: float = 0.25
    unet_levels: int = 5
    levels: int = 3
    last_step: bool = False
    optimizer: str = "adam"
    rho: float | None = None
    lr: float = 1e-3
    batch_size: int = 8
    micro_batch: int | None = None
    steps: int = 1000
    checkpoint_every: int = 100
    seed: int = 0
    lmbda: float = 1.5
    sigma: float = 5.0
    similarity: str = "lncc"
    synthetic: float = 1.0
    manifests: list[str] = field(default_factory=list)
    validation: str | None = None
    validate_every: int = 0
    init: str | None = None
    mask_channels: int = 4
    fusion: str = "attention"
    squaring_steps: int = 0
    mask_source: str = "labels"
    mask_inputs: bool = True
    loss_weights: dict[str, float] = field(default_factory=dict)
    labelled: list[str] = field(default_factory=list)
    labelled_share: float = 0.5

    def __post_init__(self) -> None:
        self.size = tuple(int(s) for s in self.size)
        self.check()

    @property
    def labelled_only(self) -> bool:
        """Every pair comes from the labelled images (no synthetic or manifest share)."""
        return bool(self.labelled) and self.labelled_share >= 1.0

    def check(self) -> None:
        """One-line errors for settings a run cannot use."""
        if self.dimension not in (2, 3) or len(self.size) != self.dimension:
            raise FmregError(f"--size needs {self.dimension} values for a {self.dimension}D model, got {list(self.size)}")
        for name, value, allowed in (("model", self.model, MODELS), ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("similarity", self.similarity, SIMILARITIES)):
            if value not in allowed:
                raise FmregError(f"unknown {name} '{value}': choose one of {', '.join(allowed)}")
        checks = [("steps", self.steps, self.steps >= 1, ">= 1"),
                  ("batch", self.batch_size, self.batch_size >= 1, ">= 1"),
                  ("lr", self.lr, self.lr > 0, "> 0"), ("width", self.width, self.width > 0, "> 0"),
                  ("checkpoint-every", self.checkpoint_every, self.checkpoint_every >= 1, ">= 1"),
                  ("rho", self.rho, self.rho is None or self.rho >= 0, ">= 0"),
                  ("synthetic", self.synthetic, 0.0 <= self.synthetic <= 1.0, "in [0, 1]"),
                  ("labelled-share", self.labelled_share, 0.0 < self.labelled_share <= 1.0, "in (0, 1]")]
        for name, value, ok, rule in checks:
            if not ok:
                raise FmregError(f"--{name} must be {rule}, got {value}")
        if self.synthetic < 1.0 and not self.manifests and not self.labelled_only:
            raise FmregError("training on manifest pairs needs --manifest CSV (or --synthetic only)")
        if self.model == "mask-guided":
            self._check_mask_guided()
            return
        min_size = 2 ** (self.levels - 1) * 2 ** self.unet_levels
        if min(self.size) < min_size:
            raise FmregError(f"--size {list(self.size)} is too small for {self.levels} cascade levels of "
                             f"{self.unet_levels}-level U-Nets: every axis needs at least {min_size} voxels")

    def _check_mask_guided(self) -> None:
        from fmreg.losses.mask_guided import DEFAULT_WEIGHTS

        if self.mask_channels < 1:
            raise FmregError(f"--mask-channels must be >= 1, got {self.mask_channels}")
        if self.squaring_steps < 0:
            raise FmregError(f"--squaring-steps must be >= 0, got {self.squaring_steps}")
        if self.mask_source not in MASK_SOURCES:
            raise FmregError(f"unknown mask source '{self.mask_source}': choose one of {', '.join(MASK_SOURCES)}")
        for name, value in self.loss_weights.items():
            if name not in DEFAULT_WEIGHTS:
                raise FmregError(f"unknown loss weight '{name}': choose among {', '.join(DEFAULT_WEIGHTS)}")
            if not (value >= 0 and value < float("inf")):
                raise FmregError(f"--loss-weight {name} must be a finite value >= 0, got {value}")
        if self.synthetic < 1.0 and not self.labelled_only:
            raise FmregError("mask-guided training needs ROI masks, which manifest pairs do not carry: "
                             "train with --synthetic and/or --labelled")
        step = 2 ** (len(MASK_GUIDED_WIDTHS) - 1)
        if any(n % step or n < 2 * step for n in self.size):
            raise FmregError(f"--size {list(self.size)}: a mask-guided model needs multiples of {step} of at least {2 * step}")

    def widths(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """U-Net down and up widths: uniGradICON's, scaled by ``width``, ``unet_levels`` deep."""
        def scale(chs: tuple[int, ...]) -> tuple[int, ...]:
            return tuple(max(2, int(round(c * self.width))) for c in chs[: self.unet_levels])

        if self.unet_levels > len(UNIGRADICON_DOWN):
            raise FmregError(f"unet_levels must be at most {len(UNIGRADICON_DOWN)}, got {self.unet_levels}")
        return scale(UNIGRADICON_DOWN), scale(UNIGRADICON_UP)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def make_model(config: TrainConfig) -> torch.nn.Module:
    """The network of ``config`` (weights from torch's current random state)."""
    if config.model == "mask-guided":
        from fmreg.nn.mask_guided import MaskGuidedNet

        widths = tuple(max(2, int(round(c * config.width))) for c in MASK_GUIDED_WIDTHS)
        return MaskGuidedNet(config.dimension, config.mask_channels, widths, fusion=config.fusion,
                             squaring_steps=config.squaring_steps)
    down, up = config.widths()
    return GradICON(config.dimension, down, up, levels=config.levels, last_step=config.last_step)


def build_model(config: TrainConfig) -> torch.nn.Module:
    """The network of ``config`` for training, seeded (same seed, same initial weights)."""
    torch.manual_seed(config.seed)
    return make_model(config)


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer | SharpnessAware:
    """Adam, wrapped in :class:`SharpnessAware` for the sharpness-aware optimizers."""
    adam = torch.optim.Adam(model.parameters(), lr=config.lr)
    if config.optimizer == "adam":
        return adam
    rho = DEFAULT_RHO[config.optimizer] if config.rho is None else config.rho
    return SharpnessAware(adam, rho=rho, adaptive=config.optimizer == "adaptive-sharpness-aware")
