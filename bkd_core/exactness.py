"""The exactness check of a cut: blocks that compute what the model computes, on a sample batch in eval mode."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import nn

ATOL, RTOL = 1e-4, 1e-4  # |blocks(x) - model(x)| <= ATOL + RTOL * max|model(x)|, float32, eval mode


class SplitError(ValueError):
    """A model that cannot be cut where asked, or whose pieces would not compute what it computes."""


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for a probe forward; every submodule's own mode restored after."""
    modes = [[m.training for m in module.modules()] for module in modules]
    for module in modules:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, saved in zip(modules, modes):
            for m, mode in zip(module.modules(), saved):
                m.training = mode


def check_same_output(model: nn.Module, net: nn.Module, sample: torch.Tensor, name: str = "",
                      logits: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> float:
    """The largest |net(x) - model(x)| on ``sample`` in eval mode; raises ``SplitError`` above the
    tolerance (``ATOL + RTOL * max|model(x)|``). Training modes are restored. ``logits``: how the model
    gives its logits for ``sample`` when its forward returns something else (Hugging Face's outputs)."""
    label = name or type(model).__name__
    with evaluating(model, net):
        expected, got = (logits or model)(sample), net(sample)
    if not isinstance(expected, torch.Tensor):
        raise SplitError(f"{label}: its forward returns a {type(expected).__name__}, not a logits tensor.")
    if got.shape != expected.shape:
        raise SplitError(f"{label}: the blocks give logits of shape {tuple(got.shape)}, the model {tuple(expected.shape)}.")
    difference = float((got.float() - expected.float()).abs().max())
    allowed = ATOL + RTOL * float(expected.float().abs().max())
    if not difference <= allowed:
        raise SplitError(f"{label}: as blocks it computes something else: the largest logit difference on a sample batch is "
                         f"{difference:.3g} (allowed {allowed:.3g}, eval mode); its forward does something the listed "
                         "modules do not (a functional op, a different pooling, a residual around a cut). Cut along its "
                         "forward instead (bkd_core.graph_split.split_model) or fix the module lists.")
    return difference
