"""The training loop of ``fmreg train``: GradICON loss, Adam or sharpness-aware steps, checkpoints.

Reproducibility: the weights, the data stream and the GradICON sample points each come from
seeded generators whose states are checkpointed, so ``--resume`` continues bit for bit. A
step's batch and sample points are drawn once and used by both passes of a sharpness-aware
step, whose second pass leaves the BatchNorm statistics alone.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from fmreg.errors import FmregError
from fmreg.losses.gradicon import gradicon_loss, perturbed_identity
from fmreg.losses.image import MINDSSC, GaussianLNCC
from fmreg.optimize.sharpness_aware import SharpnessAware, frozen_batchnorm_stats
from fmreg.training.checkpoint import save_checkpoint
from fmreg.training.config import TrainConfig, build_model, build_optimizer
from fmreg.training.distributed import World


class PairSource(Protocol):
    """Where training pairs come from (synthetic generator, manifest, or both)."""

    def batch(self, n: int, rank: int = 0, world_size: int = 1) -> tuple[Tensor, ...]:
        """This process's ``n`` pairs of a global batch of ``n * world_size``:
        ``(moving, fixed, ...)``, ``(n, 1, *size)`` float images in [0, 1] first."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class GradICONObjective(nn.Module):
    """The whole GradICON loss of a micro-batch as one forward pass (what DistributedDataParallel wraps)."""

    #: Tensors of a batch it takes: moving, fixed.
    inputs = 2

    def __init__(self, network: nn.Module, lmbda: float, sigma: float, similarity: str = "lncc") -> None:
        super().__init__()
        self.network = network
        self.lmbda = lmbda
        self.similarity = MINDSSC() if similarity == "mind-ssc" else GaussianLNCC(sigma, similarity == "squared-lncc")

    def forward(self, moving: Tensor, fixed: Tensor, points: Tensor) -> dict[str, Tensor]:
        record = gradicon_loss(self.network, moving, fixed, self.similarity, self.lmbda, points)
        return {"loss": record.total, **record.terms}


class MaskGuidedObjective(nn.Module):
    """The mask-guided loss (paper 001) of a micro-batch as one forward pass."""

    #: Tensors of a batch it takes: moving, fixed, moving masks, fixed masks.
    inputs = 4

    def __init__(self, network: nn.Module, weights: dict[str, float] | None = None, mask_inputs: bool = True) -> None:
        super().__init__()
        from fmreg.losses.mask_guided import MaskGuidedLoss

        self.network, self.loss = network, MaskGuidedLoss(weights, mask_inputs=mask_inputs)

    def forward(self, moving: Tensor, fixed: Tensor, moving_masks: Tensor, fixed_masks: Tensor,
                points: Tensor) -> dict[str, Tensor]:
        record = self.loss(self.network, moving, fixed, moving_masks, fixed_masks)
        return {"loss": record.total, **{k: v for k, v in record.terms.items() if k != "total"}}


def build_objective(model: nn.Module, config: TrainConfig) -> nn.Module:
    """The objective of ``config.model`` around ``model``."""
    if config.model == "mask-guided":
        return MaskGuidedObjective(model, config.loss_weights, config.mask_inputs)
    return GradICONObjective(model.regis_net, config.lmbda, config.sigma, config.similarity)


@dataclass
class TrainState:
    """Progress of a run (checkpointed)."""

    step: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # one record of loss terms per step
    validation: list[dict] = field(default_factory=list)


