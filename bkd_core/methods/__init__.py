"""Distillation methods, one module each, behind a registry.

    from bkd_core import methods
    methods.names()          # ['at', 'blockkd', ..., 'dkd', 'fitnet', 'kd', ...]: what search= and compare.methods take
    distiller = methods.make("blockkd", teacher, student, sample_input=x, temperature=4.0, gamma=1.0)
    out = distiller(x, y)                             # DistillOutput: loss, student_logits, parts

``kd``, ``dkd``, ``kd_ls``, ``dist`` and ``loca`` are the logit baselines (one class, ``LogitKD``, each name
fixing its ``logit_loss`` of ``bkd_core.losses.LOGIT_LOSSES``, which Block-KD's stepping stones take as well). The feature
and relation baselines (FitNet, AT, RKD, CRD, ReviewKD, OFA) read both models at the graph split's block
ends (``features.FeatureDistiller``), so they work on any pair bkd can cut. ``uld`` distils causal LMs of two
tokenizers by their logits alone.

Adding a method: a module here whose ``Distiller`` subclass is decorated with ``@register("name")`` (and
imported below), plus a search space of the same name (``search_spaces/conf/search/<name>.yaml``: ``method: name``).
"""
from ..params import MethodParamError
from . import at, blockkd, crd, fitnet, logit, none, ofa, reviewkd, rkd, uld  # noqa: F401  (each registers its method)
from .at import AttentionTransfer
from .base import Distiller, DistillOutput
from .blockkd import BlockKD
from .crd import ContrastiveKD
from .features import FeatureDistiller
from .fitnet import FitNet
from .logit import LogitKD
from .none import Supervised
from .ofa import OneForAll
from .registry import get, make, names, register
from .reviewkd import ReviewKD
from .rkd import RelationalKD
from .uld import UniversalLogitDistillation

__all__ = ["Distiller", "DistillOutput", "BlockKD", "LogitKD", "Supervised", "FeatureDistiller", "MethodParamError", "FitNet",
           "AttentionTransfer", "RelationalKD", "ContrastiveKD", "ReviewKD", "OneForAll", "UniversalLogitDistillation", "get", "make", "names", "register"]
