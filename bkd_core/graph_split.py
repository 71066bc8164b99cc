"""Cut any classifier into blocks along its own forward graph (``torch.fx``).

``split_model(model, cuts, sample)`` traces ``model.forward`` with the modules named in ``cuts`` kept
whole, and cuts the graph after each of them: block 1 is everything up to the first cut (the stem
included), block ``k`` what runs between cuts ``k-1`` and ``k``, the head what runs after the last
cut. Whatever the forward does between modules (functional ops, scales, additions) stays where it
runs. The pieces share the model's modules and weights (nothing is copied). ``find_cuts`` proposes
cuts for the usual layouts. ``check_same_output`` proves on a sample batch, in eval mode, that the
pieces compute what the model computes.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import torch
from torch import fx, nn

from .blocknet import BlockNet
from .exactness import ATOL, RTOL, SplitError, check_same_output, evaluating  # noqa: F401  (part of this module's API)


class _KeepWhole(fx.Tracer):
    """fx's tracer, with the cut modules (and their insides) as single calls."""

    def __init__(self, whole: set[str]) -> None:
        super().__init__()
        self.whole = whole

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.whole or super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module, cuts: Sequence[str], name: str = "") -> fx.GraphModule:
    """``model``'s forward graph with every cut module kept as one call."""
    tracer = _KeepWhole(set(cuts))
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many kinds for data-dependent control flow
        raise SplitError(f"{name or type(model).__name__}: its forward cannot be traced by torch.fx "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); write it without "
                         "Python control flow on tensor values, or wrap it as a BlockNet yourself.") from None
    return fx.GraphModule(tracer.root, graph)


def split_model(model: nn.Module, cuts: Sequence[str], sample: Optional[torch.Tensor] = None, name: str = "") -> BlockNet:
    """``model`` as a ``BlockNet`` cut after each module in ``cuts`` (qualified names, in forward
    order); with ``sample``, checked to compute what ``model`` computes (``check_same_output``)."""
    label = name or type(model).__name__
    if not cuts:
        raise SplitError(f"{label}: no cuts given; name the modules whose outputs end a block, e.g. [layer1, layer2, layer3].")
    traced = trace(model, cuts, label)
    nodes = list(traced.graph.nodes)
    if sum(n.op == "placeholder" for n in nodes) != 1:
        raise SplitError(f"{label}: its forward takes more than one input; a classifier takes one image batch.")
    position = {node: i for i, node in enumerate(nodes)}
    ends = []
    for cut in cuts:
        calls = [n for n in nodes if n.op == "call_module" and n.target == cut]
        if not calls:
            modules = [n for n, _ in model.named_modules() if n]
            hint = f" (its modules include {', '.join(modules[:12])}{', ...' if len(modules) > 12 else ''})"
            raise SplitError(f"{label}: no module {cut!r} runs in its forward{hint}.")
        if len(calls) > 1:
            raise SplitError(f"{label}: module {cut!r} runs {len(calls)} times in its forward; cut at a module that runs once.")
        ends.append(calls[0])
    if [position[e] for e in ends] != sorted(position[e] for e in ends):
        order = sorted(cuts, key=lambda c: position[ends[list(cuts).index(c)]])
        raise SplitError(f"{label}: the cuts {list(cuts)} are not in forward order; the forward runs them as {order}.")
    part = {}
    boundaries = [position[e] for e in ends]
    for node in nodes:
        part[node] = sum(position[node] > b for b in boundaries)  # 0..len(cuts): block index, the last is the head
    pieces = [_piece(traced, nodes, part, k, ends[k - 1] if k else None, ends[k] if k < len(ends) else None, cuts, label)
              for k in range(len(ends) + 1)]
    net = BlockNet(pieces[:-1], pieces[-1])
    net.block_ends = list(cuts)  # the module each block ends at, for messages
    net.remember_source(model)
    if sample is not None:
        check_same_output(model, net, sample, label)
    return net


