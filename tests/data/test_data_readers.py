"""Readers over tiny fake copies of every layout, the dataset YAMLs, and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from promptlab.data import dataset_names, get_spec, load_dataset
from promptlab.data.registry import DATASETS_ENV, parse_spec
from promptlab.sweep import BENCHMARK_DATASETS

ALL = [
    "caltech101",
    "dtd",
    "eurosat",
    "fgvc_aircraft",
    "food101",
    "imagenet",
    "imagenet_a",
    "imagenet_r",
    "imagenet_sketch",
    "imagenetv2",
    "oxford_flowers",
    "oxford_pets",
    "stanford_cars",
    "sun397",
    "synthetic",
    "ucf101",
]


def test_every_dataset_has_a_valid_yaml():
    names = dataset_names()
    assert names == sorted(names) and set(ALL) <= set(names)  # adding a dataset is adding a YAML
    for name in names:
        spec = get_spec(name)
        assert spec.name == name and "{}" in spec.template


def test_templates_follow_coop():
    assert get_spec("oxford_pets").template == "a photo of a {}, a type of pet."
    assert get_spec("food101").template == "a photo of {}, a type of food."
    assert get_spec("dtd").template == "{} texture."
    assert get_spec("eurosat").template == "a centered satellite photo of {}."
    assert get_spec("ucf101").template == "a photo of a person doing {}."


@pytest.mark.parametrize("name", [n for n in BENCHMARK_DATASETS if get_spec(n).reader == "split_file"])
def test_split_file_reader(data_root, helpers, name):
    split = helpers.build_split_dataset(data_root, name)
    spec = get_spec(name)
    ds = load_dataset(name, data_root)
    base = data_root / spec.folder / spec.image_dir
    for s in ("train", "val", "test"):
        got = ds.split(s)
        assert [(Path(it.path), it.label, it.classname) for it in got] == [
            (base / rel, y, c) for rel, y, c in split[s]
        ]  # entry order kept
        assert all(os.path.isabs(it.path) and os.path.isfile(it.path) for it in got)
    assert ds.classnames == [f"thing_{y}" if name == "caltech101" else f"class {y}" for y in range(5)]
    assert ds.template == spec.template and ds.root == data_root and len(ds.split_hash) == 64


def test_stanford_cars_paths_relative_to_dataset_folder(data_root, helpers):
    helpers.build_split_dataset(data_root, "stanford_cars")
    ds = load_dataset("stanford_cars", data_root)
    assert ds.train[0].path.startswith(str(data_root / "stanford_cars" / "cars_train") + os.sep)
    assert ds.image_dir == data_root / "stanford_cars"


def test_fgvc_aircraft_reader(data_root, helpers):
    variants = helpers.build_fgvc(data_root)
    ds = load_dataset("fgvc_aircraft", data_root)
    assert ds.classnames == variants  # labels are line numbers of variants.txt
    assert len(ds.train) == len(ds.val) == len(ds.test) == 12
    first = (data_root / "fgvc_aircraft" / "images_variant_train.txt").read_text().splitlines()[0]
    image_id, name = first.split(" ", 1)
    assert ds.train[0].path == str(data_root / "fgvc_aircraft" / "images" / f"{image_id}.jpg")
    assert ds.train[0].classname == name and ds.train[0].label == variants.index(name)
    assert any(it.classname == "Boeing 737-200" for it in ds.test)  # names with spaces survive


def test_imagenet_reader_sorted_and_no_val(data_root, helpers):
    helpers.build_imagenet_like(data_root, "imagenet")
    ds = load_dataset("imagenet", data_root)
    assert ds.classnames == helpers.WNID_NAMES
    assert ds.val == []  # CoOp: val is the test set; no separate val split
    assert len(ds.train) == len(ds.test) == 18
    root = data_root / "imagenet" / "images"
    assert [it.path for it in ds.train[:3]] == [
        str(root / "train" / helpers.WNIDS[0] / f"img_{i}.jpeg") for i in range(3)
    ]
    assert ds.test[-1].path == str(root / "val" / helpers.WNIDS[-1] / "img_2.jpeg")
    assert [it.label for it in ds.train] == sorted(it.label for it in ds.train)


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r"])
def test_imagenet_200_class_subsets_map_to_imagenet_order(data_root, helpers, name):
    subset = [helpers.WNIDS[5], helpers.WNIDS[1], helpers.WNIDS[3]]
    helpers.build_imagenet_like(data_root, name, wnids=subset)
    ds = load_dataset(name, data_root)
    assert ds.classnames == ["goldfish", "tiger shark", "electric ray"]  # ImageNet order, ImageNet names
    assert ds.train == [] and ds.val == [] and len(ds.test) == 9
    assert {(it.label, Path(it.path).parent.name) for it in ds.test} == {
        (0, helpers.WNIDS[1]),
        (1, helpers.WNIDS[3]),
        (2, helpers.WNIDS[5]),
    }


def test_imagenetv2_index_folders(data_root, helpers):
    helpers.build_imagenet_like(data_root, "imagenetv2")
    ds = load_dataset("imagenetv2", data_root)
    assert ds.classnames == helpers.WNID_NAMES
    assert {(it.label, Path(it.path).parent.name) for it in ds.test} == {(i, str(i)) for i in range(6)}
    assert ds.train == []


def test_imagenet_sketch_test_only(data_root, helpers):
    helpers.build_imagenet_like(data_root, "imagenet_sketch")
    ds = load_dataset("imagenet_sketch", data_root)
    assert ds.train == [] and len(ds.test) == 18 and ds.classnames == helpers.WNID_NAMES


def _custom_yaml(tmp_path: Path, **keys) -> Path:
    lines = ["name: mine", "reader: custom", "folder: mine", "template: 'a photo of a {}.'"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in keys.items()]
    path = tmp_path / "mine.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_custom_folder_per_class_auto_split(data_root, tmp_path, helpers):
    for cls in ("red_apple", "green_pear"):
        for i in range(10):
            helpers.write_image(data_root / "mine" / "images" / cls / f"{i}.png")
    yaml_path = _custom_yaml(tmp_path, image_dir="images")
    ds = load_dataset(yaml_path, data_root)
    assert ds.classnames == ["green pear", "red apple"]  # sorted folders, "_" read as " "
    assert (len(ds.train), len(ds.val), len(ds.test)) == (10, 4, 6)  # CoOp's 50/20/30 per class
    assert not set(ds.train) & set(ds.test)
    assert load_dataset(yaml_path, data_root).train == ds.train  # seeded: deterministic


def test_custom_csv_with_split_column(data_root, tmp_path, helpers):
    rows = ["path,label,split"]
    for i, (lab, split) in enumerate([("cat", "train"), ("dog", "train"), ("cat", "val"), ("dog", "test")]):
        helpers.write_image(data_root / "mine" / f"{i}.png")
        rows.append(f"{i}.png,{lab},{split}")
    (data_root / "mine" / "labels.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(_custom_yaml(tmp_path, csv="labels.csv"), data_root)
    assert ds.classnames == ["cat", "dog"]
    assert [(Path(it.path).name, it.label) for it in ds.train] == [("0.png", 0), ("1.png", 1)]
    assert [it.classname for it in ds.val + ds.test] == ["cat", "dog"]


def test_custom_csv_integer_labels_need_classnames(data_root, tmp_path, helpers):
    helpers.write_image(data_root / "mine" / "a.png")
    (data_root / "mine" / "labels.csv").write_text("a.png,1,train\na.png,0,test\n")
    with pytest.raises(ValueError, match="classnames_file"):
        load_dataset(_custom_yaml(tmp_path, csv="labels.csv"), data_root)
    (data_root / "mine" / "names.txt").write_text("zero\none\n")
    ds = load_dataset(_custom_yaml(tmp_path, csv="labels.csv", classnames_file="names.txt"), data_root)
    assert ds.train[0].classname == "one" and ds.test[0].classname == "zero"


def test_custom_with_split_file(data_root, tmp_path, helpers):
    helpers.write_image(data_root / "mine" / "x" / "a.png")
    (data_root / "mine" / "split.json").write_text(
        json.dumps({"train": [["x/a.png", 0, "thing"]], "val": [], "test": [["x/a.png", 0, "thing"]]})
    )
    ds = load_dataset(_custom_yaml(tmp_path, split_file="split.json"), data_root)
    assert ds.train[0].path == str(data_root / "mine" / "x" / "a.png")


def test_adding_a_dataset_is_adding_a_yaml(data_root, tmp_path, helpers, monkeypatch):
    helpers.build_split_dataset(data_root, "oxford_pets")
    d = tmp_path / "yamls"
    d.mkdir()
    (d / "pets_again.yaml").write_text(
        get_spec("oxford_pets")
        .yaml_path.read_text()
        .replace("name: oxford_pets", "name: pets_again")
        .replace("a type of pet", "a kind of pet")
    )
    monkeypatch.setenv(DATASETS_ENV, str(d))
    assert dataset_names() == ["pets_again"]
    ds = load_dataset("pets_again", data_root)
    assert (
        ds.name == "pets_again" and ds.template == "a photo of a {}, a kind of pet." and len(ds.train) == 29
    )


# ---- bad input -------------------------------------------------------------------------------


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="data root .*nowhere"):
        load_dataset("oxford_pets", tmp_path / "nowhere")


def test_missing_dataset_folder_names_folder_yaml_and_fix(data_root):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("oxford_pets", data_root)
    msg = str(e.value)
    assert str(data_root / "oxford_pets") in msg and "oxford_pets.yaml" in msg and "Fix:" in msg


def test_missing_split_file(data_root, helpers):
    helpers.build_split_dataset(data_root, "dtd")
    (data_root / "dtd" / "split_zhou_DescribableTextures.json").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"split file not found: .*split_zhou_DescribableTextures\.json"
        r".*drive\.google\.com",
    ):
        load_dataset("dtd", data_root)


def test_missing_image_names_entry(pets_root):
    victim = pets_root / "oxford_pets" / "images" / "c3" / "test_3_1.jpg"
    victim.unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"1 image\(s\) listed in .*split_zhou_OxfordPets\.json are "
        r"missing: test: .*test_3_1\.jpg",
    ):
        load_dataset("oxford_pets", pets_root)
    assert len(load_dataset("oxford_pets", pets_root, check_files=False).test) == 14


def _edit_split(root: Path, fn) -> None:
    path = root / "oxford_pets" / "split_zhou_OxfordPets.json"
    split = json.loads(path.read_text())
    fn(split)
    path.write_text(json.dumps(split))


def test_label_out_of_range(pets_root):
    _edit_split(pets_root, lambda s: s["test"].append(["c0/test_0_0.jpg", 37, "class 37"]))
    with pytest.raises(ValueError, match=r"label out of range in .*test\[14\].*num_classes is 37"):
        load_dataset("oxford_pets", pets_root)


def test_classname_mismatch(pets_root):
    _edit_split(pets_root, lambda s: s["val"].__setitem__(0, [s["val"][0][0], s["val"][0][1], "other"]))
    with pytest.raises(ValueError, match=r"class name mismatch for label \d: .*val\[0\].*'other'"):
        load_dataset("oxford_pets", pets_root)


def test_empty_class_in_split_file(pets_root):
    def drop_label_1(split):
        for s in split:
            split[s] = [r for r in split[s] if r[1] != 1]

    _edit_split(pets_root, drop_label_1)
    with pytest.raises(ValueError, match=r"label\(s\) \[1\] have no entries"):
        load_dataset("oxford_pets", pets_root)


def test_malformed_entry_and_bad_json(pets_root):
    _edit_split(pets_root, lambda s: s["train"].insert(2, ["c0/x.jpg", "0"]))
    with pytest.raises(ValueError, match=r"malformed entry .*train\[2\]"):
        load_dataset("oxford_pets", pets_root)
    (pets_root / "oxford_pets" / "split_zhou_OxfordPets.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_dataset("oxford_pets", pets_root)


def test_fgvc_unknown_variant_names_line(data_root, helpers):
    helpers.build_fgvc(data_root)
    path = data_root / "fgvc_aircraft" / "images_variant_val.txt"
    path.write_text(path.read_text() + "1000000 Spitfire\n")
    with pytest.raises(ValueError, match=r"images_variant_val\.txt:13: class 'Spitfire' is not in"):
        load_dataset("fgvc_aircraft", data_root)


def test_imagenet_folder_not_in_classnames(data_root, helpers):
    folder = helpers.build_imagenet_like(data_root, "imagenet_sketch")
    helpers.write_image(folder / "images" / "n99999999" / "a.jpg")
    with pytest.raises(ValueError, match=r"\['n99999999'\] .* not listed in .*classnames\.txt"):
        load_dataset("imagenet_sketch", data_root)


def test_imagenet_empty_class_folder(data_root, helpers):
    folder = helpers.build_imagenet_like(data_root, "imagenet")
    for f in (folder / "images" / "val" / helpers.WNIDS[2]).iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=rf"empty class: no images in .*val/{helpers.WNIDS[2]}"):
        load_dataset("imagenet", data_root)


def test_imagenet_missing_classnames_says_where_to_get_it(data_root, helpers):
    folder = helpers.build_imagenet_like(data_root, "imagenet_r")
    (folder / "classnames.txt").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"class names file not found.*copy \$DATA/imagenet/classnames"
    ):
        load_dataset("imagenet_r", data_root)


def test_unknown_dataset_and_bad_yaml(tmp_path):
    with pytest.raises(KeyError, match="unknown dataset 'petz'.*oxford_pets"):
        load_dataset("petz", tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nreader: split_file\nfolder: x\ntemplate: '{}'\nsplit_file: s.json\nshots: 3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown key\(s\) \['shots'\]"):
        parse_spec(bad)
    bad.write_text("name: x\nreader: split_file\nfolder: x\ntemplate: '{}'\n")
    with pytest.raises(ValueError, match="needs key 'split_file'"):
        parse_spec(bad)


def test_fgvc_missing_image_names_it(data_root, helpers):
    helpers.build_fgvc(data_root)
    victim = next((data_root / "fgvc_aircraft" / "images").glob("*.jpg"))
    victim.unlink()
    with pytest.raises(
        FileNotFoundError, match=rf"1 image\(s\) listed in .*images_variant_train\.txt.*{victim.name}"
    ):
        load_dataset("fgvc_aircraft", data_root)
