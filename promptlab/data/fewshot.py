"""Few-shot sampling and base/new class subsampling, exactly as CoOp on Dassl does them.

CoOp's call sequence, which the published tables depend on (Dassl `generate_fewshot_dataset`,
CoOp `datasets/*.py`): `set_random_seed(seed)` seeds `random`, numpy and torch; nothing draws
from `random` before the dataset is built; then `train = generate_fewshot_dataset(train, K)` and
`val = generate_fewshot_dataset(val, min(K, 4))`, each grouping items by label in order of first
appearance and taking `random.sample(group, K)` per label (the whole group when smaller). Then
`subsample_classes` keeps the base or new half of the labels.

Global state, on purpose: the draw uses a private `random.Random(seed)`. Its Mersenne Twister
stream is the one `random.seed(seed)` gives the module-level functions (numpy and torch play no
part in the draw), so the images are the same as Dassl's, while the caller's global random
state is left untouched and the result does not depend on what ran before. The engine seeds
the global generators for training itself. (Dassl itself leaves `random` in a different state
depending on whether its few-shot pickle existed, so no run could rely on it.)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
from pathlib import Path

from promptlab.data.items import DatasetSplits, Item, hash_splits, items_to_rows, rows_to_items

log = logging.getLogger(__name__)

CACHE_FORMAT = "promptlab-fewshot-v1"


def draw_per_label(items: list[Item], shots: int, rng: random.Random) -> tuple[list[Item], list[int]]:
    """Dassl's per-label draw: `rng.sample(group, shots)` for each label in first-appearance order.

    Returns:
        The drawn items and the labels that had fewer than `shots` items (kept whole).
    """
    groups: dict[int, list[Item]] = {}
    for it in items:
        groups.setdefault(it.label, []).append(it)
    out: list[Item] = []
    short = []
    for label, group in groups.items():
        if len(group) >= shots:
            out.extend(rng.sample(group, shots))
        else:
            out.extend(group)
            short.append(label)
    return out, short


def _cache_path(cache_dir: Path, ds: DatasetSplits, shots: int, seed: int) -> Path:
    return cache_dir / "fewshot" / f"{ds.name}_shot{shots}_seed{seed}.json"


def _check_outside_data(cache_dir: Path, ds: DatasetSplits) -> None:
    if ds.root is None:
        return
    root, cache = Path(os.path.realpath(ds.root)), Path(os.path.realpath(cache_dir))
    if cache == root or root in cache.parents:
        raise ValueError(
            f"few-shot cache dir {cache_dir} is inside the data root {ds.root}; "
            "promptlab never writes into the data folder. Use the run's cache directory."
        )


def _read_cache(path: Path, ds: DatasetSplits, shots: int, seed: int, split_hash: str) -> tuple | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable few-shot cache %s: %s", path, e)
        return None
    if (data.get("format"), data.get("shots"), data.get("seed")) != (CACHE_FORMAT, shots, seed):
        return None
    if data.get("split_hash") != split_hash:
        log.info("few-shot cache %s was drawn from a different split; drawing again", path)
        return None
    base = ds.root if ds.root is not None else "/"
    return rows_to_items(data["train"], base), rows_to_items(data["val"], base)


def fewshot_split(
    ds: DatasetSplits, shots: int, seed: int, cache_dir: str | Path | None = None
) -> DatasetSplits:
    """Draw the K-shot train split and min(K, 4)-shot val split of CoOp's protocol.

    Call it on the full dataset, before `subsample_classes`, as CoOp does: subsampling first
    would change the groups and so the draw.

    Args:
        ds: The dataset as `load_dataset` returns it.
        shots: K images per class; `shots <= 0` keeps all data (returned unchanged).
        seed: The run's seed (CoOp's tables use 1, 2, 3).
        cache_dir: When given, the draw is stored as JSON under `cache_dir/fewshot/` (paths
            relative to the data root, plus the split hash) and reused; a draw made from a
            different split is redrawn. Must not lie inside the data root.

    Returns:
        A new `DatasetSplits` with the drawn train and val; test is unchanged.
    """
    if shots <= 0:
        return ds
    if ds.subsample != "all":
        raise ValueError("fewshot_split must come before subsample_classes (CoOp draws from all classes).")
    if ds.shots > 0:
        raise ValueError(f"{ds.name} already holds a {ds.shots}-shot draw.")
    split_hash = ds.split_hash or hash_splits(ds.train, ds.val, ds.test, ds.root)
    path = None
    if cache_dir is not None:
        _check_outside_data(Path(cache_dir), ds)
        path = _cache_path(Path(cache_dir), ds, shots, seed)
        cached = _read_cache(path, ds, shots, seed, split_hash) if path.is_file() else None
        if cached is not None:
            log.info("few-shot split: reusing %s", path)
            return dataclasses.replace(ds, train=cached[0], val=cached[1], shots=shots, seed=seed)

    rng = random.Random(seed)  # same stream as random.seed(seed) + module-level random.sample
    train, short = draw_per_label(ds.train, shots, rng)
    val, short_val = draw_per_label(ds.val, min(shots, 4), rng)
    for split, labels, k in (("train", short, shots), ("val", short_val, min(shots, 4))):
        if labels:
            log.warning(
                "%s %s: %d class(es) have fewer than %d images and are used whole (labels %s)",
                ds.name,
                split,
                len(labels),
                k,
                labels[:10],
            )

    if path is not None:
        base = ds.root if ds.root is not None else "/"
        payload = {
            "format": CACHE_FORMAT,
            "dataset": ds.name,
            "shots": shots,
            "seed": seed,
            "split_hash": split_hash,
            "train": items_to_rows(train, base),
            "val": items_to_rows(val, base),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(payload))
        tmp.replace(path)  # atomic, so concurrent runs never read half a file
        log.info("few-shot split: wrote %s", path)
    return dataclasses.replace(ds, train=train, val=val, shots=shots, seed=seed)


def subsample_classes(ds: DatasetSplits, which: str) -> DatasetSplits:
    """Keep the base or new half of the classes, relabelled from 0 (CoOp's `subsample_classes`).

    The labels present in train are sorted; base is the first ceil(n/2), new the rest. Train, val
    and test keep only the chosen labels, each mapped to its rank in the chosen half. For a
    test-only dataset (empty train) the labels are all classes.

    Args:
        ds: A dataset, after `fewshot_split` if few-shot.
        which: "all" (returned unchanged), "base" or "new".
    """
    if which not in ("all", "base", "new"):
        raise ValueError(f"subsample must be 'all', 'base' or 'new', got {which!r}")
    if which == "all":
        return ds
    if ds.subsample != "all":
        raise ValueError(f"{ds.name} is already subsampled to its {ds.subsample} classes.")
    labels = sorted({it.label for it in ds.train}) if ds.train else list(range(ds.num_classes))
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if which == "base" else labels[m:]
    relabel = {y: i for i, y in enumerate(selected)}

    def keep(items: list[Item]) -> list[Item]:
        return [Item(it.path, relabel[it.label], it.classname) for it in items if it.label in relabel]

    return dataclasses.replace(
        ds,
        train=keep(ds.train),
        val=keep(ds.val),
        test=keep(ds.test),
        classnames=[ds.classnames[y] for y in selected],
        subsample=which,
        all_classnames=list(ds.classnames),
    )