def _piece(traced: fx.GraphModule, nodes: list[fx.Node], part: dict[fx.Node, int], k: int, start: Optional[fx.Node],
           end: Optional[fx.Node], cuts: Sequence[str], label: str) -> fx.GraphModule:
    """Piece ``k`` as its own GraphModule of one input: the model's input (k = 0) or the output of cut ``k``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if start is not None:
        env[start] = graph.placeholder("x")

    def value(arg: fx.Node) -> fx.Node:
        if arg in env:
            return env[arg]
        if arg.op == "get_attr":  # a constant or parameter of the model: read it where it is used
            env[arg] = graph.node_copy(arg, value)
            return env[arg]
        where = "the model's input" if arg.op == "placeholder" else f"{arg.name} (computed before cut {cuts[part[arg] - 1] if part[arg] else cuts[0]!r})"
        raise SplitError(f"{label}: {where} is used after cut {cuts[k - 1]!r}: a value other than the block's output crosses "
                         "the cut (e.g. a skip connection around it); cut where only one tensor flows on.")

    for node in nodes:
        if part[node] != k or node.op == "get_attr":
            continue
        env[node] = graph.placeholder("x") if node.op == "placeholder" else graph.node_copy(node, value)
    if end is not None:
        graph.output(env[end])
    graph.lint()
    return fx.GraphModule(traced, graph, class_name=f"Block{k + 1}" if end is not None else "Head")


def find_cuts(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """Block boundaries of the usual layouts: ``layer1..layerN`` (torchvision ResNets), each of
    ``stages.*``, ``blocks.*``, ``layers.*`` (timm's CNNs, ViT/DeiT, Swin) or ``encoder.layers.*``
    (torchvision's ViT), else the children of ``features`` where the spatial size changes (VGG,
    MobileNet, EfficientNet, torchvision's ConvNeXt and Swin). Raises ``SplitError`` when none fits."""
    children = dict(model.named_children())
    layers = sorted((n for n in children if re.fullmatch(r"layer\d+", n)), key=lambda n: int(n[5:]))
    if len(layers) >= 2:
        return layers
    for container in ("stages", "blocks", "layers", "encoder.layers"):  # timm (CNNs, ViT, Swin), torchvision ViT
        stages = _submodule(model, container)
        if isinstance(stages, (nn.Sequential, nn.ModuleList)) and len(stages) >= 2:
            return [f"{container}.{name}" for name, _ in stages.named_children()]
    features = children.get("features")
    if isinstance(features, nn.Sequential) and len(features) >= 2:
        return _resolution_cuts(model, features, sample)
    raise SplitError(f"{type(model).__name__}: no usual block layout found (layer1..layerN, stages, or a features "
                     f"Sequential; its children are {', '.join(children) or 'none'}); name the block ends "
                     "(e.g. pair.teacher_blocks=[block1,block2,block3]).")


def _submodule(model: nn.Module, path: str) -> Optional[nn.Module]:
    for name in path.split("."):
        model = dict(model.named_children()).get(name)
        if model is None:
            return None
    return model


def _resolution_cuts(model: nn.Module, features: nn.Sequential, sample: torch.Tensor) -> list[str]:
    """The last child of ``features`` at each spatial size (a block ends where the next child downsamples)."""
    sizes: list[Any] = [None] * len(features)
    hooks = [child.register_forward_hook(lambda _m, _i, out, i=i: sizes.__setitem__(i, tuple(out.shape[2:])))
             for i, child in enumerate(features)]
    try:
        with evaluating(model):
            model(sample)
    finally:
        for hook in hooks:
            hook.remove()
    cuts = [f"features.{i}" for i in range(len(features) - 1) if sizes[i] != sizes[i + 1]]
    cuts.append(f"features.{len(features) - 1}")
    if len(cuts) < 2:
        raise SplitError(f"{type(model).__name__}: its features keep one spatial size throughout; name the block ends.")
    return cuts


def wrap(model: nn.Module, sample: torch.Tensor, cuts: Optional[Sequence[str]] = None, name: str = "",
         check: bool = True) -> BlockNet:
    """``model`` as a ``BlockNet``: a BlockNet as it is, anything else cut at ``cuts`` or at
    ``find_cuts``' boundaries along its own forward graph, and checked on ``sample`` (``check=False``:
    where the same model was checked already, e.g. in every worker after the driver)."""
    if isinstance(model, BlockNet):
        return model
    return split_model(model, list(cuts) if cuts else find_cuts(model, sample), sample if check else None, name)


__all__ = ["ATOL", "RTOL", "SplitError", "check_same_output", "evaluating", "find_cuts", "split_model", "trace", "wrap"]
