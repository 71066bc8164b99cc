"""Logit distances d(student, teacher): KD (forward KL), DKD, KD with logit standardisation, DIST, LoCa-calibrated
KD, and the LLM distillation distances: reverse KL (MiniLLM's objective), skew KL (DistiLLM) and the generalised JSD
(GKD). ULD's cross-tokenizer distance is in ``token_losses``.

All are computed in fp32 (inputs are upcast), averaged over the batch and scaled by T^2 so that
gradient magnitudes do not shrink with the temperature (Hinton et al., 2015). On token logits (B, L, V) every
distance runs over the target tokens only, in chunks (``token_losses.per_token``).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .params import MethodParamError

LOGIT_LOSSES = ("kd", "dkd", "kd_ls", "dist", "loca", "rkl", "skl", "jsd")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, mean over the batch."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return kl.mean() * temperature**2


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-sample z-score of the logits (Sun et al., 2024, "Logit Standardization in KD")."""
    logits = logits.float()
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + eps)


def kd_ls_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KD on per-sample standardised logits."""
    return kd_loss(standardize_logits(student_logits), standardize_logits(teacher_logits), temperature)


def _non_target_indices(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Column indices of the non-target classes, shape (B, C-1), without a host sync."""
    base = torch.arange(num_classes - 1, device=target.device).unsqueeze(0)
    return base + (base >= target.unsqueeze(1)).long()


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., 2022): ``alpha * TCKD + beta * NCKD``, both T^2-scaled.

    The binary target/non-target log-probabilities come from logsumexp in fp32, so the loss stays
    finite for any logits (``log(sum(probs))`` overflows to inf for gaps of a few hundred).
    """
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    target = target.long().view(-1, 1)
    non_target = _non_target_indices(target.view(-1), s.shape[1])

    def binary_log_probs(z: torch.Tensor) -> torch.Tensor:
        log_z = torch.logsumexp(z, dim=1, keepdim=True)
        log_target = z.gather(1, target) - log_z
        log_rest = torch.logsumexp(z.gather(1, non_target), dim=1, keepdim=True) - log_z
        return torch.cat([log_target, log_rest], dim=1)

    log_b_s, log_b_t = binary_log_probs(s), binary_log_probs(t)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(dim=1).mean()

    log_q_s = F.log_softmax(s.gather(1, non_target), dim=1)
    log_q_t = F.log_softmax(t.gather(1, non_target), dim=1)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum(dim=1).mean()
    return (alpha * tckd + beta * nckd) * temperature**2


def _pearson_distance(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """``1 - Pearson correlation`` of ``a`` and ``b`` along ``dim``, averaged over the other dimension."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    r = (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)
    return (1 - r).mean()


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
              inter: float = 1.0, intra: float = 1.0) -> torch.Tensor:
    """DIST (Huang et al., 2022): ``T^2 * (inter * (1 - pearson over classes, per sample) + intra * (1 - pearson
    over the batch, per class))`` of the two softmax(logits / T) distributions."""
    p_s = F.softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    return temperature**2 * (inter * _pearson_distance(p_s, p_t, 1) + intra * _pearson_distance(p_s, p_t, 0))


def loca_targets(teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float, alpha: float = 0.9) -> torch.Tensor:
    """LoCa (Yang et al., 2024): the teacher's softmax(t / T) calibrated so that the labelled class is its
    largest probability, the non-target probabilities keeping their ratios. Non-target probabilities are
    scaled by ``s = alpha / (1 - p_y + p_max)``, the target's becomes ``1 - s * (1 - p_y)``; any alpha in
    (0, 1) puts the target above every other class."""
    p = F.softmax(teacher_logits.float() / temperature, dim=1)
    target = target.long().view(-1, 1)
    p_y = p.gather(1, target)
    scale = alpha / (1 - p_y + p.max(dim=1, keepdim=True).values)
    return (p * scale).scatter(1, target, 1 - scale * (1 - p_y))


def loca_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float,
                 alpha: float = 0.9) -> torch.Tensor:
    """KD toward LoCa's calibrated teacher targets: ``T^2 * KL(loca(t) || softmax(s/T))``, mean over the batch."""
    q = loca_targets(teacher_logits, target, temperature, alpha)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    kl = (q * (q.clamp_min(1e-12).log() - log_p_s)).sum(dim=1)
    return kl.mean() * temperature**2


def reverse_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Reverse KL, MiniLLM's objective (Gu et al., 2024) without its policy gradient:
    ``T^2 * KL(softmax(s/T) || softmax(t/T))``, mean over the rows: mode-seeking, the student need not cover every
    mode of the teacher."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return (log_p_s.exp() * (log_p_s - log_p_t)).sum(dim=1).mean() * temperature**2


def skew_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                 skew: float = 0.1) -> torch.Tensor:
    """Skew forward KL, DistiLLM (Ko et al., 2024): ``T^2 * KL(p_t || skew*p_t + (1-skew)*p_s)``, mean over the rows;
    ``skew=0`` is forward KL, and any skew > 0 keeps the target's log-ratio bounded by ``-log(skew)``."""
    if not 0 <= skew < 1:
        raise MethodParamError("skew_lambda", f"{skew}: skew KL mixes the teacher in with weight 0 <= skew_lambda < 1 (DistiLLM: 0.1).")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    log_mix = torch.logaddexp(log_p_t + math.log(skew), log_p_s + math.log1p(-skew)) if skew > 0 else log_p_s
    return (log_p_t.exp() * (log_p_t - log_mix)).sum(dim=1).mean() * temperature**2


def jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence, GKD (Agarwal et al., 2024) as TRL computes it: with
    ``m = beta*p_t + (1-beta)*p_s``, ``T^2 * (beta*KL(p_t || m) + (1-beta)*KL(p_s || m))``, mean over the rows;
    ``beta=0`` is forward KL and ``beta=1`` reverse KL (the end points TRL sets)."""
    if not 0 <= beta <= 1:
        raise MethodParamError("jsd_beta", f"{beta}: the generalised JSD weighs the teacher by 0 <= jsd_beta <= 1 (GKD: 0.5).")
    if beta == 0:
        return kd_loss(student_logits, teacher_logits, temperature)
    if beta == 1:
        return reverse_kl_loss(student_logits, teacher_logits, temperature)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    log_m = torch.logaddexp(log_p_t + math.log(beta), log_p_s + math.log1p(-beta))
    kl_t = (log_p_t.exp() * (log_p_t - log_m)).sum(dim=1)
    kl_s = (log_p_s.exp() * (log_p_s - log_m)).sum(dim=1)
    return (beta * kl_t + (1 - beta) * kl_s).mean() * temperature**2


LogitDistance = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _kd_distance(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    return kd_loss(s, t, temperature)


def _kd_ls_distance(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    return kd_ls_loss(s, t, temperature)


def _dkd_distance(
    s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float, alpha: float, beta: float
) -> torch.Tensor:
    return dkd_loss(s, t, y, alpha, beta, temperature)


def _dist_distance(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float, inter: float, intra: float) -> torch.Tensor:
    return dist_loss(s, t, temperature, inter, intra)


def _loca_distance(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    return loca_kd_loss(s, t, y, temperature, alpha)


def _rkl_distance(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    return reverse_kl_loss(s, t, temperature)


def _skl_distance(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float, skew: float) -> torch.Tensor:
    return skew_kl_loss(s, t, temperature, skew)


def _jsd_distance(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float, beta: float) -> torch.Tensor:
    return jsd_loss(s, t, temperature, beta)


DISTANCE_PARAMS = {"dkd": ("dkd_alpha", "dkd_beta"), "dist": ("dist_inter", "dist_intra"), "loca": ("loca_alpha",),
                   "skl": ("skew_lambda",), "jsd": ("jsd_beta",)}


def make_logit_distance(name: str, **kwargs: float) -> LogitDistance:
    """``d(student, teacher, target, temperature)`` for a loss name (DKD takes dkd_alpha, dkd_beta; DIST
    dist_inter, dist_intra; LoCa loca_alpha; skew KL skew_lambda; the generalised JSD jsd_beta)."""
    if name == "rkl":
        _reject_kwargs(name, kwargs)
        return _rkl_distance
    if name == "kd":
        _reject_kwargs(name, kwargs)
        return _kd_distance
    if name == "kd_ls":
        _reject_kwargs(name, kwargs)
        return _kd_ls_distance
    if name in DISTANCE_PARAMS:
        unknown = set(kwargs) - set(DISTANCE_PARAMS[name])
        if unknown:
            raise ValueError(f"{name} takes {', '.join(DISTANCE_PARAMS[name])} (and warmup_epochs); unknown: {sorted(unknown)}.")
    if name == "dkd":
        alpha, beta = float(kwargs.get("dkd_alpha", 1.0)), float(kwargs.get("dkd_beta", 8.0))
        return functools.partial(_dkd_distance, alpha=alpha, beta=beta)
    if name == "dist":
        return functools.partial(_dist_distance, inter=float(kwargs.get("dist_inter", 1.0)), intra=float(kwargs.get("dist_intra", 1.0)))
    if name == "loca":
        alpha = float(kwargs.get("loca_alpha", 0.9))
        if not 0 < alpha < 1:
            raise MethodParamError("loca_alpha", f"{alpha}: LoCa's scale needs 0 < loca_alpha < 1 (e.g. 0.9).")
        return functools.partial(_loca_distance, alpha=alpha)
    if name == "skl":
        skew = float(kwargs.get("skew_lambda", 0.1))
        if not 0 <= skew < 1:
            raise MethodParamError("skew_lambda", f"{skew}: skew KL mixes the teacher in with weight 0 <= skew_lambda < 1 (DistiLLM: 0.1).")
        return functools.partial(_skl_distance, skew=skew)
    if name == "jsd":
        beta = float(kwargs.get("jsd_beta", 0.5))
        if not 0 <= beta <= 1:
            raise MethodParamError("jsd_beta", f"{beta}: the generalised JSD weighs the teacher by 0 <= jsd_beta <= 1 (GKD: 0.5).")
        return functools.partial(_jsd_distance, beta=beta)
    raise ValueError(f"unknown logit loss {name!r}; valid: {', '.join(LOGIT_LOSSES)}.")


def _reject_kwargs(name: str, kwargs: dict) -> None:
    if kwargs:
        raise ValueError(f"logit loss {name!r} takes no extra parameters; got {sorted(kwargs)}.")


def warmup_factor(epoch: Optional[float], warmup_epochs: float) -> float:
    """Linear ramp 0 -> 1 over ``warmup_epochs`` (1.0 when no warm-up or epoch unknown)."""
    if warmup_epochs <= 0 or epoch is None:
        return 1.0
    return min(1.0, max(0.0, epoch) / warmup_epochs)
