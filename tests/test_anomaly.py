"""AnomalyCLIP: dataset layouts, DPAM in FrozenCLIP, maps, gradients, recipes, train -> eval -> predict.

Parity with the reference's loss, gradients and test-time maps: tests/test_anomaly_parity.py.
"""

from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, roc_auc_score
from torch.overrides import TorchFunctionMode

from promptlab.anomaly.data import AnomalyDataset, load_items, write_synthetic
from promptlab.anomaly.evaluator import AnomalyEvaluator
from promptlab.anomaly.method import (
    AnomalyCLIP,
    AnomalyOutput,
    gaussian_blur,
    map_loss,
    resolve_feature_layers,
)
from promptlab.anomaly.task import AnomalyBatches
from promptlab.backbones import load_clip
from promptlab.cli import main
from promptlab.config import ConfigError, load_recipe
from promptlab.engine import evaluate, make_schedule, train
from promptlab.export import load_prompts, save_prompts
from promptlab.metrics import aupro

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes" / "anomaly").glob("*.yaml"))
SMALL = dict(n_ctx=3, deep_depth=2, deep_n_ctx=2, feature_layers=[1, 2], dpam_layers=1)


def evaluate_anomaly(module, ds, *, device, batch_size=8, sigma=4.0, aupro_convention="published"):
    """The engine's evaluate with the anomaly task's batches and evaluator (what a run does)."""
    batches = AnomalyBatches(ds, batch_size, torch.Generator(), shuffle=False)
    evaluator = AnomalyEvaluator(ds.items, sigma=sigma, aupro_convention=aupro_convention)
    return evaluate(module, batches, device=device, evaluator=evaluator)


def train_anomaly(module, ds, *, epochs, batch_size, lr, run_dir, device, seed=111):
    """The engine's train on the anomaly task's batches: Adam(lr, (0.5, 0.999)) at a constant lr."""
    g = torch.Generator().manual_seed(seed)
    batches = AnomalyBatches(ds, batch_size, g, shuffle=True)
    opt = torch.optim.Adam(module.trainable_parameters(), lr=lr, betas=(0.5, 0.999))
    schedule = make_schedule("constant", base_lr=lr, epochs=epochs, batches_per_epoch=len(batches))
    return train(
        module, batches, opt, epochs=epochs, lr_schedule=schedule, generator=g, run_dir=run_dir, device=device
    )


def load_anomaly_recipe(path, overrides=()):
    return load_recipe(path, list(overrides), check_paths=False)


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


