"""The method registry: a method registers its class under a name; callers ask for it by that name."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from torch import nn

from .base import Distiller

_METHODS: dict[str, type[Distiller]] = {}
D = TypeVar("D", bound=type[Distiller])


def register(name: str) -> Callable[[D], D]:
    """Class decorator: the method ``name`` (as search spaces and ``compare.methods`` name it)."""
    def add(cls: D) -> D:
        if name in _METHODS:
            raise ValueError(f"a method named {name!r} is already registered ({_METHODS[name].__qualname__})")
        cls.name = name
        _METHODS[name] = cls
        return cls
    return add


def names() -> list[str]:
    """The registered methods' names, sorted."""
    return sorted(_METHODS)


def get(name: str) -> type[Distiller]:
    """The class of method ``name``; a ``ValueError`` naming the known ones otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown distillation method {name!r}; registered: {', '.join(names())}") from None


def make(name: str, teacher: nn.Module, student: nn.Module, **params: Any) -> Distiller:
    """Method ``name`` for the pair: ``params`` are its own parameters plus the context any method may use
    (``sample_input``: a batch for shape probes, ``connector``: the connector kind)."""
    return get(name).build(teacher, student, **params)
