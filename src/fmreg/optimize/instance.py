"""Instance optimisation: fine-tune a copy of a registration network on the one pair it registers."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from fmreg.errors import FmregError
from fmreg.losses.base import LossRecord


def check_instance_options(iterations: int, lr: float) -> None:
    """One-line error for settings :func:`instance_optimise` cannot use (NaN ``lr`` included)."""
    if iterations < 0 or not lr > 0:
        raise FmregError("io_iterations must be >= 0 and io_lr > 0")


def instance_optimise(net: nn.Module, objective: Callable[[nn.Module], LossRecord], iterations: int,
                      lr: float) -> nn.Module:
    """Adam over the weights of a copy of ``net`` (``net`` itself is left as it was).

    Args:
        net: The trained network.
        objective: The pair's loss for a network (e.g. the training loss on this pair).
        iterations: Adam steps.
        lr: Adam step size.

    Returns:
        The fine-tuned copy, in eval mode.
    """
    net = copy.deepcopy(net)
    optim = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(iterations):
        optim.zero_grad()
        objective(net).total.backward()
        optim.step()
    return net.eval()
