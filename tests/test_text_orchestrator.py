"""data=text through the orchestrator: text folders in every format (and a dataset read through `datasets`),
the token cache, hf: teachers and students, every bad input refused before Ray, and a search and a comparison
end to end on tiny BERT folders made here (real Ray, Optuna, MLflow; nothing from the hub)."""
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch

transformers = pytest.importorskip("transformers")

from bkd_core.models.text import from_hf, pack  # noqa: E402
from orchestrator import compare, describe  # noqa: E402
from orchestrator import tune as tune_entry  # noqa: E402
from orchestrator.config.compose import compose  # noqa: E402
from orchestrator.config.job import validate  # noqa: E402
from orchestrator.config.schema import TextData  # noqa: E402
from orchestrator.console.cli import entry_point  # noqa: E402
from orchestrator.data.datasets import load_dataset  # noqa: E402
from orchestrator.data.text import load_text  # noqa: E402
from tests.text_world import corpus, encoder, make_tokenizer, write_text_folder  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer, a 4-layer BERT teacher and a 2-layer BERT student (folders), and a CSV text folder."""
    root = tmp_path_factory.mktemp("text-world")
    tokenizer = make_tokenizer(root / "tokenizer")
    encoder("bert", tokenizer, 32, 4, root / "teacher", initializer_range=0.02)
    encoder("bert", tokenizer, 16, 2, root / "student", initializer_range=0.02)
    write_text_folder(root / "data", train=480, test=90)
    return root


def args(world, ws, *more):
    data = ["data=text", f"data.root={world / 'data'}", f"data.cache_dir={ws}/cache", "data.max_length=32"]
    if any(m.startswith("data=") for m in more):  # another dataset: none of data=text's keys
        data = []
    return [f"mlflow.tracking_uri=sqlite:///{ws}/m.db", f"ray.storage_path={ws}/ray", f"output_dir={ws}/out", *data,
            f"pair.teacher=hf:{world / 'teacher'}", f"pair.student=hf:{world / 'student'}", *more]


def text_data(root, cache, **more) -> TextData:
    return TextData(root=str(root), tokenizer=str(cache.parent / "tokenizer"), cache_dir=str(cache), max_length=32, **more)


def test_every_file_format_gives_the_same_tokens_and_the_cache_is_read_not_rebuilt(world, tmp_path, capsys):
    (tmp_path / "tokenizer").symlink_to(world / "tokenizer")
    loaded = {}
    for fmt in ("csv", "jsonl", "parquet"):
        loaded[fmt] = load_text(text_data(write_text_folder(tmp_path / fmt, 60, 20, fmt=fmt), tmp_path / "cache"))
    assert capsys.readouterr().out.count("[bkd] data: tokenized 60 training and 20 test texts") == 3
    for fmt in ("jsonl", "parquet"):
        assert torch.equal(loaded[fmt].train.tokens, loaded["csv"].train.tokens)
        assert torch.equal(loaded[fmt].test.labels, loaded["csv"].test.labels)
    assert loaded["csv"].classes == ["colour", "negative", "positive"]  # sorted names, saved beside the tokens
    texts, labels = corpus(60, 0)
    names = ["positive", "negative", "colour"]
    assert loaded["csv"].train.labels.tolist() == [loaded["csv"].classes.index(names[y]) for y in labels]
    tokenizer = transformers.AutoTokenizer.from_pretrained(world / "tokenizer")
    first = tokenizer(texts[0])["input_ids"]
    assert loaded["csv"].train.tokens[0, 0, :len(first)].tolist() == first and loaded["csv"].train.tokens[0, 1].sum() == len(first)

    [folder] = [p for p in (tmp_path / "cache").iterdir() if (p / "meta.json").is_file() and
                str(tmp_path / "csv") in (p / "meta.json").read_text()]
    stamp = (folder / "train.parquet").stat().st_mtime_ns
    again = load_text(text_data(tmp_path / "csv", tmp_path / "cache"))
    assert "tokenized" not in capsys.readouterr().out and (folder / "train.parquet").stat().st_mtime_ns == stamp
    assert torch.equal(again.train.tokens, loaded["csv"].train.tokens)
    assert len(list((tmp_path / "cache").iterdir())) == 3  # one folder per source; nothing left half-written
    with open(tmp_path / "csv" / "train.csv", "a") as fh:  # a changed file is tokenized again
        fh.write("a great movie,positive\n")
    assert len(load_text(text_data(tmp_path / "csv", tmp_path / "cache")).train) == 61
    assert "[bkd] data: tokenized 61 training" in capsys.readouterr().out

    held = load_dataset(text_data(tmp_path / "jsonl", tmp_path / "cache", val_fraction=0.2))
    assert len(held.val) + len(held.train) == 60
    counts = lambda d: torch.bincount(d.labels, minlength=3)  # noqa: E731
    assert torch.all((counts(held.val) - 0.2 * counts(loaded["csv"].train)).abs() <= 1)  # stratified


def test_pair_tasks_take_a_second_text_and_hub_datasets_read_through_datasets(world, tmp_path, monkeypatch):
    (tmp_path / "tokenizer").symlink_to(world / "tokenizer")
    pairs = load_text(text_data(write_text_folder(tmp_path / "pairs", 30, 10, pairs=True), tmp_path / "cache",
                                text_pair_column="text_b"))
    assert pairs.train.tokens[:, 2].amax() == 1 and pairs.train.tokens[:, 2].sum() > 0  # the second segment
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hub = load_text(TextData(hub=str(write_text_folder(tmp_path / "as-hub", 30, 10)), tokenizer=str(world / "tokenizer"),
                             cache_dir=str(tmp_path / "cache"), max_length=32))
    folder = load_text(text_data(tmp_path / "as-hub", tmp_path / "cache"))
    assert torch.equal(hub.train.tokens, folder.train.tokens) and hub.classes == folder.classes


def bad_folder(root: Path, row: dict) -> Path:
    write_text_folder(root, 30, 10)
    with open(root / "train.csv", "a") as fh:
        fh.write(f"{row['text']},{row['label']}\n")
    return root


@pytest.fixture(scope="module")
def bad_inputs(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    one = write_text_folder(root / "one-class", 30, 10)
    (one / "train.csv").write_text("text,label\n" + "".join(f"{t},same\n" for t in corpus(30)[0]))
    (one / "test.csv").write_text("text,label\n" + "".join(f"{t},same\n" for t in corpus(5)[0]))
    bad_folder(root / "empty", {"text": '""', "label": "positive"})
    transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                           image_size=8, patch_size=4).save_pretrained(root / "vit")
    rows = write_text_folder(root / "no-rows", 30, 10)
    (rows / "train.csv").write_text("text,label\n")  # a header and nothing else
    unknown = root / "unknown-tok"  # a WordPiece vocabulary of three letters: every word of the data is [UNK]
    unknown.mkdir()
    from tokenizers import BertWordPieceTokenizer
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(["qqq zzz xxx zq xq"] * 20, vocab_size=40, min_frequency=1)
    wordpiece.save_model(str(unknown))
    transformers.BertTokenizer(vocab=str(unknown / "vocab.txt")).save_pretrained(unknown)
    other = make_tokenizer(root / "other-tok")
    other.add_tokens(["zebra", "quokka"])
    encoder("bert", other, 16, 2, root / "other-student", initializer_range=0.02)
    return root


@pytest.mark.parametrize("more, key, fragment", [
    (["data.text_column=sentence"], "data.text_column", "has no column 'sentence'"),
    (["data.root={bad}/one-class"], "data.label_column", "holds one class ('same')"),
    (["data.root={bad}/empty"], "data.text_column", "row 31 of"),
    (["data.root={bad}/no-rows"], "data.root", "train.csv has no rows"),
    (["data.tokenizer={bad}/unknown-tok"], "data.tokenizer", "% of the tokens of"),
    (["pair.student=hf:{bad}/vit"], "pair.student", "is not a sequence classifier"),
    (["data.max_length=100"], "data.max_length", "(64 positions)"),
    (["pair.student=hf:{bad}/other-student"], "pair.student", "differs from the teacher's"),
    (["pair.student=tiny_cnn"], "pair.student", "is an image model"),
    (["data=digits"], "pair.teacher", "is a text classifier"),
    (["data.root=null"], "data.root", "give exactly one"),
    (["pair.teacher_blocks=[embeddings,conv1]"], "pair.teacher_blocks", "'conv1' names no block end"),
    (["train.lr_range=[1,0.1,0.5]"], "train.lr_range", "0 < low <= default <= high"),
])
def test_bad_text_input_exits_2_naming_the_key_before_ray(world, bad_inputs, tmp_path, more, key, fragment, capsys):
    before = ray.is_initialized()
    argv = args(world, tmp_path, *[m.replace("{bad}", str(bad_inputs)) for m in more])
    assert entry_point(tune_entry.run, argv) == 2
    err = capsys.readouterr().err
    assert f"configuration error in `{key}`" in err and fragment in err, err
    assert ray.is_initialized() == before


def test_students_from_a_config_or_the_teachers_layers_and_a_given_teacher(world, tmp_path, capsys):
    job = validate(compose(args(world, tmp_path, "pair.student_config={num_hidden_layers: 1}", "search=kd",
                                f"teacher.checkpoint={world / 'teacher'}")))
    assert job.num_blocks == 2 and job.cfg.teacher.checkpoint == str(world / "teacher")  # embeddings + 1 layer
    job = validate(compose(args(world, tmp_path, "pair.student_config={num_hidden_layers: 2, hidden_size: 32, "
                                "intermediate_size: 64}", "pair.student_from_teacher=true")))
    assert "pair.student_from_teacher: 37 tensors from the teacher (embeddings, layers [1, 3])" in capsys.readouterr().out
    assert job.cfg.pair.teacher_blocks == ["embeddings", "layer.1", "layer.3"]  # 4 layers in 2 runs against 2 layers
    assert entry_point(describe.run, args(world, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "MACs/token" in out and "SequenceConnector 608 params" in out and "texts of up to 32 tokens" in out, out


def test_the_text_recipe_validates_with_adamw_and_every_compared_methods_configuration(world, tmp_path):
    from orchestrator.search.comparison import checked_configs

    job = validate(compose(args(world, tmp_path, "recipe=text_bert")))
    t = job.cfg.train
    assert (t.epochs, t.batch_size, t.optimizer, t.schedule, t.warmup_epochs) == (10, 32, "adamw", "linear", 1)
    assert job.cfg.search["params"]["lr"] == {"low": 1e-5, "high": 2e-4, "log": True, "default": 5e-5}
    configs = checked_configs(job)
    assert set(configs) == {"none", "kd", "blockkd"} and all(c.config["lr"] == 5e-5 for c in configs.values())



@pytest.mark.ray
def test_text_without_the_recipe_trains_its_teacher_with_adamw_and_it_learns(world, ray_cluster, tmp_path, capsys):
    """data=text alone, the learning rate set, the optimizer not: text encoders get AdamW with a warm-up (with the
    image defaults, SGD, this teacher stayed at ln 3), so the teacher is clearly above chance and the search runs."""
    argv = args(world, tmp_path, "teacher.lr=5.0e-4", "teacher.batch_size=16", "search=kd", "tune.num_samples=1",
                "train.epochs=1", "tune.name=plain")
    job = validate(compose(argv))
    assert (job.cfg.train.optimizer, job.cfg.train.schedule, job.cfg.train.warmup_epochs) == ("adamw", "linear", 1)
    assert entry_point(tune_entry.run, argv) == 0
    out = capsys.readouterr().out
    assert "the teacher learned nothing" not in out
    teacher_line = next(line for line in out.splitlines() if line.startswith("[bkd] teacher val_acc"))
    assert float(teacher_line.split("val_acc ")[1].split("%")[0]) > 60, out
    lines = out.splitlines()
    last_epoch = max(i for i, line in enumerate(lines) if line.startswith("[bkd] teacher epoch 6/6"))
    assert lines.index(teacher_line) > last_epoch, "the teacher's last line follows its last epoch"


TRAINING = ["recipe=text_bert", "train.epochs=2", "train.batch_size=16", "train.warmup_epochs=0",
            "train.lr_range=[3.0e-3,3.0e-2,1.0e-2]", "teacher.epochs=4", "teacher.lr=1.0e-2", "teacher.batch_size=16"]


@pytest.mark.ray
def test_a_text_search_and_comparison_end_to_end(world, ray_cluster, tmp_path_factory, capsys):
    """Tune and compare a BERT pair on the text folder: the teacher fine-tuned once (and reused), the tokens
    tokenized once for every trial, the best student a Hugging Face folder and an MLflow model."""
    ws = tmp_path_factory.mktemp("text-e2e")
    assert entry_point(tune_entry.run, args(world, ws, *TRAINING, "tune.num_samples=2", "tune.scheduler=none", "tune.name=text")) == 0
    out = capsys.readouterr().out
    assert out.count("[bkd] data: tokenized 480 training and 90 test texts") == 1
    teacher_line = next(line for line in out.splitlines() if line.startswith("[bkd] teacher val_acc"))
    assert float(teacher_line.split("val_acc ")[1].split("%")[0]) > 50, out  # the texts' labels are learnt
    assert len(list((ws / "cache").iterdir())) == 1
    rows = pq.read_table(ws / "out" / "text" / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "FINISHED" and r["epochs"] == 2 for r in rows)
    assert re.search(r"selection on the held-out val split \(4\d texts of the training data\)", out), out

    folder = ws / "out" / "text" / "student_hf"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert model.config.id2label == {0: "colour", 1: "negative", 2: "positive"}
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tokenizer(corpus(3, 7)[0], padding=True, return_tensors="pt")
    x = pack(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    state = torch.load(ws / "out" / "text" / "student.pt", weights_only=True)
    blocks = from_hf(encoder("bert", tokenizer, 16, 2), groups=2)
    blocks.load_state_dict(blocks.from_source_names(state))
    with torch.no_grad():
        logits = model(**enc).logits
        assert torch.allclose(logits, blocks.eval()(x), atol=1e-5)
    import mlflow.pyfunc

    uri = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("MLflow model: "))
    mlflow.set_tracking_uri(f"sqlite:///{ws}/m.db")
    served = mlflow.pyfunc.load_model(uri.split(" ")[0]).predict(x.numpy())
    assert served.shape == (3, 3) and torch.allclose(torch.as_tensor(served), logits, atol=1e-4)

    argv = args(world, ws, *TRAINING, "compare.seeds=1", "tune.name=text-cmp")
    assert entry_point(compare.run, argv, command="compare") == 0
    out = capsys.readouterr().out
    assert "reusing teacher from MLflow run" in out and "tokenized" not in out
    rows = pq.read_table(ws / "out" / "text-cmp" / "compare.parquet").to_pylist()
    assert {r["method"] for r in rows} == {"none", "kd", "blockkd"} and all(r["status"] == "FINISHED" for r in rows)
    shutil.rmtree(ws / "ray", ignore_errors=True)
