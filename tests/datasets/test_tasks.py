"""Task sources for the multi-task protocol: groups, fashion20, single datasets; names checked early."""

from __future__ import annotations

from pathlib import Path

import pytest

import vlprompt.datasets as vds
from vlprompt.datasets import (
    CATALOG,
    GROUPS,
    TaskData,
    cached_fewshot,
    check_task_source,
    generate_dataset,
    get_entry,
    is_multitask,
    load_dataset,
    load_tasks,
    task_names,
)
from vlprompt.datasets import tasks as vtasks
from vlprompt.datasets.__main__ import main as cli_main
from vlprompt.datasets.catalog import SMALLWORLD_TASKS

COOP_11 = (  # CoOp's 11 few-shot datasets (KaiyangZhou/CoOp DATASETS.md)
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
)  # fmt: skip


@pytest.fixture(scope="module")
def general10_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every General-10 member generated small: 2 classes x 4 images (2/1/1)."""
    root = tmp_path_factory.mktemp("g10")
    for name in GROUPS["general10"]:
        generate_dataset(name, root, images_per_class=4, num_classes=2, image_size=8)
    return root


def test_groups() -> None:
    assert set(GROUPS["general10"]) == set(COOP_11) - {"imagenet"}
    assert GROUPS["general10"][:3] == ("caltech101", "dtd", "eurosat")  # SoftCPT general10.py order
    assert GROUPS["sw_all"] == SMALLWORLD_TASKS
    assert not set(GROUPS) & set(CATALOG)  # a name is a group or a dataset, never both
    for name in GROUPS:
        check_task_source(name)


def test_names_without_data() -> None:
    assert task_names("general10") == GROUPS["general10"]
    assert task_names("eurosat") == ("eurosat",)
    assert task_names("fashion20") == ("fashion20",)  # datasets only: its tasks need the data
    assert is_multitask("general10") and is_multitask("sw_all") and is_multitask("fashion20")
    assert not is_multitask("eurosat")


@pytest.mark.parametrize(("name", "close"), [("general11", "general10"), ("fashon20", "fashion20")])
def test_unknown_source_suggests_and_lists(name: str, close: str) -> None:
    for check in (check_task_source, task_names, is_multitask, lambda n: load_tasks(n, "/nowhere")):
        with pytest.raises(
            ValueError, match=rf"unknown dataset or task group '{name}'\. Did you mean '{close}'\?"
        ):
            check(name)
    with pytest.raises(ValueError, match=r"Task groups: general10, sw_all; datasets: caltech101, dtd"):
        check_task_source("zzzzzz")


def test_group_with_an_unknown_member(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(vtasks.GROUPS, "broken", ("eurosat", "eurosta"))
    with pytest.raises(ValueError, match=r"task group 'broken': unknown dataset 'eurosta'\. Did you mean"):
        check_task_source("broken")


def test_general10_loads_ten_tasks_by_name(general10_root: Path) -> None:
    tasks = load_tasks("general10", general10_root)
    assert list(tasks) == list(GROUPS["general10"])
    for key, task in tasks.items():
        assert isinstance(task, TaskData)
        assert task.splits == load_dataset(key, general10_root)
        assert task.splits.name == key and task.splits.num_classes == 2
        assert task.cache_dir == general10_root / get_entry(key).folder


def test_group_member_errors_name_the_group(general10_root: Path, tmp_path: Path) -> None:
    for name in GROUPS["general10"][:-1]:
        generate_dataset(name, tmp_path, images_per_class=4, num_classes=2, image_size=8)
    with pytest.raises(
        FileNotFoundError,
        match=r"task group 'general10', member 'ucf101': dataset 'ucf101' .*ucf101 does not exist",
    ):
        load_tasks("general10", tmp_path)


def test_a_single_dataset_is_one_task(general10_root: Path) -> None:
    tasks = load_tasks("eurosat", general10_root)
    assert list(tasks) == ["eurosat"]
    assert tasks["eurosat"].splits == load_dataset("eurosat", general10_root)
    assert tasks["eurosat"].cache_dir == general10_root / "eurosat"
    with pytest.raises(FileNotFoundError, match=r"dataset 'dtd' .*does not exist"):  # no group prefix
        load_tasks("dtd", general10_root / "empty")


def test_fashion20_tasks_get_their_own_fewshot_cache(tmp_path: Path) -> None:
    generate_dataset("fashion20", tmp_path, images_per_class=6, image_size=8, num_classes=2)
    tasks = load_tasks("fashion20", tmp_path)
    assert list(tasks) == ["fashion20/pants_length", "fashion20/pants_fit"]
    first = tasks["fashion20/pants_fit"]
    subset = cached_fewshot(first.splits, 2, 1, first.cache_dir)
    cache = tmp_path / "fashion20" / "split_fewshot_mt" / "1" / "split_fewshot" / "shot_2-seed_1.json"
    assert cache.is_file()
    assert sorted(d.label for d in subset.train) == [0, 0, 1, 1, 2, 2, 3, 3]  # K per class of the task
    assert cached_fewshot(first.splits, 2, 1, first.cache_dir) == subset


def test_exports() -> None:
    for name in ("GROUPS", "TaskData", "check_task_source", "is_multitask", "load_tasks", "task_names"):
        assert name in vds.__all__ and getattr(vds, name) is getattr(vtasks, name)


def test_cli_check_and_list_groups(general10_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["check", "general10", "--root", str(general10_root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "general10: 10 tasks, 20 classes"
    assert out[1] == "caltech101: 2 classes; train 4, val 2, test 2"
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    assert "general10      10 tasks    caltech101, dtd, eurosat" in out
    assert "sw_all          5 tasks    sw_objects" in out
