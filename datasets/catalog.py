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
    The class lists only drive the generator and listings: ``load_dataset`` takes class names
    and labels from the split file, as CoOp does.
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
        if "{cls}" not in self.path_pattern or "{n}" not in self.path_pattern:
            raise ValueError(f"{where}: path_pattern {self.path_pattern!r} needs '{{cls}}' and '{{n}}'")

    @property
    def layout(self) -> str:
        """The expected files, written out for error messages and listings."""
        example = self.path_pattern.format(cls=self.class_folders[0], n=1)
        return (
            f"{self.folder}/{self.split_file} (split file) and "
            f"{self.folder}/{self.image_dir}/{example} (images, paths relative to "
            f"{self.folder}/{self.image_dir})"
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


CATALOG: dict[str, CatalogEntry] = {
    "eurosat": _entry_eurosat(),
    "oxford_pets": _entry_oxford_pets(),
    "synthetic": _entry_synthetic(),
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
