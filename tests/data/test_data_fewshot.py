"""Few-shot draw and base/new subsampling against the reference (Dassl/CoOp) formulation."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import shutil
from collections import defaultdict

import numpy as np
import pytest
import torch

from promptlab.data import Item, fewshot_split, load_dataset, subsample_classes
from promptlab.data import fewshot as fewshot_mod


def dassl_reference(train, val, shots, seed):
    """CoOp's call sequence, written from Dassl's `set_random_seed` + `generate_fewshot_dataset`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    def generate_fewshot_dataset(data_source, num_shots):
        tracker = defaultdict(list)  # split_dataset_by_label: insertion order = first appearance
        for item in data_source:
            tracker[item.label].append(item)
        dataset = []
        for _, items in tracker.items():
            dataset.extend(random.sample(items, num_shots) if len(items) >= num_shots else items)
        return dataset

    return generate_fewshot_dataset(train, shots), generate_fewshot_dataset(val, min(shots, 4))


def coop_subsample_reference(train, val, test, subsample):
    """CoOp's `OxfordPets.subsample_classes`, over (path, label, classname) items."""
    labels = sorted({it.label for it in train})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabeler = {y: y_new for y_new, y in enumerate(selected)}
    return [
        [Item(it.path, relabeler[it.label], it.classname) for it in d if it.label in selected]
        for d in (train, val, test)
    ]


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_draw_equals_dassl(pets_root, shots, seed):
    ds = load_dataset("oxford_pets", pets_root)
    ref_train, ref_val = dassl_reference(ds.train, ds.val, shots, seed)
    out = fewshot_split(ds, shots, seed)
    assert out.train == ref_train  # same images, same order
    assert out.val == ref_val
    assert out.test == ds.test
    assert (out.shots, out.seed) == (shots, seed)


def test_draw_groups_by_first_appearance_not_sorted_label(pets_root):
    ds = load_dataset("oxford_pets", pets_root)
    first_seen = list(dict.fromkeys(it.label for it in ds.train))
    assert first_seen != sorted(first_seen)  # the fixture shuffles, so the order is meaningful
    out = fewshot_split(ds, 1, 1)
    assert [it.label for it in out.train] == first_seen


def test_seed_determinism(pets_root):
    ds = load_dataset("oxford_pets", pets_root)
    a, b, c = fewshot_split(ds, 2, 1), fewshot_split(ds, 2, 1), fewshot_split(ds, 2, 2)
    assert a.train == b.train and a.val == b.val
    assert a.train != c.train


def test_global_random_state_untouched(pets_root):
    ds = load_dataset("oxford_pets", pets_root)
    random.seed(123)
    state = random.getstate()
    fewshot_split(ds, 2, 1)
    assert random.getstate() == state


def test_shots_nonpositive_means_all_data(pets_root):
    ds = load_dataset("oxford_pets", pets_root)
    for k in (0, -1):
        out = fewshot_split(ds, k, 1)
        assert out.train == ds.train and out.val == ds.val and out.shots == 0


def test_short_class_kept_whole_with_warning(pets_root, caplog):
    ds = load_dataset("oxford_pets", pets_root)
    with caplog.at_level(logging.WARNING):
        out = fewshot_split(ds, 4, 1)
    short = [it for it in out.train if it.label == 2]
    assert len(short) == 2  # class 2 has only two training images
    assert "fewer than 4" in caplog.text
    assert (
        "oxford_pets train: 1 class(es) have fewer than 4 images and are used whole (labels [2])"
        in caplog.messages
    )


