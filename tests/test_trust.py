"""Guard rails before the trials, in this process on the shared local cluster: a teacher that learned nothing
(trained here, or given) stops the search before any trial, naming the figure, chance and the keys to look
at; ``teacher.allow_chance=true`` goes on with a warning."""
import pytest
from test_search_endings import Search

from orchestrator import tune as tune_entry
from orchestrator.console.cli import entry_point

pytestmark = pytest.mark.ray


def run(search: Search, capsys) -> tuple[int, str]:
    code = entry_point(tune_entry.run, search.args)
    printed = capsys.readouterr()
    return code, printed.out + printed.err


def test_a_teacher_trained_to_chance_stops_the_search_before_its_trials(ray_cluster, tmp_path, capsys):
    """The embedded default with teacher.lr=1e-6: the teacher ends at chance; exit 1 before any trial."""
    search = Search(tmp_path, "chance", "teacher.lr=0.000001", own_teacher=True)
    code, output = run(search, capsys)
    assert code == 1, output[-3000:]
    assert "[bkd] the teacher learned nothing: the teacher (trained just now) scores val_acc" in output
    assert "teacher.lr=1e-06" in output and "teacher.epochs=6" in output and "teacher.allow_chance=true" in output
    assert "always answering the largest class scores" in output
    assert search.parent() is None and not (tmp_path / "out" / "chance" / "trials.parquet").exists(), "no trial ran"


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
