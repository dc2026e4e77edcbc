"""Dense patch tokens, DPAM and visual prompts on timm ViT image towers (EVA02, SigLIP, PE), offline.

The towers are the families' tiny random configurations with their image-tower matrices re-drawn at
unit gain (:func:`sharpened`): timm initialises the heads a thousandfold down and the attention
near-uniform, which would let a wrong rotation or an ignored token hide below any tolerance.

What is pinned, each against a computation written out here from the weights (timm's modules are used
only for the pieces a test does not check: patch embedding, MLPs, norms):
- the pooled feature of ``encode_image_dense`` is the library's own ``encode_image``;
- with DPAM off, the patch tokens are timm's ``forward_features`` tokens through the tower's head per
  token (class-token head: ``fc_norm`` + linear head; attention-pool head: its value and output
  projections and its MLP, the pool's softmax over one key being 1), and the class token through the
  same per-token code is the pooled feature;
- DPAM's V-V path: queries and keys replaced by the values (no rotary embedding, no q / k norm), the
  block's own attention-output norm and projection and layer scale, no MLP;
- visual prompts on rotary towers: the identity rotation for prompt tokens, checked against a forward
  with the attention written out by hand, and shown to be told apart from prompts given a patch's
  rotation or left out.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from promptlab.anomaly.method import AnomalyCLIP
from promptlab.backbones import load_clip
from promptlab.clip import FrozenCLIP

TIMM_VITS = ["tiny-eva02", "tiny-siglip", "tiny-pe"]


def sharpened(arch: str, gain: float = 2.0) -> FrozenCLIP:
    """``load_clip(arch)`` with every image-tower tensor of 2+ dims re-drawn ~ N(0, gain^2 / fan_in), seeded."""
    clip = load_clip(arch)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in clip.model.visual.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * gain / p[0].numel() ** 0.5)
    return clip


def _images(clip: FrozenCLIP, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(seed))


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    scale = float(want.abs().max())
    torch.testing.assert_close(got / scale, want / scale, atol=tol, rtol=tol)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _heads(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.unflatten(-1, (n, -1)).transpose(1, 2)  # [B, L, W] -> [B, n, L, W / n]


def _values(attn: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The attention module's value projection of ``h``: [B, L, W]."""
    return attn.qkv(h).chunk(3, dim=-1)[2] if attn.qkv is not None else attn.v_proj(h)


