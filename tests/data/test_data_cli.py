"""`promptlab data list | fewshot | check` through `main_data` and a parent parser."""

from __future__ import annotations

import argparse
import json

from promptlab.cli_data import add_data_commands, main_data
from promptlab.data import (
    dataset_names,
    fewshot_split,
    load_dataset,
    make_synthetic_dataset,
    subsample_classes,
)


def test_list(capsys):
    assert main_data(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in dataset_names())
    assert "a photo of a {}, a type of pet." in out


def test_add_data_commands_on_a_parent_parser(pets_root, tmp_path):
    parser = argparse.ArgumentParser(prog="promptlab")
    add_data_commands(parser.add_subparsers(dest="command"))
    out = tmp_path / "s.json"
    args = parser.parse_args(
        ["data", "fewshot", str(pets_root), "oxford_pets", "--shots", "1", "--seed", "1", "--out", str(out)]
    )
    assert args.func(args) == 0 and out.is_file()


def test_fewshot_writes_split_file_format(pets_root, tmp_path):
    out = tmp_path / "out" / "pets_base.json"
    rc = main_data(
        [
            "fewshot",
            str(pets_root),
            "oxford_pets",
            "--shots",
            "4",
            "--seed",
            "2",
            "--subsample",
            "base",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    split = json.loads(out.read_text())
    ds = subsample_classes(fewshot_split(load_dataset("oxford_pets", pets_root), 4, 2), "base")
    image_dir = pets_root / "oxford_pets" / "images"
    for s in ("train", "val", "test"):
        assert all(not r.startswith(("/", "..")) and r.startswith("c") for r, _, _ in split[s])
        assert [(str(image_dir / r), y, c) for r, y, c in split[s]] == [
            (it.path, it.label, it.classname) for it in ds.split(s)
        ]
    assert {y for _, y, _ in split["test"]} == {0, 1, 2}  # relabelled base half


def test_fewshot_output_reads_back_as_a_split_file(pets_root, tmp_path):
    out = pets_root / ".." / "exported.json"
    assert (
        main_data(
            [
                "data",
                "fewshot",
                str(pets_root),
                "oxford_pets",
                "--shots",
                "2",
                "--seed",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    yaml_path = tmp_path / "exported.yaml"
    yaml_path.write_text(
        f"name: exported\nreader: custom\nfolder: oxford_pets\nimage_dir: images\n"
        f"split_file: {out.resolve()}\ntemplate: 'a photo of a {{}}.'\n"
    )
    again = load_dataset(yaml_path, pets_root)
    assert again.train == fewshot_split(load_dataset("oxford_pets", pets_root), 2, 1).train


def test_fewshot_missing_dataset_is_a_clean_error(data_root, capsys):
    assert main_data(["fewshot", str(data_root), "dtd", "--shots", "1", "--seed", "1"]) == 2
    assert "dtd" in capsys.readouterr().err


def test_check_ok(data_root, helpers, capsys):
    helpers.build_split_dataset(data_root, "oxford_pets")
    make_synthetic_dataset(data_root, n_classes=3)
    assert main_data(["check", str(data_root), "synthetic"]) == 0
    assert "synthetic: ok: 3 classes" in capsys.readouterr().out


def test_check_all_skips_absent_but_flags_present(pets_root, capsys):
    assert main_data(["check", str(pets_root)]) == 1  # pets present: 5 classes, 37 expected
    out = capsys.readouterr().out
    assert "dtd: not found" in out
    assert "oxford_pets: PROBLEMS: 5 classes (expected 37)" in out
    assert "train has 29 items, 2944 expected" in out


def test_check_names_missing_file_and_fix(pets_root, capsys):
    (pets_root / "oxford_pets" / "split_zhou_OxfordPets.json").unlink()
    assert main_data(["check", str(pets_root), "oxford_pets"]) == 1
    out = capsys.readouterr().out
    assert "split file missing:" in out and "split_zhou_OxfordPets.json" in out
    assert "drive.google.com/file/d/1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs" in out


def test_check_missing_and_unreadable_images(data_root, capsys):
    folder = make_synthetic_dataset(data_root, n_classes=2)
    (folder / "images" / "red_circle" / "test_000.png").unlink()
    (folder / "images" / "green_square" / "val_001.png").write_bytes(b"garbage")
    assert main_data(["check", str(data_root), "synthetic", "--full"]) == 1
    out = capsys.readouterr().out
    assert "test: 1 of 12 images missing" in out and "test_000.png" in out
    assert "val: 1 unreadable image(s) in all" in out and "val_001.png" in out


def test_check_nothing_found_and_unknown_name(data_root, capsys):
    assert main_data(["check", str(data_root)]) == 1
    assert "no known dataset found" in capsys.readouterr().out
    assert main_data(["check", str(data_root), "petz"]) == 1
    assert "unknown dataset 'petz'" in capsys.readouterr().out
