"""The end of a search: its rows, trials.parquet, plots, the best student, confirmation on fresh seeds."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from orchestrator.config.hf_models import is_hf
from orchestrator.config.job import Job
from orchestrator.console.interrupts import STOP
from orchestrator.data.datasets import example_batch
from orchestrator.search.chance import Chance, at_chance_line
from orchestrator.tracking.importance import format_importances, param_importances
from orchestrator.tracking.mlflow_models import log_generating_model, log_student_model
from orchestrator.tracking.objective import Objective, objective_of
from orchestrator.tracking.plots import search_figure
from orchestrator.tracking.records import TrialRecords
from orchestrator.tracking.results import (
    case_of,
    format_table,
    ranked,
    seed_result,
    trial_row,
    trial_status,
    val_curve,
    write_parquet,
)
from orchestrator.tracking.runs import child_runs, first_line, require_answer
from orchestrator.tracking.stats import mean_std, method_interval
from orchestrator.tracking.writer import MLflowWriter, Write

SELECTION_TAG = "bkd.selection"  # val: the search selected on the held-out split; test: on the test split


def selection_note(job: Job) -> str:
    """Which split selects and which reports, in one sentence."""
    rows = job.dataset.rows
    if job.selects_on_test:
        return (f"selection on the TEST split ({rows['test']} {job.dataset.unit}; data.val_fraction=0): the best trial's score is "
                "chosen on the data it is reported on and is optimistic; hold out a val split (data.val_fraction=0.1) "
                "for a figure you can trust")
    return (f"selection on the held-out val split ({rows['val']} {job.dataset.unit} of the training data); {objective_of(job).test}: the final "
            f"weights on the test split ({rows['test']} {job.dataset.unit}), never used to select")


RunCases = Callable[[list[dict], str], Any]  # (cases, Tune experiment name) -> ResultGrid


def collect_rows(job: Job, parent: MLflowWriter, results: Any, interrupted: bool,
                 name: Optional[str] = None) -> tuple[list[dict[str, Any]], dict[str, list], list[str]]:
    """(rows best first, val curves (of the objective) by trial id, parameter names) of a finished Tuner.fit.
    Trials that never reported anything are not rows."""
    try:
        require_answer(parent.tracking_uri)
        run_ids = child_runs(parent.client, parent.experiment_id, parent.parent_run_id)
    except Exception as exc:  # MLflow down past mlflow.end_wait_s: the table goes without run ids
        print(f"[bkd] warning: MLflow unreachable ({first_line(exc)}); the table lacks the MLflow run ids.", flush=True)
        run_ids = {}
    records = TrialRecords(job.storage_path, name or job.experiment_name)
    has_budget = job.cfg.tune.time_budget_s is not None
    rows, curves, param_names = [], {}, []
    objective = objective_of(job)
    # ResultGrid's results follow its trials in order; Tune's trial states live on the trials
    for trial, result in zip(results._experiment_analysis.trials, results):
        record = records.read(trial.trial_id)
        status = trial_status(trial.status, record, bool(result.metrics and "epoch" in result.metrics), interrupted, has_budget)
        if status is None:
            continue  # never started
        params = case_of(result.config or {})
        param_names += [k for k in params if k not in param_names]
        row = trial_row(result, params, run_ids.get(trial.trial_id), status, record, objective)
        row.setdefault("seed", job.cfg.train.seed)  # the seed it trained with: compare never reuses it
        rows.append(row)
        curves[trial.trial_id] = val_curve(result, record, objective.val)
    return ranked(rows, objective), curves, param_names


def summarize(job: Job, parent: MLflowWriter, results: Any, interrupted: bool, run_cases: RunCases) -> list[dict[str, Any]]:
    """Write trials.parquet, search.png and the best student (after ``tune.confirm_seeds`` fresh-seed
    runs of its configuration), then log them and the best trial to the parent run. An interrupted
    search logs no summary (its resume does)."""
    rows, curves, param_names = collect_rows(job, parent, results, interrupted)
    o = objective_of(job)
    out = Path(job.output_dir) / job.experiment_name
    out.mkdir(parents=True, exist_ok=True)
    best = rows[0] if rows and rows[0]["status"] == "FINISHED" and not interrupted else None
    confirm = confirm_best(job, parent, best, param_names, run_cases) if best is not None else None
    write_parquet(rows, str(out / "trials.parquet"))
    print("\n" + format_table(rows, param_names, o))
    print(f"\n[bkd] {selection_note(job)}.")
    if best is not None:
        print(f"[bkd] best trial {best['trial_id']}: {o.val} {best[o.val]:.2f}, {o.test} {best.get(o.test, float('nan')):.2f}")
    if confirm:
        print(confirm)
    at_chance = at_chance_line(rows, Chance.of_split(job, "val"), o.val, "trial")
    if at_chance:
        print(at_chance)
    if interrupted or STOP.received is not None:
        print(f"\nresults so far: {out}/trials.parquet", flush=True)
        return rows
    importances = param_importances(rows, job.cfg.search, job.num_blocks, job.cfg.fixed, job.cfg.tune.seed, o)
    figure = search_figure(rows, curves, job.experiment_name, importances, o)
    figure.savefig(out / "search.png", dpi=110)
    student = export_student(TrialRecords(job.storage_path, job.experiment_name), best["trial_id"], out) if best else None
    if importances:
        print("\n" + format_importances(importances, len(rows), o))
    print(f"\nresults: {out}/trials.parquet, plots: {out}/search.png" + (f", best student: {student}" if student else ""))
    print(f"MLflow UI: mlflow ui --backend-store-uri {job.tracking_uri}   (then open "
          f"http://127.0.0.1:5000/#/experiments/{parent.experiment_id}?workflowType=machine_learning)")
    parent_id = parent.parent_run_id
    parent.submit(Write("artifact", {"run_id": parent_id, "path": str(out / "trials.parquet")}))
    parent.submit(Write("artifact", {"run_id": parent_id, "path": str(out / "search.png")}))
    summary = {f"importance.{name}": share for name, share in importances.items()}
    if best is not None:  # tags and metrics, not params: a resumed search may find another best
        best_config = {f"best.{k}": v for k, v in best.items() if k in param_names} | {"best.trial_id": best["trial_id"]}
        parent.submit(Write("tags", {"run_id": parent_id, "tags": best_config}))
        if student:
            parent.submit(Write("artifact", {"run_id": parent_id, "path": student, "artifact_path": "best_student"}))
            log_best_model(job, parent, student)
        summary[f"best_{o.val}"] = float(best[o.val])
        if best.get(o.test) is not None and best[o.test] == best[o.test]:
            summary[f"best_{o.test}"] = float(best[o.test])  # the test figure of the best-on-val trial
        summary.update({k: best[k] for k in confirm_columns(o) if best.get(k) is not None})
    summary["trials_finished"] = sum(r["status"] == "FINISHED" for r in rows)
    parent.submit(Write("metrics", {"run_id": parent_id, "metrics": summary, "step": 0, "timestamp_ms": int(time.time() * 1000)}))
    return rows


def log_best_model(job: Job, parent: MLflowWriter, student_file: str) -> None:
    """The best student as an MLflow model on the parent run (registered as mlflow.registered_model if set).
    Not queued: during an outage it is skipped with a warning (student.pt and its artifact stay)."""
    from orchestrator.config.models import instantiate

    state = torch.load(student_file, map_location="cpu", weights_only=True)
    if job.dataset.token_level:  # a causal LM: its folder, and an MLflow model that turns prompts into texts
        folder = export_causal_student(job, state, Path(student_file).parent / "student_hf", parent)
        try:
            require_answer(job.tracking_uri)
            uri = log_generating_model(job.tracking_uri, parent.parent_run_id, str(folder), job.cfg.mlflow.registered_model)
            print(f"MLflow model: {uri} (prompts in, generated texts out)" + (
                f" (registered as {job.cfg.mlflow.registered_model})" if job.cfg.mlflow.registered_model else ""))
        except Exception as exc:
            print(f"[bkd] warning: could not log the best student as an MLflow model ({type(exc).__name__}: "
                  f"{first_line(exc)}); it is at {folder}.", flush=True)
        return
    if is_hf(job.student_model):  # a Hugging Face folder beside student.pt, and the MLflow model reads packed ids
        model = export_hf_student(job, state, Path(student_file).parent / "student_hf", parent)
    else:
        model = instantiate(job.student_model, job.num_classes, job.in_channels, "pair.student")  # the user's own class
        model.load_state_dict(model.from_source_names(state) if hasattr(model, "from_source_names") else state, strict=True)
    example = example_batch(job.dataset.shape)  # a batch of 2: the logged model serves any batch size
    try:
        require_answer(job.tracking_uri)
        uri = log_student_model(job.tracking_uri, parent.parent_run_id, model, example, job.cfg.mlflow.registered_model,
                                any_length=is_hf(job.student_model))
        print(f"MLflow model: {uri}" + (f" (registered as {job.cfg.mlflow.registered_model})"
                                        if job.cfg.mlflow.registered_model else ""))
    except Exception as exc:
        print(f"[bkd] warning: could not log the best student as an MLflow model ({type(exc).__name__}: {first_line(exc)}); "
              f"it is at {student_file}.", flush=True)


def export_hf_student(job: Job, state: dict[str, torch.Tensor], folder: Path, parent: MLflowWriter) -> torch.nn.Module:
    """The best student as a Hugging Face folder (``save_pretrained``, with the teacher's tokenizer and the class
    names as ``id2label``), logged as the parent run's ``student_hf`` artifact; returns it wrapped to take the
    packed (B, 3, L) token ids the MLflow model is served with."""
    from bkd_core.models.text import PackedClassifier
    from orchestrator.config.hf_models import build_hf
    from orchestrator.data.text import load_tokenizer

    net = build_hf(job.cfg, "student", job.num_classes, job.cfg.pair.student_blocks, check=False)
    model = net.hf_model[0]
    model.load_state_dict(state, strict=True)
    classes = job.dataset.classes or [str(i) for i in range(job.num_classes)]
    model.config.id2label = {i: str(name) for i, name in enumerate(classes)}
    model.config.label2id = {str(name): i for i, name in enumerate(classes)}
    model.save_pretrained(folder)
    load_tokenizer(job.cfg.data.tokenizer).save_pretrained(folder)
    parent.submit(Write("artifact", {"run_id": parent.parent_run_id, "path": str(folder), "artifact_path": "student_hf"}))
    print(f"[bkd] best student as a Hugging Face folder: {folder} "
          "(AutoModelForSequenceClassification.from_pretrained(folder))", flush=True)
    return PackedClassifier(model.eval())


def export_causal_student(job: Job, state: dict[str, torch.Tensor], folder: Path, parent: MLflowWriter) -> Path:
    """The best causal LM student as a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads and
    ``generate`` runs on: its weights, the tokenizer it read (the teacher's; under ULD its own) and a generation config
    that ends at the end-of-text token; logged as the parent run's ``student_hf`` artifact."""
    from orchestrator.config.hf_models import build_hf
    from orchestrator.data.text import load_tokenizer

    net = build_hf(job.cfg, "student", job.num_classes, job.cfg.pair.student_blocks, check=False)
    model = net.hf_model[0]
    model.load_state_dict(state, strict=True)
    d = job.cfg.data
    tokenizer = load_tokenizer(d.student_tokenizer or d.tokenizer)
    eos = tokenizer.eos_token_id
    if eos is not None:
        model.generation_config.eos_token_id = eos
        model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    parent.submit(Write("artifact", {"run_id": parent.parent_run_id, "path": str(folder), "artifact_path": "student_hf"}))
    print(f"[bkd] best student as a Hugging Face folder: {folder} (AutoModelForCausalLM.from_pretrained(folder), "
          "then generate)", flush=True)
    return folder


def confirm_columns(o: Objective) -> tuple[str, ...]:
    """What confirmation runs add to the best row: the fresh seeds' val and test means, stds and the test interval."""
    return (f"confirm_{o.val}_mean", f"confirm_{o.val}_std", f"confirm_{o.test}_mean", f"confirm_{o.test}_std",
            f"confirm_{o.test}_ci_low", f"confirm_{o.test}_ci_high")


def confirm_best(job: Job, parent: MLflowWriter, best: dict[str, Any], param_names: list[str], run_cases: RunCases) -> str:
    """Train the best configuration again with ``tune.confirm_seeds`` seeds the search never used (under
    the same parent run); put their val and test means and stds on ``best``; return the lines that say
    how optimistic the search's own figure was."""
    k = int(job.cfg.tune.confirm_seeds or 0)
    if k < 1:
        return ""
    config = {p: best[p] for p in param_names if p in best and best[p] is not None and p != "seed"}
    base = job.cfg.train.seed
    print(f"\n[bkd] confirming the best configuration (trial {best['trial_id']}) on {k} fresh seeds", flush=True)
    name = f"{job.experiment_name}-confirm"
    results = run_cases([{**config, "seed": base + i} for i in range(1, k + 1)], name)
    if STOP.received is not None:
        return ""
    rows, _, _ = collect_rows(job, parent, results, False, name)
    done = [r for r in rows if r["status"] == "FINISHED"]
    if not done:
        return f"[bkd] no confirmation run finished ({', '.join(r['status'] for r in rows)})"
    o = objective_of(job)
    val_mean, val_std, test_mean, test_std, ci_low, ci_high = confirm_columns(o)
    best[val_mean], best[val_std] = mean_std([r[o.val] for r in done])
    tests = {r["seed"]: seed_result(r, o.test, job.dataset.rows["test"])
             for r in done if r.get(o.test) is not None and r[o.test] == r[o.test]}
    line = f"\nbest configuration on {len(done)} fresh seeds: {o.val} {best[val_mean]:.2f} +- {best[val_std]:.2f}"
    if tests:
        test = method_interval(tests)
        best[test_mean], best[test_std] = test.mean, test.std
        line += f", {o.test} {test.mean:.2f} +- {test.std:.2f}"
        if test.n > 1:  # the seeds' and (where runs keep per-example results) the test split's noise, as compare counts them
            best[ci_low], best[ci_high] = test.low, test.high
            line += f" (95 % CI {test.low:.2f} to {test.high:.2f}, {'seeds and test examples' if test.counts_examples else 'seeds'})"
    reference = best.get(test_mean, best[val_mean])
    gap = o.gain(best[o.val], reference)
    return (line + f"\n(the search reported {o.val} {best[o.val]:.2f} for it: {'optimistic' if gap > 0 else 'pessimistic'} "
            f"by {abs(gap):.2f} against the fresh seeds' {'test' if test_mean in best else 'val'} mean)")


def export_student(records: TrialRecords, trial_id: str, out: Path) -> Optional[str]:
    """The best trial's final student weights (its record) as ``out/student.pt``."""
    state = records.student(trial_id)
    if state is None:
        return None
    target = out / "student.pt"
    torch.save(state, target)
    return str(target)


def first_failure(rows: list[dict[str, Any]]) -> str:
    """Why no trial finished, in one line: the first trial error, else the statuses."""
    errors = [r["error"] for r in sorted(rows, key=lambda r: r.get("started_at") or 0) if r.get("error")]
    if errors:
        return f"the first trial error: {errors[0]}"
    counts = {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}}
    return "trial statuses: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trial started")
