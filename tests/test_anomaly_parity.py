"""AnomalyCLIP against zqhang/AnomalyCLIP as it ran: loss, gradients, test-time maps and scores.

The reference side is re-stated here from the reference code, line by line (file and line cited;
``AnomalyCLIP.py`` is ``AnomalyCLIP_lib/AnomalyCLIP.py`` at 2a7c886^, the code behind the published
numbers, unless HEAD is named). It runs on the raw weights of a deep copy of the open_clip model and
uses none of promptlab's modules or helpers. The towers are small (6 vision blocks, DPAM in blocks
3-6, "layers" 3/4/5/6 standing for 6/12/18/24 of ViT-L/14, whose DPAM also starts at block 6).
"""

from __future__ import annotations

import copy

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from promptlab.anomaly.method import AnomalyCLIP
from promptlab.backbones import load_clip

N_CTX, DEPTH, T_N_CTX = 3, 3, 2  # --n_ctx, --depth, --t_n_ctx (12, 9, 4 in the paper)
OUT_LAYERS = [3, 4, 5, 6]  # --features_list 6 12 18 24: the first one is DPAM's first block
DPAM_LAYER = 5  # DAPM_replace(DPAM_layer) swaps the last DPAM_LAYER - 1 = 4 blocks (3..6)
SIZE = 48  # not the model's 32 px: the positional embeddings are interpolated, as at 518 px


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, object]:
    """(the reference's copy of the open_clip weights, promptlab's FrozenCLIP on the same weights)."""
    with torch.random.fork_rng():
        torch.manual_seed(3)
        m = open_clip.model.CLIP(
            embed_dim=32,
            vision_cfg=dict(layers=6, width=32, head_width=16, patch_size=8, image_size=32),
            text_cfg=dict(layers=3, width=32, heads=2),
            quick_gelu=True,
        ).eval()
    return copy.deepcopy(m), load_clip(m)


def _module(clip, **kw) -> AnomalyCLIP:
    kw.setdefault("dpam_layers", DPAM_LAYER - 1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = AnomalyCLIP(clip, n_ctx=N_CTX, deep_depth=DEPTH, deep_n_ctx=T_N_CTX, **kw)
        with torch.no_grad():  # tokens far from 0, so that every path (and fp16 rounding) shows
            for p in module.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.5)
    return module


