"""The sandbox's video variant: classes, deterministic clips, motion in the pixels, the on-disk layout
read by the real video reader, and both ViFi-CLIP sandbox recipes end to end on the sandbox CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from promptlab.backbones import load_clip
from promptlab.cli import main
from promptlab.data import load_dataset, subsample_classes
from promptlab.data.generated import PARAMS_FILE
from promptlab.runner import ensure_data
from promptlab.sandbox.video import (
    MOTIONS,
    make_sandbox_video_dataset,
    render_clip,
    trajectory,
    video_classnames,
)
from promptlab.sandbox.world import Style
from promptlab.video.data import read_frames

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "sandbox"
SHAPES4 = ["square", "triangle", "star", "heart"]


# ------------------------------------------------------------------------------------------ classes
def test_checkerboard_halves_hold_every_motion_and_shape() -> None:
    names = video_classnames(MOTIONS, SHAPES4)
    assert len(set(names)) == len(MOTIONS) * len(SHAPES4) == 24
    base, new = names[:12], names[12:]  # base = first ceil(n/2) labels (the protocol's split)
    for half in (base, new):
        assert {n.split(" ", 1)[1] for n in half} == set(MOTIONS)
        assert {n.split(" ", 1)[0] for n in half} == set(SHAPES4)
    with pytest.raises(ValueError, match="unknown"):
        video_classnames(["moonwalking"], SHAPES4)
    with pytest.raises(ValueError, match="circle"):
        video_classnames(["spinning"], ["circle", "star"])


# ------------------------------------------------------------------------------------------- clips
def test_clips_are_deterministic_per_seed_and_key() -> None:
    style = Style(noise=8.0, clutter=2, texture=0.3, cast=0.2, outline=0.5, blur=0.5)

    def clip(key: str, seed: int = 0) -> np.ndarray:
        return np.stack(
            [
                np.asarray(f)
                for f in render_clip(
                    "star bouncing", key, seed=seed, num_frames=6, image_size=32, style=style
                )
            ]
        )

    a = clip("k/1")
    assert a.shape == (6, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, clip("k/1"))
    assert not np.array_equal(a, clip("k/2"))
    assert not np.array_equal(a, clip("k/1", seed=1))


def _object_mask(frame: np.ndarray) -> np.ndarray:
    """Pixels that differ from the clean background (the corner's colour), as a bool [H, W]."""
    bg = frame[0, 0].astype(int)
    return np.abs(frame.astype(int) - bg).sum(-1) > 60


def _track(classname: str, key: str, trail: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame centroid y, centroid x and area of the object, in a clean, noiseless rendering."""
    frames = render_clip(classname, key, num_frames=16, image_size=64, style=Style(jitter=0), trail=trail)
    masks = [_object_mask(np.asarray(f)) for f in frames]
    ys, xs = zip(*(np.nonzero(m) for m in masks))
    return (
        np.array([y.mean() for y in ys]),
        np.array([x.mean() for x in xs]),
        np.array([m.sum() for m in masks], dtype=float),
    )


@pytest.mark.parametrize("key", ["m/0", "m/1", "m/2"])
def test_motion_is_in_the_pixels(key: str) -> None:
    """The object's centroid and area move as the class name says (64 px frames, object ~10-20 px)."""
    y, x, _ = _track("square moving up", key)
    assert y[-1] - y[0] < -20 and np.all(np.diff(y) < 0.5) and np.ptp(x) < 2
    y, _, _ = _track("square moving down", key)
    assert y[-1] - y[0] > 20 and np.all(np.diff(y) > -0.5)
    _, _, area = _track("star growing", key)
    assert area[-1] > 4 * area[0] and np.all(np.diff(area) > -3)
    _, _, area = _track("star shrinking", key)
    assert area[0] > 4 * area[-1] and np.all(np.diff(area) < 3)
    y, x, area = _track("triangle spinning", key)
    assert np.ptp(y) < 3 and np.ptp(x) < 3 and np.ptp(area) < 0.25 * area.mean()  # turns in place ...
    masks = [
        _object_mask(np.asarray(f))
        for f in render_clip(
            "triangle spinning", key, num_frames=16, image_size=64, style=Style(jitter=0), trail=0
        )
    ]
    assert (masks[0] ^ masks[8]).sum() > 0.2 * masks[0].sum()  # ... but does turn
    y, _, _ = _track("heart bouncing", key)
    dy = np.sign(np.diff(y)[np.abs(np.diff(y)) > 0.5])
    assert np.ptp(y) > 12 and (dy[1:] != dy[:-1]).sum() >= 1  # goes down and comes back up


def test_trail_points_where_the_object_came_from() -> None:
    """With a trail, a frame alone shows the direction: the faded copies lie behind the object."""
    for classname, sign in (("square moving up", 1), ("square moving down", -1)):
        frames = render_clip(classname, "t/0", num_frames=16, image_size=64, style=Style(jitter=0), trail=6)
        plain = render_clip(classname, "t/0", num_frames=16, image_size=64, style=Style(jitter=0), trail=0)
        f, p = np.asarray(frames[8]).astype(int), np.asarray(plain[8]).astype(int)
        ghost = np.abs(f - p).sum(-1) > 30  # pixels the trail changed
        obj_y = np.nonzero(_object_mask(p))[0].mean()
        assert ghost.sum() > 20
        assert sign * (np.nonzero(ghost)[0].mean() - obj_y) > 5  # below a rising object, above a falling one
    p = {"x": 0.5, "y": 0.5, "r": 0.15, "rot": 0.0, "spin": 3.0, "y0": 0.75, "dist": 0.5}
    assert (
        trajectory("moving up", -0.2, p)[1] > trajectory("moving up", 0.0, p)[1]
    )  # the trail extends before t=0


# ----------------------------------------------------------------------------------------- dataset
def _tiny_yaml(tmp_path: Path) -> Path:
    spec = yaml.safe_load((REPO / "datasets" / "sandbox_video.yaml").read_text())
    spec.update(name="sbv_tiny", folder="sbv_tiny", num_classes=4, expected={})
    spec["splits"]["val"] = "lists/val.txt"  # the shipped YAML has none: check a val list is read too
    spec["generator"].update(
        name="sbv_tiny",
        motions=["moving up", "growing"],
        shapes=["star", "heart"],
        train_per_class=3,
        val_per_class=1,
        test_per_class=2,
        num_frames=4,
        image_size=48,
    )
    path = tmp_path / "sbv_tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_dataset_loads_through_the_video_reader(tmp_path: Path) -> None:
    yml = _tiny_yaml(tmp_path)
    cfg = OmegaConf.create({"data": {"name": str(yml), "root": str(tmp_path / "data")}})
    ensure_data(cfg)  # the YAML's `generator` writes the files
    ds = load_dataset(yml, tmp_path / "data")  # promptlab.video.datasets.read_vifi_lists, with file checks
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 4, 8)
    assert ds.classnames == ["star moving up", "heart growing", "heart moving up", "star growing"]
    assert ds.template == "a photo of a {}."
    for it in ds.train + ds.val + ds.test:
        assert Path(it.path).is_dir() and Path(it.path).parent.name == it.classname.replace(" ", "_")
        assert ds.classnames[it.label] == it.classname
    base, new = subsample_classes(ds, "base"), subsample_classes(ds, "new")
    assert base.classnames == ["star moving up", "heart growing"] and new.classnames == [
        "heart moving up",
        "star growing",
    ]
    assert [it.label for it in new.test] == [0, 0, 1, 1]

    clip_dir = ds.test[0].path
    frames = read_frames(clip_dir, [0, 1, 2, 3])  # uint8 [T, 3, H, W], as the training loader reads it
    assert frames.shape == (4, 3, 48, 48) and frames.dtype == torch.uint8
    rel = Path(clip_dir).relative_to(tmp_path / "data" / "sbv_tiny" / "videos")
    expected = np.stack(
        [
            np.asarray(f)
            for f in render_clip(
                ds.test[0].classname,
                rel.as_posix(),
                num_frames=4,
                image_size=48,
                style=Style(**yaml.safe_load(yml.read_text())["generator"]["style"]),
            )
        ]
    )
    assert np.array_equal(frames.permute(0, 2, 3, 1).numpy(), expected)  # lossless: the files are the renders

    stamp = (Path(clip_dir) / "000.png").stat().st_mtime_ns
    ensure_data(cfg)  # complete: nothing rewritten
    assert (Path(clip_dir) / "000.png").stat().st_mtime_ns == stamp
    ensure_data(OmegaConf.create({"data": {"name": str(yml), "root": str(tmp_path / "again")}}))
    again = read_frames(str(tmp_path / "again" / "sbv_tiny" / "videos" / rel), [0, 1, 2, 3])
    assert torch.equal(again, frames)  # same seed, another folder: the same pixels


def test_changed_arguments_regenerate(tmp_path: Path) -> None:
    kw = dict(motions=["bouncing"], shapes=["star"], train_per_class=1, test_per_class=1, image_size=24)
    folder = make_sandbox_video_dataset(tmp_path, name="v", num_frames=6, **kw)
    assert len(list((folder / "videos" / "star_bouncing" / "test_000").glob("*.png"))) == 6
    make_sandbox_video_dataset(tmp_path, name="v", num_frames=3, **kw)
    assert len(list((folder / "videos" / "star_bouncing" / "test_000").glob("*.png"))) == 3  # no stale frames
    params = json.loads((folder / PARAMS_FILE).read_text())
    assert params["num_frames"] == 3 and params["style"]["noise"] == 0.0
    assert sorted(p.name for p in (folder / "lists").iterdir()) == [
        "test.txt",
        "train.txt",
    ]  # no empty val list
    assert (folder / "labels.csv").read_text() == "id,name\n0,star bouncing\n"
    (
        folder / "videos" / "star_bouncing" / "train_000" / "001.png"
    ).unlink()  # a lost frame: the folder is redone
    make_sandbox_video_dataset(tmp_path, name="v", num_frames=3, **kw)
    assert (folder / "videos" / "star_bouncing" / "train_000" / "001.png").is_file()


def test_shipped_dataset_yaml_matches_its_generator() -> None:
    spec = yaml.safe_load((REPO / "datasets" / "sandbox_video.yaml").read_text())
    gen = spec["generator"]
    names = video_classnames(gen["motions"], gen["shapes"])
    assert spec["num_classes"] == len(names)
    assert spec["expected"] == {
        s: gen[f"{s}_per_class"] * len(names) for s in ("train", "val", "test") if gen[f"{s}_per_class"]
    }
    assert set(spec["splits"]) == set(spec["expected"])


# --------------------------------------------------------------------------------------- recipes
def test_bridge_and_prompt_recipes_end_to_end(tmp_path: Path, one_thread) -> None:
    """Both sandbox ViFi-CLIP recipes, shrunk: bridge on base, eval on new, prompt on the bridged CLIP."""
    yml = _tiny_yaml(tmp_path)
    common = [
        f"data.name={yml}",
        f"cache_dir={tmp_path / 'cache'}",
        "device=cpu",
        "train.epochs=1",
        "train.warmup_epochs=0",
        "train.batch_size=3",
        "video.num_frames=2",
        "eval.batch_size=4",
        "shots=2",
    ]
    bridge = tmp_path / "bridge"
    assert (
        main(["run", str(RECIPES / "vificlip_bridge_base2novel.yaml"), *common, f"output_dir={bridge}"]) == 0
    )
    metrics = json.loads((bridge / "metrics.json").read_text())
    assert (
        metrics["method"] == "ViFiCLIP"
        and metrics["arch"] == "sandbox"
        and metrics["subsample"] == "base"
        and metrics["n"] == 4
    )
    assert (
        tmp_path / "cache" / "data" / "sbv_tiny" / "lists" / "train.txt"
    ).is_file()  # generated on first use
    bridged = load_clip("sandbox", str(bridge / "backbone"))
    assert bridged.fingerprint() != load_clip("sandbox").fingerprint()  # the towers moved and were saved

    assert main(["eval", str(bridge), "subsample=new"]) == 0
    novel = json.loads((bridge / "eval_sbv_tiny_new_test.json").read_text())
    assert novel["subsample"] == "new" and novel["n"] == 4

    prompt = tmp_path / "prompt"
    assert (
        main(
            [
                "run",
                str(RECIPES / "vificlip_prompt_base2novel.yaml"),
                *common,
                f"output_dir={prompt}",
                f"model.pretrained={bridge / 'backbone'}",
            ]
        )
        == 0
    )
    out = json.loads((prompt / "metrics.json").read_text())
    assert out["weights_fingerprint"] == bridged.fingerprint() and out["n"] == 4
    assert not (prompt / "backbone").exists()  # the prompt stage tunes no backbone weight
