"""A search that ends by its own limits, in this process on the shared local cluster (``ray_cluster``): the time
budget running out during the trials and during the teacher's training, and every trial diverging. What a user's
shell sees of a stopped command (signals, exit codes of a killed driver) is in test_search_endings."""
import pytest
from test_search_endings import Search

from orchestrator import tune as tune_entry
from orchestrator.console.cli import entry_point

pytestmark = pytest.mark.ray


def run(search: Search, capsys) -> tuple[int, str]:
    """The search's command in this process: its exit code and what it printed (stdout, then stderr)."""
    code = entry_point(tune_entry.run, search.args)
    printed = capsys.readouterr()
    return code, printed.out + printed.err


def test_time_budget_stops_trials_with_their_epochs_and_leaves_no_run_running(ray_cluster, tmp_path, capsys):
    search = Search(tmp_path, "budget", "tune.time_budget_s=12", "tune.num_samples=50", "train.epochs=400", "tune.scheduler=none")
    code, output = run(search, capsys)
    rows = search.rows()
    assert code == 1, output[-3000:]  # no trial trained all its epochs
    assert "no trial finished all its epochs" in output
    assert rows and all(r["status"] == "OUT_OF_TIME" for r in rows), rows
    assert all(r["epochs"] >= 1 and r["val_acc"] is not None and r["lr"] is not None for r in rows), rows
    assert search.parent().info.status == "FINISHED"
    runs = search.trials()
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    by_trial = {r.data.tags["bkd.trial_id"]: r for r in runs}
    for row in rows:
        run_ = by_trial[row["trial_id"]]
        assert run_.info.status == "KILLED" and run_.data.tags["bkd.end_reason"] == "stopped by tune.time_budget_s"
        assert search.steps(run_)[-1] == row["epochs"]

    # the budget stops the search as Ctrl-C does: the resume (with the budget afresh) continues each stopped trial
    # after its last finished epoch, in its own run, far within train.checkpoint_min_interval_s (30 s)
    code, output = run(search.with_args("tune.resume=true"), capsys)
    assert code == 1, output[-3000:]
    again = {r["trial_id"]: r for r in search.rows()}
    for row in rows:
        steps = search.steps(search.client.get_run(by_trial[row["trial_id"]].info.run_id))
        assert again[row["trial_id"]]["epochs"] > row["epochs"], (row, again.get(row["trial_id"]))
        assert steps == list(range(1, again[row["trial_id"]]["epochs"] + 1)), "continued, no step twice, none missing"


def test_a_search_whose_trials_all_diverge_exits_1_and_says_why(ray_cluster, tmp_path, capsys):
    search = Search(tmp_path, "all-bad", "search=kd", "search.params.lr.low=1.0e+8", "search.params.lr.high=1.0e+9",
                    "tune.num_samples=2", "train.epochs=2", "tune.scheduler=none")
    code, output = run(search, capsys)
    assert code == 1, output[-3000:]
    assert "no trial finished all its epochs; the first trial error: the training loss became NaN/inf" in output
    assert {r["status"] for r in search.rows()} == {"DIVERGED"}
    assert search.parent().info.status == "FAILED" and "NaN/inf" in search.parent().data.tags["bkd.error"]
    assert not (tmp_path / "out" / "all-bad" / "student.pt").exists()


def test_time_budget_during_the_teacher_ends_its_run_killed_with_the_resume_command(ray_cluster, tmp_path, capsys):
    search = Search(tmp_path, "teacher-budget", "teacher.epochs=400", "tune.time_budget_s=8", own_teacher=True)
    code, output = run(search, capsys)
    assert code == 1, output[-4000:]
    assert "tune.time_budget_s ran out: the teacher's training (epoch" in output
    last = output.strip().splitlines()[-1].strip()
    assert last.startswith("python -m orchestrator.tune") and "tune.resume=true tune.name=teacher-budget" in last
    (teacher,) = search.teacher_runs()
    assert teacher.info.status == "KILLED" and teacher.data.tags["bkd.end_reason"] == "stopped by tune.time_budget_s"
    logged = search.steps(teacher)
    assert logged == list(range(1, len(logged) + 1)), "the epochs it trained are logged, one point each"
    assert search.teacher_epochs_printed(output) == logged, "each epoch printed once, in the driver"
    assert f"every finished epoch is kept ({logged[-1]} reported here)" in output

    # its epochs are far shorter than train.checkpoint_min_interval_s (30 s): the resume continues after the
    # last finished one all the same, and prints only the epochs it trains
    code, output = run(search.with_args("tune.resume=true"), capsys)
    assert code == 1, output[-4000:]
    printed = search.teacher_epochs_printed(output)
    assert printed and printed[0] == logged[-1] + 1, (logged, printed, output)
    (teacher,) = search.teacher_runs()
    assert search.steps(teacher) == list(range(1, printed[-1] + 1)), "no step twice, none missing"
