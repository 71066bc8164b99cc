"""A method's own parameters: how each is read (also from MLflow's strings) and the error that names one."""
from __future__ import annotations

from typing import Any, Callable, Mapping


class MethodParamError(ValueError):
    """A method parameter with a value the method cannot use; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def as_int(value: Any) -> int:
    """An integer parameter, also from MLflow's strings ("3", "3.0")."""
    return int(float(value))


def read_params(casts: Mapping[str, Callable[[Any], Any]], params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of ``casts`` that ``params`` sets (not None), each read by its cast; a value its cast
    cannot read is a ``MethodParamError`` naming it."""
    read = {}
    for name, cast in casts.items():
        if params.get(name) is None:
            continue
        try:
            read[name] = cast(params[name])
        except (TypeError, ValueError):
            raise MethodParamError(name, f"must be a number; got {params[name]!r}.") from None
    return read
