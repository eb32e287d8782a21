"""The front door refuses bad input before Ray starts: one line naming the key or file, exit 2.

Each case runs ``experiments/benchmark.py``'s ``main`` in this process with Ray's start-up
replaced by a failure, so a case that got as far as starting Ray fails the test. The cases cover
what the config checks catch (keys, types, values, protocol × method, the search space, YAML)
and what the data checks catch before Ray (a wrong data root, a missing split file, more shots
than a class has). One case runs as a real subprocess to show the driver gets there without
importing torch, open_clip or Ray.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlprompt import datasets as vds
from vlprompt.orchestrator import sweep

REPO = Path(__file__).resolve().parents[2]
BENCHMARK = REPO / "experiments" / "benchmark.py"
UNIT = str(REPO / "tests" / "assets" / "unit.yaml")


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_script", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFIG_CASES = [
    (["data.shotz=4"], "data.shotz"),
    (["trian.epochs=4"], "trian"),
    (["method.name=cop"], "did you mean"),
    (["--config", "no_such_preset"], "quickstart"),
    (["data.dataset=imagenet_x"], "imagenet"),
    (["method.n_ctxx=4"], "n_ctxx"),
    (["train.epochs=ten"], "train.epochs"),
    (["train.epochs=0"], "train.epochs"),
    (["train.lr=-0.1"], "train.lr"),
    (["train.weight_decay=-1"], "train.weight_decay"),
    (["train.momentum=1.5"], "train.momentum"),
    (["train.crop_min_scale=0"], "train.crop_min_scale"),
    (["data.protocol=transductive"], "data.protocol"),
    (["model.name=ViT-B-61"], "ViT-B-16"),
    (["model.name=vlp-tiny", "model.pretrained=bundled"], "bundled"),
    (["resources.use_gpu=maybe"], "resources.use_gpu"),
    (["sweep.metric=hm"], "sweep.metric"),
    (["data.protocol=cross_dataset", "sweep.space={}"], "data.eval_targets"),
    (["data.eval_targets=[eurosat]"], "cross_dataset"),
    (["data.dataset=general10", "sweep.space={}"], "multi_task"),
    (["data.protocol=test_time", "method.name=coop", "sweep.space={}"], "trains nothing"),
    (["method.name=tpt", "sweep.space={}"], "data.protocol=test_time"),
    (["method.class_token_position=start"], "class_token_position"),
    (["method.n_ctx=0"], "n_ctx"),
    (["method.name=kgcoop", "method.lam=-1"], "lam"),
    (["method.name=promptkd", "method.teacher_method=cocoop"], "teacher_method"),
    (["method.name=promptkd", "method.teacher_model=ViT-X"], "teacher_model"),
    (["method.name=promptkd", "method.teacher_options={n_ctxx: 4}", "method.teacher_method=coop"], "n_ctxx"),
    (["sweep.space={method.n_ctxx: {choice: [4, 8]}}"], "method.n_ctxx"),
    (["sweep.space={method.name: {choice: [coop, zeroshot]}, method.n_ctx: {choice: [4]}}"], "when"),
    (["sweep.space={train.epochs: {choice: [2, ten]}}"], "train.epochs"),
    (["sweep.space={data.shotz: {choice: [1]}}"], "data.shotz"),
    (["sweep.space={data.shots: [1, 2]}"], "choice"),
    (["sweep.space={data.shots: {choice: [1], when: {seed: 1}}}"], "seed"),
    (["data.shots"], "section.key=value"),
]


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setattr(sweep, "connect_ray", lambda *a, **k: pytest.fail("Ray must not start"))


def _refused(benchmark, argv, message, capsys) -> None:
    assert benchmark.main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert last.startswith("config error: ") and message.lower() in last.lower(), err


@pytest.mark.parametrize(
    ("argv", "message"), CONFIG_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_bad_config_exits_2_with_one_line(benchmark, argv, message, capsys, no_ray):
    _refused(benchmark, ["--config", UNIT, *argv] if "--config" not in argv else argv, message, capsys)


def test_yaml_syntax_error_names_the_file_and_line(benchmark, tmp_path, capsys, no_ray):
    preset = tmp_path / "broken.yaml"
    preset.write_text("name: broken\ndata:\n  dataset: [eurosat\n  shots: 4\n")
    _refused(benchmark, ["--config", str(preset)], "broken.yaml", capsys)
    preset.write_text("- a list\n- not sections\n")
    _refused(benchmark, ["--config", str(preset)], "mapping", capsys)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    vds.generate_dataset("synthetic", tmp_path / "data", num_classes=4, images_per_class=10)
    return tmp_path


def _data_argv(root: Path, *overrides: str) -> list[str]:
    return ["--config", UNIT, f"tracking.uri=sqlite:///{root}/mlflow.db", "sweep.space={}", *overrides]


def test_missing_data_root_is_one_error_before_ray(benchmark, workdir, capsys, no_ray):
    _refused(
        benchmark,
        _data_argv(workdir, "data.root=/no/such/root", "data.generate_missing=false"),
        "/no/such/root",
        capsys,
    )


def test_a_typo_in_the_data_root_never_trains_on_fake_data(benchmark, workdir, capsys, no_ray):
    """The quickstart generates missing *procedural* data; a real benchmark under a typo is an error."""
    argv = ["--config", "quickstart", "data.dataset=eurosat", "data.root=/no/such/root"]
    _refused(benchmark, argv, "/no/such/root", capsys)
    assert not Path("/no/such/root").exists()


def test_missing_benchmark_folder_says_how_to_get_a_stand_in(benchmark, workdir, capsys, no_ray):
    _refused(benchmark, _data_argv(workdir, "data.dataset=eurosat"), "generate_stand_ins", capsys)


def test_more_shots_than_a_class_has_is_refused_before_ray(benchmark, workdir, capsys, no_ray):
    _refused(benchmark, _data_argv(workdir, "data.shots=500"), "shots=500", capsys)
    sweeping = _data_argv(workdir, "sweep.space={data.shots: {choice: [2, 500]}}")
    _refused(benchmark, sweeping, "500", capsys)


def test_missing_split_file_names_it(benchmark, workdir, capsys, no_ray):
    split = workdir / "data" / "synthetic" / vds.get_entry("synthetic").split_file
    split.unlink()
    _refused(benchmark, _data_argv(workdir, "data.make_missing_splits=false"), str(split), capsys)


def test_the_driver_refuses_without_importing_torch_or_ray(tmp_path):
    """A real process: the config is refused before torch, open_clip or Ray are imported."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('b', {str(BENCHMARK)!r})\n"
        "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)\n"
        "rc = b.main(['method.name=coop', 'data.protocol=test_time', 'sweep.space={}'])\n"
        "heavy = [m for m in ('torch', 'open_clip', 'ray', 'mlflow') if m in sys.modules]\n"
        "print('HEAVY', heavy); sys.exit(rc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=os.environ.copy()
    )
    assert done.returncode == 2, done.stderr
    assert "HEAVY []" in done.stdout and "trains nothing" in done.stderr


@pytest.mark.parametrize(
    ("argv", "resume", "overrides"),
    [
        (["--resume"], True, []),
        (["--resume", "quickstart-3"], "quickstart-3", []),
        (["--resume", "train.epochs=3", "seed=2"], True, ["train.epochs=3", "seed=2"]),  # not a name
        (["seed=2"], False, ["seed=2"]),
    ],
)
def test_resume_takes_an_optional_sweep_name_never_an_override(benchmark, argv, resume, overrides):
    args = benchmark._arguments(argv)
    assert args.resume == resume and args.overrides == overrides


def test_resume_without_a_sweep_to_resume_is_one_error_before_ray(benchmark, workdir, capsys, no_ray):
    assert benchmark.main(["--config", "quickstart", "--resume", f"sweep.storage_path={workdir}/runs"]) == 2
    err = capsys.readouterr().err
    assert "no sweep 'quickstart'" in err and "run without --resume" in err


def test_the_printed_mlflow_ui_command_runs_without_the_venv_activated(benchmark):
    command = benchmark.mlflow_command()
    assert Path(command).is_absolute() and Path(command).parent == Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/bin:/bin"  # no venv on the PATH
    done = subprocess.run([command, "--version"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "mlflow" in done.stdout.lower()
