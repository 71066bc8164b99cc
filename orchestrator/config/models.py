"""``pair.teacher`` / ``pair.student``: a zoo name, ``module:factory`` (a callable called with
``num_classes=`` and ``in_channels=``), a Hydra ``_target_`` node with its own arguments, or
``hf:NAME_OR_PATH`` for a Hugging Face text classifier (``orchestrator.config.hf_models``). Any
``nn.Module`` is cut into blocks along its forward graph (``bkd_core.graph_split``) at the ends named
by ``pair.teacher_blocks`` / ``pair.student_blocks``, or found for the usual layouts, and checked to
compute what the model computes.

    python -m orchestrator.tune pair.teacher=mymodels:teacher pair.student=mymodels:student
    python -m orchestrator.tune 'pair.student={_target_: mymodels.Student, width: 32}' pair.student_blocks=[s1,s2,s3]

Ray workers import the module themselves: keep it in the working directory (local clusters and
``ray job submit --working-dir .`` put it on every worker's path) or install it.
"""
from __future__ import annotations

import importlib
import re
from typing import Any, Optional, Sequence

import torch
from torch import nn

from bkd_core import BlockNet, models
from bkd_core.graph_split import SplitError, evaluating, wrap
from orchestrator.config.checks import ConfigError
from orchestrator.config.compose import absolute_path
from orchestrator.config.hf_models import PREFIX as HF_PREFIX
from orchestrator.config.hf_models import build_hf, is_hf
from orchestrator.config.schema import BkdConfig

Spec = Any  # str (zoo name or "module:factory") or a mapping with "_target_"


def is_zoo(spec: Spec) -> bool:
    return isinstance(spec, str) and spec in models.names()


def spec_name(spec: Spec) -> str:
    """A short name for experiment and run names: the zoo name, the factory's or the target's."""
    if is_hf(spec):
        return re.sub(r"[^A-Za-z0-9_.-]", "_", spec[len(HF_PREFIX):].rstrip("/").rsplit("/", 1)[-1])
    if isinstance(spec, str):
        return re.sub(r"[^A-Za-z0-9_.-]", "_", spec.split(":")[-1])
    if isinstance(spec, dict) and spec.get("_target_"):
        return str(spec["_target_"]).rsplit(".", 1)[-1]
    return "model"


def instantiate(spec: Spec, num_classes: int, in_channels: int, key: str) -> nn.Module:
    """The module a spec names (zoo models come back as BlockNets)."""
    if is_zoo(spec):
        return models.create(spec, num_classes, in_channels)
    if isinstance(spec, dict) and "_target_" in spec:
        from hydra.utils import instantiate as hydra_instantiate

        try:
            made = hydra_instantiate(spec)
        except Exception as exc:  # hydra wraps import and call errors alike
            raise ConfigError(key, f"{spec['_target_']!r} could not be built ({_cause(exc)}); check the module path "
                              "(importable from the working directory) and the node's arguments.") from None
        return _module(made, key, spec["_target_"])
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(key, f"unknown model {spec!r}; give a zoo name ({', '.join(models.names())}), "
                          f"module:factory (e.g. {key}=mymodels:resnet_small, called with num_classes= and in_channels=), "
                          f"or a Hydra node ({key}={{_target_: mymodels.Net, width: 32}}).")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(key, f"cannot import module {module_name!r} of {spec!r} ({_cause(exc)}); put it in the working "
                          "directory (where the command runs, and what `ray job submit --working-dir .` ships) or install it.") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(key, f"{module_name} has no callable {attr!r} (in {getattr(module, '__file__', module_name)}); "
                          f"{key}=module:factory names a function or class that returns an nn.Module.")
    try:
        made = factory(num_classes=num_classes, in_channels=in_channels)
    except Exception as exc:
        raise ConfigError(key, f"{spec}(num_classes={num_classes}, in_channels={in_channels}) failed ({_cause(exc)}); the "
                          "factory is called with these two keywords. For other arguments use a Hydra node: "
                          f"{key}={{_target_: {module_name}.{attr}, ...}}.") from None
    return _module(made, key, spec)


def build(spec: Spec, num_classes: int, in_channels: int, image_shape: Sequence[int], key: str,
          blocks: Optional[Sequence[str]] = None, check: bool = True) -> BlockNet:
    """The model a spec names as a BlockNet (a zoo model as it is), checked to compute what the model
    computes and to give ``num_classes`` logits (``check=False`` where validation checked it already)."""
    model = instantiate(spec, num_classes, in_channels, key)
    sample = torch.randn(2, *image_shape, generator=torch.Generator().manual_seed(0))
    if isinstance(model, BlockNet) and not blocks:
        return model
    try:
        net = wrap(model, sample, blocks, name=f"{key}={spec_name(spec)}", check=check)
    except SplitError as exc:
        raise ConfigError(f"{key}_blocks" if blocks else key, f"{exc}") from None
    if not check:
        return net
    with evaluating(net):
        classes = net(sample).shape[-1]
    if classes != num_classes:
        raise ConfigError(key, f"{spec_name(spec)} gives {classes} logits, and the dataset has {num_classes} classes; build it "
                          f"with num_classes={num_classes}.")
    return net


def block_names(spec: Spec, net: BlockNet, blocks: Optional[Sequence[str]]) -> list[str]:
    """How a model's blocks are called in messages: the module names they end at, else 1..n."""
    if blocks:
        return list(blocks)
    ends = getattr(net, "block_ends", None)
    return list(ends) if ends else [str(i) for i in range(1, net.num_blocks + 1)]


def _module(made: Any, key: str, spec: Any) -> nn.Module:
    if not isinstance(made, nn.Module):
        raise ConfigError(key, f"{spec} returned a {type(made).__name__}, not an nn.Module.")
    return made


def _cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_pretrained(c: BkdConfig, role: str, model: Any) -> None:
    """``teacher.init`` / ``student.init``: made absolute, loaded once here, and what it loads printed."""
    section = c.teacher if role == "teacher" else c.student
    path = section.init
    if not path:
        return
    if role == "teacher" and c.teacher.checkpoint:
        raise ConfigError("teacher.init", "and teacher.checkpoint are both set: teacher.checkpoint is a trained teacher (used as "
                          "it is), teacher.init a starting point fine-tuned for teacher.epochs; keep one.")
    section.init = absolute_path(str(path))
    from bkd_core.train import load_pretrained

    try:
        report = load_pretrained(model, section.init, what=f"{role}.init")
    except ValueError as exc:
        raise ConfigError(f"{role}.init", str(exc)) from None
    print(f"[bkd] {role}.init={path}: {report.summary()}", flush=True)


def build_model(c: BkdConfig, role: str, num_classes: int, in_channels: int, image_shape: list[int],
                check: bool = False) -> Any:
    """``pair.<role>`` as a BlockNet (``config.models``), cut the same way in the driver and every
    worker; ``check``: prove the cut on a sample (validation does, once, before Ray starts)."""

    spec, blocks = (c.pair.teacher, c.pair.teacher_blocks) if role == "teacher" else (c.pair.student, c.pair.student_blocks)
    if is_hf(spec):
        return build_hf(c, role, num_classes, blocks, check)
    return build(spec, num_classes, in_channels, image_shape, f"pair.{role}", blocks, check)
