"""Guard rails before the trials, in this process on the shared local cluster: a teacher that learned nothing
(trained here, or given) stops the search before any trial, naming the figure, chance and the keys to look
at; ``teacher.allow_chance=true`` goes on with a warning."""
import pytest
from test_search_endings import Search
from test_search_limits import run

from orchestrator import teacher as teacher_entry
from orchestrator.console.cli import entry_point

pytestmark = pytest.mark.ray


def test_a_teacher_trained_to_chance_stops_the_search_before_its_trials(ray_cluster, tmp_path, capsys):
    """The embedded default with teacher.lr=1e-6: the teacher ends at chance; exit 1 before any trial."""
    search = Search(tmp_path, "chance", "teacher.lr=0.000001", own_teacher=True)
    code, output = run(search, capsys)
    assert code == 1, output[-3000:]
    assert "[bkd] the teacher learned nothing: the teacher (trained just now) scores val_acc" in output
    assert "teacher.lr=1e-06" in output and "teacher.epochs=6" in output and "teacher.allow_chance=true" in output
    assert "always answering the largest class scores" in output
    assert search.parent() is None and not (tmp_path / "out" / "chance" / "trials.parquet").exists(), "no trial ran"

    # the teacher command says so too (the same teacher, reused from its MLflow run, not trained again)
    code = entry_point(teacher_entry.run, search.args)
    output = capsys.readouterr()
    assert code == 1 and "reusing teacher from MLflow run" in output.out, output
    assert "the teacher learned nothing" in output.err and "teacher.lr=1e-06" in output.err


def test_a_given_teacher_at_chance_stops_the_search_and_allow_chance_goes_on(ray_cluster, tmp_path, capsys):
    search = Search(tmp_path, "given", "tune.num_samples=1", "train.epochs=1", "search=kd")  # a random teacher file
    search.args.remove("teacher.allow_chance=true")
    code, output = run(search, capsys)
    assert code == 1, output[-3000:]
    assert "the teacher learned nothing: the teacher (" in output and "teacher.checkpoint holds another model" in output
    assert search.parent() is None

    code, output = run(search.with_args("teacher.allow_chance=true"), capsys)
    assert code == 0, output[-3000:]
    assert "distilling from it anyway (teacher.allow_chance=true)" in output
    assert len(search.rows()) == 1


def test_chance_is_the_largest_class_share_and_every_student_at_it_is_said_in_one_line():
    from orchestrator.search.chance import Chance, at_chance_line

    chance = Chance(34.0, 90)  # three classes, the largest 34 % of 90 texts
    assert chance.threshold == pytest.approx(34.0 + 3 * 100 * (0.34 * 0.66 / 90) ** 0.5)  # 49.0: three binomial errors
    at_majority = [{"status": "FINISHED", "test_acc": 34.0}, {"status": "FINISHED", "test_acc": 35.56},
                   {"status": "FAILED", "test_acc": None}]
    line = at_chance_line(at_majority, chance, "test_acc", "run of every method and seed")
    assert line.startswith("[bkd] warning: every run of every method and seed ended at chance (test_acc at most 35.56 %")
    assert "train.lr_range" in line and "train.epochs" in line
    assert at_chance_line(at_majority + [{"status": "FINISHED", "test_acc": 80.0}], chance, "test_acc", "run") is None
    assert at_chance_line(at_majority, None, "test_acc", "run") is None  # streamed data: chance not counted
    assert Chance(99.0, 100).beaten_by(100.0) and not Chance(99.0, 100).beaten_by(99.0)  # one class fills the split
