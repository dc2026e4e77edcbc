"""AnomalyCLIP: dataset layouts, DPAM in FrozenCLIP, maps, gradients, recipes, train -> eval -> predict."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from promptlab.anomaly.data import AnomalyDataset, load_items, write_synthetic
from promptlab.anomaly.loop import (
    evaluate_anomaly,
    load_anomaly_prompts,
    load_anomaly_recipe,
    save_anomaly_prompts,
    train_anomaly,
)
from promptlab.anomaly.method import AnomalyCLIP, map_loss
from promptlab.cli import main

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes" / "anomaly").glob("*.yaml"))
SMALL = dict(n_ctx=3, deep_depth=2, deep_n_ctx=2, feature_layers=[1, 2], dpam_layers=1)


@pytest.mark.parametrize("layout", ["mvtec", "visa", "folder"])
def test_layouts_read_known_masks(tmp_path: Path, layout: str) -> None:
    root = write_synthetic(tmp_path / layout, layout, categories=("a", "b"), n_good=2, n_defect=3, size=32)
    items = load_items(layout, root)
    assert len(items) == 10 and {it.category for it in items} == {"a", "b"}
    assert sum(it.label for it in items) == 6
    assert all((it.mask is not None) == bool(it.label) for it in items)
    ds = AnomalyDataset(items, 32)
    for i, it in enumerate(items):
        img, mask, label, _ = ds[i]
        assert img.shape == (3, 32, 32) and mask.shape == (1, 32, 32) and label == it.label
        # the synthetic defect is a bright 8x8 square and its mask is exactly that square
        assert mask.sum() == (64 if it.label else 0)
        if it.label:
            assert img[0][mask[0] > 0].mean() > img[0][mask[0] == 0].mean() + 1.0


def test_mvtec_missing_mask_is_an_error(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path, "mvtec", n_good=1, n_defect=1)
    next((root / "widget" / "ground_truth" / "broken").glob("*.png")).unlink()
    with pytest.raises(FileNotFoundError, match="mask"):
        load_items("mvtec", root)


def test_dpam_beyond_last_layer_is_plain_attention(tiny_clip, images) -> None:
    pooled, (last,) = tiny_clip.encode_image_dense(images, [tiny_clip.vision_layers], dpam_from=99)
    ref_pooled, ref_tokens = tiny_clip.encode_image(images, return_tokens=True)
    torch.testing.assert_close(last, ref_tokens)
    torch.testing.assert_close(pooled, ref_pooled)
    _, (vv,) = tiny_clip.encode_image_dense(images, [tiny_clip.vision_layers], dpam_from=0)
    assert (vv - last).abs().max() > 1e-3  # DPAM does change the patch path


def test_dpam_matches_dual_path_definition(tiny_clip, images) -> None:
    """Reference dual path, written out with the open_clip block modules: both attentions read ln_1 of
    the plain path; the V-V path adds out_proj(softmax(V V^T / sqrt(d)) V) and skips the MLP."""
    v = tiny_clip.model.visual
    x = v.ln_pre(tiny_clip._vision_embed(images))
    vv = None
    for blk in v.transformer.resblocks:  # DPAM from block 0
        a = blk.attn
        h = blk.ln_1(x)
        q, k, val = F.linear(h, a.in_proj_weight, a.in_proj_bias).chunk(3, -1)
        heads = lambda t, n=a.num_heads: t.unflatten(-1, (n, -1)).transpose(1, 2)  # noqa: E731
        val_h = heads(val)
        w = (val_h @ val_h.transpose(-1, -2) * val_h.shape[-1] ** -0.5).softmax(-1)
        vv_res = a.out_proj((w @ val_h).transpose(1, 2).flatten(2))
        vv = (x if vv is None else vv) + vv_res
        x = x + a.out_proj(
            F.scaled_dot_product_attention(heads(q), heads(k), val_h).transpose(1, 2).flatten(2)
        )
        x = x + blk.mlp(blk.ln_2(x))
    ref = v.ln_post(vv[:, 1:]) @ v.proj
    _, (ours,) = tiny_clip.encode_image_dense(images, [tiny_clip.vision_layers], dpam_from=0)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_other_input_size_interpolates_positions(tiny_clip) -> None:
    imgs = torch.randn(2, 3, 48, 40)
    _, (tok,) = tiny_clip.encode_image_dense(imgs, [1], dpam_from=1)
    assert tok.shape == (2, 6 * 5, tiny_clip.embed_dim)
    with pytest.raises(ValueError, match="layers"):
        tiny_clip.encode_image_dense(imgs, [3])


def test_maps_shape_range_and_scores(tiny_clip) -> None:
    module = AnomalyCLIP(tiny_clip, **SMALL)
    out = module.outputs(torch.randn(2, 3, 48, 48))
    assert out.image_logits.shape == (2, 2)
    assert out.layer_maps.shape == (2, 2, 2, 48, 48)
    torch.testing.assert_close(out.layer_maps.sum(2), torch.ones(2, 2, 48, 48))
    score, amap = module.scores(out, sigma=0)
    assert amap.shape == (2, 48, 48) and float(amap.min()) >= 0 and float(amap.max()) <= 2  # 2 layers summed
    assert bool(((score > 0) & (score < 1)).all())
    torch.testing.assert_close(amap, out.layer_maps[:, :, 1].sum(1))


def test_only_prompt_tokens_receive_gradients(tiny_clip) -> None:
    module = AnomalyCLIP(tiny_clip, **SMALL)
    out = module.outputs(torch.randn(2, 3, 32, 32))
    masks = torch.zeros(2, 1, 32, 32)
    masks[1, :, 8:16, 8:16] = 1
    loss = module.loss(out.image_logits, torch.tensor([0, 1]), layer_maps=out.layer_maps, masks=masks)
    loss.backward()
    got = {n for n, p in module.named_parameters() if p.grad is not None}
    assert got == {"ctx_normal", "ctx_anomalous", "deep"}
    assert all(not p.requires_grad for p in tiny_clip.parameters())
    assert set(module.prompt_state_dict()) == got


def test_map_loss_prefers_the_right_map() -> None:
    gt = torch.zeros(1, 1, 8, 8)
    gt[..., 2:5, 2:5] = 1
    good = torch.stack([1 - gt[:, 0], gt[:, 0]], 1).clamp(0.01, 0.99).unsqueeze(1)  # [1, 1, 2, 8, 8]
    assert map_loss(good, gt) < map_loss(good.flip(2), gt)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_anomaly_recipes_validate(path: Path) -> None:
    cfg = load_anomaly_recipe(path, ["data_root=/data"])
    assert cfg.kind == "anomaly" and cfg.train.epochs == 15 and cfg.image_size == 518
    assert cfg.train_data.layout != cfg.eval_data.layout  # cross-dataset protocol
    assert cfg.train_data.split == "test"  # the auxiliary dataset's test split has the masks
    with pytest.raises(ValueError, match="not AnomalyCLIP arguments"):
        load_anomaly_recipe(path, ["method.n_ctxx=3"])
    with pytest.raises(ValueError, match="train.epochs"):
        load_anomaly_recipe(path, ["train.epochs=many"])


def test_train_evaluate_predict_end_to_end(tmp_path: Path, tiny_clip) -> None:
    train_root = write_synthetic(tmp_path / "visa", "visa", categories=("a",), n_good=2, n_defect=2, size=32)
    test_root = write_synthetic(
        tmp_path / "mvtec", "mvtec", categories=("x", "y"), n_good=2, n_defect=2, size=32, seed=1
    )
    module = AnomalyCLIP(tiny_clip, **SMALL)
    before = module.ctx_anomalous.detach().clone()
    stats = train_anomaly(
        module,
        AnomalyDataset(load_items("visa", train_root), 32),
        epochs=2,
        batch_size=2,
        lr=1e-3,
        run_dir=tmp_path / "run",
        device=torch.device("cpu"),
    )
    assert (module.ctx_anomalous - before).abs().max() > 0 and stats["map_loss"] > 0
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    save_anomaly_prompts(module, tmp_path / "run" / "prompts", {"image_size": 32, "sigma": 1.0})
    again = load_anomaly_prompts(tmp_path / "run" / "prompts", tiny_clip)
    torch.testing.assert_close(again.text_features(), module.text_features())

    metrics = evaluate_anomaly(
        again,
        AnomalyDataset(load_items("mvtec", test_root), 32),
        device=torch.device("cpu"),
        batch_size=4,
        sigma=1.0,
    )
    assert set(metrics["categories"]) == {"x", "y"} and metrics["n"] == 8
    for k in ("pixel_auroc", "image_auroc", "image_ap"):
        assert 0 <= metrics["mean"][k] <= 100
        assert metrics["mean"][k] == pytest.approx(sum(r[k] for r in metrics["categories"].values()) / 2)

    imgs = sorted(str(p) for p in (test_root / "x" / "test").rglob("*.png"))
    out = tmp_path / "pred"
    assert main(["anomaly", "predict", str(tmp_path / "run" / "prompts"), *imgs, "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [r["image"] for r in rows] == imgs
    assert all(0 <= float(r["score"]) <= 1 and Path(r["overlay"]).is_file() for r in rows)
    from PIL import Image

    assert Image.open(rows[0]["overlay"]).size == (32, 32)
