"""Chance, and whether a model beats it: the guard that no search distils from a teacher that learned nothing,
and the line that says when every student ended at chance.

Chance is the majority class's share of a split (what always answering that class scores). A model *clearly*
beats it when its accuracy lies more than three binomial standard errors of that share above it: a one-sided
test at about 0.1 %, so a model that guesses is not taken for one that learned, even on a small split (and at
most halfway from chance to 100 %, where one class nearly fills the split).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from orchestrator.config.job import Job
from orchestrator.console.interrupts import PhaseFailed

MARGIN_SE = 3.0  # standard errors above chance that count as "clearly above"


@dataclass(frozen=True)
class Chance:
    """The majority class's share of a split (%), of ``count`` examples."""

    share: float
    count: int

    @classmethod
    def of_split(cls, job: Job, split: str) -> Optional["Chance"]:
        """Chance on ``split`` ("val": the split that selects, or "test"), as validation counted it; None
        where it was not counted (streamed shards are not read before the trials)."""
        found = (job.dataset.majority or {}).get(split)
        return cls(100.0 * found[0] / max(1, found[1]), int(found[1])) if found else None

    @property
    def threshold(self) -> float:
        """The accuracy (%) a model must reach to be clearly above chance on this split; at most halfway from
        chance to 100 %, so that on a split one class nearly fills a perfect model still counts."""
        p = self.share / 100.0
        margin = MARGIN_SE * 100.0 * math.sqrt(p * (1.0 - p) / max(1, self.count))
        return self.share + min(margin, (100.0 - self.share) / 2)

    def beaten_by(self, accuracy: float) -> bool:
        return accuracy >= self.threshold


def check_teacher(job: Job, scores: dict[str, float], source: str) -> None:
    """Stop before the trials (``PhaseFailed``: exit 1) when the teacher's val accuracy is not clearly above
    chance, naming the figure, chance and the likely causes with their keys; ``teacher.allow_chance=true``
    goes on with a warning."""
    if getattr(job.dataset, "token_level", False):
        return check_lm_teacher(job, scores, source)
    chance = Chance.of_split(job, "val")
    if chance is None or "teacher_val_acc" not in scores or chance.beaten_by(scores["teacher_val_acc"]):
        return
    c = job.cfg
    acc = scores["teacher_val_acc"]
    figure = (f"the teacher ({source}) scores val_acc {acc:.2f} % on {chance.count} held-out examples, where always "
              f"answering the largest class scores {chance.share:.2f} % (clearly above chance is {chance.threshold:.2f} % "
              "or more)")
    if c.teacher.allow_chance:
        print(f"[bkd] warning: {figure}; distilling from it anyway (teacher.allow_chance=true).", flush=True)
        return
    trained = not c.teacher.checkpoint
    causes = [f"teacher.lr={c.teacher.lr:g} (too small to move, or so large it diverged)",
              f"teacher.epochs={c.teacher.epochs} (too few)",
              f"train.optimizer={c.train.optimizer} with train.schedule={c.train.schedule} (text encoders train with "
              "adamw and a warm-up)"] if trained else [
              "teacher.checkpoint holds another model's weights, or one trained on other classes, class order or "
              "preprocessing"]
    if c.data.name == "text":
        causes.append("the tokenizer (data.tokenizer, else the teacher's folder) does not know the data's words")
    raise PhaseFailed(f"the teacher learned nothing: {figure}. Nothing is distilled from it. Likely causes: {'; '.join(causes)}. "
                      "Fix the cause and run again, or set teacher.allow_chance=true to distil from it anyway.")


UNIFORM_SHARE = 0.9  # a language model teacher must be below 90 % of the uniform guess's loss, ln(V)


def check_lm_teacher(job: Job, scores: dict[str, float], source: str) -> None:
    """A language model teacher that learned nothing scores about ln(V) nats per token, the uniform guess's loss:
    stop (exit 1) unless its val_loss is below ``UNIFORM_SHARE`` of that; ``teacher.allow_chance=true`` goes on."""
    loss, vocab = scores.get("teacher_val_loss"), int(job.num_classes)
    uniform = math.log(max(2, vocab))
    if loss is None or loss < UNIFORM_SHARE * uniform:
        return
    figure = (f"the teacher ({source}) scores val_loss {loss:.3f} nats per target token, where a uniform guess over its "
              f"{vocab} tokens scores ln({vocab}) = {uniform:.3f} (a teacher that learned something is below "
              f"{UNIFORM_SHARE * uniform:.3f})")
    if job.cfg.teacher.allow_chance:
        print(f"[bkd] warning: {figure}; distilling from it anyway (teacher.allow_chance=true).", flush=True)
        return
    raise PhaseFailed(f"the teacher learned nothing: {figure}. Nothing is distilled from it. Likely causes: "
                      "pair.teacher points at a folder without trained weights (a config alone is initialised at random), "
                      "or the data's tokenizer is not the teacher's (data.tokenizer); with teacher.epochs>0, teacher.lr or "
                      "teacher.epochs. Fix the cause and run again, or set teacher.allow_chance=true to distil from it anyway.")


def at_chance_line(rows: Iterable[dict[str, Any]], chance: Optional[Chance], metric: str, what: str) -> Optional[str]:
    """One line when every finished run's ``metric`` is not clearly above ``chance`` (None otherwise)."""
    done = [r[metric] for r in rows if r.get("status") == "FINISHED" and r.get(metric) is not None and r[metric] == r[metric]]
    if chance is None or not done or any(chance.beaten_by(float(v)) for v in done):
        return None
    return (f"[bkd] warning: every {what} ended at chance ({metric} at most {max(done):.2f} %, where always answering "
            f"the largest class scores {chance.share:.2f} %): the students learned nothing. Likely keys: train.lr_range "
            "(or the space's search.params.lr), train.epochs, train.optimizer.")
