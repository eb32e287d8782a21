"""Search spaces are data; grid points respect conditions and appear once each."""

from __future__ import annotations

import optuna
import pytest

from vlprompt.orchestrator.search_space import DefineByRun, grid_points

SPACE = {
    "method.name": {"choice": ["zeroshot", "coop"]},
    "method.n_ctx": {"choice": [4, 16], "when": {"method.name": "coop"}},
    "data.shots": {"choice": [1, 4]},
    "seed": {"choice": [1, 2, 3]},
}


def test_grid_skips_inactive_parameters_without_duplicates():
    points = grid_points(SPACE)
    zeroshot = [p for p in points if p["method.name"] == "zeroshot"]
    coop = [p for p in points if p["method.name"] == "coop"]
    assert len(zeroshot) == 2 * 3 and all("method.n_ctx" not in p for p in zeroshot)
    assert len(coop) == 2 * 2 * 3
    assert len({tuple(sorted(p.items())) for p in points}) == len(points) == 18


def test_condition_declared_after_its_dependant_still_orders_right():
    space = {"b": {"choice": [1, 2], "when": {"a": "x"}}, "a": {"choice": ["x", "y"]}}
    assert grid_points(space) == [{"a": "x", "b": 1}, {"a": "x", "b": 2}, {"a": "y"}]


def test_a_list_condition_means_any_of():
    space = {"m": {"choice": ["a", "b", "c"]}, "k": {"choice": [1, 2], "when": {"m": ["a", "b"]}}}
    assert grid_points(space) == [
        {"m": "a", "k": 1},
        {"m": "a", "k": 2},
        {"m": "b", "k": 1},
        {"m": "b", "k": 2},
        {"m": "c"},
    ]


def test_circular_conditions_are_named():
    with pytest.raises(ValueError, match="circular"):
        grid_points({"a": {"choice": [1], "when": {"b": 1}}, "b": {"choice": [1], "when": {"a": 1}}})


def test_optuna_suggests_only_the_active_keys_of_the_space():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    suggest = DefineByRun(SPACE)
    points = [str(p) for p in grid_points(SPACE)]
    for _ in range(20):
        trial = study.ask()
        suggest(trial)
        assert str({k.replace("/", "."): v for k, v in trial.params.items()}) in points
        study.tell(trial, 0.0)
