"""The driver's trial clock: a trial's overhead runs from when its slot freed, split per configuration."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vlprompt.orchestrator import trial_clock


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    logged: dict[str, dict[str, float]] = {}
    monkeypatch.setattr(trial_clock.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(
        trial_clock.tracking, "log_metrics", lambda uri, run_id, metrics: logged.setdefault(run_id, metrics)
    )
    c = trial_clock.TrialClock("sqlite:///x.db", slots=1)
    c.setup(stop=None, num_samples=1, total_num_samples=2)
    return c, now, logged


def test_the_second_trial_in_a_slot_is_timed_from_the_end_of_the_first(clock):
    c, now, logged = clock
    a, b = SimpleNamespace(trial_id="a"), SimpleNamespace(trial_id="b")
    now[0] = 110.0  # Tune reports a's start only once its actor is up: 10 s after the sweep began
    c.on_trial_start(0, [], a)
    now[0] = 120.0
    c.on_trial_result(0, [], a, {"run_id": "r1", "time_worker_s": 4.0})
    now[0] = 130.0
    c.on_trial_result(0, [], a, {"run_id": "r2", "time_worker_s": 6.0})
    c.on_trial_complete(0, [], a)
    now[0] = 137.0  # b's actor took 7 s to start after a freed the slot
    c.on_trial_start(0, [], b)
    now[0] = 140.0
    c.on_trial_result(0, [], b, {"run_id": "r3", "time_worker_s": 1.0})
    c.on_trial_error(0, [], b)
    # a: 30 s from the sweep's start, 10 s in loops → 20 s overhead, 10 s per configuration
    assert logged["r1"] == {"ray_overhead_s": 10.0, "time_trial_s": 14.0, "bundle_size": 2}
    assert logged["r2"]["ray_overhead_s"] == 10.0
    # b: from a's end (130) to its own (140), 1 s in its loop
    assert logged["r3"] == {"ray_overhead_s": 9.0, "time_trial_s": 10.0, "bundle_size": 1}


def test_a_trial_that_reported_nothing_logs_nothing_but_frees_its_slot(clock):
    c, now, logged = clock
    c.on_trial_start(0, [], SimpleNamespace(trial_id="a"))
    now[0] = 105.0
    c.on_trial_error(0, [], SimpleNamespace(trial_id="a"))
    assert logged == {} and c.free == [105.0]
