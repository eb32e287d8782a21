"""The sweep's search space: YAML data → Optuna define-by-run function and grid points.

A space is a mapping ``"section.key" -> {choice: [values], when: {"other.key": value}}``.
``when`` makes a parameter conditional (``method.n_ctx`` only when ``method.name`` is
``coop``; a list, ``{method.name: [coop, kgcoop]}``, means any of them). Keys are turned
into Optuna names with ``/`` (``method/n_ctx``), which Ray's
``OptunaSearch`` nests back into ``config["method"]["n_ctx"]``.

``sampler: grid`` visits every valid point exactly once: the points are enumerated here
(conditions respected, so no duplicate zero-shot trials per ``n_ctx``), grouped into bundles
(``orchestrator/bundles.py``) and handed to Tune as a grid over bundles; the adaptive samplers
(TPE, random) ask Optuna through :class:`DefineByRun`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Space = Mapping[str, Mapping[str, Any]]


def optuna_name(key: str) -> str:
    return key.replace(".", "/")


def condition_holds(condition: Any, value: Any) -> bool:
    """One ``when`` condition: a list means "any of these", anything else "equal to it"."""
    return value in condition if isinstance(condition, list | tuple) else value == condition


def _active(spec: Mapping[str, Any], point: Mapping[str, Any]) -> bool:
    """All ``when`` conditions hold."""
    return all(condition_holds(v, point.get(k)) for k, v in (spec.get("when") or {}).items())


def _ordered(space: Space) -> list[str]:
    """Keys with every condition's key before the keys that depend on it."""
    order: list[str] = []

    def visit(key: str, stack: tuple[str, ...]) -> None:
        if key in order:
            return
        if key in stack:
            raise ValueError(f"sweep.space: circular `when` between {' -> '.join((*stack, key))}")
        for dep in space[key].get("when") or {}:
            visit(dep, (*stack, key))
        order.append(key)

    for key in space:
        visit(key, ())
    return order


class DefineByRun:
    """An Optuna define-by-run function suggesting each active parameter as a categorical.

    A class rather than a closure: Tune pickles the searcher (with this function) into
    its experiment checkpoint, which is what lets ``--resume`` continue a sweep.
    """

    def __init__(self, space: Space):
        self.space = {k: dict(v) for k, v in space.items()}
        self.order = _ordered(self.space)

    def __call__(self, trial: Any) -> None:
        point: dict[str, Any] = {}
        for key in self.order:
            spec = self.space[key]
            if _active(spec, point):
                point[key] = trial.suggest_categorical(optuna_name(key), list(spec["choice"]))


def grid_points(space: Space) -> list[dict[str, Any]]:
    """Every combination of the active parameters, each once, in a stable order."""
    order = _ordered(space)
    points: list[dict[str, Any]] = [{}]
    for key in order:
        spec = space[key]
        grown = []
        for point in points:
            if _active(spec, point):
                grown.extend({**point, key: value} for value in spec["choice"])
            else:
                grown.append(point)
        points = grown
    unique = {tuple(sorted(p.items(), key=lambda kv: kv[0])): p for p in points}
    return list(unique.values())


def grid_size(space: Space) -> int:
    return len(grid_points(space)) if space else 1
