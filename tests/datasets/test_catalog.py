"""The catalog: entries are well formed, names are the reference ones, lookups fail helpfully."""

from __future__ import annotations

import math

import pytest

import vlprompt.datasets as vds
from vlprompt.datasets import CATALOG, get_entry
from vlprompt.datasets.__main__ import main as cli_main
from vlprompt.datasets.benchmarks import BENCHMARKS

EUROSAT_NAMES = (
    "Annual Crop Land",
    "Forest",
    "Herbaceous Vegetation Land",
    "Highway or Road",
    "Industrial Buildings",
    "Pasture Land",
    "Permanent Crop Land",
    "Residential Buildings",
    "River",
    "Sea or Lake",
)


@pytest.mark.parametrize("key", sorted(CATALOG))
def test_entry_is_well_formed(key: str) -> None:
    entry = CATALOG[key]
    assert entry.name == key
    assert entry.template.count("{}") == 1
    assert entry.template.format("x") != entry.template
    assert len(entry.classnames) == len(entry.class_folders) == len(entry.styles)
    assert len(set(entry.styles)) == len(entry.styles)
    assert all("_" not in name for name in entry.classnames)


def test_required_entries_and_templates() -> None:
    assert {"eurosat", "oxford_pets", "synthetic"} <= set(CATALOG)
    assert get_entry("eurosat").template == "a centered satellite photo of {}."
    assert get_entry("oxford_pets").template == "a photo of a {}, a type of pet."
    assert get_entry("synthetic").template == "a photo of a {}."


def test_eurosat_layout_and_renamed_classes() -> None:
    entry = get_entry("eurosat")
    assert (entry.folder, entry.image_dir, entry.split_file) == ("eurosat", "2750", "split_zhou_EuroSAT.json")
    assert entry.classnames == EUROSAT_NAMES
    assert entry.class_folders[0] == "AnnualCrop"
    assert list(entry.class_folders) == sorted(entry.class_folders)  # label = sorted folder index


def test_oxford_pets_breeds() -> None:
    entry = get_entry("oxford_pets")
    assert (entry.folder, entry.image_dir, entry.split_file) == (
        "oxford_pets",
        "images",
        "split_zhou_OxfordPets.json",
    )
    assert len(entry.classnames) == 37
    assert entry.classnames[:3] == ("abyssinian", "american bulldog", "american pit bull terrier")
    assert entry.classnames[-1] == "yorkshire terrier"
    assert entry.class_folders[9] == "British_Shorthair"
    assert entry.classnames[9] == "british shorthair"
    # official class ids are in case-insensitive alphabetical order
    assert list(entry.class_folders) == sorted(entry.class_folders, key=str.lower)


def test_synthetic_base_and_novel_halves_share_words() -> None:
    entry = get_entry("synthetic")
    n = len(entry.classnames)
    assert n >= 10
    m = math.ceil(n / 2)
    for half in (entry.styles[:m], entry.styles[m:]):
        assert {c for c, _ in half} == {c for c, _ in entry.styles}
        assert {s for _, s in half} == {s for _, s in entry.styles}
    assert entry.classnames[0] == "red circle"
    assert entry.class_folders[0] == "red_circle"


def test_unknown_name_lists_known_and_suggests() -> None:
    with pytest.raises(ValueError) as err:
        get_entry("eurosta")
    message = str(err.value)
    assert "'eurosta'" in message
    assert "Did you mean 'eurosat'?" in message
    assert ", ".join(sorted(CATALOG)) in message


def test_unknown_name_without_close_match_still_lists_known() -> None:
    with pytest.raises(ValueError, match="Known datasets: ") as err:
        get_entry("zzzzzz")
    assert ", ".join(sorted(CATALOG)) in str(err.value)
    assert "Did you mean" not in str(err.value)


def test_bad_entry_is_rejected() -> None:
    entry = get_entry("synthetic")
    with pytest.raises(ValueError, match="exactly one"):
        vds.CatalogEntry(**{**entry.__dict__, "template": "a photo of {} {}."})
    with pytest.raises(ValueError, match="must be equal"):
        vds.CatalogEntry(**{**entry.__dict__, "classnames": entry.classnames[:-1]})


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    for key in CATALOG:
        assert key in out
    assert "eurosat/2750/AnnualCrop/AnnualCrop_1.jpg" in out


@pytest.mark.parametrize("key", sorted(CATALOG))
def test_procedural_means_generated_with_no_download(key: str) -> None:
    """``data.generate_missing`` writes procedural data only for these entries unless stand-ins are
    asked for: the synthetic set and the small world, never a real benchmark's stand-in."""
    entry = CATALOG[key]
    assert entry.procedural is (key == "synthetic" or key.startswith("sw_"))
    if entry.procedural:
        assert "(generated, no download)" in entry.description
        assert entry.real_num_classes == 0  # the class lists are the whole dataset


def test_every_real_benchmark_is_a_stand_in() -> None:
    real = {key for key, entry in CATALOG.items() if not entry.procedural}
    assert real == {*BENCHMARKS, "eurosat", "oxford_pets", "fashion20"}
