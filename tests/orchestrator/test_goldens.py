"""Golden numbers: every protocol's metrics and every method's final loss, pinned.

Each case is one complete run of the real loop (in-process, no Ray), on the bundled
``vlp-small`` CLIP and small generated copies of the small-world tasks, with fixed seeds. The
numbers in ``tests/assets/goldens.json`` were produced by the code before the architecture
refactor (issue 8) and must not move: a change to a method, the loop, the data path or the
feature cache that changes any number fails here, naming the case and the metric.

Exactness. On the platform the goldens were recorded on (same torch version and CPU kernel
family, ``torch.backends.cpu.get_cpu_capability()``), every number must be *bit-equal*. On
another platform, CPU kernels may sum in another order, so losses and learned-tensor norms are
compared to 1e-4 (relative) and accuracies to one test image; the test says which it did.

To re-record after a deliberate change (and say why in the commit)::

    VLPROMPT_UPDATE_GOLDENS=1 .venv/bin/pytest tests/orchestrator/test_goldens.py

Updating writes only the cases that ran and keeps every other case's stored numbers, so a new
case is recorded alone with ``-k`` (``-k coop_per_epoch``); check with ``git diff
tests/assets/goldens.json`` that no existing value moved. A case recorded on another platform
than the file's ``platform`` gets its own entry in ``case_platforms`` (bit-equal only there);
re-recording it on the file's platform removes that entry.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from vlprompt import datasets as vds
from vlprompt.orchestrator.config import load_config, resolve_paths
from vlprompt.orchestrator.loop import Session, WorkerContext, run

pytestmark = pytest.mark.e2e

GOLDENS = Path(__file__).resolve().parents[1] / "assets" / "goldens.json"
UPDATE = os.environ.get("VLPROMPT_UPDATE_GOLDENS") == "1"

#: Datasets every case may read: small copies (at most 8 classes × 20 images: 10/4/6 per class).
DATASETS = (
    "sw_shades",
    "sw_objects",
    "sw_counting",
    "sw_textures",
    "sw_satellite",
    "sw_objects_sketch",
    "sw_objects_noisy",
)
BASE = (
    "model.name=vlp-small",
    "model.pretrained=bundled",
    "data.dataset=sw_shades",
    "data.shots=4",
    "train.epochs=3",
    "train.batch_size=8",
    "train.lr=0.01",
    "train.view_mode=cycled",  # the views of the recorded numbers: two per image, from the run's stream
    "train.feature_views=2",
    "train.view_seed=null",
    "train.crop_min_scale=0.9",
    "sweep.space={}",
)
TEACHER = ("method.teacher_model=vlp-small", "method.teacher_pretrained=bundled")

CASES: dict[str, tuple[str, ...]] = {
    # few-shot: every method that trains on labelled shots (and zero-shot / the linear probe)
    "few_shot/zeroshot": ("method.name=zeroshot",),
    "few_shot/zeroshot_ensemble": ("method.name=zeroshot", "method.ensemble=imagenet7+dataset"),
    "few_shot/linear_probe": ("method.name=linear_probe",),
    "few_shot/coop": ("method.name=coop", "method.n_ctx=4", "method.ctx_init=a photo of a"),
    "few_shot/coop_images": ("method.name=coop", "method.n_ctx=4", "train.view_mode=images"),
    # shared views (orchestrator/views.py): drawn under view_seed, not the run's stream
    "few_shot/coop_per_epoch": (
        "method.name=coop",
        "method.n_ctx=4",
        "train.view_mode=per_epoch",
        "train.view_seed=0",
    ),
    "few_shot/coop_cycled_shared": ("method.name=coop", "method.n_ctx=4", "train.view_seed=0"),
    "few_shot/coop_csc_middle": (
        "method.name=coop",
        "method.n_ctx=4",
        "method.csc=true",
        "method.class_token_position=middle",
    ),
    "few_shot/cocoop": ("method.name=cocoop",),
    "few_shot/kgcoop": ("method.name=kgcoop",),
    "few_shot/ivlp": ("method.name=ivlp",),
    "few_shot/maple": ("method.name=maple",),
    "few_shot/promptsrc": ("method.name=promptsrc", "method.gpa_mean=2"),  # GPA weight on each of 3 epochs
    "few_shot/bias_tuning": ("method.name=bias_tuning",),
    "few_shot/bias_tuning_matched": (
        "method.name=bias_tuning",
        "method.match=ivlp n_ctx_text=2 depth_text=2",
    ),
    "few_shot/promptkd": ("method.name=promptkd", *TEACHER, "method.depth_vision=2", "train.epochs=2"),
    # the other protocols
    "base_to_novel/coop": ("data.protocol=base_to_novel", "method.name=coop", "method.n_ctx=4"),
    "base_to_novel/maple": ("data.protocol=base_to_novel", "method.name=maple"),
    "base_to_novel/promptsrc": ("data.protocol=base_to_novel", "method.name=promptsrc", "method.gpa_mean=2"),
    "cross_dataset/coop": (
        "data.protocol=cross_dataset",
        "data.dataset=sw_objects",
        "data.eval_targets=[sw_counting,sw_textures]",
        "method.name=coop",
        "method.n_ctx=4",
    ),
    "domain_generalisation/ivlp": (
        "data.protocol=domain_generalisation",
        "data.dataset=sw_objects",
        "data.eval_targets=[sw_objects_sketch,sw_objects_noisy]",
        "method.name=ivlp",
    ),
    "multi_task/softcpt": ("data.protocol=multi_task", "data.dataset=sw_all", "method.name=softcpt"),
    "multi_task/coop": ("data.protocol=multi_task", "data.dataset=sw_all", "method.name=coop"),
    "multi_task/linear_probe": (
        "data.protocol=multi_task",
        "data.dataset=sw_all",
        "method.name=linear_probe",
    ),
    "test_time/zeroshot": (
        "data.protocol=test_time",
        "data.dataset=sw_objects",
        "data.eval_targets=[sw_objects_sketch]",
        "method.name=zeroshot",
    ),
    "test_time/tpt": (
        "data.protocol=test_time",
        "data.dataset=sw_objects",
        "data.eval_targets=[sw_objects_sketch]",
        "method.name=tpt",
        "method.n_views=9",
    ),
}

#: Reported numbers that are timings or cache bookkeeping, not results.
NOT_RESULTS = ("time_", "feature_cache_", "feature_images_")


def platform() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("golden-data")
    for name in DATASETS:
        classes = min(8, len(vds.get_entry(name).class_folders))
        vds.generate_dataset(name, root, num_classes=classes, images_per_class=20)
    return root


def run_case(case: str, root: Path, tmp_path: Path) -> dict[str, float]:
    """One run; its results, the norm and sum of what it learned."""
    overrides = [
        *BASE,
        f"data.root={root}",
        f"data.feature_cache={tmp_path / 'features'}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        *CASES[case],
    ]
    cfg = resolve_paths(load_config(None, overrides), tmp_path)
    learned: dict[str, torch.Tensor] = {}

    class Capture(Session):
        def finish(self, metrics: dict[str, float], state: dict[str, torch.Tensor]) -> None:
            learned.update(state)

    metrics = run(cfg, WorkerContext(0, 1, torch.device("cpu")), None, Capture())
    numbers = {k: float(v) for k, v in metrics.items() if not k.startswith(NOT_RESULTS)}
    flat = [t.double().flatten() for t in learned.values()]
    if flat:
        everything = torch.cat(flat)
        numbers["learned_norm"] = float(everything.norm())
        numbers["learned_sum"] = float(everything.sum())
    return dict(sorted(numbers.items()))


def _stored() -> dict:
    return json.loads(GOLDENS.read_text(encoding="utf-8")) if GOLDENS.is_file() else {"cases": {}}


def _tolerance(metric: str) -> dict[str, float]:
    if metric.endswith("acc") or "acc/" in metric or metric == "hm":
        return {"abs": 100.0 / 24 + 1e-9}  # one image of the smallest evaluation split (24)
    return {"rel": 1e-4, "abs": 1e-6}


def recorded_on(stored: dict, case: str) -> dict[str, str] | None:
    """The platform ``case`` was recorded on: its own entry in ``case_platforms``, else the file's."""
    return stored.get("case_platforms", {}).get(case, stored.get("platform"))


