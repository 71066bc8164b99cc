"""data=lm through the orchestrator: LM folders (plain texts, prompt/response pairs), the memory-mapped token cache,
decoder hf: pairs, every bad input refused before Ray, and a search, a comparison and ULD end to end on tiny
decoders made here (real Ray, Optuna, MLflow; nothing from the hub). The search selects on val_loss, lower is
better, and the student comes back as a folder that generates."""
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch

transformers = pytest.importorskip("transformers")

from bkd_core.token_losses import IGNORE  # noqa: E402
from orchestrator import compare  # noqa: E402
from orchestrator import tune as tune_entry  # noqa: E402
from orchestrator.config.compose import compose  # noqa: E402
from orchestrator.config.job import validate  # noqa: E402
from orchestrator.config.schema import LMData  # noqa: E402
from orchestrator.console.cli import entry_point  # noqa: E402
from orchestrator.data.datasets import load_dataset  # noqa: E402
from tests.lm_world import corpus, decoder, make_tokenizer, write_lm_folder  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer, a 4-layer Llama teacher and a 2-layer GPT-2 student on it, a Qwen2 student on another tokenizer,
    and prompt/response and plain-text folders."""
    root = tmp_path_factory.mktemp("lm-world")
    tokenizer = make_tokenizer(root / "tokenizer")
    decoder("llama", tokenizer, 48, 4, root / "teacher")
    decoder("gpt2", tokenizer, 24, 2, root / "student")
    decoder("qwen2", make_tokenizer(root / "other-tokenizer", vocab_size=290, seed=3), 24, 2, root / "other-student")
    write_lm_folder(root / "pairs", train=160, test=40, prompts=True)
    write_lm_folder(root / "texts", train=60, test=20, fmt="csv")
    return root


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """One workspace (MLflow store, Ray storage, cache) for the module: the teacher trains once and is reused."""
    return tmp_path_factory.mktemp("lm-ws")


def args(world, ws, *more):
    return [f"mlflow.tracking_uri=sqlite:///{ws}/m.db", f"ray.storage_path={ws}/ray", f"output_dir={ws}/out", "data=lm",
            f"data.root={world / 'pairs'}", f"data.cache_dir={ws}/cache", "data.prompt_column=prompt",
            "data.response_column=response", "data.max_length=40", f"pair.teacher=hf:{world / 'teacher'}",
            f"pair.student=hf:{world / 'student'}", "teacher.epochs=2", "teacher.lr=3.0e-3", "teacher.batch_size=8",
            "train.batch_size=8", "train.epochs=1", *more]


def lm_data(world, cache, **more) -> LMData:
    return LMData(**{"tokenizer": str(world / "tokenizer"), "cache_dir": str(cache), "max_length": 40, **more})


def test_prompts_are_context_texts_are_targets_and_the_cache_is_memory_mapped(world, tmp_path, capsys):
    pairs = load_dataset(lm_data(world, tmp_path, root=str(world / "pairs"), prompt_column="prompt", response_column="response"))
    assert "[bkd] data: tokenized 160 training and 40 test examples" in capsys.readouterr().out
    tokenizer = transformers.AutoTokenizer.from_pretrained(world / "tokenizer")
    prompt, response = corpus(40, 1)[0]
    x, y = pairs.test.batch(torch.tensor([0]))
    head = tokenizer(prompt)["input_ids"]
    assert x[0, 0, :len(head)].tolist() == head and (y[0, :len(head) - 1] == IGNORE).all()
    assert y[0, len(head) - 1:].tolist()[:len(tokenizer(response)["input_ids"])] == tokenizer(response)["input_ids"]
    # val is held out of train over the same token arrays: one copy, memory-mapped from the cache
    assert len(pairs.train) + len(pairs.val) == 160 and pairs.train.ids.data_ptr() == pairs.val.ids.data_ptr()
    mapped = Path("/proc/self/maps").read_text()
    assert ".ids.bin" in mapped and str(tmp_path) in mapped  # the token ids are the cache file's pages, not a copy

    texts = load_dataset(lm_data(world, tmp_path, root=str(world / "texts")))
    x, y = texts.test.batch(torch.tensor([0]))
    assert (y[0, :-1] != IGNORE).sum() == x[0, 1].sum() - 1  # every token but the first is a target
    again = load_dataset(lm_data(world, tmp_path, root=str(world / "texts")))
    assert "tokenized" not in capsys.readouterr().out.split("test examples")[-1]  # read from the cache, not rebuilt
    assert torch.equal(again.test.ids, texts.test.ids)

    cut = load_dataset(lm_data(world, tmp_path / "cut", root=str(world / "texts"), max_length=8))
    assert "reach max_length=8 tokens and are cut there" in capsys.readouterr().out
    assert int(cut.train.lengths.max()) == 8


def test_the_cache_is_written_a_batch_of_rows_at_a_time_and_reads_the_same(world, tmp_path, monkeypatch):
    from orchestrator.data import lm as lm_cache

    parquet = write_lm_folder(tmp_path / "parquet", train=60, test=20, fmt="parquet", prompts=True)
    whole = load_dataset(lm_data(world, tmp_path / "whole", root=str(parquet), prompt_column="prompt", response_column="response"))
    monkeypatch.setattr(lm_cache, "ROWS", 7)  # 60 rows in 9 batches, read batch by batch from the Parquet file
    batched = load_dataset(lm_data(world, tmp_path / "batched", root=str(parquet), prompt_column="prompt", response_column="response"))
    assert torch.equal(whole.train.ids, batched.train.ids) and torch.equal(whole.test.lengths, batched.test.lengths)
    assert torch.equal(whole.val.starts, batched.val.starts)


def test_a_hub_dataset_reads_as_its_folder_does(world, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hub = load_dataset(lm_data(world, tmp_path, hub=str(world / "texts")))
    folder = load_dataset(lm_data(world, tmp_path, root=str(world / "texts")))
    assert torch.equal(hub.test.ids, folder.test.ids) and torch.equal(hub.train.lengths, folder.train.lengths)


@pytest.fixture(scope="module")
def bad(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-bad")
    tokenizer = transformers.AutoTokenizer.from_pretrained(world / "tokenizer")
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    bert.save_pretrained(root / "bert")
    transformers.T5Config(vocab_size=len(tokenizer), d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8).save_pretrained(root / "t5")
    empty = write_lm_folder(root / "empty", 30, 10, prompts=True)
    with open(empty / "train.jsonl", "a") as fh:
        fh.write(json.dumps({"prompt": "the sky is", "response": "   "}) + "\n")
    return root


@pytest.mark.parametrize("more, key, fragment", [
    (["pair.teacher=hf:{bad}/bert"], "pair.teacher", "is an encoder (bert)"),
    (["pair.student=hf:{bad}/t5"], "pair.student", "is an encoder-decoder"),
    (["pair.student=hf:{world}/other-student"], "pair.student", "search=uld"),
    (["data.response_column=answer"], "data.response_column", "has no column 'answer'"),
    (["data.response_column=null"], "data.response_column", "prompt/response examples need both columns"),
    (["data.max_length=100"], "data.max_length", "(64 positions)"),
    (["search=at"], "search", "at does not apply to causal LMs"),
    (["compare.methods=[none,kd,crd]"], "compare.methods", "crd does not apply to causal LMs"),
    (["pair.student=tiny_cnn"], "pair.student", "is an image model"),
])
def test_bad_lm_input_exits_2_naming_the_key_before_ray(world, bad, tmp_path, more, key, fragment, capsys):
    before = ray.is_initialized()
    argv = args(world, tmp_path, *[m.replace("{bad}", str(bad)).replace("{world}", str(world)) for m in more])
    entry = compare.run if any(m.startswith("compare.") for m in more) else tune_entry.run
    assert entry_point(entry, argv) == 2
    err = capsys.readouterr().err
    assert f"configuration error in `{key}`" in err and fragment in err, err
    assert ray.is_initialized() == before


def test_empty_responses_are_skipped_and_counted_and_the_lm_family_sets_adamw(world, bad, tmp_path, capsys):
    job = validate(compose(args(world, tmp_path, f"data.root={bad / 'empty'}", "search=kd")))
    assert "1 training and 0 test examples have an empty text or response and are skipped" in capsys.readouterr().out
    t = job.cfg.train
    assert (t.optimizer, t.schedule, t.grad_clip, t.warmup_epochs) == ("adamw", "cosine", 1.0, 0.1)
    assert job.cfg.search["params"]["logit_loss"] == {"choices": ["kd", "rkl", "skl", "jsd"], "default": "kd"}
    assert job.dataset.token_level and job.dataset.shape == [2, 40]
    recipe = validate(compose(args(world, tmp_path, "recipe=lm")))  # the keys given here win over the recipe's
    assert (recipe.cfg.compare.seeds, recipe.cfg.train.lr_range, recipe.cfg.train.grad_clip) == (3, [1e-5, 1e-3, 1e-4], 1.0)


def test_a_student_from_the_teachers_layers(world, tmp_path, capsys):
    job = validate(compose(args(world, tmp_path, f"pair.student=hf:{world / 'teacher'}",
                                "pair.student_config={num_hidden_layers: 2}", "pair.student_from_teacher=true")))
    assert "pair.student_from_teacher: 21 tensors from the teacher (embeddings, layers [1, 3])" in capsys.readouterr().out
    assert job.num_blocks == 3
    from orchestrator import describe

    assert entry_point(describe.run, args(world, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "MACs/token" in out and "SequenceConnector" in out and "sequence of 48 (+ mask)" in out, out


@pytest.mark.ray
def test_an_lm_search_selects_on_val_loss_and_its_student_generates(world, ws, ray_cluster, capsys):
    argv = args(world, ws, "search=blockkd", "tune.num_samples=2", "tune.name=lm-search", "mlflow.registered_model=lm-student")
    assert entry_point(tune_entry.run, argv) == 0
    out = capsys.readouterr().out
    assert "[bkd] teacher val_loss" in out and "lower is better" in out
    rows = pq.read_table(ws / "out" / "lm-search" / "trials.parquet").to_pylist()
    finished = [r for r in rows if r["status"] == "FINISHED"]
    assert len(finished) == 2 and all(math.isfinite(r["val_loss"]) and r["test_ppl"] > 1 for r in finished)
    assert rows[0]["val_loss"] <= rows[1]["val_loss"]  # ranked: lower is better
    assert math.exp(rows[0]["val_loss"]) == pytest.approx(rows[0]["val_ppl"], rel=1e-6)
    folder = ws / "out" / "lm-search" / "student_hf"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("the sky is", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]
    import mlflow.pyfunc

    mlflow.set_tracking_uri(f"sqlite:///{ws}/m.db")
    served = mlflow.pyfunc.load_model("models:/lm-student/1")
    texts = served.predict(["the sky is", "count one"], params={"max_new_tokens": 5})
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)


@pytest.mark.ray
def test_an_lm_comparison_reports_test_loss_with_paired_differences(world, ws, ray_cluster, capsys):
    argv = args(world, ws, "compare.methods=[none,kd]", "compare.seeds=2", "tune.name=lm-compare", "train.lr_range=[1.0e-3,1.0e-2,3.0e-3]",
                "data.pack=true")  # training batches packed into rows of up to data.max_length tokens
    assert entry_point(compare.run, argv) == 0
    out = capsys.readouterr().out
    rows = pq.read_table(ws / "out" / "lm-compare" / "compare.parquet").to_pylist()
    assert {r["method"] for r in rows} == {"none", "kd"} and all(math.isfinite(r["test_loss"]) for r in rows)
    assert "test_loss: loss" in out and "lower is better" in out and "nats" in out
    verdict = next(line for line in out.splitlines() if line.startswith("The student alone "))
    assert "KD" in verdict and "nats" in verdict, out
    span = verdict.split("95 % CI ")[1].split(",")[0] if "95 % CI" in verdict else verdict.split("(difference ")[1].split(" nats")[0]
    low, high = (float(v) for v in span.split(" to "))
    assert high - low > 0.0  # the test split's examples are counted: never a zero-width interval
    kept = [r for r in rows if r.get("test_correct")]
    assert len(kept) == 4 and all(r["test_correct"].startswith("f") for r in kept)  # each example's loss term


@pytest.mark.ray
def test_uld_distils_a_student_of_another_tokenizer_end_to_end(world, ws, ray_cluster, capsys):
    argv = args(world, ws, f"pair.student=hf:{world / 'other-student'}", "search=uld", "tune.num_samples=1",
                "tune.name=lm-uld")
    assert entry_point(tune_entry.run, argv) == 0
    out = capsys.readouterr().out
    [row] = pq.read_table(ws / "out" / "lm-uld" / "trials.parquet").to_pylist()
    assert row["status"] == "FINISHED" and math.isfinite(row["test_loss"])
    folder = ws / "out" / "lm-uld" / "student_hf"  # the student keeps its own tokenizer
    own = transformers.AutoTokenizer.from_pretrained(world / "other-tokenizer")
    assert transformers.AutoTokenizer.from_pretrained(folder).get_vocab() == own.get_vocab()
    assert "teacher val_loss" in out or "reusing teacher" in out
