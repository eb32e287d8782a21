"""vlprompt's dataset layer: catalog, CoOp split files, few-shot protocol, images.

Plain Python, NumPy and Pillow (no Ray, MLflow or OmegaConf), and no torch at import: the
experiment driver checks dataset names, task groups and split files before Ray starts without
paying for torch. The torch parts are imported by module: ``vlprompt.datasets.images``
(``ImageDataset``, ``train_transform``, ``test_transform``) and ``vlprompt.datasets.views``
(``test_time_views``). The orchestrator's path through the package::

    splits = load_dataset("eurosat", root)        # reads <root>/eurosat/split_zhou_EuroSAT.json
    splits = sample_fewshot(splits, shots=16, seed=1)
    base = subsample_classes(splits, "base")      # base-to-novel protocol, after few-shot
    fingerprint = split_fingerprint(splits)
    data = images.ImageDataset(base.train, images.train_transform(224, mean, std))

The multi-task protocol reads a task source instead (a group such as ``general10``, or
``fashion20``, whose folder holds 20 tasks)::

    tasks = load_tasks("general10", root)         # {"caltech101": TaskData(splits, cache_dir), ...}
    fewshot = {key: cached_fewshot(t.splits, 16, 1, t.cache_dir) for key, t in tasks.items()}

``generate_dataset`` writes a procedural stand-in in any entry's real layout;
``python -m vlprompt.datasets`` lists, generates and checks datasets. ``read_class_folders`` reads
a folder of images labelled by class name (``<folder>/<class name>/<image>``), the proxy source
a method's source statistics may come from instead of a catalog dataset. Each on-disk layout
(CoOp's split JSON, FGVC-Aircraft's lists, the ImageNet family, Fashion-20's tasks) is one
``Layout`` in ``layouts.LAYOUTS``, named by the catalog entries that have it.
"""

from vlprompt.datasets.catalog import CATALOG, CatalogEntry, get_entry
from vlprompt.datasets.classfolders import read_class_folders
from vlprompt.datasets.decode import drop_unreadable, load_image
from vlprompt.datasets.fewshot import base_novel_labels, sample_fewshot, subsample_classes
from vlprompt.datasets.fewshot_cache import cached_fewshot
from vlprompt.datasets.generate import generate_dataset
from vlprompt.datasets.makesplit import make_split
from vlprompt.datasets.splitjson import read_split_file, write_split_file
from vlprompt.datasets.splits import dataset_folder, load_dataset, split_fingerprint
from vlprompt.datasets.tasks import GROUPS, TaskData, check_task_source, is_multitask, load_tasks, task_names
from vlprompt.datasets.types import SPLIT_NAMES, DatasetSplits, Datum

__all__ = [
    "CATALOG",
    "GROUPS",
    "SPLIT_NAMES",
    "CatalogEntry",
    "DatasetSplits",
    "Datum",
    "TaskData",
    "base_novel_labels",
    "cached_fewshot",
    "check_task_source",
    "dataset_folder",
    "drop_unreadable",
    "generate_dataset",
    "get_entry",
    "is_multitask",
    "load_dataset",
    "load_image",
    "load_tasks",
    "make_split",
    "read_class_folders",
    "read_split_file",
    "sample_fewshot",
    "split_fingerprint",
    "subsample_classes",
    "task_names",
    "write_split_file",
]