def test_global_max_image_score_is_mean_of_global_and_layer_averaged_map_max(tiny_clip) -> None:
    """image_score="global_max": (softmax(image_logits)[anomalous] + max pixel of the smoothed map / n_layers) / 2,
    per image; computed here with numpy and scipy on a hand-made output with 3 layers (neither 1 nor 2).
    The map is zqhang/AnomalyCLIP test.py's (L109 ``anomaly_map.sum(dim=0)`` over layers, L111
    ``gaussian_filter(i, sigma=args.sigma)`` per image) and the global probability its L93-95
    (``softmax(-1)[:, 0, 1]``); their mean is promptlab's option: the reference scores images with
    the global probability alone (L110, ``image_score="global"``)."""
    module = AnomalyCLIP(tiny_clip, **SMALL, image_score="global_max")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, generator=g) * 3
    layer_maps = torch.randn(3, 3, 2, 12, 12, generator=g).mul(2).softmax(2)
    score, amap = module.scores(AnomalyOutput(logits, layer_maps), sigma=1.0)
    lg, lm = logits.double().numpy(), layer_maps.double().numpy()
    p_anomalous = np.exp(lg[:, 1]) / np.exp(lg).sum(1)
    maps = np.stack([ndimage.gaussian_filter(m, sigma=1.0) for m in lm[:, :, 1].sum(1)])
    expected = 0.5 * (p_anomalous + maps.reshape(3, -1).max(1) / 3)
    assert len(set(np.round(maps.reshape(3, -1).max(1), 4))) == 3  # the per-image maxima differ
    np.testing.assert_allclose(score.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(amap.numpy(), maps, rtol=1e-5, atol=1e-6)


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


def test_map_loss_weight_scales_the_map_terms(tiny_clip) -> None:
    """loss = image cross-entropy + map_loss_weight x the layers' focal + dice terms (train.py: lam x the
    map losses), for any weight, not just the default 4."""
    g = torch.Generator().manual_seed(5)
    logits, labels = torch.randn(2, 2, generator=g), torch.tensor([0, 1])
    p = torch.rand(2, 2, 1, 8, 8, generator=g)
    maps = torch.cat([1 - p, p], 2)  # [B, layers, (normal, anomalous), H, W]
    masks = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    ce = F.cross_entropy(logits, labels)
    for w in (0.0, 1.0, 4.0):
        m = AnomalyCLIP(tiny_clip, map_loss_weight=w, **SMALL)
        got = m.loss(logits, labels, layer_maps=maps, masks=masks)
        torch.testing.assert_close(got, ce + w * map_loss(maps, masks, 1.0))
    torch.testing.assert_close(m.loss(logits, labels), ce)  # no maps: the image term alone


def test_map_loss_default_weight_mask_threshold_and_all_normal_batches() -> None:
    """The default weight is the published lam = 4; a mask pixel is anomalous strictly above 0.5 (train.py:
    gt_mask[gt_mask > 0.5] = 1); a batch of normal images only (all-zero masks) keeps both classes in the
    focal term's one-hot (loss.py FocalLoss), computed here by hand."""
    g = torch.Generator().manual_seed(6)
    p = torch.rand(2, 1, 1, 4, 4, generator=g).clamp(0.05, 0.95)
    maps = torch.cat([1 - p, p], 2)  # [B, 1 layer, (normal, anomalous), 4, 4]
    masks = (torch.rand(2, 1, 4, 4, generator=g) > 0.5).float()
    torch.testing.assert_close(map_loss(maps, masks), 4.0 * map_loss(maps, masks, 1.0))
    half = masks.masked_fill(masks == 0, 0.5)
    torch.testing.assert_close(map_loss(maps, half, 1.0), map_loss(maps, masks, 1.0))
    s = 1e-5  # focal: pt = p_normal (1 - s) + p_anomalous s + s, mean of -(1 - pt)^2 log pt
    normal, anomalous = maps[:, 0, 0], maps[:, 0, 1]
    pt = normal * (1 - s) + anomalous * s + s
    focal = (-((1 - pt) ** 2) * pt.log()).mean()
    dice_anomalous = 1 - (1 / (anomalous.flatten(1).sum(1) + 1)).mean()  # target 0: (0 + 1) / (|p| + 0 + 1)
    n = normal.flatten(1).sum(1)
    dice_normal = 1 - ((2 * n + 1) / (n + 16 + 1)).mean()  # target 1 on all 16 pixels
    torch.testing.assert_close(
        map_loss(maps, torch.zeros(2, 1, 4, 4), 1.0), focal + dice_anomalous + dice_normal
    )


@pytest.mark.parametrize("shape", [(2, 16, 16), (1, 12, 9), (3, 5, 40)])
@pytest.mark.parametrize("sigma", [0.5, 1, 2.5, 4, 7])
def test_gaussian_blur_equals_scipy_as_test_py_calls_it(shape: tuple, sigma: float) -> None:
    """test.py L111: scipy.ndimage.gaussian_filter(map, sigma) per map (mode "reflect", truncate 4),
    values compared; radii larger than the map (sigma 4, 7 on 5 or 9 pixels) reflect several times."""
    maps = torch.rand(shape, generator=torch.Generator().manual_seed(int(10 * sigma)))
    maps[:, 0, :] += 3  # a bright border row: any other border mode moves the values near it
    expected = np.stack([ndimage.gaussian_filter(m, sigma=sigma) for m in maps.double().numpy()])
    torch.testing.assert_close(
        gaussian_blur(maps.double(), sigma), torch.from_numpy(expected), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        gaussian_blur(maps, sigma), torch.from_numpy(expected).float(), rtol=0, atol=1e-5
    )


class _TensorsOn(TorchFunctionMode):
    """Fails any torch call that returns a tensor off ``device`` (a host tensor where the maps are elsewhere)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device != self.device:
                raise AssertionError(f"{getattr(func, '__name__', func)} made a tensor on {t.device}")
        return out


def test_gaussian_blur_keeps_every_tensor_on_the_maps_device() -> None:
    """The evaluator smooths maps where they were computed (the GPU in a real run): the kernel and the
    reflection indices must be made there too, or the product / index_select mixes devices. The meta
    device stands in for the GPU: any tensor made on the host shows."""
    maps = torch.empty(2, 12, 9, device="meta")
    with _TensorsOn(maps.device):
        out = gaussian_blur(maps, 1.5)
    assert out.device == maps.device and out.shape == maps.shape


def test_feature_layer_presets() -> None:
    assert resolve_feature_layers("published", 24) == [24]  # what produced the published numbers
    assert resolve_feature_layers("multilayer", 24) == [6, 12, 18, 24]
    assert resolve_feature_layers("published", 3) == [3] and resolve_feature_layers("multilayer", 3) == [
        1,
        2,
        3,
    ]
    assert resolve_feature_layers([2, 1], 3) == [2, 1]
    with pytest.raises(ValueError, match="feature_layers"):
        resolve_feature_layers("all", 24)
    with pytest.raises(ValueError, match="blocks 1..3"):
        resolve_feature_layers([6, 12], 3)
    with pytest.raises(ValueError, match=r"^feature_layers \[6\]: the image tower has blocks 1\.\.3$"):
        resolve_feature_layers([2, 6], 3)  # names the bad block, not every one asked for


def test_construction_and_forward_errors_name_the_cause(tiny_clip, images) -> None:
    """Each refusal says which argument is wrong and why (text prompt depth, image score, a tower without
    patch tokens, a forward without images); the columns are named normal, anomalous, in logit order."""
    module = AnomalyCLIP(tiny_clip, **SMALL)
    assert module.classnames == ["normal", "anomalous"]
    with pytest.raises(
        ValueError, match=r"^AnomalyCLIP needs images \(its features come from several layers\)$"
    ):
        module()
    with pytest.raises(ValueError, match=r"^AnomalyCLIP needs images"):
        module(image_features=torch.randn(2, tiny_clip.embed_dim))
    with pytest.raises(ValueError, match=r"^image_score='mean': expected one of \('global', 'global_max'\)$"):
        AnomalyCLIP(tiny_clip, **SMALL | {"image_score": "mean"})
    with pytest.raises(
        ValueError, match=r"^text prompt depth 9: expected 0\.\.2 \(the tower has 2 blocks\)$"
    ):
        AnomalyCLIP(tiny_clip, **SMALL | {"deep_depth": 9})
    rn = load_clip("tiny-rn")
    with pytest.raises(
        ValueError,
        match=r"^\S+: AnomalyCLIP needs ViT patch tokens in the joint space: the image tower is convolutional",
    ):
        AnomalyCLIP(rn, **SMALL)


def test_prompt_tokens_start_as_the_reference_draws_them(tiny_clip) -> None:
    """N(0, 0.02) for both prompts' context (prompt_ensemble.py L154-155) and the deep tokens (L163)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = AnomalyCLIP(
            tiny_clip, n_ctx=12, deep_depth=2, deep_n_ctx=12, feature_layers=[1, 2], dpam_layers=1
        )
    for name in ("ctx_normal", "ctx_anomalous", "deep"):
        t = getattr(module, name).detach()  # 12 x 32 = 384 draws each: the std is 0.02 within 10 %
        assert 0.018 < float(t.std()) < 0.022 and abs(float(t.mean())) < 0.004, (name, float(t.std()))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_anomaly_recipes_validate(path: Path) -> None:
    cfg = load_anomaly_recipe(path, ["anomaly.data_root=/data"])
    assert cfg.task == "anomaly" and cfg.train.epochs == 15 and cfg.anomaly.image_size == 518
    # the published configuration (zqhang/AnomalyCLIP train.sh / test.sh --features_list 24, train.py lam = 4)
    assert resolve_feature_layers(cfg.method.feature_layers, 24) == [24] and cfg.method.map_loss_weight == 4
    assert cfg.method.deep_fp16 is True and cfg.anomaly.sigma == 4 and cfg.method.image_score == "global"
    assert cfg.optimizer._component_ == "torch.optim.Adam" and cfg.train.lr_schedule == "constant"
    assert (cfg.optimizer.lr, list(cfg.optimizer.betas), cfg.train.batch_size) == (1e-3, [0.5, 0.999], 8)
    assert cfg.train.warmup_epochs == 0
    assert (cfg.method.n_ctx, cfg.method.deep_depth, cfg.method.deep_n_ctx, cfg.method.dpam_layers) == (
        12,
        9,
        4,
        19,
    )
    # AnomalyCLIP built by hand with its defaults is this configuration (every key the recipe sets)
    section = yaml.safe_load(path.read_text())["method"]
    assert section.pop("_component_") == "promptlab.anomaly.method.AnomalyCLIP" and section
    defaults = {p.name: p.default for p in inspect.signature(AnomalyCLIP.__init__).parameters.values()}
    assert {k: defaults[k] for k in section} == section
    assert "multilayer" in path.read_text()  # the other named option is documented in the recipe
    other = load_anomaly_recipe(path, ["anomaly.data_root=/data", "method.feature_layers=multilayer"])
    assert resolve_feature_layers(other.method.feature_layers, 24) == [6, 12, 18, 24]
    a = cfg.anomaly
    assert a.train_data.layout != a.eval_data.layout  # cross-dataset protocol
    assert a.train_data.split == "test"  # the auxiliary dataset's test split has the masks
    assert a.train_data.root.startswith("/data/") and a.eval_data.root.startswith("/data/")
    with pytest.raises(ConfigError, match="n_ctxx"):
        load_anomaly_recipe(path, ["method.n_ctxx=3"])
    with pytest.raises(ConfigError, match="train.epochs"):
        load_anomaly_recipe(path, ["train.epochs=many"])


