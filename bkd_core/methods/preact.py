"""Block outputs before their last ReLU: the pre-activation features some methods match (ReviewKD's teacher
targets, as mdistiller's ResNets return them in ``preact_feats``).

A block that ends in an ``nn.ReLU`` module (the residual stages of ResNets, built as blocks or cut by the graph
split) gives that ReLU's input; any other block (a functional ``F.relu`` at its end, a transformer block, a
text encoder's layers) gives its output as it is.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..blocknet import BlockNet


def preactivation_features(net: BlockNet, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(each block's output before its final ReLU where it has one, the last block's output itself). The ReLUs
    run out of place meanwhile (the same values), so their inputs survive."""
    relus = [m for m in net.blocks.modules() if isinstance(m, nn.ReLU)]
    inplace = [m.inplace for m in relus]
    last: dict[str, Optional[tuple[Any, Any]]] = {"call": None}

    def remember(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        last["call"] = (inputs[0], output)

    handles = [m.register_forward_hook(remember) for m in relus]
    for m in relus:
        m.inplace = False
    try:
        found = []
        for block in net.blocks:
            last["call"] = None
            x = block(x)
            call = last["call"]
            found.append(call[0] if call is not None and call[1] is x else x)
        return found, x
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in zip(relus, inplace):
            m.inplace = flag