def record(stored: dict, case: str, got: dict[str, float]) -> None:
    """Store ``case``'s numbers as recorded here. The file's ``platform`` is that of every case
    without an entry of its own in ``case_platforms``: recording on another platform gives the
    case such an entry rather than relabelling the other cases' platform."""
    here, others = platform(), [c for c in stored["cases"] if c != case and recorded_on(stored, c)]
    stored.setdefault("platform", here)
    per_case = stored.setdefault("case_platforms", {})
    per_case.pop(case, None)
    if not others:
        stored["platform"] = here
    elif recorded_on(stored, case) != here:
        per_case[case] = here
    if not per_case:
        del stored["case_platforms"]
    else:
        stored["case_platforms"] = dict(sorted(per_case.items()))
    stored["cases"][case] = got
    stored["cases"] = dict(sorted(stored["cases"].items()))


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str, data_root: Path, tmp_path: Path) -> None:
    got = run_case(case, data_root, tmp_path)
    stored = _stored()
    if UPDATE:
        record(stored, case, got)
        GOLDENS.write_text(json.dumps(stored, indent=1) + "\n", encoding="utf-8")
        return
    assert case in stored["cases"], f"no golden for {case}; record it (see the module docstring)"
    want = stored["cases"][case]
    assert sorted(got) == sorted(want), f"{case}: reported metrics changed"
    exact = recorded_on(stored, case) == platform()
    for metric, value in want.items():
        if exact:
            assert got[metric] == value or (math.isnan(value) and math.isnan(got[metric])), (
                f"{case}: {metric} = {got[metric]!r}, golden {value!r} (bit-equal expected on {platform()})"
            )
        else:
            assert got[metric] == pytest.approx(value, nan_ok=True, **_tolerance(metric)), (
                f"{case}: {metric} = {got[metric]!r}, golden {value!r} "
                f"(recorded on {stored.get('platform')}, compared with a tolerance on {platform()})"
            )
