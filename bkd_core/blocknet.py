"""A classifier seen as a chain of blocks followed by a head: the unit Block-KD cuts into."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from .exactness import check_same_output

AttrPaths = Union[str, Sequence[str]]


class Head(nn.Module):
    """Runs modules in order, flattening a feature map before the first ``nn.Linear``."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if isinstance(layer, nn.Linear) and x.dim() > 2:
                x = torch.flatten(x, 1)
            x = layer(x)
        return x


class BlockNet(nn.Module):
    """``head(blocks[n-1](...blocks[0](x)))``; ``features(x)`` returns every block's output.

    Cut ``i`` (1-based) is the output of block ``i``: a stepping stone at cut ``i`` feeds the
    student's features there, through a connector, into the teacher's blocks ``i+1..n`` and head.
    """

    def __init__(self, blocks: Sequence[nn.Module], head: nn.Module) -> None:
        super().__init__()
        if len(blocks) == 0:
            raise ValueError("BlockNet needs at least one block; got an empty block list.")
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs

    def forward_from(self, cut: int, feature: torch.Tensor) -> torch.Tensor:
        """Logits from the output of block ``cut`` (1-based): runs blocks ``cut+1..n`` and the head."""
        for block in self.blocks[cut:]:
            feature = block(feature)
        return self.head(feature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    @classmethod
    def from_module(
        cls,
        model: nn.Module,
        blocks: Sequence[AttrPaths],
        head: Sequence[str],
        stem: Sequence[str] = (),
        *,
        sample_input: torch.Tensor,
    ) -> "BlockNet":
        """Wrap an existing model by attribute paths, sharing (not copying) its modules.

        ``blocks`` lists one attribute path (or a list of paths run in order) per block; ``stem``
        modules are folded into block 1; ``head`` modules run last (flattened before a Linear).
        Example (torchvision ResNet): ``stem=["conv1", "bn1", "relu", "maxpool"],
        blocks=["layer1", "layer2", "layer3", "layer4"], head=["avgpool", "fc"]``.
        Running the listed modules in order must compute what ``model`` computes: checked on
        ``sample_input`` in eval mode (``exactness.check_same_output``), a ``SplitError`` otherwise
        (a forward with functional ops between modules: ``graph_split.split_model`` cuts along it).
        """
        if len(blocks) == 0:
            raise ValueError("BlockNet.from_module needs at least one block path in blocks=[...].")
        if len(head) == 0:
            raise ValueError("BlockNet.from_module needs the head's attribute paths in head=[...].")
        built = []
        for index, paths in enumerate(blocks):
            paths = [paths] if isinstance(paths, str) else list(paths)
            modules = [_get_attr(model, p) for p in paths]
            if index == 0:
                modules = [_get_attr(model, p) for p in stem] + modules
            built.append(modules[0] if len(modules) == 1 else nn.Sequential(*modules))
        net = cls(built, Head([_get_attr(model, p) for p in head]))
        net.remember_source(model)
        check_same_output(model, net, sample_input)
        return net

    def remember_source(self, model: nn.Module) -> None:
        """Record each of this BlockNet's tensors' name in ``model``, the module it shares them with: a
        state_dict of the original model loads into the BlockNet, and the BlockNet saves under its names."""
        original: dict[int, list[str]] = {}
        for name, t in model.state_dict(keep_vars=True).items():  # a tied tensor (an LM's embeddings and head) has several
            original.setdefault(id(t), []).append(name)
        self.source_names = {}
        for name, t in self.state_dict(keep_vars=True).items():
            names = original.get(id(t))
            if names:  # tied names are given out in order, the last one to every later user
                self.source_names[name] = names.pop(0) if len(names) > 1 else names[0]

    def source_state_dict(self) -> dict:
        """This BlockNet's weights under the wrapped model's own names (what ``model.load_state_dict``
        takes); under this BlockNet's names for a model built as a BlockNet."""
        names = getattr(self, "source_names", None) or {}
        return {names.get(key, key): value for key, value in self.state_dict().items()}

    def from_source_names(self, state: dict) -> dict:
        """``state`` with the wrapped model's names (e.g. a torchvision checkpoint) renamed to this
        BlockNet's; returned as it is when it already uses this BlockNet's names."""
        names = getattr(self, "source_names", None)
        if not names or any(key in state for key in names):
            return state
        renamed = {own: state[theirs] for own, theirs in names.items() if theirs in state}
        used = set(names.values())
        return renamed | {key: value for key, value in state.items() if key not in used}


def _get_attr(model: nn.Module, path: str) -> nn.Module:
    obj = model
    for part in path.split("."):
        if not hasattr(obj, part):
            children = ", ".join(name for name, _ in model.named_children())
            raise ValueError(
                f"{type(model).__name__} has no submodule {path!r} (missing {part!r}); "
                f"its top-level children are: {children}."
            )
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{path!r} is a {type(obj).__name__}, not an nn.Module.")
    return obj
