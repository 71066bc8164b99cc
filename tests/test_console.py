"""What reaches the console from Ray: its paragraph on a dead worker process gives way to bkd's own line."""
from orchestrator.console.filters import print_unless_a_worker_died
from orchestrator.console.progress import short_cause

DEATH = ("A worker died or was killed while executing a task by an unexpected system error. To troubleshoot the "
         "problem, check the logs for the dead worker. Lease ID: 0100 Worker ID: 72e0 Worker exit type: SYSTEM_ERROR")


def test_rays_paragraph_on_a_dead_worker_is_left_to_its_logs_and_other_messages_pass():
    printed = []
    show = lambda data, **kwargs: printed.append((data["lines"], kwargs))  # noqa: E731
    print_unless_a_worker_died(show, {"lines": [DEATH], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert printed == []
    other = {"lines": ["Failed to register worker to Raylet"], "pid": "raylet", "is_err": False}
    worker = {"lines": [DEATH], "pid": 1234, "is_err": True}  # a trial's own output that says the same is its own
    print_unless_a_worker_died(show, other, ignore_prefix=False)
    print_unless_a_worker_died(show, worker)
    assert printed == [(other["lines"], {"ignore_prefix": False}), (worker["lines"], {})]


def test_a_trials_cause_in_a_few_words():
    ray_paragraph = ("ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task. The actor is dead "
                     "because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: " + "x" * 500)
    assert short_cause(ray_paragraph) == "its process died: killed, or out of memory"
    assert short_cause("ValueError: bad " + "y" * 500) == ("ValueError: bad " + "y" * 500)[:200]
