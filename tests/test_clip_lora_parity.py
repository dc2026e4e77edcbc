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
    """loralib/layers.py LinearLoRA (L152-208): W x + b + (dropout(x) @ (B A)^T) * alpha / sqrt(r); eval: no dropout."""

    def __init__(self, weight, bias, r, lora_alpha, dropout_rate=0.0):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight.clone(), False), nn.Parameter(bias.clone(), False)
        self.w_lora_A = nn.Parameter(weight.new_zeros((r, weight.shape[1])))
        self.w_lora_B = nn.Parameter(weight.new_zeros((weight.shape[0], r)))
        self.scaling = lora_alpha / math.sqrt(r)  # LoRALayer.__init__ (L42): alpha / sqrt(r), not alpha / r
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else None  # L176-179

    def forward(self, x):
        original_output = F.linear(x, self.weight, self.bias)
        if self.dropout is not None and self.training and self.dropout.p > 0:  # L200-201
            x = self.dropout(x)
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


def ref_apply_lora(model, r, alpha, encoder="both", indices=None):
    """loralib/utils.py apply_lora (L107-134): every block of the chosen towers (``indices``: those blocks
    only), each attention replaced by PlainMultiheadAttentionLoRA. q, k and v all get a LinearLoRA here; a
    projection the reference leaves alone (``enable_lora``) is one whose B stays zero (no delta)."""
    layers = []
    towers = {"text": model.transformer, "vision": model.visual.transformer}
    for name, tower in towers.items():
        if encoder in (name, "both"):
            for i, block in enumerate(tower.resblocks):
                if indices is None or i in indices:
                    block.attn = RefPlainMHALoRA(block.attn, r, alpha)
                    layers.append(block.attn)
    return layers


def ref_text_features(model, classnames, template):
    """lora.py L12-17 (evaluate_lora): ``template[0]`` of each class through the text tower, normalised."""
    texts = open_clip.tokenize([template.format(c.replace("_", " ")) for c in classnames])
    text_features = model.encode_text(texts)
    return text_features / text_features.norm(dim=-1, keepdim=True)


def ref_logits(model, images, classnames, template, logit_scale=100):
    """lora.py L83-103: template[0] through the adapted text tower, cosine x logit_scale."""
    text_features = ref_text_features(model, classnames, template)
    image_features = model.encode_image(images)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    return logit_scale * image_features @ text_features.t()


def _randomise_b(lora: CLIPLoRA) -> None:
    """B starts at zero: give it values so the adapted path counts."""
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith(".B"):
                p.normal_(std=0.3)


def _copy_to_ref(ref_layers, ours_layers) -> None:
    """Copy our deltas' A and B into the reference's LinearLoRA of the same block and projection."""
    for ref, mine in zip(ref_layers, ours_layers, strict=True):
        for p, delta in mine.deltas.items():
            getattr(ref, f"{p}_proj").w_lora_A.data.copy_(delta.A)
            getattr(ref, f"{p}_proj").w_lora_B.data.copy_(delta.B)


@pytest.fixture
def own_clip(tiny_clip) -> FrozenCLIP:
    """A FrozenCLIP of its own: CLIP-LoRA attaches adapters to the backbone it is given."""
    return FrozenCLIP(copy.deepcopy(tiny_clip.model), arch="tiny", pretrained=None)


def test_clip_lora_logits_and_gradients_match_reference(own_clip, ref_openclip, images):
    torch.manual_seed(0)
    ours = CLIPLoRA(own_clip, CLASSNAMES, rank=2, alpha=1.0, template=TEMPLATE, logit_scale=100.0).eval()
    _randomise_b(ours)
    ref_layers = ref_apply_lora(ref_openclip, 2, 1.0)
    ours_layers = [ours.text_lora[str(i)] for i in range(own_clip.text_layers)]
    ours_layers += [ours.image_lora[str(i)] for i in range(own_clip.vision_layers)]
    assert all(sorted(mine.deltas) == ["k", "q", "v"] for mine in ours_layers)
    _copy_to_ref(ref_layers, ours_layers)
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


def test_lora_delta_init_and_dropout_are_loralibs():
    """loralib/layers.py: A is Kaiming-uniform with a = sqrt(5) (L67), B zero; LinearLoRA (L199-206) drops out
    the LoRA input in training only, then adds ``x (B A)^T * alpha / sqrt(r)``."""
    from promptlab.methods.clip_lora import LoRADelta

    torch.manual_seed(3)
    delta = LoRADelta(16, 24, rank=4, alpha=2.0, dropout=0.25)
    torch.manual_seed(3)
    ref_a = nn.init.kaiming_uniform_(torch.empty(4, 16), a=math.sqrt(5))
    torch.testing.assert_close(delta.A.data, ref_a, rtol=0, atol=0)
    assert delta.B.shape == (24, 4) and not delta.B.any()
    with torch.no_grad():
        delta.B.normal_()
    # the reference layer on a zero base weight and bias: its output is the LoRA term alone
    ref = RefLinearLoRA(torch.zeros(24, 16), torch.zeros(24), 4, 2.0, dropout_rate=0.25)
    ref.w_lora_A.data.copy_(delta.A)
    ref.w_lora_B.data.copy_(delta.B)
    x = torch.randn(5, 16)
    torch.manual_seed(4)
    trained = delta.train()(x)
    torch.manual_seed(4)
    torch.testing.assert_close(trained, ref.train()(x), rtol=1e-5, atol=1e-6)
    evaluated = delta.eval()(x)
    torch.testing.assert_close(evaluated, ref.eval()(x), rtol=1e-5, atol=1e-6)
    assert (trained - evaluated).abs().max() > 1e-3  # the dropout was drawn


