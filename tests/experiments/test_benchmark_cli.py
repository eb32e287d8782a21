"""The front door refuses bad input before starting anything, naming the key."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "experiments" / "benchmark.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_script", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["data.shotz=4"], "data.shotz"),
        (["method.name=cop"], "did you mean"),
        (["--config", "no_such_preset"], "quickstart"),
        (["data.dataset=imagenet_x"], "eurosat"),
    ],
)
def test_bad_input_exits_2_with_the_reason(benchmark, argv, message, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, "run_sweep", lambda *a, **k: pytest.fail("must not start a sweep"))
    assert benchmark.main(argv) == 2
    assert message in capsys.readouterr().err.lower()
