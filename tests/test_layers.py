"""Each box knows only the boxes below it (DESIGN.md): methods/ and datasets/ are plain
PyTorch + open_clip — no Ray, MLflow, Optuna, OmegaConf or pickle — and datasets/ never
imports methods/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ORCHESTRATION = {"ray", "mlflow", "optuna", "omegaconf", "pickle"}


def _imports(folder: Path) -> list[tuple[str, str]]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [(path.name, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.append((path.name, node.module or ""))
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("methods", ORCHESTRATION | {"vlprompt.orchestrator", "vlprompt.datasets"}),
        ("datasets", ORCHESTRATION | {"vlprompt.orchestrator", "vlprompt.methods"}),
    ],
)
def test_lower_layers_import_nothing_above_them(package, forbidden):
    bad = [
        (f, m)
        for f, m in _imports(REPO / package)
        if m.split(".")[0] in forbidden or any(m == x or m.startswith(x + ".") for x in forbidden)
    ]
    assert bad == []
