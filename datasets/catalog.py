"""The dataset catalog: one declarative ``CatalogEntry`` per dataset, in one explicit dict.

An entry is *data* (like an open_clip model config): where the dataset lives under the data
root, which CoOp split file lists its images, the hand-crafted zero-shot template, and what
the procedural generator needs to write a stand-in with the same layout (on-disk class
names, file-name pattern, one colour/shape style per class). Adding a dataset is adding one
entry to ``CATALOG``; nothing is registered by import side effects (CoOp issue #38).

Layouts, split-file names, templates and class renames follow ``reference/METHODS.md`` §0
(CoOp ``DATASETS.md``, ``trainers/zsclip.py`` ``CUSTOM_TEMPLATES``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "orange", "purple", "cyan", "pink")
"""Colour words the generator can draw (RGB values live in ``generate.py``)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
"""Shape words the generator can draw."""

MULTITASK_READERS: frozenset[str] = frozenset({"fashion20"})
"""Readers of folders that hold several tasks: no single ``DatasetSplits``, see ``tasks.py``."""


@dataclass(frozen=True)
class CatalogEntry:
    """Where one dataset lives and how to read (or procedurally write) it.

    ``class_folders`` are the class names as they appear on disk (a folder per class for
    EuroSAT, a file-name prefix for Oxford Pets), ``classnames`` the names prompts use; both
    in label order. ``path_pattern`` is an image's path relative to ``image_dir`` with
    ``{cls}`` (the class folder name) and ``{n}`` (1-based image number), e.g.
    ``"{cls}/{cls}_{n}.jpg"`` for EuroSAT's ``2750/Forest/Forest_12.jpg``. ``styles`` gives
    each class a distinct (colour, shape) so that generated classes are learnable.
    ``annotations`` names extra files the real layout has ("oxford_pets" → ``annotations/``).
    ``world`` names a task of ``vlprompt.datasets.smallworld`` that draws the images instead
    (``styles`` are then placeholders kept only so every entry has the same shape), and
    ``images_per_class`` is what ``generate_dataset`` writes when not told otherwise.
    The class lists only drive the generator and listings: ``load_dataset`` takes class names
    and labels from the split file, as CoOp does.

    A *multi-task* entry (``multitask``: Fashion-20, whose tasks reuse class names) lists its
    generator's stand-in **tasks** in the class fields (folder = task id, name = task name,
    one style per task), so ``generate_dataset``'s ``num_classes`` counts tasks for it; its
    classes are read from the data, task by task (``fashion20.py``, ``tasks.load_tasks``).
    """

    name: str  # key in CATALOG
    folder: str  # folder under the data root, e.g. "eurosat"
    image_dir: str  # image folder under ``folder``; split-file paths are relative to it
    split_file: str  # CoOp split JSON under ``folder``
    template: str  # hand-crafted zero-shot template with exactly one "{}"
    description: str  # one line, shown in errors and listings
    class_folders: tuple[str, ...]
    classnames: tuple[str, ...]
    styles: tuple[tuple[str, str], ...]
    path_pattern: str
    annotations: str = ""
    world: str = ""
    images_per_class: int = 40
    # Real benchmarks (``benchmarks.py``): how ``load_dataset`` reads the folder (a key of
    # ``readers.READERS``: "split_json", "fgvc_aircraft", "imagenet", "imagenet_v2",
    # "imagenet_folders", "imagenet_subset", "fashion20"), the "<wnid> <name>" list of the
    # ImageNet family (relative to ``folder``), the real class count when the class lists above
    # are only the generator's stand-in subset (0: the lists are complete), how a missing split
    # file may be written ("folders": Dassl ``read_and_split_data`` 50/20/30 per class folder,
    # by ``make_split``; "tasks": SoftCPT's 50/20/30 per task, by ``fashion20.make_split``; "":
    # never), folders it skips (Caltech101's BACKGROUND_Google, Faces_easy), and the layout
    # written out in words.
    reader: str = "split_json"
    classnames_file: str = ""
    real_num_classes: int = 0
    split_rule: str = ""
    ignored_folders: tuple[str, ...] = ()
    layout_note: str = ""
    # prompt ensembles published for this dataset, by name (zeroshot's ``ensemble`` option:
    # "imagenet80" = CLIP's 80 ImageNet templates, "imagenet7" = CoOp's 7 selected ones)
    ensembles: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        """The dataset's class count (the real one for benchmarks with a stand-in class list)."""
        return self.real_num_classes or len(self.class_folders)

    @property
    def procedural(self) -> bool:
        """Whether the dataset is procedural by nature (``synthetic``, the small world): generating
        it is the only way to have it, not a stand-in for a real download."""
        return bool(self.world) or self.name == "synthetic"

    @property
    def multitask(self) -> bool:
        """Whether the folder holds several classification tasks (read with ``load_tasks``)."""
        return self.reader in MULTITASK_READERS

    def __post_init__(self) -> None:
        where = f"catalog entry {self.name!r}"
        if self.template.count("{}") != 1:
            raise ValueError(f"{where}: template {self.template!r} must contain exactly one '{{}}'")
        n = len(self.class_folders)
        if len(self.classnames) != n or len(self.styles) != n:
            raise ValueError(
                f"{where}: {n} class_folders, {len(self.classnames)} classnames and "
                f"{len(self.styles)} styles; they must be equal (one per class, label order)"
            )
        for field, values in (("class_folders", self.class_folders), ("classnames", self.classnames)):
            if len(set(values)) != n:
                raise ValueError(f"{where}: {field} has duplicates")
        if len(set(self.styles)) != n:
            raise ValueError(f"{where}: two classes share a (colour, shape) style")
        for colour, shape in self.styles:
            if colour not in COLOURS or shape not in SHAPES:
                raise ValueError(f"{where}: unknown style ({colour!r}, {shape!r})")
        needs_pattern = self.reader == "split_json"  # other readers' generators name files themselves
        if needs_pattern and ("{cls}" not in self.path_pattern or "{n" not in self.path_pattern):
            raise ValueError(f"{where}: path_pattern {self.path_pattern!r} needs '{{cls}}' and '{{n}}'")

    @property
    def layout(self) -> str:
        """The expected files, written out for error messages and listings."""
        if self.layout_note:
            return self.layout_note
        example = self.path_pattern.format(cls=self.class_folders[0], n=1)
        images = f"{self.folder}/{self.image_dir}" if self.image_dir else self.folder
        return (
            f"{self.folder}/{self.split_file} (split file) and "
            f"{images}/{example} (images, paths relative to {images})"
        )


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
_PET_STYLES = tuple((colour, shape) for shape in SHAPES for colour in COLOURS)[: len(_PET_BREEDS)]

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
        annotations="oxford_pets",
        split_rule="oxford_pets",  # official trainval/test lists, trainval cut 80/20 (makesplit.py)
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
    )


