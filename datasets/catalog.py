"""The dataset catalog: one declarative ``CatalogEntry`` per dataset, in one explicit dict.

An entry is *data* (like an open_clip model config, ``entry.py``): where the dataset lives
under the data root, which on-disk layout it has (``layout_name``, a key of
``layouts.LAYOUTS``), the hand-crafted zero-shot template, and what the procedural generator
needs to write a stand-in in that layout (on-disk class names, file-name pattern, one
colour/shape style per class). Adding a dataset is adding one entry to ``CATALOG``; nothing
is registered by import side effects (CoOp issue #38). Each entry is checked against its
layout when the catalog is built, so a misnamed layout or rule fails at import.

Layouts, split-file names, templates and class renames follow ``KaiyangZhou/CoOp``
(``DATASETS.md``, ``datasets/*.py``, ``trainers/zsclip.py`` ``CUSTOM_TEMPLATES``).
"""

from __future__ import annotations

import difflib

from vlprompt.datasets.benchmarks import BENCHMARKS
from vlprompt.datasets.entry import COLOURS, PALETTE, SHAPES, CatalogEntry
from vlprompt.datasets.fashion20 import STAND_IN_TASKS, TASK_INFO_FILE
from vlprompt.datasets.layouts import layout_of
from vlprompt.datasets.smallworld import TASKS as WORLD_TASKS

# --- EuroSAT -------------------------------------------------------------------------------
# Folder names sorted = label order; renames from CoOp datasets/eurosat.py NEW_CNAMES.
_EUROSAT: tuple[tuple[str, str, tuple[str, str]], ...] = (
    ("AnnualCrop", "Annual Crop Land", ("yellow", "square")),
    ("Forest", "Forest", ("green", "circle")),
    ("HerbaceousVegetation", "Herbaceous Vegetation Land", ("green", "diamond")),
    ("Highway", "Highway or Road", ("orange", "cross")),
    ("Industrial", "Industrial Buildings", ("purple", "square")),
    ("Pasture", "Pasture Land", ("yellow", "diamond")),
    ("PermanentCrop", "Permanent Crop Land", ("orange", "square")),
    ("Residential", "Residential Buildings", ("red", "square")),
    ("River", "River", ("blue", "triangle")),
    ("SeaLake", "Sea or Lake", ("blue", "circle")),
)

# --- Oxford-IIIT Pets ----------------------------------------------------------------------
# The 37 breeds as spelled in the image file names (cats capitalised, dogs lower case), in
# the order of the official class ids 1..37 (annotations/list.txt). CoOp's class name is the
# breed lowercased; "_" becomes " " for prompts.
_PET_BREEDS: tuple[str, ...] = (
    "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle",
    "Bengal", "Birman", "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau",
    "english_cocker_spaniel", "english_setter", "german_shorthaired", "great_pyrenees",
    "havanese", "japanese_chin", "keeshond", "leonberger", "Maine_Coon", "miniature_pinscher",
    "newfoundland", "Persian", "pomeranian", "pug", "Ragdoll", "Russian_Blue", "saint_bernard",
    "samoyed", "scottish_terrier", "shiba_inu", "Siamese", "Sphynx",
    "staffordshire_bull_terrier", "wheaten_terrier", "yorkshire_terrier",
)  # fmt: skip
_PET_STYLES = PALETTE[: len(_PET_BREEDS)]

# --- synthetic ------------------------------------------------------------------------------
# 4 colours x 4 shapes, ordered by diagonals of the colour/shape grid so that the base half
# (first 8 labels) and the novel half (last 8) each contain every colour and every shape
# twice: novel classes are new *combinations* of seen words, which is what base-to-novel
# generalisation is meant to measure.
_SYN_COLOURS = COLOURS[:4]
_SYN_SHAPES = SHAPES[:4]
_SYNTHETIC_STYLES = tuple((_SYN_COLOURS[i], _SYN_SHAPES[(i + d) % 4]) for d in range(4) for i in range(4))


