"""CLIP-LoRA against a re-statement of MaxZanella/CLIP-LoRA: its attention replacement
(``loralib/layers.py`` PlainMultiheadAttentionLoRA + LinearLoRA) put into the reference's own copy of
the backbone (``ref_openclip``) as ``loralib/utils.py`` apply_lora does, and its logits (``lora.py``).
promptlab's side never touches the towers' code: the deltas enter through FrozenCLIP's adapter hook."""

from __future__ import annotations

import copy
import math

import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from promptlab.clip import FrozenCLIP
from promptlab.methods import CLIPLoRA

CLASSNAMES = ["cat", "sea_lion", "red car"]
TEMPLATE = "a photo of a {}."


class RefLinearLoRA(nn.Module):
    """loralib/layers.py LinearLoRA (L199-255): W x + b + (dropout(x) @ (B A)^T) * alpha / sqrt(r); eval: no dropout."""

    def __init__(self, weight, bias, r, lora_alpha):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight.clone(), False), nn.Parameter(bias.clone(), False)
        self.w_lora_A = nn.Parameter(weight.new_zeros((r, weight.shape[1])))
        self.w_lora_B = nn.Parameter(weight.new_zeros((weight.shape[0], r)))
        self.scaling = lora_alpha / math.sqrt(r)  # LoRALayer.__init__: alpha / sqrt(r), not alpha / r

    def forward(self, x):
        original_output = F.linear(x, self.weight, self.bias)
        lora_adjustment = torch.matmul(x, (self.w_lora_B @ self.w_lora_A).transpose(0, 1)) * self.scaling
        return original_output + lora_adjustment


