"""Atomic writes: the previous file survives any failure and no temporary file is left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from promptlab import io


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_writers_round_trip(tmp_path: Path) -> None:
    io.atomic_write_bytes(tmp_path / "a.bin", b"abc")
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    io.atomic_write_json(tmp_path / "sub" / "m.json", {"acc": 0.5, "name": "café"})
    assert json.loads((tmp_path / "sub" / "m.json").read_text(encoding="utf-8")) == {
        "acc": 0.5,
        "name": "café",
    }
    obj = {"state_dict": {"ctx": torch.randn(2, 3)}, "epoch": 3}
    io.atomic_save_torch(obj, tmp_path / "ckpt.pt")
    back = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert back["epoch"] == 3 and torch.equal(back["state_dict"]["ctx"], obj["state_dict"]["ctx"])
    base = torch.randn(4, 6)
    # a non-contiguous view and a tensor sharing its storage: plain safetensors refuses both
    io.atomic_save_safetensors({"t": base.t(), "v": base[:2]}, tmp_path / "x.safetensors", {"k": "v"})
    got = load_file(tmp_path / "x.safetensors")
    assert torch.equal(got["t"], base.t()) and torch.equal(got["v"], base[:2])
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []


def test_new_file_gets_umask_permissions(tmp_path: Path) -> None:
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    umask = os.umask(0o022)
    try:
        io.atomic_write_bytes(tmp_path / "f", b"x")
    finally:
        os.umask(umask)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644


def test_failed_torch_save_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model.pth.tar-1"
    io.atomic_save_torch({"epoch": 1}, target)
    before = target.read_bytes()
    real_save = torch.save

    def half_save(obj, f, *a, **k):
        f.write(b"partial garbage")  # some bytes reach the temporary file, then the write dies
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_save_torch({"epoch": 2}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert target.read_bytes() == before
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert _leftovers(tmp_path) == []


def test_failed_fsync_and_failed_rename_keep_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "m.json"
    io.atomic_write_json(target, {"v": 1})

    def boom(*a, **k):
        raise OSError("io error")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", boom)
        with pytest.raises(OSError):
            io.atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1} and _leftovers(tmp_path) == []
    with monkeypatch.context() as m:
        m.setattr(os, "replace", boom)
        with pytest.raises(OSError):
            io.atomic_write_json(target, {"v": 3})
    assert json.loads(target.read_text()) == {"v": 1} and _leftovers(tmp_path) == []


def test_unserialisable_json_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        io.atomic_write_json(tmp_path / "m.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_stage_then_commit(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")
    tmp = io.stage(target, lambda f: f.write(b"new"))
    assert target.read_text() == "old" and tmp.parent == tmp_path and tmp.name.endswith(".tmp")
    io.commit(tmp, target)
    assert target.read_text() == "new" and _leftovers(tmp_path) == []
    io.discard(io.stage(target, lambda f: f.write(b"dropped")))
    assert target.read_text() == "new" and _leftovers(tmp_path) == []


def test_safetensors_bytes_do_not_depend_on_metadata_order() -> None:
    """Issue 15 item 10: safetensors writes __metadata__ in hash-map order, which changes call to call."""
    tensors = {"ctx": torch.arange(6.0).reshape(2, 3), "b": torch.ones(1)}
    meta = {f"key{i}": str(i) for i in range(6)}
    outs = {io.safetensors_bytes(tensors, dict(reversed(meta.items()) if i % 2 else meta)) for i in range(12)}
    assert len(outs) == 1
    from safetensors.torch import load

    assert torch.equal(load(outs.pop())["ctx"], tensors["ctx"])


def test_exports_of_identical_modules_are_byte_identical(tmp_path: Path, tiny_clip) -> None:
    from promptlab.export import load_prompts, save_prompts
    from promptlab.methods import CoOp

    torch.manual_seed(0)
    module = CoOp(tiny_clip, ["cat", "dog"], n_ctx=2, ctx_init=None)
    for name in ("a", "b"):
        save_prompts(module, tmp_path / name, extra={"dataset": "x", "seed": 1, "shots": 4})
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files and files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert torch.equal(load_prompts(tmp_path / "b", tiny_clip).ctx, module.ctx)
