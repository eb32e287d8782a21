"""``CatalogEntry``: what one dataset is, as data — and the colour and shape words its styles use.

An entry is *data* (like an open_clip model config): where the dataset lives under the data
root, which on-disk layout it has (``layout_name``, a key of ``layouts.LAYOUTS``), the
hand-crafted zero-shot template, and what the procedural generator needs to write a stand-in
in that layout. This module imports nothing else from the package, so every layout module
can take an entry without an import cycle; ``catalog.py`` holds the entries themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "orange", "purple", "cyan", "pink")
"""Colour words the generator can draw (RGB values live in ``generate.py``)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
"""Shape words the generator can draw."""

PALETTE: tuple[tuple[str, str], ...] = tuple((colour, shape) for shape in SHAPES for colour in COLOURS)
"""Every (colour, shape) style, shape after shape: entries take their first N as N distinct styles."""


@dataclass(frozen=True)
class CatalogEntry:
    """Where one dataset lives and how to read (or procedurally write) it.

    ``class_folders`` are the class names as they appear on disk (a folder per class for
    EuroSAT, a file-name prefix for Oxford Pets), ``classnames`` the names prompts use; both
    in label order. ``path_pattern`` is an image's path relative to ``image_dir`` with
    ``{cls}`` (the class folder name) and ``{n}`` (1-based image number), e.g.
    ``"{cls}/{cls}_{n}.jpg"`` for EuroSAT's ``2750/Forest/Forest_12.jpg`` (layouts that name
    their files themselves leave it empty). ``styles`` gives each class a distinct
    (colour, shape) so that generated classes are learnable. ``world`` names a task of
    ``vlprompt.datasets.smallworld`` that draws the images instead (``styles`` are then
    placeholders kept only so every entry has the same shape), and ``images_per_class`` is
    what ``generate_dataset`` writes when not told otherwise. ``procedural`` marks data that
    *is* procedural and has no download (the synthetic set, the small world): for those the
    generator writes the dataset itself, for every other entry only a stand-in.
    The class lists only drive the generator and listings: readers take class names and
    labels from the data, as CoOp does.

    A *multi-task* layout (Fashion-20, whose tasks reuse class names) lists its generator's
    stand-in **tasks** in the class fields (folder = task id, name = task name, one style per
    task), so ``generate_dataset``'s ``num_classes`` counts tasks for it; its classes are read
    from the data, task by task (``fashion20.py``, ``tasks.load_tasks``).
    """

    name: str  # key in CATALOG
    folder: str  # folder under the data root, e.g. "eurosat"
    image_dir: str  # image folder under ``folder``; split-file paths are relative to it
    split_file: str  # the split file under ``folder`` ("" for layouts without one)
    template: str  # hand-crafted zero-shot template with exactly one "{}"
    description: str  # one line, shown in errors and listings
    class_folders: tuple[str, ...]
    classnames: tuple[str, ...]
    styles: tuple[tuple[str, str], ...]
    path_pattern: str
    world: str = ""
    images_per_class: int = 40
    procedural: bool = False
    # How the folder is laid out: a key of ``layouts.LAYOUTS`` ("split_json", "fgvc_aircraft",
    # "imagenet", "imagenet_v2", "imagenet_folders", "fashion20"); the layout reads it, writes
    # the stand-in and, where it can, makes a missing split file.
    layout_name: str = "split_json"
    # Split-JSON layout only: the official-files rule (a key of ``official.RULES``) that
    # regenerates a missing split file from the files the dataset ships with and writes those
    # files for the stand-in ("folders": Dassl ``read_and_split_data`` 50/20/30 per class
    # folder; "oxford_pets", ...; "": the split file is never regenerated).
    split_rule: str = ""
    # The "<wnid> <name>" list of the ImageNet family (relative to ``folder``), the real class
    # count when the class lists above are only the generator's stand-in subset (0: the lists
    # are complete), folders the "folders" rule skips (Caltech101's BACKGROUND_Google,
    # Faces_easy), and the layout written out in words (default: from ``path_pattern``).
    classnames_file: str = ""
    real_num_classes: int = 0
    ignored_folders: tuple[str, ...] = ()
    layout_note: str = ""
    # prompt ensembles published for this dataset, by name (zeroshot's ``ensemble`` option:
    # "imagenet80" = CLIP's 80 ImageNet templates, "imagenet7" = CoOp's 7 selected ones)
    ensembles: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        """The dataset's class count (the real one for benchmarks with a stand-in class list)."""
        return self.real_num_classes or len(self.class_folders)

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
        if self.path_pattern and ("{cls}" not in self.path_pattern or "{n" not in self.path_pattern):
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
