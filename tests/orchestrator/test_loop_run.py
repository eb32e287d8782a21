"""The real training/evaluation loop, in-process (no Ray) on generated data and the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mlflow.tracking import MlflowClient

from vlprompt.methods import METHODS, capabilities
from vlprompt.orchestrator import source_stats, tracking
from vlprompt.orchestrator.config import load_config, resolve_paths
from vlprompt.orchestrator.loop import Session, WorkerContext, run

pytestmark = pytest.mark.e2e  # runs the real loop in-process (seconds per test)

CPU = torch.device("cpu")
UNIT = str(Path(__file__).resolve().parents[1] / "assets" / "unit.yaml")


def _cfg(tmp_path, *overrides, method=("method.name=coop", "method.n_ctx=4")):
    base = [
        *method,
        f"data.root={tmp_path / 'data'}",
        "data.generate_missing=true",
        "data.dataset=synthetic",
        "data.shots=4",
        "train.epochs=3",
        "train.batch_size=8",
        "train.view_mode=cycled",
        "train.feature_views=2",
        "sweep.space={}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    return resolve_paths(load_config(UNIT, [*base, *overrides]), tmp_path)


def _learned(tmp_path, cfg, ctx=None):
    ctx = ctx or WorkerContext(0, 1, CPU)
    captured = {}

    class Capture(Session):
        def finish(self, metrics, learned):
            captured["state"], captured["metrics"] = learned, metrics

    metrics = run(cfg, ctx, None, Capture())
    return metrics, captured


def test_same_config_and_seed_give_the_same_prompt_and_metrics(tmp_path):
    cfg = _cfg(tmp_path)
    m1, c1 = _learned(tmp_path, cfg)
    m2, c2 = _learned(tmp_path, cfg)
    assert torch.equal(c1["state"]["ctx"], c2["state"]["ctx"])
    assert m1["test_acc"] == m2["test_acc"] and m1["val_acc"] == m2["val_acc"]
    other = _learned(tmp_path, _cfg(tmp_path, "seed=2"))[1]
    assert not torch.equal(c1["state"]["ctx"], other["state"]["ctx"])
    assert m1["trainable_params"] == 4 * 64
    assert 0.0 <= m1["test_acc"] <= 100.0


def test_text_memory_budget_reaches_the_backbone_and_moves_no_number(tmp_path, monkeypatch):
    from vlprompt.orchestrator import loop

    built = []

    def load_backbone(*args, **kwargs):
        built.append(kwargs)
        return real(*args, **kwargs)

    real = loop.load_backbone
    monkeypatch.setattr(loop, "load_backbone", load_backbone)
    kept, k = _learned(tmp_path, _cfg(tmp_path, "model.text_chunk_size=2", "model.text_checkpoint=never"))
    recomputed, r = _learned(tmp_path, _cfg(tmp_path, "model.text_chunk_size=2"))
    assert [(b["text_chunk_size"], b["text_checkpoint"]) for b in built] == [(2, "never"), (2, "auto")]
    assert torch.equal(k["state"]["ctx"], r["state"]["ctx"])  # several chunks, re-computed: same steps
    assert (kept["test_acc"], kept["val_acc"]) == (recomputed["test_acc"], recomputed["val_acc"])


def test_training_moves_the_prompt_and_logs_everything_to_mlflow(tmp_path):
    cfg = _cfg(tmp_path, "method.ctx_init=a photo of a", "train.epochs=4")
    uri = cfg.tracking.uri
    exp = tracking.ensure_experiment(uri, "unit")
    run_id = tracking.start_run(uri, exp, "unit-run")
    captured = {}

    class Capture(Session):
        def finish(self, metrics, learned):
            captured["state"] = learned

    metrics = run(cfg, WorkerContext(0, 1, CPU), run_id, Capture())
    tracking.finish_run(uri, run_id)
    client = MlflowClient(uri)
    data = client.get_run(run_id).data
    assert data.params["method.name"] == "coop"
    assert data.params["trainable_params"] == "256"
    assert len(data.params["split_fingerprint"]) == 64
    assert "RandomResizedCrop" in data.params["train_transform"]
    losses = [m.value for m in client.get_metric_history(run_id, "train_loss")]
    assert len(losses) == 4 and all(v == v for v in losses)
    lrs = [m.value for m in sorted(client.get_metric_history(run_id, "lr"), key=lambda m: m.step)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[1] == pytest.approx(cfg.train.lr)
    assert data.metrics["test_acc"] == pytest.approx(metrics["test_acc"])
    words = client.download_artifacts(run_id, "learned/learned_prompt_words.txt", str(tmp_path))
    text = Path(words).read_text()
    assert "ctx[0]:" in text and "ctx as text:" in text
    # the init spelled "a photo of a"; training moved it
    from vlprompt.methods.clip import load_backbone

    backbone = load_backbone(cfg.model.name, None)
    init = backbone.token_embedding(backbone.tokenize(["a photo of a"]))[0, 1:5]
    assert not torch.allclose(captured["state"]["ctx"], init)


def test_base_to_novel_reports_base_novel_and_harmonic_mean(tmp_path):
    cfg = _cfg(tmp_path, "data.protocol=base_to_novel")
    metrics = run(cfg, WorkerContext(0, 1, CPU), None, None)
    base, novel = metrics["base_acc"], metrics["novel_acc"]
    assert metrics["test_acc"] == base
    assert metrics["hm"] == pytest.approx(2 * base * novel / (base + novel) if base + novel else 0.0)


def test_too_many_shots_names_the_class(tmp_path):
    cfg = _cfg(tmp_path, "data.shots=500")
    with pytest.raises(ValueError, match="500"):
        run(cfg, WorkerContext(0, 1, CPU), None, None)


def _ddp_worker(rank, world, init_file, cfg_yaml, out):
    from omegaconf import OmegaConf

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = OmegaConf.create(cfg_yaml)
        states = {}

        class Capture(Session):
            def finish(self, metrics, learned):
                states.update(s=learned, m=metrics)

        run(cfg, WorkerContext(rank, world, CPU), None, Capture())
        if rank == 0:
            torch.save(states, out)
    finally:
        dist.destroy_process_group()


def test_two_workers_learn_what_one_worker_learns(tmp_path):
    """Data-parallel training is exact: same global batches, summed weighted gradients."""
    from omegaconf import OmegaConf

    cfg = _cfg(tmp_path, "train.batch_size=10", "data.shots=5")
    _, single = _learned(tmp_path, cfg)
    out = tmp_path / "ddp.pt"
    mp.start_processes(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), OmegaConf.to_yaml(cfg), str(out)),
        nprocs=2,
        start_method="fork",
    )
    ddp = torch.load(out)
    assert torch.allclose(ddp["s"]["ctx"], single["state"]["ctx"], atol=1e-5)
    assert ddp["m"]["test_acc"] == pytest.approx(single["metrics"]["test_acc"])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_runs_through_the_loop(tmp_path, name):
    """The method matrix: each registry entry trains (if it can) and evaluates in the one loop."""
    offline = {"promptkd": ("method.teacher_model=vlp-small", "method.teacher_pretrained=bundled")}
    protocol = "data.protocol=test_time" if capabilities(name).test_time_views else "data.protocol=few_shot"
    method = (f"method.name={name}", *offline.get(name, ()))
    cfg = _cfg(tmp_path, "train.epochs=2", protocol, method=method)
    if capabilities(name).source_stats is not None:  # its statistics, made by the stats command's code
        method = (*method, "method.source_dataset=synthetic", "method.n_views=9")
        cfg = _cfg(tmp_path, "train.epochs=2", protocol, method=method)
        made = source_stats.make(cfg, source_stats.plan(cfg), tmp_path / "stats", say=lambda _: None)
        cfg = _cfg(tmp_path, "train.epochs=2", protocol, method=(*method, f"method.source_stats={made}"))
    metrics, captured = _learned(tmp_path, cfg)
    assert 0.0 <= metrics["test_acc"] <= 100.0
    # the learned state is the trained parameters (plus BatchNorm statistics, which are state too)
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    learned = {k: v for k, v in captured["state"].items() if not k.endswith(statistics)}
    assert metrics["trainable_params"] == sum(v.numel() for v in learned.values())


def test_linear_probe_fits_on_train_features_and_logs_its_choice_of_c(tmp_path, monkeypatch):
    """The full-batch hook replaces SGD: weights are the train-split solution for the chosen C."""
    from vlprompt.datasets.images import ImageDataset, test_transform
    from vlprompt.methods.linear_probe import LinearProbe, solve
    from vlprompt.orchestrator.data import prepare_data

    seen = {}
    original_fit = LinearProbe.fit

    def recording_fit(self, train, val):
        seen.update(train=train, val=val, backbone=self.backbone)
        return original_fit(self, train, val)

    monkeypatch.setattr(LinearProbe, "fit", recording_fit)
    monkeypatch.chdir(tmp_path)  # the SQLite store's default artifact root is relative to the cwd
    cfg = _cfg(tmp_path, method=("method.name=linear_probe", "method.search_steps=2"))
    uri = cfg.tracking.uri
    run_id = tracking.start_run(uri, tracking.ensure_experiment(uri, "unit"), "probe")
    captured = {}

    class Capture(Session):
        def finish(self, metrics, learned):
            captured["state"] = learned

    metrics = run(cfg, WorkerContext(0, 1, CPU), run_id, Capture())
    tracking.finish_run(uri, run_id)
    data = MlflowClient(uri).get_run(run_id).data
    assert 0.0 <= metrics["test_acc"] <= 100.0 and data.metrics["test_acc"] == metrics["test_acc"]
    assert "train_loss" not in data.metrics  # no SGD epochs ran
    chosen = data.metrics["probe_c"]
    assert chosen > 0 and data.metrics["probe_val_acc"] == pytest.approx(metrics["val_acc"])
    assert data.params["train_transform"] == data.params["test_transform"]

    # fit saw the whole few-shot train split once, encoded with the test transform
    train, backbone = seen["train"], seen["backbone"]
    splits = prepare_data(cfg).tasks["synthetic"]
    assert train.labels.tolist() == [d.label for d in splits.train]
    tf = test_transform(backbone.image_size, backbone.image_mean, backbone.image_std)
    images = torch.stack([ImageDataset(splits.train[:3], tf)[i][0] for i in range(3)])
    with torch.no_grad():
        assert torch.allclose(train.features[:3], backbone.encode_image(images).float(), atol=1e-5)
    assert len(seen["val"]) == len(splits.val) > 0
    # the saved weights are the train-only solve with the chosen C (val only picked C)
    x = torch.nn.functional.normalize(train.features, dim=-1)
    expected = solve(x, train.labels, len(splits.classnames), chosen)
    assert torch.allclose(captured["state"]["weight"], expected.weight.float(), atol=1e-6)
    assert torch.allclose(captured["state"]["bias"], expected.bias.float(), atol=1e-6)


def test_cross_dataset_transfer_scores_each_target_with_its_own_classes(tmp_path):
    """Zero-shot 'trained' on one dataset and transferred must equal zero-shot run on the target."""
    targets = "data.eval_targets=[eurosat,oxford_pets]"
    stand_ins = "data.generate_stand_ins=true"  # the benchmarks' procedural stand-ins, asked for
    cfg = _cfg(tmp_path, "data.protocol=cross_dataset", targets, stand_ins, method=("method.name=zeroshot",))
    metrics = run(cfg, WorkerContext(0, 1, CPU), None, None)
    for name in ("eurosat", "oxford_pets"):
        direct = run(
            _cfg(tmp_path, f"data.dataset={name}", stand_ins, method=("method.name=zeroshot",)),
            WorkerContext(0, 1, CPU),
            None,
            None,
        )
        assert metrics[f"target_acc/{name}"] == pytest.approx(direct["test_acc"])
    assert metrics["target_acc_mean"] == pytest.approx(
        (metrics["target_acc/eurosat"] + metrics["target_acc/oxford_pets"]) / 2
    )
    # a prompt method transfers its shared context; class-specific context cannot transfer
    coop = _cfg(tmp_path, "data.protocol=cross_dataset", targets, "train.epochs=1")
    assert 0 <= run(coop, WorkerContext(0, 1, CPU), None, None)["target_acc/eurosat"] <= 100
    csc = _cfg(tmp_path, "data.protocol=domain_generalisation", targets, "method.csc=true", "train.epochs=1")
    with pytest.raises(ValueError, match="does not transfer to dataset 'eurosat'"):
        run(csc, WorkerContext(0, 1, CPU), None, None)
