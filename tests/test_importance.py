"""fANOVA parameter importance (real Optuna) over a search's trial rows."""
import math
import random
from pathlib import Path

import optuna
import pytest
import yaml

from orchestrator.tracking.importance import format_importances, param_importances
from orchestrator.tracking.plots import search_figure
from search_spaces.space import suggest

SPACE = yaml.safe_load((Path(__file__).resolve().parents[1] / "search_spaces/conf/search/blockkd.yaml").read_text())


def rows_where_the_partition_decides(n: int) -> list[dict]:
    """Trial rows as summarize builds them: accuracy is high exactly when cut 1 is a stepping stone."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    noise = random.Random(0)
    rows = []
    for _ in range(n):
        trial = study.ask()
        constants = suggest(trial, SPACE, 3) or {}
        acc = 50.0 + 30.0 * ("1" in trial.params["cuts"].split(",")) + noise.random()
        rows.append({**trial.params, **constants, "status": "FINISHED", "val_acc": acc})
    return rows


def test_the_parameter_that_decides_comes_first():
    rows = rows_where_the_partition_decides(24)
    rows.append({"status": "FAILED", "val_acc": math.nan, "lr": 0.1})  # skipped
    importances = param_importances(rows, SPACE, 3)
    assert next(iter(importances)) == "cuts", importances
    assert sum(importances.values()) == pytest.approx(1.0)
    assert list(importances.values()) == sorted(importances.values(), reverse=True)
    assert "cuts" in format_importances(importances, 24).splitlines()[1]


def test_too_few_trials_give_no_importances():
    rows = rows_where_the_partition_decides(1)
    assert param_importances(rows, SPACE, 3) == {}
    assert param_importances([], SPACE, 3) == {}


def test_importances_panel():
    rows = sorted(rows_where_the_partition_decides(8), key=lambda r: -r["val_acc"])
    for i, row in enumerate(rows):
        row.update(trial_id=f"t{i}", started_at=float(i))
    fig = search_figure(rows, {}, "exp", {"cuts": 0.7, "lr": 0.3})
    assert len(fig.axes) == 4
    assert [t.get_text() for t in fig.axes[-1].get_yticklabels()] == ["lr", "cuts"]  # largest on top
