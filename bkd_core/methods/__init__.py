"""Distillation methods, one module each, behind a registry.

    from bkd_core import methods
    methods.names()                                   # ['blockkd', 'logit', 'none']
    distiller = methods.make("blockkd", teacher, student, sample_input=x, temperature=4.0, gamma=1.0)
    out = distiller(x, y)                             # DistillOutput: loss, student_logits, parts

Adding a method: a module here whose ``Distiller`` subclass is decorated with ``@register("name")`` (and
imported below), plus a search space naming it (``search_spaces/conf/search/<name>.yaml``: ``method: name``).
"""
from . import blockkd, logit, none  # noqa: F401  (each registers its method)
from .base import Distiller, DistillOutput
from .blockkd import BlockKD
from .logit import LogitKD
from .none import Supervised
from .registry import get, make, names, register

__all__ = ["Distiller", "DistillOutput", "BlockKD", "LogitKD", "Supervised", "get", "make", "names", "register"]
