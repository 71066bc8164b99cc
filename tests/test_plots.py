"""The search summary figure: what each panel shows, written as a real PNG."""
import math

from orchestrator.tracking.plots import search_figure


def rows_and_curves():
    rows = [  # best first, as summarize passes them
        {"trial_id": "b", "status": "FINISHED", "val_acc": 90.0, "cuts": "1,3", "started_at": 20.0},
        {"trial_id": "a", "status": "FINISHED", "val_acc": 70.0, "cuts": "3", "started_at": 10.0},
        {"trial_id": "c", "status": "FINISHED", "val_acc": 80.0, "cuts": "1,3", "started_at": 30.0},
        {"trial_id": "d", "status": "FAILED", "val_acc": math.nan, "cuts": "2", "started_at": math.nan},
    ]
    curves = {"b": [(1, 60.0), (2, 90.0)], "a": [(1, 70.0)], "c": [(2, 80.0), (1, 50.0)], "d": []}
    return rows, curves


def test_search_figure_panels(tmp_path):
    rows, curves = rows_and_curves()
    fig = search_figure(rows, curves, "exp")
    curves_ax, progress_ax, partition_ax = fig.axes
    lines = curves_ax.get_lines()
    assert len(lines) == 3  # one per trial that reported an epoch
    (best_line,) = [l for l in lines if l.get_label() == "best: b"]
    assert list(best_line.get_ydata()) == [60.0, 90.0]
    assert [list(l.get_xdata()) for l in lines if l.get_label() != "best: b"] == [[1], [1, 2]]  # sorted by epoch
    (running,) = progress_ax.get_lines()
    assert list(running.get_ydata()) == [70.0, 90.0, 90.0]  # start order a, b, c: the best so far
    assert [t.get_text() for t in partition_ax.get_xticklabels()] == ["1,3", "3"]  # best partition first; failed trials left out
    fig.savefig(tmp_path / "search.png")
    assert (tmp_path / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_figure_without_partitions():
    rows = [{"trial_id": "a", "status": "FINISHED", "val_acc": 70.0, "started_at": 1.0}]
    fig = search_figure(rows, {"a": [(1, 70.0)]}, "kd search")
    assert len(fig.axes) == 2
