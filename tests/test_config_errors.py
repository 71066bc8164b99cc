"""Bad configurations: one clear paragraph naming the key, exit code 2, before Ray starts."""
import subprocess
import sys

import torch
from conftest import REPO, write_idx

from bkd_core import models
from orchestrator.config.compose import compose
from orchestrator.config.job import validate
from orchestrator.console.cli import entry_point


def never_run(job):
    raise AssertionError("run() must not be reached for a bad configuration")


def check(argv, key, *fragments, capsys):
    assert entry_point(never_run, argv) == 2
    err = capsys.readouterr().err
    assert f"configuration error in `{key}`" in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert "Traceback" not in err
    return err


def test_unknown_pair_group(capsys):
    check(["pair=resnet9000_resnet1"], "pair", "resnet32x4_resnet8x4", capsys=capsys)


def test_unknown_model_name(capsys):
    check(["pair.teacher=resnet9000"], "pair.teacher", "unknown model 'resnet9000'", "resnet8x4", capsys=capsys)


def test_unknown_dataset_group(capsys):
    check(["data=imagenet22k"], "data", "fashion_mnist", capsys=capsys)


def test_missing_data_root(capsys):
    check(["data=fashion_mnist"], "data.root", "data.root=PATH", capsys=capsys)


def test_data_root_does_not_exist(tmp_path, capsys):
    check(["data=fashion_mnist", f"data.root={tmp_path}/nope"], "data.root", "does not exist", capsys=capsys)


def test_data_root_with_wrong_files(tmp_path, capsys):
    (tmp_path / "readme.txt").write_text("not data")
    check(["data=fashion_mnist", f"data.root={tmp_path}"], "data.root", "train-images-idx3-ubyte.gz", capsys=capsys)


def test_search_space_without_valid_partition(capsys):
    check(["search.partition.allowed=[7,8]"], "search.partition", "no valid block partition", capsys=capsys)
    check(["search=blockkd_fixed_partition", "search.partition.fixed=[0,5]"], "search.partition", "outside 1..3", capsys=capsys)


def test_unknown_loss_and_search_space(capsys):
    check(["search.params.logit_loss.choices=[kd,mse]"], "search.params.logit_loss", "mse", capsys=capsys)
    check(["search=bayes"], "search", "blockkd", capsys=capsys)


def test_unknown_fixed_parameter(capsys):
    check(["fixed.temprature=3"], "fixed.temprature", "temperature", capsys=capsys)


def test_bad_training_switches(capsys):
    check(["train.lr_base_batch=0"], "train.lr_base_batch", "null for no scaling", capsys=capsys)
    check(["train.compile_mode=fastest"], "train.compile_mode", "reduce-overhead", capsys=capsys)
    check(["resources.max_worker_group_start_failures=-2"], "resources.max_worker_group_start_failures", "wait forever",
          capsys=capsys)
    check(["train.checkpoint_every_epochs=0"], "train.checkpoint_every_epochs", "integer >= 1", capsys=capsys)
    check(["train.checkpoint_min_interval_s=-1"], "train.checkpoint_min_interval_s", "seconds >= 0", capsys=capsys)
    check(["train.distill_warmup_epochs=-1"], "train.distill_warmup_epochs", "[0, train.epochs=4]", capsys=capsys)
    check(["mlflow.retry_interval_s=0"], "mlflow.retry_interval_s", "seconds > 0", capsys=capsys)
    check(["mlflow.end_wait_s=soon"], "mlflow.end_wait_s", "seconds >= 0", capsys=capsys)


def test_block_count_mismatch(capsys):
    check(["pair=vgg13_vgg8", "pair.student=resnet20"], "pair", "4 blocks", capsys=capsys)