def _entry_eurosat() -> CatalogEntry:
    return CatalogEntry(
        name="eurosat",
        folder="eurosat",
        image_dir="2750",
        split_file="split_zhou_EuroSAT.json",
        template="a centered satellite photo of {}.",
        description="EuroSAT RGB, 10 land-use classes from Sentinel-2 (CoOp split)",
        class_folders=tuple(folder for folder, _, _ in _EUROSAT),
        classnames=tuple(name for _, name, _ in _EUROSAT),
        styles=tuple(style for _, _, style in _EUROSAT),
        path_pattern="{cls}/{cls}_{n}.jpg",
        split_rule="folders",  # CoOp eurosat.py: read_and_split_data with NEW_CNAMES
    )


def _entry_oxford_pets() -> CatalogEntry:
    return CatalogEntry(
        name="oxford_pets",
        folder="oxford_pets",
        image_dir="images",
        split_file="split_zhou_OxfordPets.json",
        template="a photo of a {}, a type of pet.",
        description="Oxford-IIIT Pets, 37 cat and dog breeds (CoOp split)",
        class_folders=_PET_BREEDS,
        classnames=tuple(breed.lower().replace("_", " ") for breed in _PET_BREEDS),
        styles=_PET_STYLES,
        path_pattern="{cls}_{n}.jpg",
        split_rule="oxford_pets",  # official trainval/test lists, trainval cut 80/20 (official.py)
    )


def _entry_synthetic() -> CatalogEntry:
    return CatalogEntry(
        name="synthetic",
        folder="synthetic",
        image_dir="images",
        split_file="split_synthetic.json",
        template="a photo of a {}.",
        description="procedural coloured shapes, 16 colour+shape classes (generated, no download)",
        class_folders=tuple(f"{colour}_{shape}" for colour, shape in _SYNTHETIC_STYLES),
        classnames=tuple(f"{colour} {shape}" for colour, shape in _SYNTHETIC_STYLES),
        styles=_SYNTHETIC_STYLES,
        path_pattern="{cls}/{n}.png",
        procedural=True,
    )


# --- small world ---------------------------------------------------------------------------
# Downstream tasks of the procedural small world (``smallworld.py``), seen by the bundled
# ``vlp-small`` CLIP. Each mirrors the role of a real benchmark; the templates are the
# hand-written prompts zero-shot uses, deliberately unlike most pretraining captions.
def _entry_smallworld(task: str, template: str, description: str) -> CatalogEntry:
    names = WORLD_TASKS[task].classnames
    return CatalogEntry(
        name=f"sw_{task}",
        folder=f"sw_{task}",
        image_dir="images",
        split_file=f"split_sw_{task}.json",
        template=template,
        description=f"small world: {description} (generated, no download)",
        class_folders=tuple(name.replace(" ", "_") for name in names),
        classnames=names,
        styles=PALETTE[: len(names)],
        path_pattern="{cls}/{n}.png",
        world=task,
        images_per_class=80,
        procedural=True,
    )


SMALLWORLD_TASKS: tuple[str, ...] = (
    "sw_objects", "sw_shades", "sw_textures", "sw_satellite", "sw_counting",
)  # fmt: skip
"""The small-world multi-task group: one task per benchmark role (objects, fine-grained,
textures, satellite, counting). Domain-shifted renderings of ``sw_objects``:"""
SMALLWORLD_SHIFTS: tuple[str, ...] = (
    "sw_objects_sketch", "sw_objects_cartoon", "sw_objects_noisy", "sw_objects_inverted",
)  # fmt: skip

BENCHMARK_NAMES: tuple[str, ...] = (
    "caltech101", "dtd", "fgvc_aircraft", "food101", "oxford_flowers", "stanford_cars", "sun397",
    "ucf101", "imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r",
)  # fmt: skip
"""The real benchmarks whose entries ``benchmarks.BENCHMARKS`` spells out (with eurosat, oxford_pets)."""