class Trainer:
    """One training run.

    Args:
        config: The run's settings.
        data: The pair source (seeded).
        world: Process group (:func:`~fmreg.training.distributed.init_world`).
    """

    def __init__(self, config: TrainConfig, data: PairSource, world: World | None = None) -> None:
        self.config, self.data, self.world = config, data, world or World()
        self.model = build_model(config)
        self.objective = build_objective(self.model, config)
        self.parallel = self.world.wrap(self.objective)
        self.optimizer = build_optimizer(self.model, config)
        self.noise = torch.Generator().manual_seed(config.seed + 1)
        self.state = TrainState()
        if config.batch_size % self.world.size:
            raise FmregError(f"--batch {config.batch_size} does not split over {self.world.size} processes")
        self.local_batch = config.batch_size // self.world.size
        self.micro = config.micro_batch or self.local_batch
        if self.local_batch % self.micro:
            raise FmregError(f"the batch per process ({self.local_batch}) is not a multiple of the micro-batch {self.micro}")

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> dict:
        return {"config": self.config.to_dict(), "step": self.state.step, "seconds": self.state.seconds,
                "history": self.state.history, "validation": self.state.validation,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "noise": self.noise.get_state()},
                "data": self.data.state_dict()}

    def restore(self, ckpt: dict) -> None:
        """Continue from a checkpoint of this configuration."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.noise.set_state(ckpt["rng"]["noise"])
        self.data.load_state_dict(ckpt["data"])
        self.state = TrainState(ckpt["step"], ckpt["seconds"], list(ckpt["history"]), list(ckpt["validation"]))

    # ------------------------------------------------------------------ one step
    def _local_batch(self) -> list[Tensor]:
        """This process's share of the step's batch, then its GradICON sample points."""
        batch = self.data.batch(self.local_batch, self.world.rank, self.world.size)[: self.objective.inputs]
        # Every process draws the global batch's points (cheap) so that the stream stays in step.
        points = perturbed_identity(self.config.batch_size, tuple(self.config.size), self.noise)
        part = slice(self.world.rank * self.local_batch, (self.world.rank + 1) * self.local_batch)
        return [*batch, points[part]]

    def _gradients(self, batch: list[Tensor]) -> dict[str, float]:
        """Zero, then accumulate the mean-loss gradient over the micro-batches."""
        self.optimizer.zero_grad()
        terms: dict[str, float] = {}
        chunks = range(0, self.local_batch, self.micro)
        share = self.micro / self.local_batch
        for i, start in enumerate(chunks):
            part = slice(start, start + self.micro)
            last = i == len(chunks) - 1
            # Gradients of all but the last micro-batch stay local; the last backward all-reduces.
            sync = self.parallel.no_sync() if (self.world.size > 1 and not last) else contextlib.nullcontext()
            with sync:
                out = self.parallel(*[t[part] for t in batch])
                (out["loss"] * share).backward()
            for name, value in out.items():
                terms[name] = terms.get(name, 0.0) + float(value.detach()) * share
        return terms

    def step(self) -> dict[str, float]:
        """One optimisation step; returns the loss terms at the current weights."""
        self.model.train()
        batch = self._local_batch()
        terms = self._gradients(batch)
        if isinstance(self.optimizer, SharpnessAware):
            self.optimizer.ascend()
            with frozen_batchnorm_stats(self.model):
                self._gradients(batch)
            self.optimizer.descend()
        else:
            self.optimizer.step()
        return terms

    # ------------------------------------------------------------------ the run
    def run(self, run_dir: Path, progress: Callable[[int, dict], None] | None = None,
            validate: Callable[[nn.Module], dict] | None = None) -> TrainState:
        """Train until ``config.steps``, checkpointing every ``checkpoint_every`` steps.

        Raises:
            FmregError: The loss became NaN/Inf; the last good checkpoint is kept.
        """
        cfg = self.config
        while self.state.step < cfg.steps:
            t0 = time.perf_counter()
            terms = self.step()
            if not all(math.isfinite(v) for v in terms.values()):
                raise FmregError(f"the loss became {terms['loss']} at step {self.state.step + 1}; "
                                 f"the last good checkpoint (step {self._last_saved()}) is kept in {run_dir}")
            self.state.step += 1
            self.state.seconds += time.perf_counter() - t0
            self.state.history.append({"step": self.state.step, **{k: round(v, 6) for k, v in terms.items()}})
            if validate is not None and cfg.validate_every and self.state.step % cfg.validate_every == 0:
                self.state.validation.append({"step": self.state.step, **validate(self.model)})
            if progress is not None:
                progress(self.state.step, terms)
            if self.state.step % cfg.checkpoint_every == 0 or self.state.step == cfg.steps:
                if self.world.main:
                    save_checkpoint(run_dir, self.checkpoint())
                self.world.barrier()
        return self.state

    def _last_saved(self) -> int:
        every = self.config.checkpoint_every
        return (self.state.step // every) * every