def test_a_module_built_with_defaults_is_the_recipes(make_openclip) -> None:
    """``AnomalyCLIP(clip)`` computes what the recipe's method section builds: the same learned tensors
    from the same seed, the same maps, scores and loss. The towers are just deep enough for every default
    to act (9 text blocks for deep_depth 9; 20 vision blocks, so DPAM in the last 19 leaves a plain first
    block as on ViT-L/14's 24) at toy width (the signature check above cannot see a default that a
    wrapper hides)."""
    clip = load_clip(
        make_openclip(
            vision_cfg=dict(layers=20, width=32, head_width=16, patch_size=8, image_size=32),
            text_cfg=dict(layers=9, width=32, heads=2),
        )
    )
    section = yaml.safe_load(RECIPES[0].read_text())["method"]
    section.pop("_component_")
    built = []
    for kw in ({}, section):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            built.append(AnomalyCLIP(clip, **kw))
    default, recipe = built
    default_state, recipe_state = default.prompt_state_dict(), recipe.prompt_state_dict()
    assert default_state.keys() == recipe_state.keys()
    for k, v in recipe_state.items():
        torch.testing.assert_close(default_state[k], v, rtol=0, atol=0, msg=k)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 1, 32, 32)
    masks[1, :, 8:20, 4:12] = 1
    with torch.no_grad():
        outs = [m.outputs(images) for m in built]
        for got, want in zip(default.scores(outs[0]), recipe.scores(outs[1], sigma=4)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        losses = [
            m.loss(o.image_logits, torch.tensor([0, 1]), layer_maps=o.layer_maps, masks=masks)
            for m, o in zip(built, outs)
        ]
    torch.testing.assert_close(outs[0].image_logits, outs[1].image_logits, rtol=0, atol=0)
    torch.testing.assert_close(outs[0].layer_maps, outs[1].layer_maps, rtol=0, atol=0)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


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
    assert (module.ctx_anomalous - before).abs().max() > 0 and stats.last_loss > 0
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    save_prompts(module, tmp_path / "run" / "prompts", extra={"image_size": 32, "sigma": 1.0})
    again = load_prompts(tmp_path / "run" / "prompts", tiny_clip)
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


# ------------------------------------------------------------------------------ evaluation, by value
def _published_aupro(
    masks: np.ndarray, amaps: np.ndarray, max_step: int = 200, expect_fpr: float = 0.3
) -> float:
    """zqhang/AnomalyCLIP metrics.py cal_pro_score (L5-29), skimage's 8-connected label as scipy's."""
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    pros, fprs = [], []
    for th in np.arange(min_th, max_th, (max_th - min_th) / max_step):
        binary_amaps[amaps <= th], binary_amaps[amaps > th] = 0, 1
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks):
            labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
            pro += [binary_amap[labelled == r].mean() for r in range(1, n + 1)]
        inverse_masks = 1 - masks
        fprs.append(np.logical_and(inverse_masks, binary_amaps).sum() / inverse_masks.sum())
        pros.append(np.mean(pro))
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < expect_fpr
    f = fprs[keep]
    return auc((f - f.min()) / (f.max() - f.min()), pros[keep])


