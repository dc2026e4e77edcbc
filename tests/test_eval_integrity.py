"""No silent wrong evaluations: class-bound prompts on other classes, ignored backbone overrides,
test files dropped without a record (issue 15, item 7)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from promptlab.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo" / "coop_tiny.yaml"


@pytest.fixture(scope="module")
def csc_base_run(tmp_path_factory) -> Path:
    """Class-specific CoOp trained on the base half (3 of the 6 synthetic classes; new is also 3)."""
    tmp = tmp_path_factory.mktemp("csc")
    args = [f"output_dir={tmp / 'run'}", f"cache_dir={tmp / 'cache'}", "train.epochs=1", "train.aug_views=1"]
    assert main(["run", str(DEMO), *args, "method.csc=true", "subsample=base"]) == 0
    return tmp / "run"


def test_class_specific_context_refuses_other_classes_of_the_same_count(csc_base_run: Path, capsys) -> None:
    assert main(["eval", str(csc_base_run), "subsample=new"]) == 2
    assert "specific to the 3 classes it was learned on" in capsys.readouterr().err
    assert not (csc_base_run / "eval_synthetic_new_test.json").exists()
    assert main(["eval", str(csc_base_run), "subsample=base"]) == 0  # its own classes


def test_eval_honours_a_backbone_override(csc_base_run: Path, tmp_path: Path) -> None:
    from promptlab.backbones import load_clip, save_clip

    clip = load_clip("tiny")
    with torch.no_grad():
        next(p for p in clip.parameters() if p.dim() == 2).add_(0.01)  # other weights, same shapes
    weights = save_clip(clip, tmp_path / "weights")
    assert main(["eval", str(csc_base_run), "subsample=base", f"model.pretrained={weights}"]) == 0
    res = json.loads((csc_base_run / "eval_synthetic_base_test.json").read_text())
    run = json.loads((csc_base_run / "metrics.json").read_text())
    assert res["pretrained"] == str(weights) and res["backbone_overrides"] == ["model.pretrained"]
    assert res["weights_fingerprint"] == clip.fingerprint() != run["weights_fingerprint"]


def test_eval_refuses_a_backbone_of_another_width(csc_base_run: Path, capsys) -> None:
    assert main(["eval", str(csc_base_run), "subsample=base", "model.arch=sandbox"]) == 2
    assert "prompts were learned on a different backbone: width" in capsys.readouterr().err


def test_unreadable_test_videos_are_counted_and_named(tmp_path: Path) -> None:
    from promptlab.backbones import load_clip
    from promptlab.data import Item
    from promptlab.engine import evaluate
    from promptlab.methods import ViFiCLIP
    from promptlab.video.data import ClipTransform, VideoBatches, VideoDataset

    items = []
    for i in range(4):
        folder = tmp_path / f"v{i}"
        folder.mkdir()
        for t in range(4):
            Image.fromarray(np.full((32, 32, 3), 40 * t + i, dtype=np.uint8)).save(
                folder / f"img_{t:05d}.png"
            )
        items.append(Item(str(folder), i % 2, f"c{i % 2}"))
    bad = tmp_path / "broken.avi"
    bad.write_bytes(b"\x00" * 64)
    items.insert(1, Item(str(bad), 1, "c1"))
    ev = ClipTransform(32, (0.5,) * 3, (0.25,) * 3, train=False)
    batches = VideoBatches(VideoDataset(items, 4, ev), 2, torch.Generator(), shuffle=False)
    module = ViFiCLIP(load_clip("tiny"), ["c0", "c1"], stage="bridge")  # its own CLIP: bridge unfreezes it
    out = evaluate(module, batches, device=torch.device("cpu"))
    assert out["n"] == 4 and out["skipped"] == {"count": 1, "files": [str(bad)]}