def test_teacher_checkpoint_corrupt_and_mismatched(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    check([f"teacher.checkpoint={bad}"], "teacher.checkpoint", "not a readable torch state_dict", capsys=capsys)
    other = tmp_path / "other.pt"
    torch.save(models.create("resnet20", 10, 1).state_dict(), other)
    check([f"teacher.checkpoint={other}"], "teacher.checkpoint", "does not fit", "missing keys", capsys=capsys)
    check([f"teacher.checkpoint={tmp_path}/none.pt"], "teacher.checkpoint", "does not exist", capsys=capsys)


def test_good_config_resolves_absolute_paths(tmp_path, monkeypatch):
    root = write_idx(tmp_path / "fm")
    monkeypatch.chdir(tmp_path)
    job = validate(compose(["data=fashion_mnist", "data.root=fm", "mlflow.tracking_uri=sqlite:///m.db"]))
    assert job.cfg.data.root == str(root)
    assert job.tracking_uri == f"sqlite:///{tmp_path / 'm.db'}"
    assert job.storage_path.startswith("/") and job.partitions == ["1", "2", "3", "1,2", "1,3", "2,3", "1,2,3"]


def test_command_line_exit_code_and_message():
    proc = subprocess.run([sys.executable, "-m", "orchestrator.tune", "data=fashion_mnist", "data.root=/no/such/dir"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "configuration error in `data.root`" in proc.stderr and "Traceback" not in proc.stderr


def test_unwritable_storage_and_output(capsys):
    check(["ray.storage_path=/proc/bkd-results"], "ray.storage_path", "cannot write", capsys=capsys)
    check(["output_dir=/proc/bkd-out"], "output_dir", "cannot write", capsys=capsys)


def test_unreachable_or_unwritable_mlflow(tmp_path, capsys, monkeypatch):
    from orchestrator.search.search import search

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    base = [f"ray.storage_path={tmp_path}/ray", f"output_dir={tmp_path}/out"]
    assert entry_point(search, base + ["mlflow.tracking_uri=http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "configuration error in `mlflow.tracking_uri`" in err and "cannot use MLflow at http://127.0.0.1:9" in err
    assert entry_point(search, base + ["mlflow.tracking_uri=sqlite:////proc/nope/mlflow.db"]) == 2
    assert "configuration error in `mlflow.tracking_uri`" in capsys.readouterr().err
    import ray
    assert not ray.is_initialized()


BAD_VALUES = [  # (override, the key named, a fragment of the fix)
    (["tune.num_samples=abc"], "tune.num_samples", "integer >= 1"),
    (["resources.workers_per_trial=abc"], "resources.workers_per_trial", "integer >= 1"),
    (["train.epochs=abc"], "train.epochs", "got 'abc'"),
    (["data.train_size=abc"], "data.train_size", "or null for all"),
    (["data.train_size=-5"], "data.train_size", "got -5"),
    (["tune.max_concurrent=0"], "tune.max_concurrent", "integer >= 1"),
    (["tune.time_budget_s=-3"], "tune.time_budget_s", "seconds > 0"),
    (["tune.grace_period=0"], "tune.grace_period", "integer >= 1"),
    (["tune.reduction_factor=1"], "tune.reduction_factor", "number > 1"),
    (["tune.seed=x"], "tune.seed", "an integer"),
    (["tune.max_failures=-2"], "tune.max_failures", "-1 for no limit"),
    (["teacher.epochs=-1"], "teacher.epochs", "(0: the teacher as given)"),
    (["teacher.lr=abc"], "teacher.lr", "> 0"),
    (["resources.cpus_per_worker=0"], "resources.cpus_per_worker", "> 0"),
    (["ray.num_cpus=two"], "ray.num_cpus", "or null for all"),
    (["train.connector=linear"], "train.connector", "conv1x1, auto"),
    (["tune.resume=maybe"], "tune.resume", "true or false"),
    (["fixed.lr=-1"], "fixed.lr", "[0.01, 0.3]"),
    (["fixed.logit_loss=foo"], "fixed.logit_loss", "kd, dkd, kd_ls"),
    (["fixed.temperature=abc"], "fixed.temperature", "got 'abc'"),
    (["fixed.cuts=[9]"], "fixed.cuts", "cuts in 1..3"),
    (["fixed.cuts=[1]", "fixed.w_3=0.5"], "fixed.w_3", "not in fixed.cuts"),
    (["search=kd", "fixed.cuts=[2]"], "fixed.cuts", "logit-only baseline"),
    (["search=dkd", "fixed.gamma=1"], "fixed.gamma", "use search=blockkd"),
    (["train.batch_size=5000"], "train.batch_size", "at most 1214"),
    (["data.train_size=10"], "train.batch_size", "10 training images"),
    (["tune.nmu_samples=3"], "tune.nmu_samples", "did you mean `tune.num_samples`?"),
    (["fixed.temprature=3"], "fixed.temprature", "did you mean `temperature`?"),
    (["search=fitnet", "fixed.hint_block=7"], "fixed.hint_block", "names no block: this pair has blocks 1..3"),
    (["search=fitnet", "fixed.hint_block=abc"], "fixed.hint_block", "must be a number; got 'abc'"),
    (["search=at", "search.params.at_p=-1"], "search.params.at_p", "give at_p > 0"),
    (["search=crd", "fixed.nce_t=5"], "fixed.nce_t", "[0.03, 0.3]"),
    (["search=ofa", "fixed.ofa_eps=0"], "fixed.ofa_eps", "[1, 2]"),
    (["search=rkd", "search.params.angle_weight=-3"], "search.params.angle_weight", "give a weight >= 0"),
    (["search=fitnet", "fixed.gamma=1"], "fixed.gamma", "a FitNet hint (no stepping stones)"),
    (["search=dist", "fixed.dist_inter=abc"], "fixed.dist_inter", "got 'abc'"),
    (["search.params.temperature=abc"], "search.params.temperature", "must be a number; got 'abc'"),
    (["search.params.logit_loss=loca", "search.params.loca_alpha=2"], "search.params.loca_alpha", "0 < loca_alpha < 1"),
]


def test_every_bad_value_is_named_before_ray_starts(capsys):
    import ray

    for argv, key, fragment in BAD_VALUES:
        check(argv, key, fragment, capsys=capsys)
    assert not ray.is_initialized()


def test_a_text_file_as_teacher_checkpoint_is_one_line(tmp_path, capsys):
    text = tmp_path / "teacher.pt"
    text.write_text("these are not weights\n")
    err = check([f"teacher.checkpoint={text}"], "teacher.checkpoint", "not a readable torch state_dict", "torch.save", capsys=capsys)
    assert "weights_only" not in err and len(err.strip().splitlines()) == 2, err


UNKNOWN_KEYS = [  # (override, the key named, fragments of the message)
    (["train.epoch=3"], "train.epoch", ["did you mean `train.epochs`?"]),
    (["+train.epoch=3"], "train.epoch", ["did you mean `train.epochs`?"]),  # `+` does not slip a typo past the schema
    (["+tune.nmu_samples=3"], "tune.nmu_samples", ["did you mean `tune.num_samples`?"]),
    (["data.image_size=32"], "data.image_size", ["does not apply to this dataset (data.name=digits)", "data=image_folder"]),
    (["+data.image_size=32"], "data.image_size", ["does not apply", "data=parquet"]),
    (["+nonsense=1"], "nonsense", ["no such key", "tune"]),
    (["data=image_folder", "data.root=/tmp", "data.shuffle_buffer=8"], "data.shuffle_buffer", ["data=parquet"]),
]


def test_unknown_keys_are_refused_also_with_plus_and_never_suggest_plus(capsys):
    for argv, key, fragments in UNKNOWN_KEYS:
        err = check(argv, key, *fragments, capsys=capsys)
        assert "+" + key not in err and "use +" not in err, err


def test_the_open_maps_and_a_models_own_arguments_take_new_keys():
    cfg = compose(["fixed.temperature=3", "compare.fixed.kd.alpha=0.5", "compare.from_search.blockkd=results/x",
                   "pair.teacher={_target_:bkd_core.models.small.tiny_resnet}", "+pair.teacher.width=4"])
    from orchestrator.config.checks import check_values

    check_values(cfg)  # no error
    assert cfg.fixed.temperature == 3 and cfg.compare.fixed.kd.alpha == 0.5 and cfg.pair.teacher.width == 4


def test_the_reference_page_is_generated_from_the_schema_and_every_key_has_a_doc():
    from orchestrator.config.reference import PAGE, render, undocumented

    assert undocumented() == []
    assert PAGE.read_text() == render(), "docs/reference/config.md is stale: run `python -m orchestrator.reference`"
    for key in ("`tune.num_samples`", "`data.shuffle_buffer`", "`compare.tune_trials`", "`images_per_shard`"):
        assert key in PAGE.read_text()


def test_the_yaml_files_state_no_default_the_schema_has():
    """config.yaml holds only its defaults list; a data group only what differs from its schema."""
    import yaml

    from orchestrator.config.checks import data_groups
    from orchestrator.config.schema import DATA_SCHEMAS, fields_of

    conf = REPO / "orchestrator" / "conf"
    assert set(yaml.safe_load((conf / "config.yaml").read_text())) == {"defaults", "hydra"}
    assert set(yaml.safe_load((conf / "prepare.yaml").read_text())) == {"defaults"}
    for group, kind in data_groups().items():
        values = yaml.safe_load((conf / "data" / f"{group}.yaml").read_text())
        schema = fields_of(DATA_SCHEMAS[kind])
        for name, value in values.items():
            if name != "defaults":
                assert name in schema and (value != schema[name].default or name == "name"), (group, name)


def test_help_is_bkds_own():
    proc = subprocess.run([sys.executable, "-m", "orchestrator.tune", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "docs/reference/config.md" in proc.stdout and "tune.num_samples" in proc.stdout
    assert "Powered by Hydra" not in proc.stdout


def test_every_entry_point_answers_help_with_its_own_usage(capsys):
    """In-process: each entry point's main(["--help"]) prints its usage and exits 0 (prepare included)."""
    import importlib

    for command in ("tune", "train", "teacher", "compare", "describe", "prepare"):
        module = importlib.import_module(f"orchestrator.{command}")
        assert module.main(["--help"]) == 0, command
        out = capsys.readouterr().out
        assert out.startswith(f"usage: python -m orchestrator.{command}"), (command, out[:200])
        assert "Lexer" not in out and "Powered by Hydra" not in out


def test_negative_or_zero_gpus_per_worker_is_refused_without_a_gpu(capsys):
    for value in ("-1", "0"):
        check([f"resources.gpus_per_worker={value}"], "resources.gpus_per_worker", "a number of GPUs in (0, 8]", capsys=capsys)
    check(["resources.gpus_per_worker=abc"], "resources.gpus_per_worker", "abc", capsys=capsys)
