"""Define-by-run suggestions with real Optuna."""
import functools
import pickle

import optuna

from orchestrator.config.compose import compose
from search_spaces import defaults, partitions, suggest


def space(name):
    from omegaconf import OmegaConf
    return OmegaConf.to_container(compose([f"search={name}"]).search, resolve=True)


def test_weights_follow_partition_and_dkd_params_are_conditional():
    s = space("blockkd")
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize")
    fn = functools.partial(suggest, space=s, num_blocks=3)
    pickle.dumps(fn)  # Ray ships it to the searcher
    for _ in range(25):
        trial = study.ask()
        fn(trial)
        cuts = [int(c) for c in trial.params["cuts"].split(",")]
        assert sorted(k for k in trial.params if k.startswith("w_")) == [f"w_{c}" for c in cuts]
        assert ("dkd_beta" in trial.params) == (trial.params["logit_loss"] == "dkd")
        study.tell(trial, trial.params["temperature"])


def test_same_seed_same_suggestions():
    s = space("blockkd")
    def first(seed):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
        trial = study.ask()
        suggest(trial, s, 3)
        return trial.params
    assert first(1) == first(1) and first(1) != first(2)


def test_baselines_have_no_stones_and_fixed_values_are_not_searched():
    study = optuna.create_study()
    trial = study.ask()
    constants = suggest(trial, space("kd"), 3, fixed={"temperature": 2.0})
    assert "cuts" not in trial.params and constants["cuts"] == "" and constants["temperature"] == 2.0
    assert "temperature" not in trial.params
    fixed = space("blockkd_fixed_partition")
    assert partitions(fixed, 4) == ["1,2,3,4"]
    assert defaults(fixed, 4)["w_2"] == 0.25


def test_defaults_for_one_configuration():
    cfg = defaults(space("blockkd"), 3, fixed={"cuts": [1, 3], "w_3": 0.5})
    assert cfg["cuts"] == "1,3" and cfg["w_1"] == 0.25 and cfg["w_3"] == 0.5 and cfg["temperature"] == 4.0
    assert "dkd_beta" not in cfg
