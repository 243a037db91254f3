"""``fmreg train``: train or fine-tune a registration network (papers 000 and 001)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from fmreg.cli_base import PROG, Command, arg


@dataclass(kw_only=True)
class Train(Command):
    """Train or fine-tune a registration network into RUN_DIR: GradICON (paper 000, the default) or
the mask-guided network (paper 001, --model mask-guided).

RUN_DIR gets checkpoint.pt (every --checkpoint-every steps, atomic; --resume continues it bit for
bit), loss.png and model.json (data, command, optimizer, steps, wall time, machine). Data:
synthetic SynthMorph-style pairs (--synthetic 2d|3d) and/or the pairs of --manifest CSVs.
More processes: torchrun --nproc_per_node N -m fmreg train ... (DistributedDataParallel)."""

    name: ClassVar[str] = "train"
    help: ClassVar[str] = "train or fine-tune a registration network (gradicon, mask-guided)"
    outdir: Path = arg("-o", "--outdir", help="run folder", type=Path, required=True, metavar="RUN_DIR")
    model: str = arg("--model", help="gradicon (paper 000) or mask-guided (paper 001)", default="gradicon",
                     choices=("gradicon", "mask-guided"))
    mask_channels: int = arg("--mask-channels", help="mask-guided: ROI mask channels K", type=int, default=4, metavar="K")
    fusion: str = arg("--fusion", help="mask-guided: cross-fusion attention or convolutional fusion", default="attention",
                      choices=("attention", "conv"))
    squaring_steps: int = arg("--squaring-steps", help="mask-guided: each level outputs a velocity integrated in N "
                              "scaling-and-squaring steps (diffeomorphic; default 7); 0, a displacement (the "
                              "published code's)", type=int, default=7, metavar="N")
    mask_source: str = arg("--mask-source", help="mask-guided: training masks from the synthetic label maps, "
                           "the classical segmenter's ROI pairs, or either per pair", default="mixed",
                           choices=("labels", "segmenter", "mixed"))
    no_mask_inputs: bool = arg("--no-mask-inputs", help="mask-guided: the network sees empty mask channels "
                               "(images-only baseline; the masks still enter the losses)", default=False, action="store_true")
    loss_weight: list[str] | None = arg("--loss-weight", help="mask-guided: a loss weight (repeatable), e.g. contour=0; "
                                        "names: ncc diffusion dice contour contrastive alignment", action="append", metavar="NAME=VALUE")
    manifest: list[str] | None = arg("--manifest", help="training pairs (repeatable; labels are not used)", action="append", metavar="CSV")
    synthetic: str | None = arg("--synthetic", help="synthetic pairs of this dimension", choices=("2d", "3d"))
    labelled: list[str] | None = arg("--labelled", help="labelled images whose deformed copies make training pairs "
                                     "(repeatable): PATH.npz with arrays vol and seg, or IMAGE,LABELS; 2D models "
                                     "take random slices of 3D images", action="append", metavar="SPEC")
    labelled_share: float | None = arg("--labelled-share", help="share of each batch from --labelled (default 0.5 "
                                       "with other data, else 1)", type=float, metavar="F")
    synthetic_share: float | None = arg("--synthetic-share", help="share of synthetic pairs per batch with --manifest (default 0.5)", type=float, metavar="F")
    init: str | None = arg("--init", help="start from these weights (fmreg checkpoint or uniGradICON's regis_net)", metavar="WEIGHTS")
    optimizer: str = arg("--optimizer", help="adam, sharpness-aware (SAM) or adaptive-sharpness-aware (ASAM)", default="adam",
                         choices=("adam", "sharpness-aware", "adaptive-sharpness-aware"))
    rho: float | None = arg("--rho", help="ascent radius (default 0.05 SAM, 0.5 ASAM)", type=float, metavar="R")
    steps: int | None = arg("--steps", help="optimisation steps (default 1000; on --resume a new total)", type=int, metavar="N")
    size: list[int] | None = arg("--size", help="network input size, array order (default 128 128 in 2D, 128 128 128 in 3D)", type=int, nargs="+", metavar="N")
    width: float | None = arg("--width", help="multiplier of the model's widths (gradicon: uniGradICON's, 1 = the 70.7 M model, default 0.25; mask-guided: the paper's 8-16-32-64, default 1)", type=float, metavar="W")
    depth: int = arg("--depth", help="U-Net levels (uniGradICON: 5)", type=int, default=5, metavar="L")
    batch: int = arg("--batch", help="pairs per step over all processes", type=int, default=8, metavar="B")
    lr: float = arg("--lr", help="Adam learning rate", type=float, default=1e-3)
    similarity: str = arg("--similarity", help="lncc (uniGradICON), squared-lncc (contrast-sign blind) or mind-ssc "
                          "(MIND-SSC descriptors: contrast-independent)", default="lncc",
                          choices=("lncc", "squared-lncc", "mind-ssc"))
    seed: int = arg("--seed", help="seed of weights, data and sample points", type=int, default=0)
    checkpoint_every: int = arg("--checkpoint-every", help="steps between checkpoints", type=int, default=100, metavar="K")
    validate: str | None = arg("--validate", help="score this manifest's labelled pairs (Dice, folding) during training", metavar="CSV")
    validate_every: int = arg("--validate-every", help="steps between validations (with --validate)", type=int, default=100, metavar="K")
    resume: bool = arg("--resume", help="continue the run in RUN_DIR", default=False, action="store_true")
    overwrite: bool = arg("--overwrite", help="start over in a RUN_DIR that holds another run", default=False, action="store_true")

    def config(self):
        from fmreg.errors import FmregError
        from fmreg.training.config import TrainConfig

        if not self.synthetic and not self.manifest and not self.labelled:
            raise FmregError("give training data: --synthetic 2d|3d, --labelled SPEC and/or --manifest CSV")
        dim = int(self.synthetic[0]) if self.synthetic else (len(self.size) if self.size else 2)
        share = 1.0 if not self.manifest else (0.0 if not self.synthetic else (0.5 if self.synthetic_share is None else self.synthetic_share))
        alone = not self.synthetic and not self.manifest
        labelled_share = 1.0 if alone else (0.5 if self.labelled_share is None else self.labelled_share)
        width = self.width if self.width is not None else (1.0 if self.model == "mask-guided" else 0.25)
        return TrainConfig(model=self.model, mask_channels=self.mask_channels, fusion=self.fusion,
                           squaring_steps=self.squaring_steps,
                           mask_source=self.mask_source, mask_inputs=not self.no_mask_inputs,
                           labelled=list(self.labelled or []), labelled_share=labelled_share,
                           loss_weights=self._loss_weights(),
                           dimension=dim, size=tuple(self.size or (128,) * dim), width=width,
                           unet_levels=self.depth, optimizer=self.optimizer, rho=self.rho, lr=self.lr,
                           similarity=self.similarity,
                           batch_size=self.batch, steps=1000 if self.steps is None else self.steps,
                           checkpoint_every=self.checkpoint_every,
                           seed=self.seed, synthetic=share, manifests=list(self.manifest or []), init=self.init,
                           validation=self.validate, validate_every=self.validate_every if self.validate else 0)

    def _loss_weights(self) -> dict[str, float]:
        from fmreg.errors import FmregError

        weights = {}
        for item in self.loss_weight or []:
            name, _, value = item.partition("=")
            try:
                weights[name.strip()] = float(value)
            except ValueError:  # no "=" leaves value empty: not a number either
                raise FmregError(f"--loss-weight takes NAME=VALUE (e.g. contour=0), got '{item}'") from None
        return weights

    def run(self) -> int:
        from fmreg.app.train import train

        card = train(self.outdir, None if self.resume else self.config(), resume=self.resume,
                     overwrite=self.overwrite, steps=self.steps, log=self.log, quiet=self.quiet,
                     command=shlex.join([PROG, *self.argv]))
        last = card["final_loss"]
        print(f"{card['steps']} steps in {card['wall_time_s']:.0f} s, last loss {last.get('loss', float('nan')):.4f}: "
              f"{self.outdir / 'model.json'}")
        return 0
