"""How the package imports: without torch, so configs are checked before anything heavy starts."""

from __future__ import annotations

import os
import subprocess
import sys

TORCH_FREE = (
    "vlprompt.datasets",
    "vlprompt.datasets.catalog",
    "vlprompt.datasets.tasks",
    "vlprompt.datasets.splits",
    "vlprompt.datasets.fewshot",
    "vlprompt.datasets.fewshot_cache",
    "vlprompt.datasets.generate",
    "vlprompt.datasets.makesplit",
    "vlprompt.datasets.doctor",
)


def test_package_import_does_not_load_torch() -> None:
    """The experiment driver validates dataset names and split files before Ray starts; that must
    not cost a torch import. Run in a fresh interpreter: this one has torch loaded already."""
    code = (
        "import importlib, sys\n"
        f"for name in {TORCH_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in ('torch', 'torchvision') if m in sys.modules)\n"
        "assert not loaded, f'importing vlprompt.datasets loaded {loaded}'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