# --- small world ---------------------------------------------------------------------------
# Downstream tasks of the procedural small world (``smallworld.py``), seen by the bundled
# ``vlp-small`` CLIP. Each mirrors the role of a real benchmark; the templates are the
# hand-written prompts zero-shot uses, deliberately unlike most pretraining captions.
_SW_PLACEHOLDER_STYLES = tuple((colour, shape) for shape in SHAPES for colour in COLOURS)


def _entry_smallworld(task: str, template: str, description: str) -> CatalogEntry:
    from vlprompt.datasets.smallworld import TASKS  # local: keeps the catalog import light

    names = TASKS[task].classnames
    return CatalogEntry(
        name=f"sw_{task}",
        folder=f"sw_{task}",
        image_dir="images",
        split_file=f"split_sw_{task}.json",
        template=template,
        description=f"small world: {description} (generated, no download)",
        class_folders=tuple(name.replace(" ", "_") for name in names),
        classnames=names,
        styles=_SW_PLACEHOLDER_STYLES[: len(names)],
        path_pattern="{cls}/{n}.png",
        world=task,
        images_per_class=80,
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


def _entry_benchmark(name: str) -> CatalogEntry:
    from vlprompt.datasets.benchmarks import BENCHMARKS  # plain data; it does not import the catalog

    return CatalogEntry(name=name, **BENCHMARKS[name])


def _entry_fashion20() -> CatalogEntry:
    from vlprompt.datasets.fashion20 import STAND_IN_TASKS, TASK_INFO_FILE  # local, as smallworld

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
        styles=tuple((colour, shape) for shape in SHAPES for colour in COLOURS)[: len(STAND_IN_TASKS)],
        path_pattern="",
        reader="fashion20",
        real_num_classes=78,
        split_rule="tasks",
        layout_note=(
            f"fashion20/{TASK_INFO_FILE} (a header line, then per task '<id> TAB <task name> TAB "
            f"<description> TAB <label, label, ...>'), fashion20/images/<task id>/<class id>/<file>.jpg "
            f"(0-based integer folders) and fashion20/split_dk_Fashion20.json (SoftCPT's split, "
            f"[[<path under images/>, [<label>], [<task id>]], ...] per split; written 50/20/30 per "
            f"task when absent)"
        ),
    )


CATALOG: dict[str, CatalogEntry] = {
    "eurosat": _entry_eurosat(),
    "oxford_pets": _entry_oxford_pets(),
    "synthetic": _entry_synthetic(),
    # the CoOp benchmarks (benchmarks.py): 11 datasets + 4 ImageNet shifts (test only)
    **{name: _entry_benchmark(name) for name in BENCHMARK_NAMES},
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
    "sw_objects_sketch": _entry_smallworld("objects_sketch", "a photo of a {}.", "sw_objects as sketches"),
    "sw_objects_cartoon": _entry_smallworld("objects_cartoon", "a photo of a {}.", "sw_objects as cartoons"),
    "sw_objects_noisy": _entry_smallworld("objects_noisy", "a photo of a {}.", "sw_objects with heavy noise"),
    "sw_objects_inverted": _entry_smallworld(
        "objects_inverted", "a photo of a {}.", "sw_objects in inverted colours (never seen in pretraining)"
    ),
    # SoftCPT's multi-task benchmark: 20 tasks in one folder (fashion20.py)
    "fashion20": _entry_fashion20(),
}


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