def _expected_metrics(module: AnomalyCLIP, ds: AnomalyDataset, sigma: float) -> dict:
    """test.py's per-category evaluation, one image at a time: the anomalous probability of the global
    feature, the layer-summed map smoothed by scipy; sklearn's AUROC / AP; metrics.py's AUPRO."""
    per_image = []
    with torch.no_grad():
        for i, it in enumerate(ds.items):
            img, mask, label, _ = ds[i]
            out = module.outputs(img[None])
            amap = ndimage.gaussian_filter(out.layer_maps[0, :, 1].sum(0).double().numpy(), sigma=sigma)
            per_image.append(
                (it.category, label, float(out.image_logits.softmax(-1)[0, 1]), amap, mask[0].numpy())
            )
    cats = {}
    for cat in sorted({c for c, *_ in per_image}):
        rows = [r for r in per_image if r[0] == cat]
        labels, scores = [r[1] for r in rows], [r[2] for r in rows]
        maps, gts = np.stack([r[3] for r in rows]), np.stack([r[4] for r in rows]).astype(int)
        cats[cat] = {
            "image_auroc": 100 * roc_auc_score(labels, scores),
            "image_ap": 100 * average_precision_score(labels, scores),
            "pixel_auroc": 100 * roc_auc_score(gts.ravel(), maps.ravel()),
            "pixel_aupro": 100 * _published_aupro(gts, maps),
        }
    return cats


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory: pytest.TempPathFactory, tiny_clip) -> tuple[Path, Path, AnomalyCLIP]:
    """(an MVTec-layout root with 2 categories, exported untrained prompts, the module)."""
    tmp = tmp_path_factory.mktemp("anomaly_eval")
    root = write_synthetic(
        tmp / "mvtec", "mvtec", categories=("x", "y"), n_good=3, n_defect=3, size=32, seed=2
    )
    with torch.random.fork_rng():
        torch.manual_seed(5)
        module = AnomalyCLIP(tiny_clip, **SMALL).eval()
    save_prompts(module, tmp / "prompts", extra={"image_size": 32, "sigma": 1.0})
    return root, tmp / "prompts", module


