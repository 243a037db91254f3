"""Instance optimisation: fine-tune a copy of a registration network on the one pair it registers."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from fmreg.losses.base import LossRecord


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