def _entry_fashion20() -> CatalogEntry:
    return CatalogEntry(
        name="fashion20",
        folder="fashion20",
        image_dir="images",
        split_file="split_dk_Fashion20.json",
        # SoftCPT has a template per task id (fashion20.TASK_TEMPLATES, "a photo of {}, a type of
        # pants." ...); this one only serves task ids beyond Fashion-20's 20.
        template="a photo of a {}.",
        description="Fashion-20 (SoftCPT), 20 fashion-attribute tasks with 78 classes in all; "
        "multi-task: load_tasks / data.protocol=multi_task",
        class_folders=tuple(str(i) for i in range(len(STAND_IN_TASKS))),  # stand-in tasks, see above
        classnames=tuple(name for name, _, _ in STAND_IN_TASKS),
        styles=PALETTE[: len(STAND_IN_TASKS)],
        path_pattern="",
        layout_name="fashion20",  # multi-task; the layout makes its split file (SoftCPT, per task)
        real_num_classes=78,
        layout_note=(
            f"fashion20/{TASK_INFO_FILE} (a header line, then per task '<id> TAB <task name> TAB "
            f"<description> TAB <label, label, ...>'), fashion20/images/<task id>/<class id>/<file>.jpg "
            f"(0-based integer folders) and fashion20/split_dk_Fashion20.json (SoftCPT's split, "
            f"[[<path under images/>, [<label>], [<task id>]], ...] per split; written 50/20/30 per "
            f"task when absent)"
        ),
    )


def _checked(entries: dict[str, CatalogEntry]) -> dict[str, CatalogEntry]:
    """``entries``, each checked by the layout it names (an unknown layout is an error too)."""
    for entry in entries.values():
        layout = layout_of(entry)
        if layout.check is not None:
            layout.check(entry)
    return entries


CATALOG: dict[str, CatalogEntry] = _checked(
    {
        "eurosat": _entry_eurosat(),
        "oxford_pets": _entry_oxford_pets(),
        "synthetic": _entry_synthetic(),
        # the CoOp benchmarks (benchmarks.py): 11 datasets + 4 ImageNet shifts (test only)
        **{name: BENCHMARKS[name] for name in BENCHMARK_NAMES},
        # generic objects with a distractor, like Caltech101
        "sw_objects": _entry_smallworld("objects", "a photo of a {}.", "10 shapes among distractors"),
        # fine-grained: 8 hues x light/plain/dark, like FGVC-Aircraft's near-identical variants
        "sw_shades": _entry_smallworld("shades", "a photo of a {} object.", "24 colour shades"),
        # textures, like DTD
        "sw_textures": _entry_smallworld("textures", "{} texture.", "8 background textures"),
        # top-down land use with EuroSAT's class names, which captions seldom use
        "sw_satellite": _entry_smallworld(
            "satellite", "a centered satellite photo of {}.", "10 land-use classes seen from above"
        ),
        # counting, 1-5 objects
        "sw_counting": _entry_smallworld("counting", "a photo of {} objects.", "count 1 to 5 objects"),
        # domain generalisation: sw_objects' classes in shifted renderings
        "sw_objects_sketch": _entry_smallworld(
            "objects_sketch", "a photo of a {}.", "sw_objects as sketches"
        ),
        "sw_objects_cartoon": _entry_smallworld(
            "objects_cartoon", "a photo of a {}.", "sw_objects as cartoons"
        ),
        "sw_objects_noisy": _entry_smallworld(
            "objects_noisy", "a photo of a {}.", "sw_objects with heavy noise"
        ),
        "sw_objects_inverted": _entry_smallworld(
            "objects_inverted",
            "a photo of a {}.",
            "sw_objects in inverted colours (never seen in pretraining)",
        ),
        # SoftCPT's multi-task benchmark: 20 tasks in one folder (fashion20.py)
        "fashion20": _entry_fashion20(),
    }
)


def get_entry(name: str) -> CatalogEntry:
    """The catalog entry for ``name``; an unknown name lists the known ones and a close match."""
    try:
        return CATALOG[name]
    except KeyError:
        pass
    known = sorted(CATALOG)
    close = difflib.get_close_matches(str(name).lower(), known, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown dataset {name!r}.{hint} Known datasets: {', '.join(known)}")
