"""What a search selects on and a comparison reports, and which way is better: a classifier's accuracy (``val_acc``,
higher is better, %), or a language model's loss (``val_loss``, the mean negative log-likelihood per target token
in nats, lower is better). Tune's scheduler and searcher, the ranked table, plots, importances, confirmation seeds
and compare's paired differences all read it from here."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional


@dataclass(frozen=True)
class Objective:
    """A selection metric: ``val_<name>`` on the selection split, ``test_<name>`` on the test split."""

    name: str  # "acc" | "loss"
    mode: str  # "max" | "min": Tune's mode
    unit: str  # what follows a figure in prose: "%" or " nats"
    meaning: str  # the figure in words, for tables' legends and axes
    also: tuple[str, ...] = ()  # further scores every run keeps (an LM's perplexity and token accuracy)

    @property
    def val(self) -> str:
        return f"val_{self.name}"

    @property
    def test(self) -> str:
        return f"test_{self.name}"

    @property
    def best_val(self) -> str:
        return f"best_val_{self.name}"

    @property
    def higher_is_better(self) -> bool:
        return self.mode == "max"

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"

    def best(self, values: Iterable[float]) -> float:
        """The best of ``values`` (NaN for none)."""
        finite = [float(v) for v in values if v is not None and v == v]
        return (max(finite) if self.higher_is_better else min(finite)) if finite else float("nan")

    def gain(self, value: float, reference: float) -> float:
        """How much ``value`` is better than ``reference`` (positive: better), in the metric's units."""
        return value - reference if self.higher_is_better else reference - value

    def sort_key(self, value: Optional[float]) -> float:
        """Ascending order is best first; a missing figure last."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return math.inf
        return -float(value) if self.higher_is_better else float(value)

    def fmt(self, value: Any) -> str:
        return "nan" if value is None or value != value else f"{float(value):.2f}{self.unit}"

    def final_metrics(self) -> tuple[str, ...]:
        """The final figures a trial's row keeps."""
        return (self.val, self.test, *self.also, "train_loss", "throughput_img_s")


ACCURACY = Objective("acc", "max", "%", "top-1 accuracy (%)")
LOSS = Objective("loss", "min", " nats", "loss: mean negative log-likelihood per target token (nats)",
                 also=("val_ppl", "test_ppl", "val_token_acc", "test_token_acc"))


def objective_of(job: Any) -> Objective:
    """The job's objective: its data is scored per target token (``data=lm``) or per example."""
    return LOSS if getattr(job.dataset, "token_level", False) else ACCURACY
