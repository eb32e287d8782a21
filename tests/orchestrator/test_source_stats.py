"""The source-statistics command on generated data, what a run logs of the file it read, and the
driver's refusals before Ray (``orchestrator/source_stats.py``, ``preflight.check_source_stats``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import REPO, ray_processes, stop_group, write_class_folders
from vlprompt import datasets as vds
from vlprompt.methods import stats_file
from vlprompt.methods.promptalign import stats_inputs
from vlprompt.methods.source_stats import GLOBAL, PER_CLASS, load_stats
from vlprompt.orchestrator import source_stats, tracking
from vlprompt.orchestrator.config import ConfigError, load_config, resolve_paths
from vlprompt.orchestrator.loop import WorkerContext, run
from vlprompt.orchestrator.preflight import check_source_stats, preflight

pytestmark = pytest.mark.e2e  # builds the tiny model and streams images through it (seconds)

DATASETS = ("imagenet", "imagenet_sketch")


def overrides(root: Path, *more: str) -> list[str]:
    """The run's overrides, shared by the command and the run (the same model, on small data)."""
    return [
        "model.name=vlp-tiny",
        "model.pretrained=null",
        f"data.root={root}",
        "data.eval_targets=[imagenet_sketch]",
        "method.n_views=9",
        "sweep.space={}",
        "sweep.metric=test_acc",
        *more,
    ]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Generated ImageNet-layout data, and the statistics file the command makes for it."""
    tmp = tmp_path_factory.mktemp("stats")
    for name in DATASETS:
        vds.generate_dataset(name, tmp / "data", num_classes=3, images_per_class=4)
    out = tmp / "cache"
    assert (
        source_stats.main(["--config", "promptalign", "--out-dir", str(out), *overrides(tmp / "data")]) == 0
    )
    (file,) = out.glob("*.safetensors")
    return tmp, file


def test_the_command_writes_the_models_statistics_under_its_fingerprint(made, capsys) -> None:
    tmp, file = made
    metadata, tensors = stats_file.read_header(file)
    splits = vds.load_dataset("imagenet", tmp / "data")
    assert file.name == f"{metadata['fingerprint'][:16]}-imagenet-train.safetensors"
    assert json.loads(metadata["classes"]) == list(splits.classnames)
    assert metadata["images"] == str(len(splits.train))
    assert (metadata["source_dataset"], metadata["source_split"], metadata["source_images_per_class"]) == (
        "imagenet",
        "train",
        "0",
    )
    assert metadata["blocks"] == "0,1" and metadata["backbone"].startswith("vlp-tiny visual sha256:")
    assert "Resize(size=32" in metadata["transform_repr"] and "CenterCrop" in metadata["transform_repr"]
    assert tensors["class_mean"]["shape"] == [
        3,
        2,
        17 + 2,
        64,
    ]  # classes, blocks, tokens (+ 2 prompts), width
    # again: the file is this model's, kept as it is
    before = file.stat().st_mtime_ns
    args = ["--config", "promptalign", "--out-dir", str(file.parent), *overrides(tmp / "data")]
    assert source_stats.main(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert any("up to date" in line for line in printed)
    assert printed[-1] == f"method.source_stats={file}"
    assert file.stat().st_mtime_ns == before


def test_a_capped_source_has_its_own_file_and_counts(made) -> None:
    tmp, file = made
    args = ["--config", "promptalign", "--out-dir", str(file.parent)]
    assert source_stats.main([*args, *overrides(tmp / "data", "method.source_images_per_class=1")]) == 0
    capped = next(file.parent.glob("*-imagenet-train-1pc.safetensors"))
    stats = load_stats(
        capped,
        {},
        source={"images_per_class": 1},
        classes=vds.load_dataset("imagenet", tmp / "data").classnames,
    )
    assert stats.class_rows["class_count"].tolist() == [1, 1, 1] and stats.metadata["images"] == "3"
    assert not torch.equal(stats.mean, load_stats(file, {}).mean)


@pytest.mark.slow  # ~20 s: a whole test-time run, each image adapted on its views
def test_the_run_reads_the_file_and_logs_it(made, monkeypatch) -> None:
    tmp, file = made
    logged: dict[str, object] = {}
    monkeypatch.setattr(tracking, "log_params", lambda uri, run_id, params: logged.update(params))
    for name in ("set_tags", "log_metrics", "log_artifact_files"):
        monkeypatch.setattr(tracking, name, lambda *a, **k: None)
    short = ("method.n_views=3", "method.selection_p=0.34")  # 1 + 3 images per test image, keeps 1
    cfg = load_config("promptalign", overrides(tmp / "data", f"method.source_stats={file}", *short))
    cfg = resolve_paths(cfg, tmp)
    check_source_stats(cfg)  # the driver's check passes
    metrics = run(cfg, WorkerContext(0, 1, torch.device("cpu")), "run-id", None)
    assert 0 <= metrics["test_acc"] <= 100 and "target_acc/imagenet_sketch" in metrics
    assert logged["source_stats.file"] == str(file)
    assert logged["source_stats.fingerprint"] == stats_file.read_header(file)[0]["fingerprint"]
    assert logged["source_stats.source"] == "imagenet/train"


def test_a_named_file_of_another_model_is_not_overwritten(made, capsys) -> None:
    tmp, _ = made
    named = tmp / "named.safetensors"
    base = ["--config", "promptalign", *overrides(tmp / "data", f"method.source_stats={named}")]
    assert source_stats.main(base) == 0 and named.is_file()  # written where the config says
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"method.source_stats={named}"
    assert source_stats.main([*base, "method.align_layers=[1]"]) == 2
    assert re.search(
        r"named\.safetensors exists and is not this configuration's.*blocks.*--force", capsys.readouterr().err
    )
    assert source_stats.main([*base, "method.align_layers=[1]", "--force"]) == 0
    assert stats_file.read_header(named)[0]["blocks"] == "1"


def test_bad_input_is_refused_before_the_model_is_built(made, capsys, monkeypatch, tmp_path) -> None:
    tmp, _ = made
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(source_stats, "build_model", lambda *a: pytest.fail("built"))
    cases = {
        "method.name=tpt": r"method.name=tpt aligns to no source statistics; methods that do: promptalign",
        "method.source_dataset=imagenett": r"unknown dataset 'imagenett'. Did you mean 'imagenet'",
        f"data.root={tmp / 'nowhere'}": r"source dataset 'imagenet'.*does not exist",
        "method.align_layers=[]": r"align_layers must be distinct image block indices",
        f"method.source_folder={tmp / 'gone'}": r"source_folder=\S+gone: \S+ does not exist.*<class name>",
        f"method.source_folder={empty}": r"source_folder=\S+empty: \S+ holds no class folder; expected",
    }
    for override, message in cases.items():
        assert source_stats.main(["--config", "promptalign", *overrides(tmp / "data"), override]) == 2
        assert re.search(message, capsys.readouterr().err), override


def test_the_driver_refuses_a_missing_or_foreign_file_before_ray(made) -> None:
    tmp, file = made

    def check(*more: str) -> None:
        check_source_stats(resolve_paths(load_config("promptalign", overrides(tmp / "data", *more)), tmp))

    with pytest.raises(
        ConfigError, match=r"method.source_stats is empty.*aligns to source statistics.*source_stats\.py"
    ):
        check()
    check("method.align_weight=0")  # TPT on MaPLe needs no file
    with pytest.raises(
        ConfigError, match=r"method.source_stats: source statistics .*gone\.safetensors do not exist"
    ):
        check(f"method.source_stats={tmp / 'gone.safetensors'}")
    with pytest.raises(ConfigError, match=r"made with backbone 'vlp-tiny', this run's model is 'vlp-small'"):
        check(f"method.source_stats={file}", "model.name=vlp-small")
    with pytest.raises(ConfigError, match=r"blocks is '0,1', this model's '0'"):
        check(f"method.source_stats={file}", "method.align_layers=[0]")
    with pytest.raises(ConfigError, match=r"source_split is 'train', the config's 'test'"):
        check(f"method.source_stats={file}", "method.source_split=test")
    broken = tmp / "broken.safetensors"
    broken.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(ConfigError, match=r"broken\.safetensors are truncated"):
        check(f"method.source_stats={broken}")


def test_promptalign_runs_only_where_nothing_is_trained() -> None:
    with pytest.raises(
        ConfigError, match=r"method.name=promptalign adapts to each test image.*data.protocol=test_time"
    ):
        load_config("promptalign", ["data.protocol=domain_generalisation"])


# ---------------------------------------------------------------- a folder of images as the source
PROXY = ("tabby cat", "baluster / handrail", "Faces", "sea lion", "cab")


@pytest.fixture(scope="module")
def folder_made(made, tmp_path_factory) -> tuple[Path, Path]:
    """A class-folder proxy and the statistics file the command makes from it (promptsync)."""
    tmp, _ = made
    folder = write_class_folders(tmp_path_factory.mktemp("proxy") / "proxy", PROXY, per_class=3)
    args = ["--config", "promptsync", "--out-dir", str(tmp / "cache")]
    assert source_stats.main([*args, *overrides(tmp / "data", f"method.source_folder={folder}")]) == 0
    (file,) = (tmp / "cache").glob("*-folder-proxy-*.safetensors")
    return folder, file


def test_a_folder_source_is_recorded_by_its_path_with_its_class_names(folder_made) -> None:
    folder, file = folder_made
    assert re.fullmatch(r"[0-9a-f]{16}-folder-proxy-[0-9a-f]{8}\.safetensors", file.name)
    metadata, tensors = stats_file.read_header(file)
    source = (metadata["source_folder"], metadata["source_dataset"], metadata["source_split"])
    assert source == (str(folder), "", "")
    # sorted folders: Faces, cab, class0001 (named by classnames.txt), sea_lion, tabby_cat
    assert json.loads(metadata["classes"]) == ["Faces", "cab", "baluster / handrail", "sea lion", "tabby cat"]
    assert metadata["images"] == "15" and tensors["class_count"]["shape"] == [5]
    stats = load_stats(file, {}, classes=["sea lion", "baluster / handrail"])
    assert stats.class_rows["class_count"].tolist() == [3, 3]
    assert stats_inputs(stats)["source_stats.source"] == f"folder {folder}"  # what a run logs


def test_a_file_is_refused_for_another_source_by_its_name(made, folder_made, tmp_path) -> None:
    tmp, dataset_file = made
    folder, file = folder_made

    def check(*more: str) -> None:
        cfg = load_config("promptsync", overrides(tmp / "data", *more))
        check_source_stats(resolve_paths(cfg, tmp))

    check(f"method.source_stats={file}", f"method.source_folder={folder}")  # its own source
    with pytest.raises(ConfigError, match=rf"source_folder is '{re.escape(str(folder))}', the config's ''"):
        check(f"method.source_stats={file}")  # the default source, ImageNet train
    other = write_class_folders(tmp_path / "other", PROXY)
    with pytest.raises(ConfigError, match=rf"the config's '{re.escape(str(other))}'"):
        check(f"method.source_stats={file}", f"method.source_folder={other}")
    with pytest.raises(ConfigError, match=r"source_dataset is 'imagenet', the config's ''.*folder is ''"):
        check(f"method.source_stats={dataset_file}", f"method.source_folder={folder}")


def test_the_driver_refuses_a_file_lacking_a_scored_class_before_ray(made, folder_made) -> None:
    tmp, dataset_file = made
    folder, file = folder_made

    def check(*more: str) -> None:
        preflight(resolve_paths(load_config("promptsync", overrides(tmp / "data", *more)), tmp))

    with pytest.raises(
        ConfigError,
        match=r"method.source_stats: source statistics \S+ have no images of 3 of the 3 classes needed: "
        r"'tench', 'goldfish', 'great white shark' \(the file covers 5 classes of folder",
    ):
        check(f"method.source_stats={file}", f"method.source_folder={folder}")
    check(f"method.source_stats={dataset_file}")  # ImageNet's train split: ImageNet's and Sketch's classes


def test_a_class_the_folder_lacks_is_named_with_a_near_miss(folder_made) -> None:
    _, file = folder_made
    with pytest.raises(
        ValueError,
        match=r"no images of 2 of the 3 classes needed: 'Tabby Cat', 'dog' \(the file covers 5 classes of "
        r"folder '\S+proxy'\) -- it has 'tabby cat' for 'Tabby Cat': class names are compared exactly",
    ):
        load_stats(file, {}, classes=["cab", "Tabby Cat", "dog"])


def test_a_missing_folder_is_refused_before_torch_is_imported(tmp_path) -> None:
    code = (
        "import sys\n"
        "from vlprompt.orchestrator.source_stats import main\n"
        f"rc = main(['--config', 'promptsync', 'method.source_folder={tmp_path / 'gone'}'])\n"
        "print(rc, sorted(m for m in ('torch', 'ray', 'open_clip') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "2 []", done.stdout + done.stderr
    assert re.search(r"config error: method.source_folder=\S+gone: \S+gone does not exist", done.stderr)


def test_an_image_that_cannot_be_read_is_named(folder_made, made, tmp_path, capsys) -> None:
    tmp, _ = made
    folder = write_class_folders(tmp_path / "proxy", PROXY[:2])
    bad = folder / "tabby_cat" / "broken.png"
    bad.write_bytes(b"not a png")
    args = ["--config", "promptalign", "--out-dir", str(tmp_path), "--no-ray"]
    assert source_stats.main([*args, *overrides(tmp / "data", f"method.source_folder={folder}")]) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"error: cannot read image {re.escape(str(bad))}: .*", err)


# ---------------------------------------------------------------- the Ray Data pass
@pytest.mark.slow  # a Ray Data job: decoding tasks and an encoder actor on the test's Ray (~20 s)
def test_the_ray_data_pass_writes_the_in_process_file(made, local_ray, tmp_path, capsys) -> None:
    tmp, _ = made
    folder = write_class_folders(tmp_path / "proxy", PROXY, per_class=3)
    # batches of 4 of 15 images: batches that straddle classes, partial sums of several batches per class
    base = ["--config", "promptsync", *overrides(tmp / "data", f"method.source_folder={folder}")]
    base.append("data.encode_batch_size=4")
    assert source_stats.main([*base, "--out-dir", str(tmp_path / "here"), "--no-ray"]) == 0
    assert source_stats.main([*base, "--out-dir", str(tmp_path / "ray"), "--ray"]) == 0
    printed = capsys.readouterr().out
    assert "on Ray Data: 15 images in 4 batches, 1 encoder actor(s) on cpu" in printed
    progress = re.findall(r"source statistics: (\d+)/15 images \([\d.]+/s, ~\d+ s left\)", printed)
    assert progress[-1] == "15" and len(progress) >= 2 * 4  # a line per batch (15 < 20), both runs
    (here,) = (tmp_path / "here").glob("*.safetensors")
    (there,) = (tmp_path / "ray").glob("*.safetensors")
    assert here.name == there.name  # one fingerprint: the actors built the driver's model
    assert stats_file.read_header(here)[0] == stats_file.read_header(there)[0]  # metadata, classes
    with safe_open(str(here), "pt") as a, safe_open(str(there), "pt") as b:
        assert set(a.keys()) == set(b.keys()) == {*GLOBAL, *PER_CLASS}
        for key in sorted(a.keys()):
            torch.testing.assert_close(b.get_tensor(key), a.get_tensor(key), rtol=1e-6, atol=1e-7)
    assert local_ray.is_initialized()  # an attached driver leaves the test's Ray running


@pytest.mark.slow  # a subprocess that starts its own Ray (~30 s)
def test_an_image_a_ray_worker_cannot_read_stops_the_job_naming_it(made, tmp_path) -> None:
    tmp, _ = made
    folder = write_class_folders(tmp_path / "proxy", PROXY[:2])
    bad = folder / "tabby_cat" / "broken.png"
    bad.write_bytes(b"not a png")
    ray_tmp = tempfile.mkdtemp(prefix="vlps", dir="/tmp")  # short: Ray's socket paths must fit
    script = str(REPO / "experiments" / "source_stats.py")
    more = [f"method.source_folder={folder}", "resources.local_dashboard=false"]
    cmd = [sys.executable, script, "--config", "promptalign", "--ray", *overrides(tmp / "data", *more)]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env={**os.environ, "RAY_TMPDIR": ray_tmp},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, out[-2000:] + err[-4000:]
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        named = rf"error: source statistics: cannot read image {re.escape(str(bad))}: .*"
        assert errors and re.fullmatch(named, errors[-1]), err[-4000:]
        assert ray_processes(ray_tmp, wait=20) == []  # the Ray it started is stopped
    finally:
        stop_group(proc)
        for pid in ray_processes(ray_tmp, wait=0):
            os.kill(pid, 9)
        shutil.rmtree(ray_tmp, ignore_errors=True)
