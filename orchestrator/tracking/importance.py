"""Which searched parameters mattered: Optuna's fANOVA importance over a search's finished trials."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import optuna
from optuna.trial import FixedTrial, create_trial

from orchestrator.tracking.objective import ACCURACY, Objective
from search_spaces.space import suggest


def param_importances(rows: Sequence[Mapping[str, Any]], space: Mapping[str, Any], num_blocks: int,
                      fixed: Optional[Mapping[str, Any]] = None, seed: int = 0, objective: Objective = ACCURACY) -> dict[str, float]:
    """Importance (shares summing to 1, largest first) of each searched parameter, the block
    partition ``cuts`` included, for the objective's val figure. Trials that reported one count
    (diverged ones too: the searcher learnt from them); {} with fewer than two or nothing varied.

    Each trial's distributions come from replaying the define-by-run space on its parameters.
    """
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line
    try:
        study = optuna.create_study(direction="maximize" if objective.higher_is_better else "minimize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    for row in rows:
        value = row.get(objective.val)
        if row.get("status") == "FAILED" or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        replay = FixedTrial({k: v for k, v in row.items() if v is not None})
        suggest(replay, space, num_blocks, fixed)
        if replay.params:
            study.add_trial(create_trial(params=replay.params, distributions=replay.distributions, value=float(value)))
    if len(study.trials) < 2:
        return {}
    try:
        found = optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed))
    except (RuntimeError, ValueError):  # e.g. no parameter took two values
        return {}
    return {name: float(share) for name, share in found.items()}


def format_importances(importances: Mapping[str, float], trials: int, objective: Objective = ACCURACY) -> str:
    rough = "; few trials: a rough guide" if trials < 10 else ""
    lines = [f"parameter importance for {objective.val} (fANOVA, Optuna; {trials} trials{rough}):"]
    lines += [f"  {name:<20} {share:6.1%}  {'#' * round(40 * share)}" for name, share in importances.items()]
    return "\n".join(lines)
