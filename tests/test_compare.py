"""orchestrator.compare and tune.confirm_seeds: real local Ray, Optuna, MLflow sqlite store; the
statistics against hand-computed values; bad input before Ray starts."""
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from bkd_core import models
from orchestrator import compare
from orchestrator import tune as tune_entry
from orchestrator.config.compose import compose
from orchestrator.config.job import validate
from orchestrator.console.cli import entry_point
from orchestrator.search.comparison import COLUMNS, check_methods, method_config
from orchestrator.tracking.stats import (Interval, SeedResult, decode_correct, encode_correct, method_interval, paired_difference,
                                         verdict)
from orchestrator.worker.loop import build_module


def test_interval_and_paired_difference_by_hand():
    i = Interval.of([1.0, 2.0, 3.0, 4.0, 5.0])  # std sqrt(2.5); t(0.975, 4) = 2.7764; no test term given
    assert i.mean == 3.0 and i.std == pytest.approx(math.sqrt(2.5))
    assert i.high - i.mean == pytest.approx(2.7764 * math.sqrt(2.5) / math.sqrt(5), rel=1e-4)
    runs = lambda accs: {s: SeedResult(a, None, 1000) for s, a in accs.items()}  # noqa: E731
    d = paired_difference(runs({0: 94.1, 1: 93.8, 2: 94.0, 7: 50.0}), runs({0: 93.6, 1: 93.7, 2: 93.5}))  # seed 7 has no pair
    assert d.n == 3 and d.mean == pytest.approx(0.3667, abs=1e-4)
    assert verdict("Block-KD", "KD", Interval(5, 0.31, 0.1, 0.12, 0.50)) == \
        "Block-KD beats KD by 0.31 points (95 % CI 0.12 to 0.50, 5 seeds)."
    assert verdict("Block-KD", "KD", Interval(5, 0.2, 0.3, -0.05, 0.40)) == \
        "Block-KD and KD are not distinguishable at 5 seeds (difference -0.05 to 0.40)."
    assert "trails KD by 0.50" in verdict("DKD", "KD", Interval(3, -0.5, 0.1, -0.8, -0.2))
    assert "no interval" in verdict("DKD", "KD", Interval.of([0.3]))


def test_equal_paired_differences_on_two_seeds_give_an_interval_at_least_the_test_splits_error():
    """Two seeds, each 14 of 449 test examples better (KD 64.14/69.49 against LoCa 67.26/72.61, as a comparison
    printed it): the seeds agree exactly, yet the interval is not zero-wide: the test examples' paired noise
    counts, computed here by hand from the per-example results (t(0.975, 1) = 12.706)."""
    n = 449
    rng = np.random.default_rng(0)
    kd, loca = {}, {}
    for seed, right in ((1, 288), (2, 312)):
        base = np.zeros(n, dtype=bool)
        base[rng.choice(n, right, replace=False)] = True
        better = base.copy()
        better[rng.choice(np.flatnonzero(~base), 14, replace=False)] = True  # 14 more examples right, none fewer
        kd[seed] = SeedResult(100.0 * base.mean(), decode_correct(encode_correct(base)), n)
        loca[seed] = SeedResult(100.0 * better.mean(), decode_correct(encode_correct(better)), n)
    d = paired_difference(loca, kd)
    assert d.n == 2 and d.std == 0.0 and d.mean == pytest.approx(100 * 14 / n)
    per_example = np.mean([loca[s].correct.astype(float) - kd[s].correct.astype(float) for s in (1, 2)], axis=0)
    test_se = 100 * per_example.std(ddof=1) / math.sqrt(n)  # by hand: the paired test term of the mean difference
    assert d.test_se == pytest.approx(test_se) and test_se > 0.22  # more than one example's worth (0.22 points)
    assert d.high - d.mean == pytest.approx(12.706 * test_se, rel=1e-4) and d.low < d.mean < d.high
    assert "not distinguishable at 2 seeds" in verdict("KD+LoCa", "KD", d) and "few seeds" in verdict("KD+LoCa", "KD", d)
    # without per-example results (streamed test data): the binomial term of both accuracies, never zero either
    plain = paired_difference({s: SeedResult(r.accuracy, None, n) for s, r in loca.items()},
                              {s: SeedResult(r.accuracy, None, n) for s, r in kd.items()})
    assert plain.high - plain.low > 0 and plain.test_se >= test_se
    # one method's own interval over the same two seeds: the seeds' spread and the test term
    one = method_interval(kd)
    matrix = np.mean([kd[s].correct.astype(float) for s in (1, 2)], axis=0)
    by_hand = math.sqrt(one.std ** 2 / 2 + (100 * matrix.std(ddof=1)) ** 2 / n)
    assert one.high - one.mean == pytest.approx(12.706 * by_hand, rel=1e-4)


