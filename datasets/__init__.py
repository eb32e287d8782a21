"""vlprompt's dataset layer: catalog, CoOp split files, few-shot protocol, images.

Plain Python, Pillow and PyTorch only (no Ray, MLflow or OmegaConf). The orchestrator's
path through it::

    splits = load_dataset("eurosat", root)        # reads <root>/eurosat/split_zhou_EuroSAT.json
    splits = sample_fewshot(splits, shots=16, seed=1)
    base = subsample_classes(splits, "base")      # base-to-novel protocol, after few-shot
    fingerprint = split_fingerprint(splits)
    data = ImageDataset(base.train, train_transform(224, mean, std))

``generate_dataset`` writes a procedural stand-in in any entry's real layout;
``python -m vlprompt.datasets`` lists, generates and checks datasets.
"""

from vlprompt.datasets.catalog import CATALOG, CatalogEntry, get_entry
from vlprompt.datasets.fewshot import base_novel_labels, sample_fewshot, subsample_classes
from vlprompt.datasets.fewshot_cache import cached_fewshot
from vlprompt.datasets.generate import generate_dataset
from vlprompt.datasets.images import ImageDataset, load_image, test_transform, train_transform
from vlprompt.datasets.splits import (
    dataset_folder,
    load_dataset,
    read_split_file,
    split_fingerprint,
    write_split_file,
)
from vlprompt.datasets.types import SPLIT_NAMES, DatasetSplits, Datum

__all__ = [
    "CATALOG",
    "SPLIT_NAMES",
    "CatalogEntry",
    "DatasetSplits",
    "Datum",
    "ImageDataset",
    "base_novel_labels",
    "cached_fewshot",
    "dataset_folder",
    "generate_dataset",
    "get_entry",
    "load_dataset",
    "load_image",
    "read_split_file",
    "sample_fewshot",
    "split_fingerprint",
    "subsample_classes",
    "test_transform",
    "train_transform",
    "write_split_file",
]