def test_cache_written_relative_and_reused(pets_root, tmp_path, monkeypatch, helpers):
    cache = tmp_path / "run" / "cache"
    ds = load_dataset("oxford_pets", pets_root)
    first = fewshot_split(ds, 2, 1, cache_dir=cache)
    files = list(cache.rglob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["split_hash"] == ds.split_hash
    assert all(row[0].startswith("oxford_pets/images/") for row in data["train"] + data["val"])

    def no_draw(*a, **k):
        raise AssertionError("should have reused the cache")

    monkeypatch.setattr(fewshot_mod, "draw_per_label", no_draw)
    again = fewshot_split(ds, 2, 1, cache_dir=cache)
    assert again.train == first.train and again.val == first.val


def test_cache_survives_moving_the_data_root(pets_root, tmp_path):
    cache = tmp_path / "cache"
    first = fewshot_split(load_dataset("oxford_pets", pets_root), 2, 3, cache_dir=cache)
    moved = tmp_path / "moved"
    shutil.move(str(pets_root), moved)
    ds = load_dataset("oxford_pets", moved)
    again = fewshot_split(ds, 2, 3, cache_dir=cache)
    assert [it.path for it in again.train] == [
        it.path.replace(str(pets_root), str(moved)) for it in first.train
    ]
    assert all(it.path.startswith(str(moved)) for it in again.train)


def test_changed_split_file_invalidates_cache(pets_root, tmp_path):
    cache = tmp_path / "cache"
    fewshot_split(load_dataset("oxford_pets", pets_root), 2, 1, cache_dir=cache)
    split_path = pets_root / "oxford_pets" / "split_zhou_OxfordPets.json"
    split = json.loads(split_path.read_text())
    split["train"] = split["train"][1:]  # drop one training entry
    split_path.write_text(json.dumps(split))
    ds = load_dataset("oxford_pets", pets_root)
    out = fewshot_split(ds, 2, 1, cache_dir=cache)
    ref_train, ref_val = dassl_reference(ds.train, ds.val, 2, 1)
    assert out.train == ref_train and out.val == ref_val
    data = json.loads(next(cache.rglob("*.json")).read_text())
    assert data["split_hash"] == ds.split_hash


def test_nothing_written_into_data_folder(pets_root, tmp_path, helpers):
    before = helpers.snapshot(pets_root)
    ds = load_dataset("oxford_pets", pets_root)
    subsample_classes(fewshot_split(ds, 4, 1, cache_dir=tmp_path / "cache"), "new")
    assert helpers.snapshot(pets_root) == before


def test_cache_dir_inside_data_root_refused(pets_root):
    ds = load_dataset("oxford_pets", pets_root)
    with pytest.raises(ValueError, match="inside the data root"):
        fewshot_split(ds, 2, 1, cache_dir=pets_root / "oxford_pets" / "split_fewshot")


@pytest.mark.parametrize("which", ["base", "new"])
def test_subsample_equals_coop_with_odd_class_count(pets_root, which):
    ds = fewshot_split(load_dataset("oxford_pets", pets_root), 4, 1)
    assert ds.num_classes == 5
    out = subsample_classes(ds, which)
    ref = coop_subsample_reference(ds.train, ds.val, ds.test, which)
    assert [out.train, out.val, out.test] == ref
    expected_old = [0, 1, 2] if which == "base" else [3, 4]  # ceil(5/2) = 3 base classes
    assert out.classnames == [ds.classnames[y] for y in expected_old]
    for split in (out.train, out.val, out.test):
        assert sorted({it.label for it in split}) == list(range(len(expected_old)))
        assert all(out.classnames[it.label] == it.classname for it in split)
    assert out.subsample == which
    assert out.all_classnames == ds.classnames  # every name, for MoCoOp's text loss over base and new


def test_subsample_all_is_identity_and_bad_name_rejected(pets_root):
    ds = load_dataset("oxford_pets", pets_root)
    assert subsample_classes(ds, "all") is ds
    with pytest.raises(ValueError, match="'all', 'base' or 'new'"):
        subsample_classes(ds, "novel")


def test_fewshot_after_subsample_refused(pets_root):
    ds = subsample_classes(load_dataset("oxford_pets", pets_root), "base")
    with pytest.raises(ValueError) as e:
        fewshot_split(ds, 2, 1)
    assert str(e.value) == "fewshot_split must come before subsample_classes (CoOp draws from all classes)."


def test_a_second_draw_is_refused(pets_root):
    once = fewshot_split(load_dataset("oxford_pets", pets_root), 1, 1)
    with pytest.raises(ValueError, match="^oxford_pets already holds a 1-shot draw.$"):
        fewshot_split(once, 1, 1)


# ---------------------------------------------------------------------- cache layout, logs, messages
def _memory_dataset(train_labels, n_classes, root=None, base="/data/x"):
    """A DatasetSplits built in memory (absolute paths; ``root=None``: not under a data root)."""
    from promptlab.data import DatasetSplits

    def items(split, labels):
        return [Item(f"{base}/{split}/{i}.jpg", y, f"c{y}") for i, y in enumerate(labels)]

    every = [y for y in range(n_classes) for _ in range(3)]
    return DatasetSplits(
        name="mem",
        train=items("train", train_labels),
        val=items("val", every),
        test=items("test", every),
        classnames=[f"c{y}" for y in range(n_classes)],
        template="a photo of a {}.",
        root=root,
    )


def test_cache_file_name_and_reuse_logs(pets_root, tmp_path, caplog):
    """``cache_dir/fewshot/<name>_shot<K>_seed<S>.json``; a corrupt file or another split's draw is
    redrawn, and the log names the file (and the error)."""
    cache = tmp_path / "cache"
    ds = load_dataset("oxford_pets", pets_root)
    with caplog.at_level(logging.INFO, logger="promptlab.data.fewshot"):
        first = fewshot_split(ds, 2, 3, cache_dir=cache)
    assert not any("cache" in m and "ignoring" in m for m in caplog.messages)  # no file yet: nothing read
    caplog.clear()
    path = cache / "fewshot" / "oxford_pets_shot2_seed3.json"
    with caplog.at_level(logging.INFO, logger="promptlab.data.fewshot"):
        reused = fewshot_split(ds, 2, 3, cache_dir=cache)
    assert f"few-shot split: reusing {path}" in caplog.messages
    assert (reused.shots, reused.seed, reused.train) == (2, 3, first.train)  # a reused draw says what it is
    caplog.clear()
    assert [p.relative_to(cache) for p in cache.rglob("*.json")] == [path.relative_to(cache)]
    path.write_text("{not json")
    with caplog.at_level(logging.INFO, logger="promptlab.data.fewshot"):
        again = fewshot_split(ds, 2, 3, cache_dir=cache)
    assert again.train == first.train
    warning = [m for m in caplog.messages if m.startswith("ignoring unreadable")]
    assert len(warning) == 1 and warning[0].startswith(f"ignoring unreadable few-shot cache {path}: ")
    assert "Expecting property name" in warning[0]  # json's own message: the error is passed on
    data = json.loads(path.read_text())
    data["split_hash"] = "0" * 64
    path.write_text(json.dumps(data))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="promptlab.data.fewshot"):
        fewshot_split(ds, 2, 3, cache_dir=cache)
    assert f"few-shot cache {path} was drawn from a different split; drawing again" in caplog.messages


