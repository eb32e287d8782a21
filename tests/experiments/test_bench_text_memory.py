"""The text-memory benchmark, run small: one invocation reports both modes and their ratio."""

from __future__ import annotations

import re
import sys

import pytest

from vlprompt.experiments import bench_text_memory


def test_reports_saved_bytes_for_both_modes_and_equal_gradients(monkeypatch, capsys) -> None:
    flags = ["--model", "vlp-tiny", "--classes", "8", "--chunk", "2", "--batch-size", "4"]
    monkeypatch.setattr(sys, "argv", ["bench_text_memory.py", *flags])
    bench_text_memory.main()
    out = capsys.readouterr().out
    assert out.startswith("$ python bench_text_memory.py --model vlp-tiny")
    assert "never: saved for backward" in out and " auto: saved for backward" in out
    ratio = float(re.search(r"saved bytes auto / never = ([0-9.]+)", out).group(1))
    assert ratio == pytest.approx(0.3, abs=0.1)  # four chunks: about one chunk's worth (+ inputs)
    assert "gradients bit-equal: True" in out


def test_class_names_are_distinct_and_stable() -> None:
    names = bench_text_memory.class_names(1000)
    assert len(set(names)) == 1000 and names[:3] == ["red 0", "golden red 1", "sea red red 2"]