class RefPlainMHALoRA(nn.Module):
    """loralib/layers.py PlainMultiheadAttentionLoRA (L340-191 of the class): q, k, v split out of in_proj."""

    def __init__(self, mha: nn.MultiheadAttention, r: int, lora_alpha: float):
        super().__init__()
        e = mha.embed_dim
        self.embed_dim, self.num_heads, self.head_dim = e, mha.num_heads, mha.head_dim
        self.batch_first = mha.batch_first
        w, b = mha.in_proj_weight.data, mha.in_proj_bias.data
        self.q_proj = RefLinearLoRA(w[:e], b[:e], r, lora_alpha)
        self.k_proj = RefLinearLoRA(w[e : 2 * e], b[e : 2 * e], r, lora_alpha)
        self.v_proj = RefLinearLoRA(w[2 * e :], b[2 * e :], r, lora_alpha)
        self.proj = nn.Linear(e, e)
        self.proj.load_state_dict(mha.out_proj.state_dict())

    def forward(self, query, key, value, need_weights=True, attn_mask=None, is_causal=False, **kw):
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:
            query = key = value = query.transpose(1, 0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=q.dtype,
            check_other=False,
        )
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(0)  # 2-D -> [1, L, L]
            attn_mask = attn_mask.unsqueeze(0)  # size(0) == 1 and dim 3 -> [1, 1, L, L]
        q = q.view(tgt_len, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        k = k.view(src_len, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        v = v.view(src_len, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        q = q.view(bsz, self.num_heads, tgt_len, self.head_dim)
        k = k.view(bsz, self.num_heads, src_len, self.head_dim)
        v = v.view(bsz, self.num_heads, src_len, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal)
        out = self.proj(out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, embed_dim))
        out = out.view(tgt_len, bsz, out.size(1))
        return (out.transpose(1, 0), None) if self.batch_first and is_batched else (out, None)


def ref_apply_lora(model, r, alpha):
    """loralib/utils.py apply_lora, encoder "both", position "all": every block of both towers."""
    layers = []
    for encoder in (model.transformer, model.visual.transformer):
        for block in encoder.resblocks:
            block.attn = RefPlainMHALoRA(block.attn, r, alpha)
            layers.append(block.attn)
    return layers


def ref_logits(model, images, classnames, template, logit_scale=100):
    """lora.py L83-103: template[0] through the adapted text tower, cosine x logit_scale."""
    texts = open_clip.tokenize([template.format(c.replace("_", " ")) for c in classnames])
    text_features = model.encode_text(texts)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    image_features = model.encode_image(images)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    return logit_scale * image_features @ text_features.t()


@pytest.fixture
def own_clip(tiny_clip) -> FrozenCLIP:
    """A FrozenCLIP of its own: CLIP-LoRA attaches adapters to the backbone it is given."""
    return FrozenCLIP(copy.deepcopy(tiny_clip.model), arch="tiny", pretrained=None)


def test_clip_lora_logits_and_gradients_match_reference(own_clip, ref_openclip, images):
    torch.manual_seed(0)
    ours = CLIPLoRA(own_clip, CLASSNAMES, rank=2, alpha=1.0, template=TEMPLATE, logit_scale=100.0).eval()
    with torch.no_grad():  # B starts at zero: give it values so the adapted path counts
        for p in ours.parameters():
            if p.requires_grad and p.shape[-1] == 2:
                p.normal_(std=0.3)
    ref_layers = ref_apply_lora(ref_openclip, 2, 1.0)
    ours_layers = [ours.text_lora[str(i)] for i in range(own_clip.text_layers)]
    ours_layers += [ours.image_lora[str(i)] for i in range(own_clip.vision_layers)]
    assert len(ref_layers) == len(ours_layers)
    for ref, mine in zip(ref_layers, ours_layers):
        for p in ("q", "k", "v"):
            proj = getattr(ref, f"{p}_proj")
            proj.w_lora_A.data.copy_(mine.deltas[p].A)
            proj.w_lora_B.data.copy_(mine.deltas[p].B)
    labels = torch.arange(images.shape[0]) % len(CLASSNAMES)
    logits = ours(images)
    expected = ref_logits(ref_openclip, images, CLASSNAMES, TEMPLATE)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    F.cross_entropy(logits, labels).backward()
    F.cross_entropy(expected, labels).backward()
    for ref, mine in zip(ref_layers, ours_layers):
        for p in ("q", "k", "v"):
            proj = getattr(ref, f"{p}_proj")
            torch.testing.assert_close(mine.deltas[p].A.grad, proj.w_lora_A.grad, rtol=1e-3, atol=1e-6)
            torch.testing.assert_close(mine.deltas[p].B.grad, proj.w_lora_B.grad, rtol=1e-3, atol=1e-6)


def test_zero_init_is_zero_shot_clip_and_only_lora_is_exported(own_clip, images):
    before = own_clip.encode_image(images)
    lora = CLIPLoRA(own_clip, CLASSNAMES, template=TEMPLATE)
    torch.testing.assert_close(own_clip.encode_image(images), before)  # B = 0: the towers are unchanged
    state = lora.prompt_state_dict()
    assert state and all(k.startswith(("text_lora.", "image_lora.")) for k in state)
    assert all(k.endswith((".A", ".B")) for k in state)
    n_blocks = own_clip.text_layers + own_clip.vision_layers
    assert len(state) == n_blocks * 3 * 2  # q, k, v x (A, B) per block
    assert not lora.image_side_frozen  # the image tower is adapted: no feature cache


def test_encoder_and_position_choose_the_blocks(own_clip):
    text_only = CLIPLoRA(own_clip, CLASSNAMES, encoder="text", position=[1], params=["q", "v"])
    assert list(text_only.text_lora) == ["1"] and not text_only.image_lora and text_only.image_side_frozen
    assert set(text_only.text_lora["1"].deltas) == {"q", "v"}
    with pytest.raises(ValueError, match="blocks"):
        CLIPLoRA(own_clip, CLASSNAMES, position=[7])
    with pytest.raises(ValueError, match="subset"):
        CLIPLoRA(own_clip, CLASSNAMES, params=["o"])
