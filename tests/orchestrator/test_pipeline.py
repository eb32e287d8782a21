"""The sweep's Ray Data feature pipeline on a real (in-process) Ray: same numbers as the trials,
each (image, view) encoded once per sweep, trials that only read, failures before any trial."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from vlprompt import datasets as vds
from vlprompt.orchestrator.config import load_config, resolve_paths
from vlprompt.orchestrator.data import prepare_data
from vlprompt.orchestrator.loop import Keep, WorkerContext, run
from vlprompt.orchestrator.pipeline import (
    FeaturePipelineError,
    fill_feature_cache,
    plan_pipeline,
    planned_trials,
)
from vlprompt.orchestrator.resources import plan_resources
from vlprompt.orchestrator.sweep import run_sweep

pytestmark = pytest.mark.slow
UNIT = str(Path(__file__).resolve().parents[1] / "assets" / "unit.yaml")
CPU = torch.device("cpu")
#: The bundled pretrained model: its weights do not depend on the trial's seed, so seeds share.
SMALL = ("model.name=vlp-small", "model.pretrained=bundled")


def _cfg(tmp_path, *overrides, cache="cache"):
    base = [
        *SMALL,
        f"data.root={tmp_path / 'data'}",
        "data.shots=4",
        "train.epochs=2",
        "train.batch_size=8",
        "train.eval_batch_size=16",
        "method.name=coop",
        "train.view_mode=per_epoch",  # the default (unit.yaml cycles its own views)
        "train.view_seed=0",
        "sweep.space={}",
        f"data.feature_cache={tmp_path / cache}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "tracking.experiment=unit",
    ]
    return resolve_paths(load_config(UNIT, [*base, *overrides]), tmp_path)


def _fill(cfg):
    import ray

    plan = plan_resources(
        ray.cluster_resources(),
        num_workers=1,
        use_gpu="false",
        cpus_per_worker=1,
        gpus_per_worker=1,
        max_concurrent_trials=0,
        num_trials=1,
    )
    return fill_feature_cache(cfg, planned_trials(cfg), plan)


def _learned(cfg):
    kept = Keep()
    metrics = run(cfg, WorkerContext(0, 1, CPU), None, kept)
    return metrics, kept.learned


def _entries(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """file name → {image id: feature} of every entry in a cache folder."""
    out = {}
    for path in sorted(folder.glob("*.parquet")):
        table = pq.read_table(path)
        features = np.stack(table.column("feature").to_numpy(zero_copy_only=False))
        out[path.name] = dict(zip(table.column("image").to_pylist(), features, strict=True))
    return out


@pytest.mark.parametrize("mode", ["per_epoch", "cycled"])
def test_pipeline_features_equal_the_trial_encoder(local_ray, tmp_path, mode):
    """Test transform and seeded views: the pipeline's entries are the in-trial encoder's."""
    views = ("train.view_mode=cycled", "train.feature_views=2") if mode == "cycled" else ()
    planned = _cfg(tmp_path, *views)
    report = _fill(planned)
    assert report.planned and report.encoded > 0 and planned.data.features_planned
    in_trial = _cfg(tmp_path, *views, cache="in-trial")
    metrics, _ = _learned(in_trial)
    assert metrics["feature_images_encoded"] == report.encoded
    ours, theirs = _entries(tmp_path / "cache"), _entries(tmp_path / "in-trial")
    assert sorted(ours) == sorted(theirs) and len(ours) == 3  # test+val, and two training views
    worst = max(
        float(np.abs(ours[name][image] - theirs[name][image]).max()) for name in ours for image in ours[name]
    )
    assert worst <= 1e-6, worst
    # other batch sizes than the trial's: not the same batches, still within 1e-6
    _fill(_cfg(tmp_path, *views, "data.encode_batch_size=5", cache="batch5"))
    other = _entries(tmp_path / "batch5")
    worst = max(
        float(np.abs(other[name][image] - theirs[name][image]).max())
        for name in other
        for image in other[name]
    )
    assert worst <= 1e-6, worst


def test_a_sweep_encodes_each_image_and_view_once(local_ray, tmp_path):
    """Three methods × two seeds: the test split once, each training image once per epoch view."""
    space = (
        "sweep.space={method.name: {choice: [zeroshot, coop, kgcoop]}, "
        "seed: {choice: [1, 2], when: {method.name: [coop, kgcoop]}}}"
    )
    cfg = _cfg(tmp_path, space)
    trials = planned_trials(cfg)
    assert len(trials) == 5
    report = _fill(cfg)
    datas = [prepare_data(t) for t in trials]
    evaluated = {d.path for data in datas for es in data.eval_sets for d in es.items}
    trained = {d.path for data, t in zip(datas, trials, strict=True) if t.method.name != "zeroshot"
               for s in data.tasks.values() for d in s.train}  # fmt: skip
    subsets = {
        t.seed: {d.path for s in data.tasks.values() for d in s.train}
        for data, t in zip(datas, trials, strict=True)
    }
    assert len(trained) < sum(len(s) for s in subsets.values())  # the two seeds' subsets overlap
    assert report.encoded == len(evaluated) + cfg.train.epochs * len(trained)
    rows = sum(len(v) for v in _entries(tmp_path / "cache").values())
    assert rows == report.encoded  # one row per (image, view): nothing encoded twice
    assert _fill(cfg).encoded == 0  # a second sweep over the same images encodes nothing
    # a trial of the sweep only reads
    metrics, _ = _learned(trials[-1])
    assert metrics["feature_images_encoded"] == 0 and metrics["feature_cache_misses"] == 0


def test_a_trial_learns_the_same_from_the_pipeline_as_from_its_own_encoder(local_ray, tmp_path):
    planned = _cfg(tmp_path, "train.epochs=3")
    _fill(planned)
    read_metrics, read = _learned(planned)
    own_metrics, own = _learned(_cfg(tmp_path, "train.epochs=3", cache="own"))
    assert read_metrics["feature_images_encoded"] == 0 and own_metrics["feature_images_encoded"] > 0
    assert torch.equal(read["ctx"], own["ctx"])
    assert read_metrics["test_acc"] == own_metrics["test_acc"]


def _sweep_ctx(cfg, tmp_path):
    outcome = run_sweep(cfg, launch_dir=tmp_path)
    assert not outcome.failed, outcome.failed
    client = MlflowClient(outcome.tracking_uri)
    (child,) = client.search_runs(
        [outcome.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'"
    )
    local = client.download_artifacts(child.info.run_id, "learned/learned_state.pt", str(tmp_path))
    return child.data.metrics, torch.load(local)["ctx"]


def test_two_workers_learn_the_same_from_the_pipeline_as_from_their_own_encoder(local_ray, tmp_path):
    """A real sweep, 2 Ray Train workers per trial: each rank reads its rows of the planned cache."""
    two = ("resources.num_workers=2", "resources.cpus_per_worker=0.5", "train.batch_size=10", "data.shots=5")
    planned_metrics, planned = _sweep_ctx(_cfg(tmp_path, *two, "sweep.name=planned"), tmp_path)
    assert planned_metrics["feature_images_encoded"] == 0 and planned_metrics["feature_cache_hits"] > 0
    own_cfg = _cfg(tmp_path, *two, "sweep.name=own", "data.pipeline=false", cache="own")
    own_metrics, own = _sweep_ctx(own_cfg, tmp_path)
    assert own_metrics["feature_images_encoded"] > 0
    assert torch.equal(planned, own)
    single = _learned(_cfg(tmp_path, *two[2:], cache="single"))[1]["ctx"]
    assert torch.allclose(planned, single, atol=1e-5)  # data parallel is exact up to summation order


def test_an_image_the_pipeline_cannot_encode_stops_the_sweep_before_any_trial(local_ray, tmp_path):
    root = tmp_path / "data"
    vds.generate_dataset("synthetic", root, seed=0, num_classes=4, images_per_class=10)
    bad = vds.load_dataset("synthetic", root).test[0].path
    Path(bad).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cfg = _cfg(tmp_path, "data.generate_missing=false")
    with pytest.raises(FeaturePipelineError, match="synthetic test") as err:
        run_sweep(cfg, launch_dir=tmp_path)
    assert bad in str(err.value)
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run: nothing started


def test_the_pipeline_always_leaves_decoding_a_cpu():
    two = plan_pipeline({"CPU": 2.0}, gpu=False, actors=0)
    assert (two.actors, two.actor_cpus, two.decode_cpus, two.actor_gpus) == (1, 1.0, 0.5, 0.0)
    gpus = plan_pipeline({"CPU": 16.0, "GPU": 4.0}, gpu=True, actors=0)
    assert (gpus.actors, gpus.actor_gpus, gpus.actor_cpus) == (4, 1.0, 1.0)
    many = plan_pipeline({"CPU": 2.0}, gpu=False, actors=4)
    assert many.actors * many.actor_cpus <= 1.0 and many.decode_cpus > 0