def test_evaluate_values_per_category(eval_setup) -> None:
    """Every number of evaluate_anomaly, including pixel AUPRO, against independent computations."""
    root, _, module = eval_setup
    ds = AnomalyDataset(load_items("mvtec", root), 32)
    m = evaluate_anomaly(
        module, ds, device=torch.device("cpu"), batch_size=4, sigma=1.0
    )  # batches span categories
    expected = _expected_metrics(module, ds, sigma=1.0)
    assert m["aupro_convention"] == "published" and m["n"] == 12
    keys = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")
    for cat, row in expected.items():
        for k in keys:
            assert m["categories"][cat][k] == pytest.approx(row[k], abs=1e-3), (cat, k)
    for k in keys:
        assert m["mean"][k] == pytest.approx(np.mean([r[k] for r in expected.values()]), abs=1e-3)
    assert len({round(r["pixel_aupro"], 3) for r in expected.values()}) == 2  # the categories differ


def test_anomaly_eval_cli_and_its_aupro_setting(
    eval_setup, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """README: `promptlab anomaly eval PROMPTS --layout --root` prints per-category metrics; AUPRO is the
    published convention unless `--aupro fpr_limit` (the MVTec AD paper's) is asked for."""
    root, prompts, module = eval_setup
    runs = {}
    for aupro_flag in (None, "fpr_limit"):
        out = tmp_path / f"{aupro_flag}.json"
        args = ["anomaly", "eval", str(prompts), "--layout", "mvtec", "--root", str(root), "--sigma", "1"]
        args += ["--device", "cpu", "--out", str(out)] + (["--aupro", aupro_flag] if aupro_flag else [])
        assert main(args) == 0
        printed = capsys.readouterr().out
        assert "pixel_aupro" in printed and all(f"\n{c} " in printed for c in ("x", "y", "mean"))
        runs[aupro_flag] = json.loads(out.read_text())
    published, limited = runs[None], runs["fpr_limit"]
    assert published["aupro_convention"] == "published" and limited["aupro_convention"] == "fpr_limit"
    ds = AnomalyDataset(load_items("mvtec", root), 32)
    expected = _expected_metrics(module, ds, sigma=1.0)
    for cat in ("x", "y"):
        assert published["categories"][cat]["pixel_aupro"] == pytest.approx(
            expected[cat]["pixel_aupro"], abs=1e-3
        )
        idx = [i for i, it in enumerate(ds.items) if it.category == cat]
        with torch.no_grad():
            outs = [module.outputs(ds[i][0][None]) for i in idx]
        maps = torch.from_numpy(
            np.stack(
                [ndimage.gaussian_filter(o.layer_maps[0, :, 1].sum(0).double().numpy(), 1.0) for o in outs]
            )
        )
        gts = torch.stack([ds[i][1][0] > 0.5 for i in idx])
        ref = 100 * aupro(
            maps, gts, convention="fpr_limit"
        )  # metrics.py is checked against its own reference
        assert limited["categories"][cat]["pixel_aupro"] == pytest.approx(ref, abs=1e-3)
        assert abs(ref - expected[cat]["pixel_aupro"]) > 0.01  # 10x the tolerance: the setting is seen
        for k in ("pixel_auroc", "image_auroc", "image_ap"):  # only AUPRO depends on the setting
            assert limited["categories"][cat][k] == published["categories"][cat][k]


# ------------------------------------------------------------------------------ predict: names, bad files
def test_predict_same_stems_keep_every_overlay(eval_setup, tmp_path: Path) -> None:
    _, prompts, _ = eval_setup
    rng = np.random.default_rng(0)
    paths = []
    for rel, fmt in (("a/x.png", "PNG"), ("b/x.jpg", "JPEG"), ("c/X.png", "PNG"), ("d/x_2.png", "PNG")):
        p = tmp_path / rel
        p.parent.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(p, format=fmt)
        paths.append(str(p))
    out = tmp_path / "pred"
    assert main(["anomaly", "predict", str(prompts), *paths, "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    overlays = [r["overlay"] for r in rows]
    assert len({o.lower() for o in overlays}) == 4 and all(Path(o).is_file() for o in overlays)
    assert [r["image"] for r in rows] == paths and not any(r["error"] for r in rows)
    assert len(list(out.glob("*_anomaly.png"))) == 4
    # each overlay is its own image's: the blend of that image (rows differ as the inputs do)
    assert len({Image.open(o).tobytes() for o in overlays}) == 4


def test_predict_skips_reports_and_counts_unreadable_images(
    eval_setup, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root, prompts, _ = eval_setup
    good = sorted(str(p) for p in (root / "x" / "test").rglob("*.png"))[:2]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    missing = tmp_path / "missing.png"
    inputs = [good[0], str(broken), good[1], str(missing)]
    out = tmp_path / "pred"
    assert main(["anomaly", "predict", str(prompts), *inputs, "--out", str(out)]) == 1  # partial
    captured = capsys.readouterr()
    assert "2 scored, 2 skipped" in captured.out
    assert str(broken) in captured.err and str(missing) in captured.err
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [r["image"] for r in rows] == inputs
    assert [bool(r["error"]) for r in rows] == [False, True, False, True]
    assert all(0 <= float(r["score"]) <= 1 and Path(r["overlay"]).is_file() for r in rows if not r["error"])
    assert all(r["score"] == r["overlay"] == "" for r in rows if r["error"])
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        Path(r["overlay"]).name for r in rows if r["overlay"]
    )
    # nothing readable: one error line, exit 2, no table
    assert main(["anomaly", "predict", str(prompts), str(broken), "--out", str(tmp_path / "none")]) == 2
    assert "none of the 1 images could be read" in capsys.readouterr().err


def test_engine_training_is_the_reference_loop(tmp_path: Path, tiny_clip) -> None:
    """zqhang/AnomalyCLIP train.py L70-104, restated: a DataLoader shuffled by the seeded generator (the
    last short batch kept), Adam(1e-3, (0.5, 0.999)) at a constant lr, image cross-entropy plus the map
    losses. engine.train on the anomaly task's batches learns bit-identical prompts (issue 22: the
    anomaly loop folded into the engine changes no number)."""
    from torch.utils.data import DataLoader

    root = write_synthetic(tmp_path / "visa", "visa", categories=("a",), n_good=3, n_defect=2, size=32)
    ds = AnomalyDataset(load_items("visa", root), 32)  # 5 images in batches of 2: a short last batch

    def fresh() -> AnomalyCLIP:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return AnomalyCLIP(tiny_clip, **SMALL)

    ref = fresh()
    g = torch.Generator().manual_seed(111)
    opt = torch.optim.Adam([ref.ctx_normal, ref.ctx_anomalous, ref.deep], lr=1e-3, betas=(0.5, 0.999))
    for _ in range(2):
        for images, masks, labels, _ in DataLoader(ds, batch_size=2, shuffle=True, generator=g):
            out = ref.outputs(images)
            loss = F.cross_entropy(out.image_logits, labels) + map_loss(out.layer_maps, masks, 4.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
    mine = fresh()
    train_anomaly(
        mine, ds, epochs=2, batch_size=2, lr=1e-3, run_dir=tmp_path / "run", device=torch.device("cpu")
    )
    for k, v in ref.prompt_state_dict().items():
        assert torch.equal(mine.prompt_state_dict()[k], v), k
    assert not torch.equal(ref.ctx_anomalous, fresh().ctx_anomalous)  # training moved them