# ------------------------------------------------------------------------------ the reference
def _mha(blk: torch.nn.Module, h: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """[B, N, C] -> [V-V path, plain path] outputs of the reference's ``Attention`` (AnomalyCLIP.py
    L71-94): q, k, v from one qkv projection; the V-V path is softmax(v v^T * scale) v."""
    a = blk.attn
    B, N, C = h.shape
    H = a.num_heads
    qkv = F.linear(h, a.in_proj_weight, a.in_proj_bias).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scale = (C // H) ** -0.5
    attn_ori = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        attn_ori = attn_ori + mask
    attn_ori = attn_ori.softmax(-1)
    attn = (v @ v.transpose(-2, -1) * scale).softmax(-1)
    x_ori = (attn_ori @ v).transpose(1, 2).reshape(B, N, C)
    x = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return [a.out_proj(x), a.out_proj(x_ori)]


@torch.no_grad()
def ref_encode_image(m, image: torch.Tensor, out_layers, dpam_layer: int, clone: bool = False):
    """VisionTransformer.forward (AnomalyCLIP.py L356-387) with DPAM (L345-353, L135-174, L284-296).

    ``clone=False`` is the published code (out_tokens.append(x[0]), L293); ``True`` is 2a7c886's fix.
    """
    v = m.visual
    x = v.conv1(image).reshape(image.shape[0], v.conv1.out_channels, -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    pos = v.positional_embedding
    side, new_side = int((pos.shape[0] - 1) ** 0.5), int((x.shape[1] - 1) ** 0.5)
    if side != new_side:  # L366-370
        new_pos = pos[1:, :].reshape(-1, side, side, x.shape[-1]).permute(0, 3, 1, 2)
        new_pos = F.interpolate(new_pos, (new_side, new_side), mode="bilinear")
        new_pos = new_pos.reshape(-1, x.shape[-1], new_side * new_side).transpose(1, 2)
        pos = torch.cat([pos[:1, :], new_pos[0]], 0)
    x = v.ln_pre(x + pos)
    blocks = v.transformer.resblocks
    dual = set(range(len(blocks) - (dpam_layer - 1), len(blocks)))  # resblocks[-1 .. -(DPAM_layer-1)]
    out_tokens = []
    for idx, blk in enumerate(blocks, start=1):
        if idx - 1 not in dual:  # L171-173
            x = x + _mha(blk, blk.ln_1(x))[1]
            x = x + blk.mlp(blk.ln_2(x))
        elif isinstance(x, list):  # L140-149
            x, x_ori = x
            x_res, x_ori_res = _mha(blk, blk.ln_1(x_ori))
            x_ori += x_ori_res
            x_ori = x_ori + blk.mlp(blk.ln_2(x_ori))
            x += x_res  # in place: the tensor appended at earlier layers changes too
            x = [x, x_ori]
        else:  # L162-168, the start of the dual path
            x_res, x_ori_res = _mha(blk, blk.ln_1(x))
            x_ori = x + x_ori_res
            x_ori = x_ori + blk.mlp(blk.ln_2(x_ori))
            x += x_res
            x = [x, x_ori]
        if idx in out_layers:
            t = x[0] if isinstance(x, list) else x
            out_tokens.append(t.clone() if clone else t)
    x, x_ori = x
    patch_tokens = [v.ln_post(t) @ v.proj for t in out_tokens]  # L380-385
    return x_ori[:, 0, :] @ v.proj, patch_tokens  # L387: no ln_post on the class token


def ref_text_features(m, ctx_pos, ctx_neg, deep) -> torch.Tensor:
    """[1, 2, D] normalised: AnomalyCLIP_PromptLearner.forward (prompt_ensemble.py L156-264), then
    encode_text_learn (AnomalyCLIP.py L108-126) with the deep tokens of L237-251, then train.py L78-80."""
    prompts = ["X " * N_CTX + "object.", "X " * N_CTX + "damaged object."]  # L176-177
    tokens = open_clip.tokenize(prompts)  # [2, 77]
    emb = m.token_embedding(tokens)
    ctx = torch.stack([ctx_pos, ctx_neg])  # [2, n_ctx, W]
    x = torch.cat([emb[:, :1], ctx, emb[:, 1 + N_CTX :]], dim=1) + m.positional_embedding
    mask = torch.empty(77, 77).fill_(float("-inf")).triu_(1)  # build_attention_mask, L77-83
    counter = 0
    for i, blk in enumerate(m.transformer.resblocks):
        if i > 0 and not counter > len(deep) - 1:  # L237-251
            textual_context = deep[counter].expand(x.shape[0], -1, -1).half()
            x = torch.cat([x[:, :1], textual_context, x[:, 1 + T_N_CTX :]], dim=1)
            counter += 1
        x = x + _mha(blk, blk.ln_1(x), mask)[1]
        x = x + blk.mlp(blk.ln_2(x))
    x = m.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ m.text_projection
    x = torch.stack(torch.chunk(x, dim=0, chunks=2), dim=1)
    return x / x.norm(dim=-1, keepdim=True)


def ref_similarity_maps(patch_features, text_features, size: int) -> list[torch.Tensor]:
    """[B, H, W, 2] per layer: compute_similarity + get_similarity_map (model_load.py L222-235)."""
    maps = []
    for patch_feature in patch_features:
        patch_feature = patch_feature / patch_feature.norm(dim=-1, keepdim=True)
        t = text_features[0]
        b, n_t, n_i, c = patch_feature.shape[0], t.shape[0], patch_feature.shape[1], patch_feature.shape[2]
        similarity = ((patch_feature.reshape(b, n_i, 1, c) * t.reshape(1, 1, n_t, c)).sum(-1) / 0.07).softmax(
            -1
        )
        sm = similarity[:, 1:, :]
        side = int(sm.shape[1] ** 0.5)
        sm = sm.reshape(sm.shape[0], side, side, -1).permute(0, 3, 1, 2)
        sm = F.interpolate(sm, size, mode="bilinear")
        maps.append(sm.permute(0, 2, 3, 1))
    return maps


def ref_focal(
    logit: torch.Tensor, target: torch.Tensor, gamma: float = 2, smooth: float = 1e-5
) -> torch.Tensor:
    """loss.py FocalLoss.forward, L34-86 (alpha None: ones)."""
    num_class = logit.shape[1]
    logit = logit.view(logit.size(0), logit.size(1), -1).permute(0, 2, 1).contiguous().view(-1, num_class)
    target = torch.squeeze(target, 1).view(-1, 1)
    idx = target.cpu().long()
    one_hot_key = torch.FloatTensor(target.size(0), num_class).zero_().scatter_(1, idx, 1)
    one_hot_key = torch.clamp(one_hot_key, smooth / (num_class - 1), 1.0 - smooth)
    pt = (one_hot_key * logit).sum(1) + smooth
    return (-1 * torch.ones(num_class, 1)[idx].squeeze() * torch.pow(1 - pt, gamma) * pt.log()).mean()


def ref_dice(inp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """loss.py BinaryDiceLoss.forward, L93-106."""
    N = targets.size()[0]
    i, t = inp.view(N, -1), targets.view(N, -1)
    return 1 - ((2 * (i * t).sum(1) + 1) / (i.sum(1) + t.sum(1) + 1)).sum() / N


def ref_train_loss(m, params, image, label, img_mask, out_layers, clone: bool, lam: float) -> torch.Tensor:
    """One step's loss, train.py L61-104 (lam: 1 before 76b83e1, when the published numbers were made)."""
    gt = img_mask.squeeze().clone()
    gt[gt > 0.5], gt[gt <= 0.5] = 1, 0
    with torch.no_grad():
        image_features, patch_features = ref_encode_image(m, image, out_layers, DPAM_LAYER, clone)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = ref_text_features(m, *params)
    text_probs = (image_features.unsqueeze(1) @ text_features.permute(0, 2, 1))[:, 0, ...] / 0.07
    image_loss = F.cross_entropy(text_probs.squeeze(), label.long())
    loss = 0
    for sm in ref_similarity_maps(patch_features, text_features, image.shape[-1]):
        sm = sm.permute(0, 3, 1, 2)
        loss += ref_focal(sm, gt) + ref_dice(sm[:, 1, :, :], gt) + ref_dice(sm[:, 0, :, :], 1 - gt)
    return lam * loss + image_loss


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, SIZE, SIZE, generator=g)
    masks = torch.zeros(2, 1, SIZE, SIZE)
    masks[1, :, 10:30, 5:21] = 1
    return images, masks, torch.tensor([0, 1])


def _ours_loss_and_grads(module: AnomalyCLIP, images, masks, labels):
    module.zero_grad(set_to_none=True)
    out = module.outputs(images)
    loss = module.loss(out.image_logits, labels, layer_maps=out.layer_maps, masks=masks)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in (module.ctx_normal, module.ctx_anomalous, module.deep)]


def _ref_loss_and_grads(ref, module: AnomalyCLIP, images, masks, labels, out_layers, clone, lam):
    params = [
        p.detach().clone().requires_grad_() for p in (module.ctx_normal, module.ctx_anomalous, module.deep)
    ]
    loss = ref_train_loss(ref, params, images, labels, masks, out_layers, clone, lam)
    loss.backward()
    return loss.detach(), [p.grad for p in params]


def _assert_grads_close(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    """ctx_normal, ctx_anomalous to fp32 accuracy; the deep tokens' gradients pass through fp16 on
    both sides, where a last-bit difference upstream can move a value by one fp16 step (< 1e-3)."""
    for name, a, b, rtol in zip(("ctx_normal", "ctx_anomalous", "deep"), ours, ref, (1e-4, 1e-4, 2e-3)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------ the tests
def test_reference_restatement_aliases_its_four_layers(models) -> None:
    """The published code's four patch tensors are one object holding the last block (2a7c886's bug)."""
    ref, _ = models
    images = _batch()[0]
    _, published = ref_encode_image(ref, images, OUT_LAYERS, DPAM_LAYER, clone=False)
    _, fixed = ref_encode_image(ref, images, OUT_LAYERS, DPAM_LAYER, clone=True)
    for t in published:
        torch.testing.assert_close(t, fixed[-1])
    assert (fixed[0] - fixed[-1]).abs().max() > 1e-3  # distinct once copied


def test_default_loss_and_gradients_are_the_published_codes(models) -> None:
    """Default AnomalyCLIP == train.py as it ran for the paper: four aliased "layers" (= the last
    block four times), lam = 1; the same as HEAD's --features_list 24 with lam = 4."""
    ref, clip = models
    images, masks, labels = _batch()
    module = _module(clip)  # defaults: feature_layers="published", map_loss_weight=4, deep_fp16=True
    ours, ours_grads = _ours_loss_and_grads(module, images, masks, labels)
    published, published_grads = _ref_loss_and_grads(ref, module, images, masks, labels, OUT_LAYERS, False, 1)
    head, _ = _ref_loss_and_grads(ref, module, images, masks, labels, [6], True, 4)
    torch.testing.assert_close(published, head)
    torch.testing.assert_close(ours, published, rtol=1e-5, atol=1e-5)
    _assert_grads_close(ours_grads, published_grads)


def test_multilayer_option_is_the_fixed_code_with_four_layers(models) -> None:
    """feature_layers="multilayer": 2a7c886's code with four distinct layers (a quarter of the tower
    apart: 2/3/5/6 of 6 here, 6/12/18/24 of 24) and HEAD's lam = 4."""
    ref, clip = models
    images, masks, labels = _batch()
    module = _module(clip, feature_layers="multilayer")
    assert module.feature_layers == [2, 3, 5, 6]
    ours, ours_grads = _ours_loss_and_grads(module, images, masks, labels)
    fixed, fixed_grads = _ref_loss_and_grads(ref, module, images, masks, labels, [2, 3, 5, 6], True, 4)
    torch.testing.assert_close(ours, fixed, rtol=1e-5, atol=1e-5)
    _assert_grads_close(ours_grads, fixed_grads)


def test_deep_tokens_pass_through_fp16_as_in_the_reference(models) -> None:
    ref, clip = models
    module = _module(clip)
    params = (module.ctx_normal, module.ctx_anomalous, module.deep)
    with torch.no_grad():
        expected = ref_text_features(ref, *params)[0]  # [2, D]
        ours = F.normalize(module.text_features(), dim=-1)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
        module.deep_fp16 = False  # the named option: full-precision deep tokens
        assert (F.normalize(module.text_features(), dim=-1) - expected).abs().max() > 1e-5


@pytest.mark.parametrize("sigma", [4, 1])
def test_test_time_map_and_image_score_are_test_py(models, sigma: int) -> None:
    """module.scores == test.py L89-111: map (p_anomalous + 1 - p_normal) / 2 summed over the layers,
    scipy's gaussian_filter(sigma) per map; image score softmax(global . text / 0.07)[anomalous]."""
    ref, clip = models
    images = _batch()[0]
    module = _module(clip)
    with torch.no_grad():  # test.py's --sigma defaults to 4 (L192): so does scores'
        score, amap = module.scores(module.outputs(images), **({} if sigma == 4 else {"sigma": sigma}))
        text_features = ref_text_features(ref, module.ctx_normal, module.ctx_anomalous, module.deep)

        def reference(out_layers, clone):  # one image at a time: test.py's batch_size=1 (L48)
            scores, maps = [], []
            for image in images.split(1):
                image_features, patch_features = ref_encode_image(ref, image, out_layers, DPAM_LAYER, clone)
                image_features = image_features / image_features.norm(dim=-1, keepdim=True)
                text_probs = ((image_features @ text_features.permute(0, 2, 1)) / 0.07).softmax(-1)[:, 0, 1]
                layer_maps = ref_similarity_maps(patch_features, text_features, SIZE)
                anomaly_map = torch.stack([(s[..., 1] + 1 - s[..., 0]) / 2.0 for s in layer_maps]).sum(dim=0)
                anomaly_map = [torch.from_numpy(gaussian_filter(i, sigma=sigma)) for i in anomaly_map.numpy()]
                scores.append(text_probs)
                maps.append(torch.stack(anomaly_map, dim=0))
            return torch.cat(scores), torch.cat(maps)

        head_score, head_map = reference([6], True)  # HEAD test.sh: --features_list 24
        published_score, published_map = reference(OUT_LAYERS, False)
    torch.testing.assert_close(score, head_score, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(amap, head_map, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(published_score, head_score)
    torch.testing.assert_close(
        published_map, 4 * head_map, rtol=1e-5, atol=1e-5
    )  # same ranking, same metrics
    assert np.ptp(amap.numpy()) > 1e-3  # a map with something in it


def _ref_outputs(
    ref, module: AnomalyCLIP, images: torch.Tensor, dpam_layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image logits [B, 2], maps [B, 1, 2, H, W]) as test.py L89-107 computes them with HEAD's
    ``--features_list 24`` (the last block's map), for the reference's ``DPAM_layer``."""
    text_features = ref_text_features(ref, module.ctx_normal, module.ctx_anomalous, module.deep)
    image_features, patch_features = ref_encode_image(ref, images, [6], dpam_layer, clone=True)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    logits = (image_features @ text_features[0].t()) / 0.07
    (sm,) = ref_similarity_maps(patch_features, text_features, images.shape[-1])
    return logits, sm.permute(0, 3, 1, 2).unsqueeze(1)


@pytest.mark.parametrize("dpam_layers", [1, 6, 9])
def test_dpam_layers_is_the_references_dpam_layer_minus_one(models, dpam_layers: int) -> None:
    """``dpam_layers = k`` is the reference's ``DPAM_layer = k + 1``: DAPM_replace swaps the attention of
    ``resblocks[-i]`` for i in range(1, DPAM_layer) (AnomalyCLIP.py L345-353), the last k blocks; 1: the
    last block only; the whole tower (6 of 6) and more than the tower (9): every block from the first.
    The module's forward is the image logits of its outputs; the maps are the V-V path's."""
    ref, clip = models
    images = _batch()[0]
    module = _module(clip, dpam_layers=dpam_layers)
    with torch.no_grad():
        out = module.outputs(images)
        logits = module(images)
        want_logits, want_maps = _ref_outputs(ref, module, images, dpam_layers + 1)
        other = _ref_outputs(ref, module, images, 2 if dpam_layers > 1 else 3)[1]  # another DPAM depth
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.image_logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.layer_maps, want_maps, rtol=1e-5, atol=1e-6)
    assert (other - want_maps).abs().max() > 1e-3  # the depth shows in the maps


def test_global_ln_post_is_clips_own_image_embedding(models) -> None:
    """``global_ln_post=True`` gives the image logits of CLIP's own image embedding (open_clip's
    ``encode_image``: ln_post on the class token, then the projection); DPAM leaves that plain path
    alone. The reference (the default, False) projects the class token without ln_post (AnomalyCLIP.py
    L387). 32 px: the size the tower was built for, where open_clip needs no interpolation."""
    ref, clip = models
    images = _batch()[0][..., :32, :32]
    module = _module(clip, global_ln_post=True)
    with torch.no_grad():
        text_features = ref_text_features(ref, module.ctx_normal, module.ctx_anomalous, module.deep)[0]
        want = F.normalize(ref.encode_image(images), dim=-1) @ text_features.t() / 0.07
        got = module.outputs(images).image_logits
        module.global_ln_post = False
        without = module.outputs(images).image_logits
        want_without = _ref_outputs(ref, module, images, DPAM_LAYER)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(without, want_without, rtol=1e-5, atol=1e-5)
    assert (got - without).abs().max() > 1e-2