def test_cache_without_a_data_root_keeps_absolute_paths(tmp_path):
    ds = _memory_dataset([0, 0, 1, 1, 2, 2], 3)
    first = fewshot_split(ds, 1, 1, cache_dir=tmp_path)
    rows = json.loads((tmp_path / "fewshot" / "mem_shot1_seed1.json").read_text())["train"]
    assert all(r[0].startswith("data/x/train/") for r in rows)  # relative to "/"
    again = fewshot_split(ds, 1, 1, cache_dir=tmp_path)
    assert again.train == first.train and all(it.path.startswith("/data/x/train/") for it in again.train)
    # no split file: the draw is keyed by the hash of the items themselves; other items, another draw
    assert ds.split_hash == "" and json.loads((tmp_path / "fewshot" / "mem_shot1_seed1.json").read_text())[
        "split_hash"
    ] == fewshot_mod.hash_splits(ds.train, ds.val, ds.test, None)
    for split in ("train", "val", "test"):
        moved = dataclasses.replace(
            ds, **{split: [Item(it.path + "x", it.label, it.classname) for it in getattr(ds, split)]}
        )
        redrawn = fewshot_split(moved, 1, 1, cache_dir=tmp_path)
        assert all(it.path.endswith("x") for it in redrawn.train) == (split == "train"), split
        assert redrawn.val == dassl_reference(moved.train, moved.val, 1, 1)[1], split


def test_cache_dir_inside_data_root_message(pets_root):
    ds = load_dataset("oxford_pets", pets_root)
    with pytest.raises(ValueError) as e:
        fewshot_split(ds, 2, 1, cache_dir=pets_root)
    assert str(e.value) == (
        f"few-shot cache dir {pets_root} is inside the data root {ds.root}; "
        "promptlab never writes into the data folder. Use the run's cache directory."
    )


def test_subsample_uses_the_labels_present_in_train():
    """CoOp sorts the labels *of the training items*: a class missing from train is in neither half."""
    ds = _memory_dataset([0, 1, 2, 3, 5, 5], 6)  # class 4 has no training image
    new = subsample_classes(ds, "new")
    assert new.classnames == ["c3", "c5"]  # ceil(5 / 2) = 3 base labels (0, 1, 2); new = 3, 5
    assert sorted({(it.classname, it.label) for it in new.test}) == [("c3", 0), ("c5", 1)]
    base = subsample_classes(ds, "base")
    assert base.classnames == ["c0", "c1", "c2"]
    with pytest.raises(ValueError, match="^mem is already subsampled to its base classes.$"):
        subsample_classes(base, "new")


def test_subsample_of_a_test_only_dataset_uses_every_class():
    ds = _memory_dataset([], 5)  # e.g. a cross-dataset target: no training items
    new = subsample_classes(ds, "new")
    assert new.classnames == ["c3", "c4"] and new.train == []
    assert sorted({it.label for it in new.test}) == [0, 1]


def test_short_val_warning_cache_payload_and_root_relative_hash(tmp_path, caplog):
    """What a draw tells the user and writes: the val warning names min(K, 4) and at most ten labels,
    the cache file records the dataset and is logged by path, and a dataset without a split hash is
    hashed relative to its root, so the same data under another root reuses the draw."""
    n = 12
    train = [y for y in range(n) for _ in range(10)]
    root_a, root_b, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    ds = _memory_dataset(train, n, root=root_a, base=str(root_a))
    with caplog.at_level(logging.INFO, logger="promptlab.data.fewshot"):
        fewshot_split(ds, 8, 1, cache_dir=cache)  # val has 3 images per class: every class is short
    path = cache / "fewshot" / "mem_shot8_seed1.json"
    assert (
        f"mem val: {n} class(es) have fewer than 4 images and are used whole (labels {list(range(10))})"
        in caplog.messages
    )
    assert f"few-shot split: wrote {path}" in caplog.messages
    assert json.loads(path.read_text())["dataset"] == "mem"
    caplog.clear()
    moved = _memory_dataset(train, n, root=root_b, base=str(root_b))
    with caplog.at_level(logging.INFO, logger="promptlab.data.fewshot"):
        again = fewshot_split(moved, 8, 1, cache_dir=cache)
    assert f"few-shot split: reusing {path}" in caplog.messages
    assert all(it.path.startswith(str(root_b)) for it in again.train)
