"""Write-once bookkeeping of generated datasets: skip when complete, redo after a crash or a change."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from promptlab.data.generated import PARAMS_FILE, write_split_dataset

COUNTS = {"train": 2, "val": 1, "test": 1}


class Renderer:
    """Counts renders; optionally crashes after ``fail_after`` of them."""

    def __init__(self, fail_after: int | None = None, value: int = 0) -> None:
        self.calls, self.fail_after, self.value = 0, fail_after, value

    def __call__(self, classname: str, rel: str) -> Image.Image:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("crash while rendering")
        self.calls += 1
        return Image.new("RGB", (4, 4), (self.value, 0, 0))


def write(folder: Path, render: Renderer, seed: int = 0) -> Path:
    return write_split_dataset(folder, "split_x.json", ["a b", "c d"], COUNTS, {"seed": seed}, render)


def test_second_call_with_same_arguments_renders_nothing(tmp_path: Path) -> None:
    first, again = Renderer(), Renderer()
    write(tmp_path, first)
    write(tmp_path, again)
    assert first.calls == 8 and again.calls == 0
    assert (tmp_path / "images" / "a_b" / "train_001.png").is_file()


def test_crash_leaves_no_index_and_the_next_call_finishes(tmp_path: Path) -> None:
    write(tmp_path, Renderer(value=1), seed=1)
    with pytest.raises(RuntimeError):
        write(tmp_path, Renderer(fail_after=3, value=2), seed=2)
    assert not (tmp_path / "split_x.json").exists() and not (tmp_path / PARAMS_FILE).exists()
    # the old arguments must not be trusted either: some of their files were overwritten
    redo = Renderer(value=1)
    write(tmp_path, redo, seed=1)
    assert redo.calls == 8 and (tmp_path / "split_x.json").is_file()


def test_changed_arguments_or_missing_file_regenerate(tmp_path: Path) -> None:
    write(tmp_path, Renderer())
    changed = Renderer()
    write(tmp_path, changed, seed=5)
    assert changed.calls == 8
    (tmp_path / "images" / "c_d" / "test_000.png").unlink()
    missing = Renderer()
    write(tmp_path, missing, seed=5)
    assert missing.calls == 8


def test_generation_waits_for_the_lock_of_another_process(tmp_path: Path) -> None:
    """torchrun ranks / parallel sweep jobs: one generates while the others wait, then find it complete."""
    import threading

    from promptlab.data.generated import generation_lock, run_generator

    spec = {
        "_component_": "promptlab.data.make_synthetic_dataset",
        "n_classes": 2,
        "train_per_class": 1,
        "val_per_class": 1,
        "test_per_class": 1,
        "image_size": 8,
    }
    done = threading.Event()
    worker = threading.Thread(target=lambda: (run_generator(spec, tmp_path), done.set()))
    with generation_lock(
        tmp_path
    ):  # flock locks are per open file: a second open() in this process waits too
        worker.start()
        assert not done.wait(0.5), "the generator ran while another holder had the lock"
        assert not (tmp_path / "synthetic").exists()
    worker.join(30)
    assert done.is_set() and (tmp_path / "synthetic" / "split_synthetic.json").is_file()


def test_misspelt_generator_key_names_its_source(tmp_path: Path) -> None:
    from promptlab.data.generated import run_generator

    spec = {"_component_": "promptlab.data.make_synthetic_dataset", "n_clases": 2}
    with pytest.raises(ValueError, match=r"datasets/x\.yaml: generator: .*n_clases.* takes \['n_classes'"):
        run_generator(spec, tmp_path, source="datasets/x.yaml: generator")
    assert not (tmp_path / "synthetic").exists()


def test_every_shipped_generator_takes_its_yaml_arguments() -> None:
    """A misspelt key in a shipped dataset YAML's `generator:` would only fail on a user's first run."""
    import inspect

    from promptlab.config import resolve_component
    from promptlab.data import dataset_names, get_spec

    generated = [n for n in dataset_names() if get_spec(n).generator]
    assert {"synthetic", "sandbox_shapes", "sandbox_clean", "sandbox_video", "sandbox_video_source"} <= set(
        generated
    )
    for name in generated:
        kwargs = dict(get_spec(name).generator)
        fn = resolve_component(kwargs.pop("_component_"), "generator")
        inspect.signature(fn).bind(Path("root"), **kwargs)  # raises TypeError on a key the generator lacks
