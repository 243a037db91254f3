"""Sharpness-aware minimisation (Foret et al. 2021) and its adaptive form (ASAM, Kwon et al. 2021).

Named ``SharpnessAware`` because "SAM" means Segment Anything in fmreg. One step:

1. the gradient ``g`` at the weights ``w`` (the caller's first forward/backward);
2. ascent: ``w ← w + e`` with ``e = ρ g / ‖g‖`` (ASAM: ``e = ρ w² g / ‖|w| g‖``);
3. the gradient at ``w + e`` (the caller's second forward/backward, on the *same* batch, noise
   and augmentation, with BatchNorm statistics frozen: :func:`frozen_batchnorm_stats`);
4. descent: restore ``w`` and let the base optimizer step with the gradient from 3.

So the base optimizer minimises the loss at the worst nearby point, which favours flat minima.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor, nn


class SharpnessAware:
    """Wraps any ``torch.optim`` optimizer with a sharpness-aware ascent step.

    Args:
        base: The optimizer that takes the descent step (e.g. ``torch.optim.Adam``); its
            parameter groups are the ones perturbed.
        rho: Radius ρ of the ascent step (SAM 0.05, ASAM 0.5 by convention).
        adaptive: ASAM's scale-invariant ascent (``e = ρ w² g / ‖|w| g‖``).
        eps: Guards the division for a vanishing gradient.
    """

    def __init__(self, base: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False,
                 eps: float = 1e-12) -> None:
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        self.base, self.rho, self.adaptive, self.eps = base, float(rho), bool(adaptive), eps
        self._perturbation: dict[Tensor, Tensor] = {}

    @property
    def param_groups(self) -> list[dict]:
        return self.base.param_groups

    def _params(self) -> Iterator[Tensor]:
        for group in self.base.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield p

    def _grad_norm(self) -> Tensor:
        norms = [((p.abs() if self.adaptive else 1.0) * p.grad).norm(2) for p in self._params()]
        return torch.stack(norms).norm(2) if norms else torch.zeros(())

    @torch.no_grad()
    def ascend(self) -> None:
        """Move every parameter to ``w + e`` using its current gradient (step 2)."""
        scale = self.rho / (self._grad_norm() + self.eps)
        self._perturbation = {}
        for p in self._params():
            e = (p * p if self.adaptive else 1.0) * p.grad * scale
            p.add_(e)
            self._perturbation[p] = e

    @torch.no_grad()
    def descend(self) -> None:
        """Restore ``w`` and take the base optimizer's step with the current gradient (step 4)."""
        for p, e in self._perturbation.items():
            p.sub_(e)
        self._perturbation = {}
        self.base.step()

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """One full step; ``closure`` zeroes the gradients, evaluates the loss and back-propagates.

        Returns:
            The loss at ``w`` (the first evaluation).
        """
        loss = closure()
        self.ascend()
        closure()
        self.descend()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"base": self.base.state_dict(), "rho": self.rho, "adaptive": self.adaptive}

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state["base"])
        self.rho, self.adaptive = float(state["rho"]), bool(state["adaptive"])


@contextlib.contextmanager
def frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with batch statistics but leave their running statistics
    (and batch counters) unchanged: the pass at ``w + e`` must not count twice."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