def test_a_seed_gives_every_method_the_same_student_and_another_seed_another():
    job = validate(compose(["compare.seeds=2"]), command="compare")
    teacher = models.create("tiny_resnet", 10, 1).state_dict()
    sample = torch.zeros(2, 1, 8, 8)
    students = {}
    for method, params in (("none", {"method": "none", "lr": 0.05}), ("kd", {"method": "kd", "cuts": ""}),
                           ("blockkd", {"method": "blockkd", "cuts": "1,3", "w_1": 0.25, "w_3": 1.0})):
        for seed in (0, 1):
            module = build_module(job, {**params, "seed": seed}, "distill", teacher, sample)
            students[method, seed] = module.student.state_dict()
    for method in ("kd", "blockkd"):
        assert all(torch.equal(students[method, 0][k], v) for k, v in students["none", 0].items())
    assert not all(torch.equal(students["none", 1][k], v) for k, v in students["none", 0].items())


@pytest.mark.parametrize("argv, key, fragment", [
    (["compare.methods=[kd,foo]"], "compare.methods", "unknown method 'foo'"),
    (["compare.methods=[none,blockkd]"], "compare.baseline", "compare.baseline=null"),
    (["compare.methods=[kd,fitnet]", "compare.fixed.fitnet.hint_block=5"], "compare.fixed.fitnet.hint_block", "names no block"),
    (["compare.methods=[kd,crd]", "compare.fixed.crd.nce_k=-1"], "compare.fixed.crd.nce_k", "nce_k >= 0"),
    (["compare.fixed.kd.cuts=[1]"], "compare.fixed.kd.cuts", "logit-only baseline"),
    (["compare.fixed.blockkd.gamma=-1"], "compare.fixed.blockkd.gamma", "[0, 2]"),
    (["compare.from_search.blockkd=/no/such/search"], "compare.from_search.blockkd", "neither a results folder"),
    (["compare.seeds=0"], "compare.seeds", "integer >= 1"),
    (["compare.tune_trials=0"], "compare.tune_trials", "integer >= 1"),
    (["compare.tune_trials=4", "compare.from_search.kd=results/x"], "compare.tune_trials", "drop compare.from_search"),
])
def test_bad_compare_input_is_refused_before_ray(argv, key, fragment, tmp_path, capsys):
    base = [f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db", f"output_dir={tmp_path}/out", f"ray.storage_path={tmp_path}/ray"]
    assert entry_point(compare.run, base + argv, command="compare") == 2
    err = capsys.readouterr().err
    assert f"configuration error in `{key}`" in err and fragment in err, err
    assert not ray.is_initialized()


def with_random_teacher(tmp_path, name):
    """The overrides of a run named ``name`` in ``tmp_path`` whose teacher is a random tiny_resnet (no teacher run)."""
    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(models.create("tiny_resnet", 10, 1).state_dict(), teacher)
    return [f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"ray.storage_path={tmp_path}/ray", f"output_dir={tmp_path}/out",
            f"tune.name={name}", f"teacher.checkpoint={teacher}", "teacher.allow_chance=true"]



ALL_METHODS = ["none", "kd", "dkd", "fitnet", "at", "rkd", "crd", "reviewkd", "ofa", "dist", "loca", "blockkd"]


@pytest.mark.ray
def test_compare_methods_by_seeds_end_to_end(ray_cluster, tmp_path, capsys):
    """Every shipped method, feature and logit baselines beside Block-KD, on fresh paired seeds."""
    argv = with_random_teacher(tmp_path, "cmp") + ["compare.seeds=2", "train.epochs=1", "compare.fixed.blockkd.cuts=[1,3]",
                                                   f"compare.methods=[{','.join(ALL_METHODS)}]"]
    assert entry_point(compare.run, argv, command="compare") == 0
    out = capsys.readouterr().out
    rows = pq.read_table(tmp_path / "out" / "cmp" / "compare.parquet").to_pylist()
    # seeds train.seed+1, +2: never train.seed, the seed a search trains its trials with
    assert {(r["method"], r["seed"]) for r in rows} == {(m, s) for m in ALL_METHODS for s in (1, 2)}
    assert all(r["status"] == "FINISHED" and r["epochs"] == 1 and r["val_acc"] > 0 and r["test_acc"] > 0 and r["mlflow_run_id"]
               for r in rows)
    assert "[bkd] KD (kd): lr=0.05, temperature=4, alpha=1, beta=1, logit_loss=kd, cuts=  <- its search space's defaults" in out
    assert "[bkd] FitNet (fitnet): lr=0.05, alpha=1, beta=100, hint_block=0, regressor=convreg, cuts=  <- its search space's defaults" in out
    assert "compare.fixed.blockkd: cuts; its search space's defaults for the rest" in out
    assert set(COLUMNS) <= set(rows[0])
    assert all(r["val_acc_stone_1"] is not None for r in rows if r["method"] == "blockkd")
    assert (tmp_path / "out" / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("bkd").experiment_id
    (parent,) = client.search_runs([exp], filter_string="tags.`mlflow.runName` = 'cmp'")
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted((c.data.params["method"], c.data.params["seed"]) for c in children) == sorted(
        (r["method"], str(r["seed"])) for r in rows)
    metrics = parent.data.metrics
    acc = {(r["method"], r["seed"]): r["test_acc"] for r in rows}  # the statistics are the test split's
    for m in ALL_METHODS:
        assert metrics[f"mean_test_acc.{m}"] == pytest.approx((acc[m, 1] + acc[m, 2]) / 2)
        assert metrics[f"std_test_acc.{m}"] == pytest.approx(abs(acc[m, 1] - acc[m, 2]) / math.sqrt(2))
    diffs = [acc["blockkd", s] - acc["kd", s] for s in (1, 2)]
    assert metrics["diff_vs_kd.blockkd"] == pytest.approx(sum(diffs) / 2)
    # each run kept its per-example correctness on the test split, and every interval counts it: none is zero-wide,
    # and each is at least t(0.975, 1) times the paired test-split error of its difference
    for r in rows:
        correct = decode_correct(r["test_correct"])
        assert correct.size == 449 and 100 * correct.mean() == pytest.approx(r["test_acc"])
    for m in ALL_METHODS:
        if m == "kd":
            continue
        low, high = metrics[f"diff_vs_kd_ci_low.{m}"], metrics[f"diff_vs_kd_ci_high.{m}"]
        per_example = np.mean([decode_correct(r["test_correct"]).astype(float) for r in rows if r["method"] == m], axis=0) - \
            np.mean([decode_correct(r["test_correct"]).astype(float) for r in rows if r["method"] == "kd"], axis=0)
        test_se = 100 * per_example.std(ddof=1) / math.sqrt(per_example.size)
        assert high - low >= 2 * 12.706 * test_se * (1 - 1e-9) and high > low, m
    assert metrics["diff_vs_kd_ci_low.blockkd"] < metrics["diff_vs_kd.blockkd"] < metrics["diff_vs_kd_ci_high.blockkd"]
    assert "diff_vs_kd.kd" not in metrics and "diff_vs_kd.none" in metrics
    for m in set(ALL_METHODS) - {"kd"}:  # the same seed, another method: no method silently trains as KD
        assert all(acc[m, s] != acc["kd", s] for s in (1, 2)), m
    assert "diff vs kd (paired)" in out and ("Block-KD beats KD" in out or "Block-KD trails KD" in out
                                              or "Block-KD and KD are not distinguishable at 2 seeds" in out)


@pytest.mark.ray
def test_confirm_seeds_trains_the_best_configuration_again(ray_cluster, tmp_path, capsys):
    argv = with_random_teacher(tmp_path, "conf") + ["tune.num_samples=2", "train.epochs=2", "tune.scheduler=none",
            "tune.confirm_seeds=2"]
    assert entry_point(tune_entry.run, argv) == 0
    out = capsys.readouterr().out
    rows = pq.read_table(tmp_path / "out" / "conf" / "trials.parquet").to_pylist()
    best = rows[0]
    assert best["confirm_val_acc_mean"] is not None and best["confirm_val_acc_std"] is not None
    assert best["confirm_test_acc_mean"] is not None and ("optimistic" in out or "pessimistic" in out)
    assert "best configuration on 2 fresh seeds" in out
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("bkd").experiment_id
    (parent,) = client.search_runs([exp], filter_string="tags.`mlflow.runName` = 'conf'")
    assert parent.data.metrics["confirm_val_acc_mean"] == pytest.approx(best["confirm_val_acc_mean"])
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    confirm = [c for c in children if c.data.params.get("seed") in ("1", "2")]
    assert len(children) == 4 and len(confirm) == 2
    assert all(c.data.params["cuts"] == str(best["cuts"]) and float(c.data.params["lr"]) == pytest.approx(best["lr"])
               for c in confirm)


@pytest.mark.ray
def test_compare_tune_trials_searches_every_method_then_trains_the_best_on_fresh_seeds(ray_cluster, tmp_path, capsys):
    argv = with_random_teacher(tmp_path, "tuned") + ["compare.methods=[kd,blockkd]", "compare.tune_trials=2",
            "compare.seeds=2", "train.epochs=1", "compare.fixed.blockkd.cuts=[1,3]"]
    assert entry_point(compare.run, argv, command="compare") == 0
    out = capsys.readouterr().out
    searched = {m: pq.read_table(tmp_path / "out" / "tuned" / f"search-{m}" / "trials.parquet").to_pylist() for m in ("kd", "blockkd")}
    assert all(len(rows) == 2 for rows in searched.values())
    rows = pq.read_table(tmp_path / "out" / "tuned" / "compare.parquet").to_pylist()
    assert len(rows) == 4 and all(r["status"] == "FINISHED" for r in rows)
    assert not {r["seed"] for r in rows} & {r["seed"] for found in searched.values() for r in found}, "fresh seeds"
    for method, found in searched.items():
        best = next(r for r in found if r["status"] == "FINISHED")
        assert all(r["lr"] == pytest.approx(best["lr"]) for r in rows if r["method"] == method), "the search's best trains"
        assert f"the best of {method}'s search of 2 trials" in out
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("bkd").experiment_id
    (parent,) = client.search_runs([exp], filter_string="tags.`mlflow.runName` = 'tuned'")
    nested = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`bkd.role` = 'search'")
    assert sorted(r.info.run_name for r in nested) == ["tuned-search-blockkd", "tuned-search-kd"]
    for run in nested:
        trials = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        assert len(trials) == 2 and run.info.status == "FINISHED" and "best_val_acc" in run.data.metrics
    assert "mean_test_acc.blockkd" in parent.data.metrics and "diff_vs_kd.blockkd" in parent.data.metrics



@pytest.mark.ray
def test_mixed_pairs_search_and_compare_end_to_end(ray_cluster, tmp_path, capsys):
    """A ViT teacher (timm's layout, its 6 blocks grouped into 3) with a CNN student in a search, and a CNN
    teacher with a ViT student in a comparison: stones through token connectors both ways, the student's
    weights in its own class's names."""
    torch.manual_seed(0)
    teacher = tmp_path / "vit.pt"
    torch.save(models.create("vit_tiny_p2_8", 10, 1).source_state_dict(), teacher)
    base = [f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"ray.storage_path={tmp_path}/ray", f"output_dir={tmp_path}/out",
            "train.epochs=1", "tune.scheduler=none"]
    argv = base + ["tune.name=vit-cnn", f"teacher.checkpoint={teacher}", "teacher.allow_chance=true", "pair.teacher=vit_tiny_p2_8", "pair.student=tiny_cnn",
                   "tune.num_samples=2", "fixed.cuts=[1,2,3]"]
    assert entry_point(tune_entry.run, argv) == 0
    rows = pq.read_table(tmp_path / "out" / "vit-cnn" / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "FINISHED" and r["cuts"] == "1,2,3" for r in rows), rows
    models.create("tiny_cnn", 10, 1).load_state_dict(torch.load(tmp_path / "out" / "vit-cnn" / "student.pt", weights_only=True),
                                                     strict=True)
    describe = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_experiment_by_name("bkd").experiment_id],
        filter_string="tags.`bkd.role` = 'search'")[0]
    assert describe.info.status == "FINISHED"
    argv = base + ["tune.name=vit-cnn-ofa", f"teacher.checkpoint={teacher}", "teacher.allow_chance=true", "pair.teacher=vit_tiny_p2_8", "pair.student=tiny_cnn",
                   "tune.num_samples=2", "search=ofa"]  # a feature baseline's own search: its parameters searched and logged
    assert entry_point(tune_entry.run, argv) == 0
    rows = pq.read_table(tmp_path / "out" / "vit-cnn-ofa" / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "FINISHED" and 1.0 <= r["ofa_eps"] <= 2.0 and r["train_loss_distill"] > 0
                                  for r in rows), rows

    cnn_teacher = with_random_teacher(tmp_path, "cnn-vit")[-2:]
    mixed = ["kd", "blockkd", "fitnet", "at", "crd", "reviewkd"]  # the feature baselines across forms: maps to tokens
    argv = base + ["tune.name=cnn-vit", *cnn_teacher, "pair.student=vit_tiny_p2_8", f"compare.methods=[{','.join(mixed)}]",
                   "compare.seeds=1", "compare.fixed.blockkd.cuts=[1,2,3]"]
    assert entry_point(compare.run, argv, command="compare") == 0
    rows = pq.read_table(tmp_path / "out" / "cnn-vit" / "compare.parquet").to_pylist()
    assert {r["method"] for r in rows} == set(mixed) and all(r["status"] == "FINISHED" for r in rows), rows
    out = capsys.readouterr().out
    assert "teacher epoch" not in out  # the given teachers were used


@pytest.mark.parametrize("recipe", ["cifar100_baselines", "cifar100_vit_to_resnet"])
def test_the_cifar100_recipes_validate_with_every_methods_configuration(recipe, tmp_path):
    """The recipes' pairs, schedules and each method's compare.fixed pass the checks a run makes before Ray."""
    from tests.test_data import write_cifar

    write_cifar(tmp_path, 100, n=300)
    job = validate(compose([f"recipe={recipe}", f"data.root={tmp_path}", f"ray.storage_path={tmp_path}/ray",
                            f"output_dir={tmp_path}/out", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]))
    configs = {m: method_config(job, m).config for m in check_methods(job)}
    assert job.cfg.train.epochs == 240 and job.cfg.train.milestones == [0.625, 0.75, 0.875]
    assert configs["kd"]["alpha"] == 0.1 and configs["kd"]["beta"] == 0.9 and configs["dkd"]["dkd_beta"] == 8.0
    if recipe == "cifar100_baselines":
        assert len(configs) == 12 and configs["fitnet"]["beta"] == 100.0 and configs["at"]["beta"] == 1000.0
