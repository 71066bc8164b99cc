"""One figure that summarises a search: learning curves, the search's progress, accuracy by block partition."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Mapping, Optional, Sequence

from matplotlib.figure import Figure  # the object API: no pyplot state, no display needed
from matplotlib.ticker import MaxNLocator

from orchestrator.tracking.objective import ACCURACY, Objective


def search_figure(rows: Sequence[Mapping[str, Any]], curves: Mapping[str, Sequence[tuple[int, float]]], title: str,
                  importances: Optional[Mapping[str, float]] = None, objective: Objective = ACCURACY) -> Figure:
    """``rows``: trials best first (``trial_id``, ``status``, the objective's val figure (final epoch), ``cuts``,
    ``started_at``); ``curves``: trial id -> [(epoch, val figure)]. ``objective``: val_acc (higher is better) or an
    LM's val_loss (lower is better).

    Left: the val figure per epoch of every trial (the best in bold; short curves were stopped early).
    Middle: each trial's final val figure in the order trials started, with the best so far.
    Then (Block-KD searches): the final val figure of every trial per block partition (``cuts``).
    Last (when given): each parameter's share of ``importances`` (fANOVA).
    """
    metric = objective.val
    axis = f"{metric}{' (%)' if objective is ACCURACY else ' (nats)'}"
    by_partition = "cuts" in (rows[0] if rows else {})
    panels = 2 + by_partition + bool(importances)
    fig = Figure(figsize=(5 * panels, 4.2), layout="constrained")
    axes = fig.subplots(1, panels)
    fig.suptitle(title)
    best = rows[0]["trial_id"] if rows and rows[0]["status"] == "FINISHED" else None

    ax = axes[0]
    for trial_id, points in curves.items():
        if points:
            epochs, accs = zip(*sorted(points))
            strong = trial_id == best
            ax.plot(epochs, accs, marker="o", markersize=3, linewidth=2.5 if strong else 1, alpha=1 if strong else 0.5,
                    label=f"best: {trial_id}" if strong else None)
    ax.set(xlabel="epoch", ylabel=axis, title="learning curves")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if best is not None and curves.get(best):
        ax.legend(loc="best")

    ax = axes[1]
    started = sorted((r for r in rows if _finite(r.get(metric))),
                     key=lambda r: r["started_at"] if _finite(r.get("started_at")) else 0.0)
    accs = [float(r[metric]) for r in started]
    running = [objective.best(accs[: i + 1]) for i in range(len(accs))]
    order = list(range(1, len(accs) + 1))
    ax.scatter(order, accs, s=18, label="trial")
    ax.step(order, running, where="post", color="black", label="best so far")
    ax.set(xlabel="trial (in start order)", ylabel=f"final {axis}", title="search progress")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="best")

    if by_partition:
        ax = axes[2]
        groups: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            if _finite(r.get(metric)):
                groups[str(r.get("cuts") or "none")].append(float(r[metric]))
        names = sorted(groups, key=lambda name: objective.sort_key(objective.best(groups[name])))
        for i, name in enumerate(names):
            ax.scatter([i] * len(groups[name]), groups[name], s=18)
        ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 6 else 0)
        ax.set(xlabel="block partition (cuts)", ylabel=f"final {axis}", title="by partition")
    if importances:
        ax = axes[-1]
        names = list(importances)[::-1]  # largest on top
        ax.barh(names, [100 * importances[n] for n in names])
        ax.set(xlabel=f"share of {metric} variance (%)", title="parameter importance (fANOVA)")
    return fig


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
