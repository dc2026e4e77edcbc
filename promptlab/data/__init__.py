"""Data layer: dataset readers, CoOp's few-shot and base/new protocol, image loading.

Typical use::

    ds = load_dataset("oxford_pets", "$DATA")             # full splits, as in CoOp's split file
    ds = fewshot_split(ds, shots=16, seed=1, cache_dir=run_dir / "cache")
    ds = subsample_classes(ds, "base")                    # base-to-new
    loader = make_loader(ImageDataset(ds.train, clip.train_transform), 32, train=True)

Where promptlab deliberately differs from Dassl/CoOp (the draws are otherwise identical):

- Directory listings are sorted (image files inside class folders too), so folder datasets
  (ImageNet and its shifts, custom folders) give the same few-shot images on every file system.
  Dassl's unsorted `os.listdir` makes its ImageNet draw file-system dependent.
- The few-shot draw uses a private `random.Random(seed)` (the same stream as `random.seed(seed)`)
  and leaves global random state alone; the engine seeds globals for training.
- Few-shot draws are cached as JSON with paths relative to the data root and a hash of the
  split, under the run's cache directory, never as pickles with absolute paths inside `$DATA`.
- ImageNet has no val split here (`val == []`); CoOp passes its test set as val, which matters
  only for best-epoch selection, and the protocol evaluates the last epoch.
"""

import importlib
from typing import Any

from promptlab.data.fewshot import fewshot_split, subsample_classes
from promptlab.data.items import DatasetSplits, Item
from promptlab.data.registry import DatasetSpec, dataset_names, get_spec, load_dataset

# Imported on first use: image loading needs torch and torchvision, which a recipe check (dataset
# names, `promptlab sweep --dry-run`) does not.
_LAZY = {
    "ImageDataset": "promptlab.data.images",
    "ImageReadError": "promptlab.data.images",
    "make_loader": "promptlab.data.images",
    "read_image": "promptlab.data.images",
    "make_synthetic_dataset": "promptlab.data.synthetic",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = [
    "DatasetSpec",
    "DatasetSplits",
    "ImageDataset",
    "ImageReadError",
    "Item",
    "dataset_names",
    "fewshot_split",
    "get_spec",
    "load_dataset",
    "make_loader",
    "make_synthetic_dataset",
    "read_image",
    "subsample_classes",
]
