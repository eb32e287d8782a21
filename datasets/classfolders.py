"""A folder of images labelled by class name: a proxy source that is no catalog dataset.

Test-time methods that align to source statistics (PromptAlign, PromptSync) need images of the
classes they classify. The catalog's ImageNet covers the domain-generalisation targets, but not
Flowers102's species or a novel-class half; PROMPTSYNC.md §2.2 proposes images retrieved per
class name instead (e.g. LAION, top-K per name). Such a collection is one folder::

    <folder>/<class folder>/<image>.{jpg,jpeg,png,bmp,gif,webp,tif,tiff}
    <folder>/classnames.txt      optional: "<class folder> <class name>" per line

and :func:`read_class_folders` reads it as one split (``train``, every image).

**Which class a folder holds.** Its name, with ``_`` read as a space: every reader of the
platform gives class names CoOp's ``name.replace("_", " ")`` (``splitjson``, ``imagenet``,
``fgvc``...), so no class name has an underscore and ``golden_retriever/`` is the class
"golden retriever". Case is kept and names are compared *exactly* with the run's class names:
several datasets' names differ only in case from a word (``Faces`` in Caltech101, the
capitalised UCF101 actions, Oxford Pets' lower-cased breeds), and a silent case-folding match
could pick the wrong row (the run's refusal of a missing class points out a name that differs
only in case). A name a folder cannot have -- ImageNet's "baluster / handrail" holds a ``/`` --
comes from ``classnames.txt``, in ImageNet's ``classnames.txt`` format (so an ImageNet-style
tree of wnid folders with CoOp's ``classnames.txt`` copied beside it is a valid proxy as it is);
a folder it does not list keeps its own name. Two folders naming one class
(``golden_retriever/`` and ``golden retriever/``, or two wnids listed with one name, as
ImageNet's two "crane"s) are one class: the run looks rows up by name, so it could only ever
read one of them.

Images are those directly in each class folder (hidden files and other suffixes are skipped:
``files.list_images``), in name order, folders in sorted order; a class's images are the first
``images_per_class`` of them (0: all). Nothing here follows a path *read from a file*: the
``classnames.txt`` column only names folders already listed, and is held to the rule every
path in a data file is (``files.check_relative``), so a file copied from elsewhere cannot
name something outside the folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from vlprompt.datasets.files import IMAGE_SUFFIXES, check_relative, list_images, subfolders
from vlprompt.datasets.imagenet import read_classnames
from vlprompt.datasets.types import DatasetSplits, Datum

#: ``DatasetSplits.name`` of a class-folder source.
NAME = "folder"
#: The optional file mapping class folders to class names.
CLASSNAMES_FILE = "classnames.txt"
#: The prompt template (the text side is built but never read by the statistics).
TEMPLATE = "a photo of a {}."
LAYOUT = (
    "<folder>/<class name>/<image> (one folder per class, '_' read as a space; an optional "
    f"<folder>/{CLASSNAMES_FILE} of '<class folder> <class name>' lines names the others)"
)


def class_name(folder_name: str, listed: dict[str, str]) -> str:
    """The class a folder holds: its ``classnames.txt`` name, else its own, ``_`` read as a space."""
    return listed.get(folder_name, folder_name).replace("_", " ")


def _listed_names(folder: Path) -> dict[str, str]:
    """``classnames.txt``'s folder → class name map (empty without one); folder names checked."""
    path = folder / CLASSNAMES_FILE
    if not path.is_file():
        return {}
    listed = read_classnames(path)
    for name in listed:
        check_relative(f"{path}: class folder", name)
        if "/" in name or "\\" in name:
            raise ValueError(f"{path}: {name!r} is not a folder name (one path component); fix that line")
    return listed


def read_class_folders(folder: str | Path, images_per_class: int = 0) -> DatasetSplits:
    """Every image of ``folder`` labelled by its class folder, as the ``train`` split.

    ``FileNotFoundError`` for a missing folder, ``ValueError`` for one with no class folder or
    no image, each naming the folder and the expected layout. A class folder without images is
    a class with no items (the caller says so; a run that needs the class refuses the file).
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist or is not a folder; expected layout: {LAYOUT}")
    listed = _listed_names(root)
    names = subfolders(root)
    if not names:
        loose = len(list_images(root))
        held = f"{loose} images directly but no class folder" if loose else "no class folder"
        raise ValueError(f"{root} holds {held}; expected layout: {LAYOUT}")
    images: dict[str, list[Path]] = {}
    for name in names:
        paths = list_images(root / name)
        images.setdefault(class_name(name, listed), []).extend(paths)
    if not any(images.values()):
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ValueError(
            f"{root} has {len(names)} class folders but no image in them (files ending {suffixes}); "
            f"expected layout: {LAYOUT}"
        )
    classnames = tuple(images)
    items = tuple(
        Datum(os.path.abspath(path), label, classname)
        for label, classname in enumerate(classnames)
        for path in images[classname][: images_per_class or None]
    )
    return DatasetSplits(
        name=NAME,
        classnames=classnames,
        template=TEMPLATE,
        train=items,
        val=(),
        test=(),
        image_root=os.path.abspath(root),
    )