def test_clip_lora_one_tower_matches_reference(own_clip, ref_openclip, images):
    """``--encoder vision``: LoRA in the image tower only; the text side is the frozen tower's feature of
    ``template[0]`` (lora.py L12-17, also with a second template given). ``--encoder text`` on block 1's
    q and v only: the image tower is the frozen one, the text tower adapted where asked."""
    ref_text_side, plain = copy.deepcopy(ref_openclip), copy.deepcopy(ref_openclip)
    torch.manual_seed(0)
    second = "a blurry photo of a {}."
    vision = CLIPLoRA(own_clip, CLASSNAMES, encoder="vision", templates=[TEMPLATE, second], logit_scale=100.0)
    vision.eval()
    _randomise_b(vision)
    assert not vision.text_lora and all(k.startswith("image_lora.") for k in vision.prompt_state_dict())
    ref_layers = ref_apply_lora(ref_openclip, 2, 1.0, encoder="vision")
    _copy_to_ref(ref_layers, [vision.image_lora[str(i)] for i in range(own_clip.vision_layers)])
    with torch.no_grad():
        text = ref_text_features(ref_openclip, CLASSNAMES, TEMPLATE)
        image = ref_openclip.encode_image(images)
        expected = 100 * (image / image.norm(dim=-1, keepdim=True)) @ text.t()
        torch.testing.assert_close(vision(images), expected, rtol=1e-4, atol=1e-4)
        frozen = ref_logits(plain, images, CLASSNAMES, TEMPLATE)
    assert (expected - frozen).abs().max() > 1e-2  # the adapted image blocks count in what was compared

    template = "itap of a {}."  # not the default template: the dataset's one must be the one used
    text_only = CLIPLoRA(
        own_clip,
        CLASSNAMES,
        encoder="text",
        params=["q", "v"],
        position=[1],
        template=template,
        logit_scale=100.0,
    ).eval()
    _randomise_b(text_only)
    ref_layers = ref_apply_lora(ref_text_side, 2, 1.0, encoder="text", indices=[1])
    _copy_to_ref(ref_layers, [text_only.text_lora["1"]])
    with torch.no_grad():
        torch.testing.assert_close(
            text_only.encode_image(images), ref_text_side.encode_image(images), rtol=1e-5, atol=1e-5
        )
        expected = ref_logits(ref_text_side, images, CLASSNAMES, template)
        torch.testing.assert_close(text_only(images), expected, rtol=1e-4, atol=1e-4)
        frozen = ref_logits(plain, images, CLASSNAMES, template)
    assert (expected - frozen).abs().max() > 1e-2  # the adapted text blocks count in what was compared


def test_clip_lora_arguments_are_checked(own_clip):
    """encoder, rank and params are checked at construction, with the value named; LoRA on the image tower
    needs a transformer tower (``--encoder text`` is fine on a ResNet CLIP)."""
    from promptlab.backbones import load_clip

    assert CLIPLoRA(own_clip, CLASSNAMES, rank=1).text_lora["0"].deltas["q"].A.shape == (1, own_clip.width)
    with pytest.raises(ValueError, match="encoder='image': expected 'both', 'text' or 'vision'"):
        CLIPLoRA(own_clip, CLASSNAMES, encoder="image")
    with pytest.raises(ValueError, match=r"rank must be >= 1 and params a non-empty subset"):
        CLIPLoRA(own_clip, CLASSNAMES, rank=0)
    with pytest.raises(ValueError, match=r"rank must be >= 1 and params a non-empty subset"):
        CLIPLoRA(own_clip, CLASSNAMES, params=[])
    rn = load_clip("tiny-rn")
    for encoder in ("both", "vision"):
        with pytest.raises(ValueError, match="tiny-rn: LoRA on the image tower needs a ViT"):
            CLIPLoRA(rn, CLASSNAMES, encoder=encoder)
    text_only = CLIPLoRA(rn, CLASSNAMES, encoder="text")
    assert text_only.text_lora and not text_only.image_lora and text_only.image_side_frozen


def test_clip_lora_vision_only_head_under_reference_fp16(images):
    """``--encoder vision`` under reference_fp16: the frozen text classifier (computed in fp32) joins the
    fp16 image feature in the fp16 head (lora.py L90-91: ``textual_features.t().half()``)."""
    from promptlab.backbones import load_clip

    half, full = load_clip("tiny", precision="reference_fp16"), load_clip("tiny")
    torch.manual_seed(0)
    ours = CLIPLoRA(half, CLASSNAMES, encoder="vision", template=TEMPLATE).eval()
    ours.match_backbone_precision()
    _randomise_b(ours)
    torch.manual_seed(0)
    fp32 = CLIPLoRA(full, CLASSNAMES, encoder="vision", template=TEMPLATE).eval()
    fp32.load_state_dict(ours.state_dict())
    with torch.no_grad():
        logits = ours(images)
        assert logits.dtype == torch.float16
        torch.testing.assert_close(logits.float(), fp32(images), rtol=0, atol=0.5)