def _branch_scale(blk: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The block's layer scale on its attention branch (EvaBlock: gamma_1 or none; ViT Block: ls1)."""
    if hasattr(blk, "ls1"):
        return blk.ls1(y)
    return y if blk.gamma_1 is None else blk.gamma_1 * y


def _head_per_token(clip: FrozenCLIP, normed: torch.Tensor) -> torch.Tensor:
    """[B, P, Wv] tokens after the final norm -> [B, P, D], written out from the head's weights."""
    t = clip._timm_trunk
    ap = getattr(t, "attn_pool", None)
    if ap is not None:  # MAP head with one key: softmax = 1, so the output is proj(v) then the MLP residual
        assert ap.pos_embed is None
        W = normed.shape[-1]
        y = ap.proj(F.linear(normed, ap.kv.weight[W:], ap.kv.bias[W:]))
        normed = y + ap.mlp(ap.norm(y))
    return clip.model.visual.head(t.head(t.fc_norm(normed)))


@pytest.mark.parametrize("arch", TIMM_VITS)
def test_dense_tokens_are_the_towers_head_per_token(arch: str) -> None:
    clip = sharpened(arch)
    t = clip._timm_trunk
    assert clip.supports_dense_features and clip.dense_features_refusal is None and clip.patch_size == 8
    images = _images(clip)
    with torch.no_grad():
        pooled, (first, last) = clip.encode_image_dense(images, [1, 2], dpam_from=None, pooled_ln_post=True)
        own = clip.model.encode_image(images)
        _close(pooled, own)
        feats = t.forward_features(images)  # [B, npt + P, Wv], after timm's final norm
        npt = t.num_prefix_tokens
        _close(last, _head_per_token(clip, feats[:, npt:]))
        assert last.shape == (2, 16, clip.embed_dim) and first.shape == last.shape
        assert _rel(first, last) > 1e-2  # block 1's map is another map
        # encode_image's patch tokens are the same tensor, and its pooled feature the library's
        p2, tokens = clip.encode_image(images, return_tokens=True)
        torch.testing.assert_close(tokens, last, atol=0, rtol=0)
        _close(p2, own)
        if getattr(t, "attn_pool", None) is None:  # class-token head: the class token per token == pooled
            x, _, _ = clip._timm_vision_forward(images, None, None)
            _close(clip._timm_per_token(x[:, :1])[:, 0], own)


@pytest.mark.parametrize("arch", TIMM_VITS)
def test_dpam_matches_the_dual_path_definition(arch: str) -> None:
    """V-V path from block 0, written out: both attentions read norm1 of the plain path; the V-V path adds
    layer_scale(proj(norm(softmax(V V^T / sqrt(d)) V))) and skips the MLP. The plain path is timm's block."""
    clip = sharpened(arch)
    t = clip._timm_trunk
    images = _images(clip, 1)
    with torch.no_grad():
        out = t._pos_embed(t.patch_embed(images))
        x, rope = out if isinstance(out, tuple) else (out, None)
        x = t.norm_pre(x)
        vv = None
        for blk in t.blocks:
            a = blk.attn
            v = _heads(_values(a, blk.norm1(x)), a.num_heads)  # [B, H, L, d]
            w = (v @ v.transpose(-1, -2) * v.shape[-1] ** -0.5).softmax(-1)
            res = _branch_scale(blk, a.proj(a.norm((w @ v).transpose(1, 2).flatten(2))))
            vv = (x if vv is None else vv) + res
            x = blk(x, rope=rope) if rope is not None else blk(x)
        want = _head_per_token(clip, t.norm(vv[:, t.num_prefix_tokens :]))
        pooled, (got,) = clip.encode_image_dense(images, [2], dpam_from=0, pooled_ln_post=True)
        _close(got, want)
        _close(pooled, clip.model.encode_image(images))  # the plain path is untouched
        _, (plain,) = clip.encode_image_dense(images, [2], dpam_from=None)
        assert _rel(got, plain) > 1e-2  # DPAM changes the patch path
        _, (later,) = clip.encode_image_dense(images, [2], dpam_from=1)
        assert _rel(later, got) > 1e-2  # and where it starts matters


def test_pooled_ln_post_off_skips_the_final_norm_on_the_pooled_feature() -> None:
    clip = sharpened("tiny-eva02")
    t = clip._timm_trunk
    images = _images(clip)
    with torch.no_grad():
        pooled, _ = clip.encode_image_dense(images, [2], pooled_ln_post=False)
        x, _, _ = clip._timm_vision_forward(images, None, None)
        _close(pooled, clip.model.visual.head(t.head(x[:, 0])))


def test_timm_dense_refusals_name_the_cause() -> None:
    clip = load_clip("tiny-eva02")
    with pytest.raises(ValueError, match=r"takes 32x32 images.*\(48, 48\)"):
        clip.encode_image_dense(torch.randn(1, 3, 48, 48), [1])
    blk = clip._timm_trunk.blocks[1]
    blk.__class__ = type("PostNormBlock", (type(blk),), {})  # a block class DPAM does not know
    assert not clip.supports_dense_features
    assert "timm block PostNormBlock with EvaAttention" in clip.dense_features_refusal
    with pytest.raises(ValueError, match="AnomalyCLIP needs ViT patch tokens.*PostNormBlock"):
        AnomalyCLIP(clip, deep_depth=2, feature_layers=[1, 2], dpam_layers=1)
    with pytest.raises(ValueError, match="no patch tokens: timm block PostNormBlock"):
        clip.encode_image(torch.randn(1, 3, 32, 32), return_tokens=True)
    rn = load_clip("tiny-rn")
    assert "image tower is convolutional" in rn.dense_features_refusal
    with pytest.raises(ValueError, match="no dense patch features: the image tower is convolutional"):
        rn.encode_image_dense(torch.randn(1, 3, 64, 64), [1])


def _rotate(z: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Interleaved rotary embedding: pairs (z0, z1) -> (z0 cos - z1 sin, z1 cos + z0 sin)."""
    turned = torch.stack([-z[..., 1::2], z[..., ::2]], dim=-1).flatten(-2)
    return z * cos + turned * sin


def _prompted_by_hand(
    clip: FrozenCLIP,
    images: torch.Tensor,
    shallow: torch.Tensor,
    deep: dict[int, torch.Tensor],
    prompt_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pooled features with appended visual prompts, each block's attention written out by hand.

    Rotary embeddings from timm's table (rows = patches) rotate the patch tokens' queries and keys; the
    class token and the prompts stay unrotated, unless ``prompt_rows`` (sin | cos per prompt) says
    otherwise (the mutant the test must tell apart).
    """
    t = clip._timm_trunk
    B = images.shape[0]
    x, _ = t._pos_embed(t.patch_embed(images))
    npt, n_img, n = t.num_prefix_tokens, x.shape[1], shallow.shape[0]
    table = t.rope.get_embed()  # [P, 2d]: sin | cos
    d = table.shape[-1] // 2
    identity = torch.cat([torch.zeros(1, d), torch.ones(1, d)], dim=-1)
    rows = torch.cat(
        [identity.expand(npt, -1), table, identity.expand(n, -1) if prompt_rows is None else prompt_rows]
    )
    sin, cos = rows.chunk(2, dim=-1)  # [L, d] each
    x = t.norm_pre(torch.cat([x, shallow.expand(B, -1, -1)], dim=1))
    for i, blk in enumerate(t.blocks):
        if i in deep:
            x = torch.cat([x[:, :n_img], deep[i].expand(B, -1, -1)], dim=1)
        a = blk.attn
        h = blk.norm1(x)
        if a.qkv is not None:
            q, k, v = a.qkv(h).chunk(3, dim=-1)
        else:
            q, k, v = a.q_proj(h), a.k_proj(h), a.v_proj(h)
        q, k, v = (_heads(z, a.num_heads) for z in (q, k, v))
        q, k = _rotate(a.q_norm(q), sin, cos), _rotate(a.k_norm(k), sin, cos)
        w = (q @ k.transpose(-1, -2) * d**-0.5).softmax(-1)
        x = x + _branch_scale(blk, a.proj(a.norm((w @ v).transpose(1, 2).flatten(2))))
        m = blk.mlp(blk.norm2(x))
        x = x + (m if blk.gamma_2 is None else blk.gamma_2 * m)
    return clip.model.visual.head(t.forward_head(t.norm(x[:, :n_img])))


@pytest.mark.parametrize("arch", ["tiny-pe", "tiny-eva02"])
def test_visual_prompts_on_rotary_towers_against_a_hand_written_forward(arch: str) -> None:
    """PE (attention-pool head) and EVA02: shallow and deep prompts through rotary attention written out.

    The same comparison fails for prompts that are ignored or that are rotated like patches: both
    mutants are shown to land far outside the tolerance.
    """
    clip = sharpened(arch)
    g = torch.Generator().manual_seed(2)
    images = _images(clip, 2)
    shallow = torch.randn(3, clip.vision_width, generator=g)
    deep = torch.randn(3, clip.vision_width, generator=g)
    with torch.no_grad():
        got = clip.encode_image(images, prompts=shallow, deep_prompts={1: deep})
        want = _prompted_by_hand(clip, images, shallow, {1: deep})
        _close(got, want, tol=1e-4)
        patch_rows = clip._timm_trunk.rope.get_embed()[5:8]  # prompts given three patches' rotations
        assert _rel(_prompted_by_hand(clip, images, shallow, {1: deep}, patch_rows), want) > 1e-2
        assert _rel(clip.model.encode_image(images), want) > 1e-2  # prompts not ignored
        shallow_only = clip.encode_image(images, prompts=shallow)
        assert _rel(shallow_only, want) > 1e-2  # the deep prompts act too
        _close(shallow_only, _prompted_by_hand(clip, images, shallow, {}), tol=1e-4)
