"""What names a backbone -- an open_clip architecture and its weights -- readable without torch.

Two questions are asked both before anything starts (config validation, in the experiment driver)
and when the backbone is loaded (``methods/clip.py``): *is this model name known?* and *is this
``pretrained`` value a checkpoint file or an open_clip tag?* Both places use this module, so the
answers cannot drift apart, and the driver does not import torch or open_clip to get them.

* Model names are the stems of open_clip's JSON architecture configs (the files
  ``open_clip.list_models()`` reads) plus vlprompt's own (``model_configs/``): the package's
  folder is found without importing it.
* A ``pretrained`` value is a checkpoint *path* when it looks like one: it has a path separator,
  starts with ``~`` or ``.``, or ends in a checkpoint suffix (``weights.ckpt``). Otherwise it is an
  open_clip tag (``openai``), ``"bundled"`` (the weights shipped in ``weights/``) or null.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from pathlib import Path

#: open_clip JSON architectures shipped with vlprompt (``vlp-tiny`` for tests, ``vlp-small``).
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

#: Weights shipped inside the package (``pretrained="bundled"``): ``<model>.safetensors`` in fp16,
#: with ``<model>.safetensors.sha256`` and the ``<model>.json`` record of how it was made.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BUNDLED = "bundled"

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


def is_checkpoint_path(value: str | None) -> bool:
    """Whether a ``pretrained`` value names a file rather than a tag (see the module docstring)."""
    if not value or value == BUNDLED:
        return False
    return (
        "/" in value
        or os.sep in value
        or value.startswith(("~", "."))
        or value.lower().endswith(CHECKPOINT_SUFFIXES)
    )


def _open_clip_config_dir() -> Path | None:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model_configs"


@cache
def model_names() -> tuple[str, ...]:
    """Every architecture name ``load_backbone`` accepts, sorted (``open_clip.list_models()`` + ours)."""
    folders = [d for d in (_open_clip_config_dir(), MODEL_CONFIG_DIR) if d is not None and d.is_dir()]
    return tuple(sorted({p.stem for folder in folders for p in folder.glob("*.json")}))


def bundled_models() -> tuple[str, ...]:
    """Models whose weights ship with vlprompt (``pretrained="bundled"``)."""
    return tuple(sorted(p.name.removesuffix(".safetensors.sha256") for p in WEIGHTS_DIR.glob("*.sha256")))
