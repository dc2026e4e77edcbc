"""Errors a user can act on: one line naming the file or key, and an exit code per kind of problem.

Exit codes (promptlab/cli.py): 2 invalid command / recipe / file contents, 3 a file cannot be read
or written, 4 a non-finite loss, 1 anything else. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from promptlab.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo" / "coop_tiny.yaml"


def _run(tmp_path: Path, *extra: str) -> list[str]:
    return ["run", str(DEMO), f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", *extra]


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.batch_size=0", "train.batch_size"),  # ZeroDivisionError
        ("train.checkpoint_every=0", "train.checkpoint_every"),  # ZeroDivisionError
        ("eval.batch_size=0", "eval.batch_size"),  # ZeroDivisionError
        ("train.aug_views=0", "train.aug_views"),  # torch internals
        ("train.epochs=-5", "train.epochs"),  # silently ran zero-shot
        ("train.epochs_by_shots.4=-1", "train.epochs_by_shots.4"),
    ],
)
def test_out_of_range_values_are_refused_before_anything_runs(tmp_path, capsys, override, key) -> None:
    assert main(_run(tmp_path, override)) == 2
    assert f"{key}: must be >= " in _err(capsys)
    assert not (tmp_path / "run").exists()


def test_negative_n_ctx_names_the_key(tmp_path, capsys) -> None:
    assert main(_run(tmp_path, "method.n_ctx=-2", "method.ctx_init=null", "train.epochs=1")) == 2
    assert "n_ctx must be a positive number of context tokens, got -2" in _err(capsys)


def test_non_finite_loss_exits_4_and_is_in_log_txt(tmp_path, capsys) -> None:
    assert main(_run(tmp_path, "optimizer.lr=1e30", "train.epochs=2")) == 4
    assert "non-finite loss" in _err(capsys)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "run failed: FloatingPointError: non-finite loss" in log


def test_unreadable_image_names_the_file(tmp_path, capsys) -> None:
    from promptlab.data import make_synthetic_dataset

    images = make_synthetic_dataset(tmp_path / "cache" / "data") / "images"
    bad = sorted(p for p in images.iterdir() if p.is_dir())[0]
    for f in bad.iterdir():
        f.write_bytes(b"not an image")
    assert main(_run(tmp_path, "train.epochs=1")) == 3
    assert f"cannot read image {bad}/" in _err(capsys)


def test_decompression_bomb_names_the_file(tmp_path, capsys, monkeypatch) -> None:
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # every 32 x 32 image is now "too large"
    assert main(_run(tmp_path, "train.epochs=1")) == 3
    err = _err(capsys)
    assert "cannot read image" in err and "decompression bomb" in err and "MAX_IMAGE_PIXELS" in err


def test_disk_full_while_checkpointing(tmp_path, capsys, monkeypatch) -> None:
    import torch

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1536 vs 1430")

    monkeypatch.setattr(torch, "save", full)  # promptlab.io imports torch when it first saves
    assert main(_run(tmp_path, "train.epochs=1")) == 3
    err = _err(capsys)
    assert f"cannot write {tmp_path / 'run' / 'checkpoints' / 'last.pt'}: disk full" in err


def test_output_path_that_is_a_file(tmp_path, capsys) -> None:
    (tmp_path / "run").write_text("a file")
    assert main(_run(tmp_path)) == 3
    assert f"output directory {tmp_path / 'run'} is a file" in _err(capsys)


def test_empty_prompt_config_names_the_file(tmp_path, capsys) -> None:
    (tmp_path / "prompt_config.json").write_text("")
    assert main(["eval", str(tmp_path), f"data.root={tmp_path}"]) == 2
    assert f"{tmp_path / 'prompt_config.json'}: not valid JSON" in _err(capsys)


def test_recipe_not_found_is_a_config_error(capsys) -> None:
    assert main(["run", "no/such_recipe"]) == 2
    assert "recipe 'no/such_recipe' not found" in _err(capsys)


def test_unexpected_error_exits_1_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch) -> None:
    import promptlab.cli

    def boom(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(promptlab.cli, "cmd_ls", boom)
    assert main(["ls"]) == 1
    assert "ZeroDivisionError: division by zero" in _err(capsys)
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "ls"])
