"""FrozenCLIP: the one boundary between promptlab and the libraries that build CLIP towers.

Every method sees the same small interface whichever library built the weights (open_clip, an
OpenAI ``.pt`` file, a Hugging Face ``CLIPModel`` directory). The transformer blocks of both towers
are driven by *one* per-layer loop written here (``_block_forward``), so that prompt injection at
any layer, causal truncation of the text tower and activation checkpointing are implemented once,
never by forking the backbone's code.

Which library builds the model is the business of the backbone loaders (:class:`BackboneLoader`,
registered with :func:`register_backbone`); this module imports none of them.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from promptlab.transforms import OPENAI_MEAN, OPENAI_STD, eval_transform, train_transform

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: The CoOp-family references' arithmetic (PREC=fp16, their default): see :func:`to_reference_fp16`.
REFERENCE_FP16 = "reference_fp16"
PRECISIONS = (*_DTYPES, REFERENCE_FP16)


class _LayerNormFp32(nn.LayerNorm):
    """OpenAI CLIP's LayerNorm under fp16: fp32 weights, computed in fp32, cast back to the input's dtype
    (openai/CLIP ``clip/model.py`` ``class LayerNorm``; the CoOp family's ``clip/model.py`` copies it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


def to_reference_fp16(model: nn.Module) -> nn.Module:
    """Cast a CLIP model the way the CoOp-family references run it with ``PREC=fp16``.

    ``clip.build_model`` ends with ``convert_weights``, which halves the weights of linear, convolution
    and attention layers and the text / image projections; CoOp's trainers call ``clip_model.float()``
    only for ``PREC=fp32`` or ``amp`` (CoOp ``trainers/coop.py`` ``build_model``). LayerNorms,
    ``logit_scale`` and a ResNet tower's BatchNorms stay fp32, and every LayerNorm computes in fp32. Embeddings (token, positional,
    class) are stored in fp16 here: the reference casts them to fp16 before any use
    (``.type(self.dtype)``), so the numbers are the same.
    """
    fp32_modules = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)  # ResNet towers: BatchNorm stays fp32 too
    keep = {
        id(t)
        for m in model.modules()
        if isinstance(m, fp32_modules)
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
    }
    if isinstance(getattr(model, "logit_scale", None), torch.Tensor):
        keep.add(id(model.logit_scale))
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point() and id(t) not in keep:
            t.data = t.data.half()
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.__class__ = _LayerNormFp32  # same parameters; only the forward's arithmetic changes
    return model


# DeepPrompts: per-layer tokens for the text tower. Either a mapping {layer index: tensor}, where
# the tensor ([n, W] or [N, n, W]) replaces the n tokens right after the start token before that
# layer runs (MaPLe / IVLP style), or a callable (layer index, hidden states) -> hidden states.
# Layer indices count transformer blocks from 0. Block 0 sees the input embeddings themselves (the
# "shallow" prompt, spliced into ``x`` by the method), so keys are 1..n_layers-1: "prompt depth d"
# in the MaPLe / IVLP papers is the shallow prompt plus keys 1..d-1 (depth 9 -> blocks 0..8).
# Keys beyond the tower are ignored; key 0 or below is an error. An empty mapping (depth 0 or 1)
# runs exactly the plain encoder. The vision tower takes the same {layer: tensor} form.
DeepPrompts = Mapping[int, torch.Tensor] | Callable[[int, torch.Tensor], torch.Tensor]


#: A per-block attention adapter: ln_1's output h [..., W] -> (dq, dk, dv), each [..., W] or None.
QKVAdapter = Callable[[torch.Tensor], tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]


@dataclass
class _Block:
    """A pre-LN transformer block seen through one interface, whichever library built it."""

    ln_1: nn.Module
    ln_2: nn.Module
    mlp: nn.Module
    out_proj: nn.Linear
    heads: int
    qkv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ls_1: nn.Module
    ls_2: nn.Module
    #: (set inside :meth:`FrozenCLIP.attention_adapters`) h [..., W] -> deltas (dq, dk, dv), each [..., W]
    #: or None, added to the frozen projections: LoRA without touching the tower's weights.
    adapter: QKVAdapter | None = None

    def project_qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of ``ln_1``'s output ``h``: the frozen projections plus the adapter's deltas, if any."""
        q, k, v = self.qkv(h)
        if self.adapter is None:
            return q, k, v
        dq, dk, dv = self.adapter(h)
        return tuple(t if d is None else t + d.to(t.dtype) for t, d in ((q, dq), (k, dk), (v, dv)))


def _block_forward(
    b: _Block, x: torch.Tensor, *, causal: bool = False, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [B, L, W] -> [B, L, W]. Same maths as open_clip / HF CLIP blocks, through SDPA."""
    B, L, W = x.shape
    q, k, v = b.project_qkv(b.ln_1(x))  # each [B, L, W]
    q, k, v = (t.reshape(B, L, b.heads, W // b.heads).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None)
    x = x + b.ls_1(b.out_proj(o.transpose(1, 2).reshape(B, L, W)))
    return x + b.ls_2(b.mlp(b.ln_2(x)))


def _block_forward_dpam(b: _Block, x: torch.Tensor, vv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One block with DPAM's second, V-V attention path (AnomalyCLIP, arXiv 2310.18961, section 3.3).

    Args:
        x: [B, L, W] the plain path, which stays exactly CLIP's computation.
        vv: [B, L, W] the V-V path: at the first DPAM block it is that block's input ``x``.

    Returns:
        (x, vv) after the block. As in zqhang/AnomalyCLIP's dual-path blocks, both attentions read
        ``ln_1`` of the *plain* path; the V-V path adds softmax(V V^T / sqrt(d)) V through the same
        output projection and skips the MLP, so it accumulates V-V attention of the plain states.
    """
    B, L, W = x.shape
    q, k, v = (t.reshape(B, L, b.heads, W // b.heads).transpose(1, 2) for t in b.project_qkv(b.ln_1(x)))
    o = F.scaled_dot_product_attention(q, k, v)
    o_vv = F.scaled_dot_product_attention(v, v, v)  # queries and keys replaced by the values
    vv = vv + b.ls_1(b.out_proj(o_vv.transpose(1, 2).reshape(B, L, W)))
    x = x + b.ls_1(b.out_proj(o.transpose(1, 2).reshape(B, L, W)))
    return x + b.ls_2(b.mlp(b.ln_2(x))), vv


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., L, W] -> [..., H, L, W/H]."""
    return t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(-3, -2)


@dataclass(frozen=True)
class _PackedSuffixes:
    """Where C variable-length prompt suffixes sit when packed end to end (no padding).

    The per-token layers (LayerNorms, projections, MLP) run on the T = sum of the suffix lengths packed
    tokens; only attention, which needs each suffix's own tokens side by side, sees them padded to the
    longest suffix S, through one scatter and one gather per block.

    Attributes:
        pad_index: [T] position of each packed token in the padded [C * S] layout.
        eot_padded: [C] position of each suffix's last (end-of-text) token in the padded layout.
        eot_packed: [C] its position among the packed tokens.
        positions: [T] each packed token's position in its full prompt (for the positional embeddings).
        classes: C.
        longest: S.
    """

    pad_index: torch.Tensor
    eot_padded: torch.Tensor
    eot_packed: torch.Tensor
    positions: torch.Tensor
    classes: int
    longest: int

    @staticmethod
    def of(eot_index: torch.Tensor, prefix_len: int) -> _PackedSuffixes:
        """Layout of suffixes running from ``prefix_len`` to each prompt's ``eot_index`` (inclusive)."""
        lens = eot_index.long() - prefix_len + 1  # [C]
        if bool((lens < 1).any()):
            raise ValueError(
                f"every end-of-text token must lie after the shared prefix of {prefix_len} tokens"
            )
        C, S = lens.shape[0], int(lens.max())
        seg = torch.repeat_interleave(torch.arange(C, device=lens.device), lens)  # [T] class of each token
        start = torch.cumsum(lens, 0) - lens  # [C] first packed index of each suffix
        within = torch.arange(seg.shape[0], device=lens.device) - start[seg]  # [T] offset in its suffix
        return _PackedSuffixes(
            pad_index=seg * S + within,
            eot_padded=torch.arange(C, device=lens.device) * S + lens - 1,
            eot_packed=start + lens - 1,
            positions=prefix_len + within,
            classes=C,
            longest=S,
        )

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """[G, T, W] packed -> [G, C, S, W] padded with zeros (after each suffix's end: causally masked)."""
        G, _, W = t.shape
        out = t.new_zeros(G, self.classes * self.longest, W).index_copy(1, self.pad_index, t)
        return out.view(G, self.classes, self.longest, W)


def _block_forward_prefixed(
    b: _Block, xp: torch.Tensor, xs: torch.Tensor, layout: _PackedSuffixes, last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One causal block over prompts that share a prefix, computing the prefix once and no padding.

    Args:
        xp: [G, P, W] the shared prefix of each group (start token + unified context).
        xs: [G, T, W] the prompts' own tokens (class name, '.', EOT) packed end to end (see
            :class:`_PackedSuffixes`), or [1, T, W] when every group has the same suffix states (the
            first block's input): its LayerNorm and projections then run once, not once per group.
            Each token attends causally to its group's prefix and to the earlier tokens of its own suffix.
        last: the tower's last block, whose output is read at the end-of-text tokens only: the
            prefix's output and every other suffix token's output projection and MLP are skipped.

    Returns:
        (xp, xs) after the block; for ``last``, (xp unchanged, [G, C, W] at the end-of-text tokens).

    In a causal tower the prefix's hidden states do not depend on what follows, so running it once
    per group and letting every suffix read its keys and values is exactly the full computation.
    """
    G, P, W = xp.shape
    C, S, H = layout.classes, layout.longest, b.heads
    qp, kp, vp = (_heads(t, H) for t in b.project_qkv(b.ln_1(xp)))  # [G, H, P, d]
    # Suffix queries attend to [prefix keys | own keys], in the padded layout [g, C, H, S, d].
    qs, ks, vs = (_heads(layout.pad(t), H) for t in b.project_qkv(b.ln_1(xs)))
    scale = qs.shape[-1] ** -0.5
    # The prefix part is one matmul for all C*S queries of a group (no per-class copy of its keys and values).
    q_flat = qs.transpose(1, 2).reshape(qs.shape[0], H, C * S, -1)  # [g, H, C*S, d]
    s_pre = (q_flat @ kp.transpose(-1, -2)).reshape(G, H, C, S, P).transpose(1, 2)  # [G, C, H, S, P]
    s_own = (qs @ ks.transpose(-1, -2)).masked_fill(
        ~torch.ones(S, S, dtype=torch.bool, device=xs.device).tril(), float("-inf")
    )  # [g, C, H, S, S]
    a = torch.softmax(torch.cat([s_pre, s_own.expand(G, -1, -1, -1, -1)], dim=-1) * scale, dim=-1)
    a_pre = a[..., :P].transpose(1, 2).reshape(G, H, C * S, P)
    os_ = (a_pre @ vp).reshape(G, H, C, S, -1).transpose(1, 2) + a[..., P:] @ vs  # [G, C, H, S, d]
    os_ = os_.transpose(-3, -2).reshape(G, C * S, W)  # padded layout, heads merged
    if last:
        x = xs[:, layout.eot_packed] + b.ls_1(b.out_proj(os_[:, layout.eot_padded]))  # [G, C, W]
        return xp, x + b.ls_2(b.mlp(b.ln_2(x)))
    xs = xs + b.ls_1(b.out_proj(os_.index_select(1, layout.pad_index)))  # [G, T, W]
    op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
    xp = xp + b.ls_1(b.out_proj(op.transpose(-3, -2).flatten(-2)))
    return xp + b.ls_2(b.mlp(b.ln_2(xp))), xs + b.ls_2(b.mlp(b.ln_2(xs)))


def _open_clip_blocks(transformer: nn.Module) -> list[_Block]:
    blocks = []
    for i, blk in enumerate(transformer.resblocks):
        attn = getattr(blk, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention):
            raise TypeError(
                f"FrozenCLIP supports open_clip's standard ResidualAttentionBlock; block {i} is "
                f"{type(blk).__name__} (qk-norm / scaled-cosine variants are not supported)"
            )

        def qkv(h: torch.Tensor, a: nn.MultiheadAttention = attn):
            return F.linear(h, a.in_proj_weight, a.in_proj_bias).chunk(3, dim=-1)

        blocks.append(
            _Block(blk.ln_1, blk.ln_2, blk.mlp, attn.out_proj, attn.num_heads, qkv, blk.ls_1, blk.ls_2)
        )
    return blocks


def _hf_blocks(encoder: nn.Module) -> list[_Block]:
    blocks = []
    for layer in encoder.layers:
        a = layer.self_attn

        def qkv(h: torch.Tensor, a: nn.Module = a):
            return a.q_proj(h), a.k_proj(h), a.v_proj(h)

        ident = nn.Identity()
        blocks.append(
            _Block(
                layer.layer_norm1, layer.layer_norm2, layer.mlp, a.out_proj, a.num_heads, qkv, ident, ident
            )
        )
    return blocks


class FrozenCLIP(nn.Module):
    """A frozen CLIP model behind one interface.

    Build it with :func:`promptlab.load_clip` (:mod:`promptlab.backbones`). All weights are frozen and the model stays in eval mode
    (RN50's BatchNorm statistics must not move); methods learn only their own parameters.
    """

    def __init__(self, model: nn.Module, *, arch: str, pretrained: str | None, tokenizer=None):
        super().__init__()
        self.model = model
        self.arch = arch
        self.pretrained = pretrained
        self.backend = "hf" if hasattr(model, "text_model") else "open_clip"
        self.grad_checkpointing = False
        self.precision = "fp32"  # how load_clip cast the weights (see load_clip's ``precision``)
        if tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            tokenizer = SimpleTokenizer()
        self.tokenizer = tokenizer
        self._fingerprint: str | None = None
        self._n_start: int | None = None
        if self.backend == "hf":
            self._init_hf(model)
        else:
            self._init_open_clip(model)
        model.requires_grad_(False)
        self.eval()  # the wrapper itself too, not only the wrapped model

    # ------------------------------------------------------------------ construction
    def _init_open_clip(self, m: nn.Module) -> None:
        t = getattr(m, "text", m)  # CustomTextCLIP keeps the text tower under .text
        if not hasattr(t, "token_embedding"):
            raise TypeError(f"{type(m).__name__}: FrozenCLIP needs a CLIP-style text transformer")
        self._tok_emb, self._pos_emb, self._ln_final = t.token_embedding, t.positional_embedding, t.ln_final
        self._text_proj_w = t.text_projection
        self._text_blocks = _open_clip_blocks(t.transformer)
        if getattr(t, "cls_emb", None) is not None or getattr(t, "use_pad_mask", False):
            raise TypeError(
                f"{type(m).__name__}: text towers with an appended class token or a padding mask (CoCa-style) "
                "are not supported"
            )
        pool = getattr(t, "pool_type", "argmax")
        if pool not in ("argmax", "eos", "last"):
            raise TypeError(
                f"{type(m).__name__}: text pooling {pool!r} is not supported (argmax, eos or last)"
            )
        self.text_causal = getattr(t, "attn_mask", True) is not None  # open_clip: no mask = bidirectional
        self.text_pool = "last" if pool == "last" else "eot"
        v = m.visual
        self.vision_is_transformer = hasattr(v, "conv1") and hasattr(v, "class_embedding")
        self._timm_trunk = _timm_vit_trunk(v)
        if self.vision_is_transformer:
            if getattr(v, "attn_pool", None) is not None or getattr(v, "final_ln_after_pool", False):
                self.vision_is_transformer = False  # exotic pooling: use the library's forward
            else:
                self._vis_blocks = _open_clip_blocks(v.transformer)
        size = v.image_size
        self.image_size = int(size[0] if isinstance(size, tuple | list) else size)
        self.image_mean = tuple(getattr(v, "image_mean", None) or OPENAI_MEAN)
        self.image_std = tuple(getattr(v, "image_std", None) or OPENAI_STD)
        self.width = t.transformer.width
        self.vision_width = getattr(v, "transformer", None).width if self.vision_is_transformer else None
        if self._timm_trunk is not None:
            self.vision_width = int(self._timm_trunk.embed_dim)
        proj = self._text_proj_w
        self.embed_dim = (
            (proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])
            if proj is not None
            else self.width
        )
        self.context_length = t.positional_embedding.shape[0]

    def _init_hf(self, m: nn.Module) -> None:
        tm, vm = m.text_model, m.vision_model
        self._tok_emb = tm.embeddings.token_embedding
        self._pos_emb = tm.embeddings.position_embedding.weight
        self._ln_final = tm.final_layer_norm
        self._text_proj_w = m.text_projection
        self._text_blocks = _hf_blocks(tm.encoder)
        self.text_causal, self.text_pool = True, "eot"  # HF CLIPTextModel: causal mask, EOT pooling
        self._vis_blocks = _hf_blocks(vm.encoder)
        self._timm_trunk = None
        self.vision_is_transformer = True
        cfg = m.config
        self.image_size = int(cfg.vision_config.image_size)
        self.image_mean, self.image_std = OPENAI_MEAN, OPENAI_STD
        self.width = cfg.text_config.hidden_size
        self.vision_width = cfg.vision_config.hidden_size
        self.embed_dim = cfg.projection_dim
        self.context_length = self._pos_emb.shape[0]

    def train(self, mode: bool = True) -> FrozenCLIP:
        """Keep the frozen backbone in eval mode whatever the caller asks (BatchNorm, dropout)."""
        super().train(False)
        return self

    # ------------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        return self._tok_emb.weight.dtype

    @property
    def prompt_dtype(self) -> torch.dtype:
        """dtype of learned prompt tensors on this backbone: fp16 under ``reference_fp16`` (the reference
        creates its context in ``clip_model.dtype`` and SGD steps it in fp16), else fp32."""
        return torch.float16 if self.precision == REFERENCE_FP16 else torch.float32

    @property
    def device(self) -> torch.device:
        return self._tok_emb.weight.device

    @property
    def is_causal(self) -> bool:
        """The text tower's attention is causal (CLIP's is; SigLIP's and MobileCLIP's are bidirectional)."""
        return self.text_causal

    @property
    def can_truncate_text(self) -> bool:
        """Cutting a batch of prompts to its longest prompt (max EOT + 1) leaves the features unchanged.

        True only for a causal tower pooled at the end-of-text token: the pooled state then depends on
        the tokens up to EOT alone. A bidirectional tower (padding tokens are attended) or last-token
        pooling (SigLIP pools position context_length - 1) needs the full context. Decided from the
        model, never per method.
        """
        return self.text_causal and self.text_pool == "eot"

    @property
    def can_share_prefix(self) -> bool:
        """A prefix shared by several prompts may be run once (:meth:`encode_text_prefixed`'s fast path).

        Exact for the same reason as :attr:`can_truncate_text`: the prefix's states must not depend on
        what follows, and the pooled token must lie in the suffix.
        """
        return self.can_truncate_text

    @property
    def n_start_tokens(self) -> int:
        """Tokens the tokenizer puts before the text: 1 for CLIP's start-of-text, 0 for SigLIP's.

        Context slots and deep text prompts go right after them.
        """
        if self._n_start is None:
            self._n_start = int(self.eot_index(self.tokenize(""))[0])
        return self._n_start

    @property
    def logit_bias(self) -> torch.Tensor | None:
        """SigLIP's learned logit bias (``logit_scale * cos + logit_bias``), or None for a CLIP.

        It is a constant added to every class's logit, so it changes neither a softmax over classes nor
        an argmax: promptlab's cross-entropy objective and zero-shot evaluation use
        ``logit_scale * cos`` alone and are the same with or without it. Exposed for users who want
        SigLIP's own per-pair sigmoid probabilities, ``sigmoid(logit_scale * cos + logit_bias)``.
        """
        b = getattr(self.model, "logit_bias", None)
        return None if b is None else b.detach().float().reshape(())

    @property
    def text_layers(self) -> int:
        """Number of text transformer blocks (deep-prompt keys run 1..text_layers-1)."""
        return len(self._text_blocks)

    @property
    def vision_layers(self) -> int:
        """Number of vision transformer blocks that take visual prompts (FrozenCLIP's loop, or a timm ViT's
        blocks); 0 for a convolutional image tower (no visual prompts)."""
        if self._timm_trunk is not None:
            return len(self._timm_trunk.blocks)
        return len(self._vis_blocks) if self.vision_is_transformer else 0

    @property
    def supports_dense_features(self) -> bool:
        """Patch tokens in the joint space and DPAM (:meth:`encode_image_dense`, ``encode_image(return_tokens=True)``).

        A CLIP-style ViT (FrozenCLIP's own loop): ``ln_post`` and ``proj`` per token. A timm ViT tower
        (EVA02, SigLIP, PE) whose blocks are timm's pre-norm ``EvaBlock`` / ``Block`` with one of timm's
        attention modules: each token goes through the tower's own head *alone* (final norm, then the
        pooling head given that one token, then the projection). For a class-token head (EVA02) that is
        the norm and the linear head per token, as ``ln_post`` + ``proj``; for an attention-pool head
        (SigLIP's and PE's MAP) the softmax over a single key is 1, leaving the pool's value and output
        projections and its MLP: MaskCLIP's value path for attention pooling (Zhou et al., ECCV 2022),
        which TextRegion (arXiv 2505.23769) applies to SigLIP2 and PE. Convolutional towers: no.
        """
        return self.dense_features_refusal is None

    @property
    def dense_features_refusal(self) -> str | None:
        """Why this image tower gives no dense features, or None when :attr:`supports_dense_features` holds
        (a method's refusal quotes it, so the reason is stated once, here)."""
        if self._timm_trunk is not None:
            bad = next((b for b in self._timm_trunk.blocks if _timm_dpam_parts(b) is None), None)
            if bad is None:
                return None
            return (
                f"timm block {type(bad).__name__} with {type(bad.attn).__name__}: dense tokens and DPAM run "
                "through timm's pre-norm EvaBlock / Block with EvaAttention, AttentionRope or Attention"
            )
        if self.vision_is_transformer:
            return None
        if hasattr(self.model.visual, "conv1") and hasattr(self.model.visual, "transformer"):
            return "this ViT pools with an attention pool or a norm after pooling, which the library's forward runs"
        return "the image tower is convolutional (no transformer blocks for DPAM and per-layer patch maps)"

    @property
    def patch_size(self) -> int:
        """Side of the image tower's square patches in pixels (ViTs; dense maps are this much coarser)."""
        if self._timm_trunk is not None:
            return int(self._timm_trunk.patch_embed.patch_size[0])
        if not self.vision_is_transformer:
            raise ValueError(f"{self.arch}: a convolutional image tower has no patches")
        m = self.model
        conv = m.vision_model.embeddings.patch_embedding if self.backend == "hf" else m.visual.conv1
        return int(conv.kernel_size[0])

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp(learned temperature), as CLIP multiplies cosine similarities by it. Scalar tensor; a graph
        into the temperature only when a method unfroze it (``TEMPERATURE`` in its backbone parts)."""
        t = self.model.logit_scale
        return (t if t.requires_grad else t.detach()).float().exp().reshape(())

    @property
    def eot_token_id(self) -> int:
        """The end-of-text id: open_clip's ``SimpleTokenizer.eot_token_id`` or a Hugging Face tokenizer's EOS."""
        tok = self.tokenizer
        eot = getattr(tok, "eot_token_id", None)
        if eot is None:
            eot = getattr(getattr(tok, "tokenizer", tok), "eos_token_id", None)
        if eot is None:
            raise TypeError(f"{type(tok).__name__}: tokenizer has no end-of-text (EOS) token id")
        return int(eot)

    @property
    def train_transform(self) -> Callable:
        return self.make_train_transform()

    def make_train_transform(self, crop_scale: Sequence[float] = (0.08, 1.0)) -> Callable:
        """The protocol's training transform at this model's size and normalisation (crop area range adjustable)."""
        return train_transform(self.image_size, self.image_mean, self.image_std, crop_scale)

    @property
    def eval_transform(self) -> Callable:
        return eval_transform(self.image_size, self.image_mean, self.image_std)

    def fingerprint(self) -> str:
        """SHA-256 over every weight (names, dtypes, shapes, bytes): identifies the backbone in caches and exports."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name, t in sorted(self.model.state_dict().items()):
                t = t.detach().cpu().contiguous()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    #: The learned temperature as a backbone part (``logit_scale`` in open_clip and HF models alike).
    TEMPERATURE = "model.logit_scale"

    def tower_parts(self, tower: str, *, word_embeddings: bool = True) -> tuple[str, ...]:
        """Names (sub-modules or parameters, relative to this object) holding one tower's weights.

        Args:
            tower: ``"image"``, ``"text"`` or ``"both"``. The learned temperature is in neither
                (:attr:`TEMPERATURE` names it).
            word_embeddings: include the text tower's token-embedding table. Without it the text parts
                are the tower's other sub-modules and parameters (ViFi-CLIP fine-tunes the text tower
                on embeddings computed once from the frozen table).
        """
        if tower == "both":
            return self.tower_parts("image") + self.tower_parts("text", word_embeddings=word_embeddings)
        if tower == "text" and not word_embeddings:
            return self._without_module(self.tower_parts("text"), self._tok_emb)
        m = self.model
        if tower == "image":
            return (
                ("model.vision_model", "model.visual_projection")
                if self.backend == "hf"
                else ("model.visual",)
            )
        if tower != "text":
            raise ValueError(f"tower={tower!r}: expected 'image', 'text' or 'both'")
        if self.backend == "hf":
            return ("model.text_model", "model.text_projection")
        if hasattr(m, "text"):
            return ("model.text",)
        names = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        return tuple(f"model.{n}" for n in names if getattr(m, n, None) is not None)

    def _without_module(self, parts: Sequence[str], excluded: nn.Module) -> tuple[str, ...]:
        """``parts`` with every part that contains ``excluded`` replaced by its other children."""
        out: list[str] = []
        for name in parts:
            try:
                mod = self.get_submodule(name)
            except AttributeError:  # a parameter
                out.append(name)
                continue
            if mod is excluded:
                continue
            if not any(m is excluded for m in mod.modules()):
                out.append(name)
                continue
            children = [f"{name}.{n}" for n, _ in mod.named_children()]
            own = [f"{name}.{n}" for n, _ in mod.named_parameters(recurse=False)]
            out += own + list(self._without_module(children, excluded))
        return tuple(out)

    def unfreeze(self, parts: Sequence[str]) -> None:
        """Make the named sub-modules or parameters trainable (a method fine-tuning the backbone)."""
        for name in parts:
            try:
                self.get_submodule(name).requires_grad_(True)
            except AttributeError:
                self.get_parameter(name).requires_grad_(True)

    @contextmanager
    def attention_adapters(self, tower: str, adapters: Mapping[int, QKVAdapter]) -> Iterator[None]:
        """Inside the block, add learned deltas to the q, k, v projections of some blocks of a tower (LoRA).

        Args:
            tower: ``"text"`` or ``"image"`` (a ViT).
            adapters: {block index (0-based): fn}; ``fn(h)`` gets the block's ``ln_1`` output [..., W] and
                returns (dq, dk, dv), each [..., W] or None. Blocks not named get none.

        The callables (the method's modules, which own the parameters) are referenced for the duration
        of the block only, then the previous ones come back: the backbone's weights and fingerprint never
        change, and another method sharing this FrozenCLIP never sees them.
        """
        blocks = self._adaptable_blocks(tower)
        bad = sorted(i for i in adapters if not 0 <= int(i) < len(blocks))
        if bad:
            raise ValueError(f"{tower} blocks {bad}: the tower has blocks 0..{len(blocks) - 1}")
        before = [blk.adapter for blk in blocks]
        for i, blk in enumerate(blocks):
            blk.adapter = adapters.get(i)
        try:
            yield
        finally:
            for blk, old in zip(blocks, before):
                blk.adapter = old

    def _adaptable_blocks(self, tower: str) -> list[_Block]:
        if tower == "text":
            return self._text_blocks
        if tower != "image":
            raise ValueError(f"tower={tower!r}: expected 'text' or 'image'")
        if not self.vision_is_transformer:
            raise ValueError(
                f"{self.arch}: image-tower attention adapters need a ViT that FrozenCLIP runs block by block"
            )
        return self._vis_blocks

    # ------------------------------------------------------------------ text side
    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids [N, context_length] (start token, BPE, end token, zero padding)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(texts, context_length=self.context_length).to(self.device)

    def eot_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Position of the end-of-text token in each row of ``ids``: [N]."""
        return (ids == self.eot_token_id).int().argmax(dim=-1)

    @property
    def token_embedding_table(self) -> torch.Tensor:
        """[vocab, W] the text tower's token embedding matrix (for nearest-word interpretation)."""
        return self._tok_emb.weight

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [N, L, W] without positional embeddings (what prompt methods edit)."""
        return self._tok_emb(ids.to(self.device))

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text features [N, D] of token ids, through the same loop as learned prompts."""
        return self.encode_text_embeddings(
            self.embed_tokens(ids), self.eot_index(ids.to(self.device)), normalize=normalize
        )

    def encode_text_embeddings(
        self,
        x: torch.Tensor,
        eot_index: torch.Tensor,
        deep_prompts: DeepPrompts | None = None,
        normalize: bool = False,
    ) -> torch.Tensor:
        """Run the text transformer on prompt embeddings.

        Args:
            x: [N, L, W] token embeddings (learned context spliced in), without positional embeddings.
            eot_index: [N] position of each prompt's end-of-text token; its hidden state is the feature.
            deep_prompts: per-layer tokens (see ``DeepPrompts``); layer 0's tokens are ``x`` itself.
            normalize: L2-normalize the output.

        Returns:
            [N, D] projected text features.

        Where :attr:`can_truncate_text` holds (causal tower, EOT pooling) the batch is cut to its
        longest prompt (max EOT + 1) instead of the full context: the features are identical and the
        work is several times smaller. Otherwise the tower sees the full context, as the model does:
        shorter inputs are padded with the padding token's embedding, and a last-token pooled tower
        (SigLIP) reads position ``context_length - 1`` whatever ``eot_index`` says.
        """
        _check_deep_keys(deep_prompts)
        eot_index = eot_index.to(x.device)
        if self.can_truncate_text:
            L = int(eot_index.max()) + 1
            x = x[:, :L]
        else:
            x = self._pad_to_context(x)
            L = x.shape[1]
        x = x.to(self.dtype) + self._pos_emb[:L].to(self.dtype)
        start = self.n_start_tokens if deep_prompts is not None else 1
        for i, blk in enumerate(self._text_blocks):
            if deep_prompts is not None and i > 0:
                x = _apply_deep_prompts(deep_prompts, i, x, start)
            x = self._run_block(blk, x, causal=self.text_causal)
        x = self._ln_final(x)
        pooled_at = eot_index if self.text_pool == "eot" else torch.full_like(eot_index, L - 1)
        x = x[torch.arange(x.shape[0], device=x.device), pooled_at]  # [N, W]
        x = self._project_text(x)
        return F.normalize(x, dim=-1) if normalize else x

    @functools.cached_property
    def _pad_id(self) -> torch.Tensor:
        """[1, 1] the padding token: an empty text's last id. Tokenized once, not on every padded call."""
        return self.tokenize("")[:, -1:]

    def _pad_to_context(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, W] -> [N, context_length, W], filled with the padding token's embedding (an empty text's last id)."""
        missing = self.context_length - x.shape[1]
        if missing < 0:
            raise ValueError(f"{x.shape[1]} text tokens exceed the context length {self.context_length}")
        if missing == 0:
            return x
        pad = self.embed_tokens(self._pad_id).to(x.dtype).expand(x.shape[0], missing, -1)
        return torch.cat([x, pad], dim=1)

    def encode_text_prefixed(
        self, prefix: torch.Tensor, suffix: torch.Tensor, eot_index: torch.Tensor, normalize: bool = False
    ) -> torch.Tensor:
        """Text features of prompts that share a prefix, with the prefix run once per group.

        Args:
            prefix: [G, P, W] embeddings shared by all prompts of a group (CoOp: start token and
                the unified context, G = 1; CoCoOp: G = images).
            suffix: [G, C, S, W] or [C, S, W] (same suffixes for every group) per-prompt embeddings.
            eot_index: [C] end-of-text position of each prompt in the full sequence (>= P).
            normalize: L2-normalize the output.

        Returns:
            [G, C, D], equal to :meth:`encode_text_embeddings` of the concatenated prompts. Where the
            fast path would be inexact (:attr:`can_share_prefix` is False) it computes exactly that.
        """
        G, P, _ = prefix.shape
        eot_index = eot_index.to(prefix.device)
        if not self.can_share_prefix:  # inexact here: run every full prompt (see can_share_prefix)
            suffix = suffix.expand(G, *suffix.shape[-3:]) if suffix.dim() == 3 else suffix
            C = suffix.shape[1]
            full = torch.cat([prefix.unsqueeze(1).expand(G, C, P, -1).to(suffix.dtype), suffix], dim=2)
            feats = self.encode_text_embeddings(full.flatten(0, 1), eot_index.repeat(G), normalize=normalize)
            return feats.reshape(G, C, -1)
        layout = _PackedSuffixes.of(eot_index, P)
        xp = prefix.to(self.dtype) + self._pos_emb[:P].to(self.dtype)
        flat = suffix[..., : layout.longest, :].flatten(-3, -2)  # [C * S, W] or [G, C * S, W], padded
        xs = flat.index_select(-2, layout.pad_index).to(self.dtype)  # packed: no token past an EOT
        xs = xs + self._pos_emb[layout.positions].to(self.dtype)
        xs = xs if xs.dim() == 3 else xs.unsqueeze(0)  # [1, T, W]: every group's first-block input
        n = len(self._text_blocks)
        for i, blk in enumerate(self._text_blocks):
            last = i == n - 1  # its output is read at the EOT tokens only: [G, C, W]
            if self.grad_checkpointing and torch.is_grad_enabled() and (xp.requires_grad or xs.requires_grad):
                xp, xs = checkpoint(_block_forward_prefixed, blk, xp, xs, layout, last, use_reentrant=False)
            else:
                xp, xs = _block_forward_prefixed(blk, xp, xs, layout, last)
        if n == 0:
            xs = xs[:, layout.eot_packed].expand(G, -1, -1)
        x = self._project_text(self._ln_final(xs))  # [G, C, D]
        return F.normalize(x, dim=-1) if normalize else x

    def _project_text(self, x: torch.Tensor) -> torch.Tensor:
        p = self._text_proj_w
        if p is None:
            return x
        return p(x) if isinstance(p, nn.Module) else x @ p

    def _run_block(self, blk: _Block, x: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(_block_forward, blk, x, causal=causal, use_reentrant=False)
        return _block_forward(blk, x, causal=causal)

    # ------------------------------------------------------------------ image side
    def encode_image(
        self,
        images: torch.Tensor,
        *,
        prompts: torch.Tensor | None = None,
        deep_prompts: Mapping[int, torch.Tensor] | None = None,
        return_tokens: bool = False,
        normalize: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Image features [B, D].

        Args:
            images: [B, 3, H, W] normalized pixels.
            prompts: [n, Wv] or [B, n, Wv] visual prompt tokens appended after the patch tokens (VPT).
                They are appended after the positional embedding and *before* ``ln_pre``, as in the
                reference VPT / IVLP / MaPLe code (muzairkhattak/multimodal-prompt-learning).
            deep_prompts: {layer: [n, Wv] or [B, n, Wv]} replacing those n appended tokens right before
                block ``layer`` (1..n_layers-1, see ``DeepPrompts``); they enter the residual stream
                as they are (no positional embedding, no LayerNorm), again as in the reference.
            return_tokens: also return the projected patch tokens [B, P, D] of the last layer.
            normalize: L2-normalize the pooled features.
        """
        images = images.to(self.device, self.dtype)
        if deep_prompts and prompts is None:
            raise ValueError(
                "encode_image: deep_prompts replace appended visual prompts; pass the first layer's `prompts` too"
            )
        if return_tokens and not self.supports_dense_features:
            raise ValueError(f"{self.arch}: no patch tokens: {self.dense_features_refusal}")
        if self._timm_trunk is not None and (prompts is not None or return_tokens):
            x, n_img, _ = self._timm_vision_forward(images, prompts, deep_prompts)
            pooled = self._timm_pooled(x[:, :n_img])
            pooled = F.normalize(pooled, dim=-1) if normalize else pooled
            if return_tokens:
                return pooled, self._timm_per_token(x[:, self._timm_trunk.num_prefix_tokens : n_img])
            return pooled
        if not self.vision_is_transformer:
            if prompts is not None or deep_prompts:
                raise ValueError(f"{self.arch}: visual prompts need a ViT image tower")
            pooled = (
                self.model.encode_image(images)
                if self.backend == "open_clip"
                else self.model.get_image_features(images)
            )
            return F.normalize(pooled, dim=-1) if normalize else pooled
        x, n_patch, _ = self._vision_forward(images, prompts, deep_prompts)
        pooled = self._vision_post(x[:, 0])
        pooled = F.normalize(pooled, dim=-1) if normalize else pooled
        if return_tokens:
            return pooled, self._vision_post(x[:, 1 : 1 + n_patch])
        return pooled

    def encode_image_dense(
        self,
        images: torch.Tensor,
        layers: Sequence[int],
        *,
        dpam_from: int | None = None,
        pooled_ln_post: bool = True,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Global features and projected patch tokens of intermediate layers (dense prediction).

        Args:
            images: [B, 3, H, W] normalized pixels; any size that is a multiple of the patch size
                (the positional embeddings are interpolated when the grid differs from pre-training).
            layers: 1-based block outputs to return (6, 12, 18, 24 for ViT-L/14 in AnomalyCLIP).
            dpam_from: 0-based block from which DPAM's V-V path runs beside the plain one (see
                ``_block_forward_dpam``); patch tokens of those blocks come from the V-V path.
                ``None`` or an index beyond the last block: plain attention everywhere.
            pooled_ln_post: apply the final LayerNorm to the class token before projecting it.
                zqhang/AnomalyCLIP projects the last class token *without* ``ln_post``; ``False``
                reproduces that. On a timm tower it is the trunk's final norm before the pooling head.

        Returns:
            pooled [B, D] (from the plain path) and one [B, P, D] tensor per entry of ``layers``,
            each through ``ln_post`` and the projection into the joint space (timm towers: the final
            norm and the head per token, see :attr:`supports_dense_features`).

        timm towers (EVA02, SigLIP, PE) run through timm's own blocks and take images of the size they
        were built for (their patch grid and rotary tables are fixed); FrozenCLIP's own ViT interpolates.
        """
        if not self.supports_dense_features:
            raise ValueError(f"{self.arch}: no dense patch features: {self.dense_features_refusal}")
        bad = [i for i in layers if not 1 <= int(i) <= self.vision_layers]
        if bad:
            raise ValueError(f"layers {bad}: expected 1..{self.vision_layers} (1-based block outputs)")
        if self._timm_trunk is not None:
            x, n_img, kept = self._timm_vision_forward(
                images.to(self.device, self.dtype), None, None, dpam_from, layers
            )
            npt = self._timm_trunk.num_prefix_tokens
            pooled = self._timm_pooled(x[:, :n_img], ln=pooled_ln_post)
            return pooled, [self._timm_per_token(kept[int(i)][:, npt:n_img]) for i in layers]
        x, n_patch, kept = self._vision_forward(
            images.to(self.device, self.dtype), None, None, dpam_from, layers
        )
        pooled = self._vision_post(x[:, 0], ln=pooled_ln_post)
        return pooled, [self._vision_post(kept[int(i)][:, 1 : 1 + n_patch]) for i in layers]

    def _vision_forward(
        self,
        images: torch.Tensor,
        prompts: torch.Tensor | None,
        deep_prompts: Mapping[int, torch.Tensor] | None,
        dpam_from: int | None = None,
        keep: Sequence[int] = (),
    ) -> tuple[torch.Tensor, int, dict[int, torch.Tensor]]:
        """The one per-layer loop of the image tower: visual prompts, DPAM and intermediate outputs.

        Returns the last hidden states [B, 1 + P + n, Wv] (plain path), the patch count P, and
        {layer: hidden states after that many blocks} for the 1-based ``keep`` layers (V-V path
        where DPAM runs).
        """
        _check_deep_keys(deep_prompts)
        x = self._vision_embed(images)  # [B, 1 + P, Wv], before ln_pre
        n_patch = x.shape[1] - 1
        x, n_prompt = _append_prompts(x, prompts)  # [B, tokens + n, Wv]
        x = self._vision_ln_pre(x)  # [B, 1 + P + n, Wv]
        keep = {int(i) for i in keep}
        kept: dict[int, torch.Tensor] = {}
        vv = None
        for i, blk in enumerate(self._vis_blocks):
            x = _replace_visual_prompts(deep_prompts, i, x, 1 + n_patch, n_prompt)
            if dpam_from is not None and i >= dpam_from:
                x, vv = _block_forward_dpam(blk, x, x if vv is None else vv)
            else:
                x = self._run_block(blk, x)
            if i + 1 in keep:
                kept[i + 1] = x if vv is None else vv
        return x, n_patch, kept

    def _timm_vision_forward(
        self,
        images: torch.Tensor,
        prompts: torch.Tensor | None,
        deep_prompts: Mapping[int, torch.Tensor] | None,
        dpam_from: int | None = None,
        keep: Sequence[int] = (),
    ) -> tuple[torch.Tensor, int, dict[int, torch.Tensor]]:
        """The per-layer loop of a timm ViT image tower (EVA02, SigLIP, PE): visual prompts, DPAM, intermediates.

        timm's own modules do the work (patch embedding, positional / rotary embeddings, each block's
        ``forward``); only the token sequence is edited between them, as in :meth:`_vision_forward`: the
        ``prompts`` [n, Wv] are appended after the image's tokens before ``norm_pre`` and replaced before
        each block of ``deep_prompts``. Rotary embeddings (EVA02, PE) get the identity rotation (sin 0,
        cos 1) for the prompt tokens, which have no position. From block ``dpam_from`` on, DPAM's V-V path
        runs beside the plain one (:func:`_timm_block_vv`): the plain path stays each block's own forward.

        Returns the last hidden states [B, n_img + n, Wv] before the final norm (plain path), n_img (the
        image's own tokens: prefix tokens, then patches), and {layer: hidden states after that many
        blocks} for the 1-based ``keep`` layers (V-V path where DPAM runs).
        """
        _check_deep_keys(deep_prompts)
        t = self._timm_trunk
        want = tuple(int(s) for s in t.patch_embed.img_size)
        if tuple(images.shape[-2:]) != want:
            raise ValueError(
                f"{self.arch}: the timm image tower takes {want[0]}x{want[1]} images (its patch grid and rotary "
                f"embeddings are fixed); got {tuple(images.shape[-2:])}"
            )
        x = t.patch_embed(images)
        out = t._pos_embed(x)
        x, rope = out if isinstance(out, tuple) else (t.patch_drop(out), None)
        n_img = x.shape[1]  # prefix (class / register) tokens + patches
        x, n_prompt = _append_prompts(x, prompts)  # [B, tokens + n, Wv]
        x = t.norm_pre(x)  # [B, n_img + n, Wv]
        if rope is not None and n_prompt:  # [..., P, 2 * d] = sin | cos: identity rows for the prompts
            half = rope.shape[-1] // 2
            ident = torch.cat(
                [
                    rope.new_zeros(*rope.shape[:-2], n_prompt, half),
                    rope.new_ones(*rope.shape[:-2], n_prompt, half),
                ],
                -1,
            )
            rope = torch.cat([rope, ident], dim=-2)
        keep = {int(i) for i in keep}
        kept: dict[int, torch.Tensor] = {}
        vv = None
        for i, blk in enumerate(t.blocks):
            x = _replace_visual_prompts(deep_prompts, i, x, n_img, n_prompt)
            if dpam_from is not None and i >= dpam_from:
                vv = _timm_block_vv(blk, x, x if vv is None else vv)
            x = blk(x, rope=rope) if rope is not None else blk(x)
            if i + 1 in keep:
                kept[i + 1] = x if vv is None else vv
        return x, n_img, kept

    def _timm_pooled(self, x: torch.Tensor, ln: bool = True) -> torch.Tensor:
        """[B, n_img, Wv] image tokens after the blocks -> [B, D]: final norm, the trunk's pooling head, the
        tower's projection (what the library's ``encode_image`` does after the blocks). The head pools the
        image's own tokens only: prompts act through attention, as CLIP's class-token readout ignores them."""
        t = self._timm_trunk
        return self.model.visual.head(t.forward_head(t.norm(x) if ln else x))

    def _timm_per_token(self, x: torch.Tensor) -> torch.Tensor:
        """[B, P, Wv] -> [B, P, D]: every token through the tower's head alone (see :attr:`supports_dense_features`).

        The final norm, then the pooling head given a sequence of that one token (a token pool reads it;
        an attention pool's softmax over one key is 1), then ``fc_norm``, the classifier-as-projection and
        open_clip's own head.
        """
        t = self._timm_trunk
        B, P, W = x.shape
        h = t.norm(x).reshape(B * P, 1, W)
        pool = getattr(t, "attn_pool", None)
        h = pool(h) if pool is not None else h[:, 0]  # [B * P, Wv]
        h = self.model.visual.head(t.head(t.head_drop(t.fc_norm(h))))
        return h.reshape(B, P, -1)

    def _vision_embed(self, images: torch.Tensor) -> torch.Tensor:
        """Class + patch tokens with positional embeddings, before the pre-LayerNorm: [B, 1 + P, Wv]."""
        if self.backend == "hf":
            other_size = tuple(images.shape[-2:]) != (self.image_size, self.image_size)
            return self.model.vision_model.embeddings(
                images, interpolate_pos_encoding=other_size
            )  # HF: bicubic
        v = self.model.visual
        x = v.conv1(images)  # [B, Wv, gh, gw]
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)  # [B, P, Wv]
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + _resize_pos_embed(v.positional_embedding, grid).to(x.dtype)

    def _vision_ln_pre(self, x: torch.Tensor) -> torch.Tensor:
        return (
            self.model.vision_model.pre_layrnorm(x) if self.backend == "hf" else self.model.visual.ln_pre(x)
        )

    def _vision_post(self, x: torch.Tensor, ln: bool = True) -> torch.Tensor:
        """Final LayerNorm (unless ``ln=False``) and projection into the joint space, for class or patch tokens."""
        if self.backend == "hf":
            return self.model.visual_projection(self.model.vision_model.post_layernorm(x) if ln else x)
        v = self.model.visual
        x = v.ln_post(x) if ln else x
        return x @ v.proj if v.proj is not None else x


def _timm_vit_trunk(visual: nn.Module) -> nn.Module | None:
    """The timm ViT inside an open_clip ``TimmModel`` image tower (EVA02, SigLIP, PE), or None.

    Accepted when timm's model exposes the pieces :meth:`FrozenCLIP._timm_vision_forward` calls
    (``patch_embed``, ``_pos_embed``, ``norm_pre``, ``blocks``, ``norm``, ``forward_head``) and no
    depth-dependent rotary embeddings; convolutional timm towers (MobileCLIP's FastViT) are not ViTs.
    """
    t = getattr(visual, "trunk", None)
    needed = (
        "patch_embed",
        "_pos_embed",
        "norm_pre",
        "blocks",
        "norm",
        "forward_head",
        "embed_dim",
        "num_prefix_tokens",
    )
    if t is None or not all(hasattr(t, n) for n in needed) or getattr(t, "rope_mixed", False):
        return None
    if getattr(t, "dynamic_img_size", False):
        return None
    return t


def _timm_dpam_parts(blk: nn.Module) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]] | None:
    """(attention module, attention-branch layer scale) of a timm block DPAM can run through, or None.

    Accepted: timm's pre-norm blocks (``EvaBlock``: EVA02, PE; ``vision_transformer.Block``: SigLIP) whose
    attention is ``EvaAttention``, ``AttentionRope`` or ``Attention``, the modules :func:`_timm_block_vv`
    reads. Post-norm or parallel blocks and other attention classes are not (None): their residual
    branches are arranged differently.
    """
    from timm.layers import Attention, AttentionRope
    from timm.models.eva import EvaAttention, EvaBlock
    from timm.models.vision_transformer import Block

    if type(blk) not in (EvaBlock, Block) or type(blk.attn) not in (EvaAttention, AttentionRope, Attention):
        return None
    if type(blk) is EvaBlock:
        gamma = blk.gamma_1
        return blk.attn, (lambda y: y) if gamma is None else (lambda y: gamma * y)
    return blk.attn, blk.ls1


def _timm_block_vv(blk: nn.Module, x: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
    """DPAM's V-V path through one timm block (the analogue of :func:`_block_forward_dpam`'s second path).

    Args:
        x: [B, L, W] the plain path's input to the block (its ``norm1`` is what both attentions read).
        vv: [B, L, W] the V-V path so far (at the first DPAM block, ``x`` itself).

    Returns:
        vv + layer_scale(proj(norm(softmax(V V^T / sqrt(d)) V) [* gate])): the block's own value
        projection, attention-output norm (EVA02's ``scale_attn_inner``), gate and output projection,
        with queries and keys replaced by the values. Rotary embeddings and q / k norms act on queries
        and keys only, so the V-V path has none (as CLIP's V-V path has no positional term); the MLP
        is skipped, as in zqhang/AnomalyCLIP.
    """
    a, layer_scale = _timm_dpam_parts(blk)
    h = blk.norm1(x)
    B, L, _ = h.shape
    if getattr(a, "qkv", None) is not None:  # fused: the value rows of the qkv projection
        w, b = a.qkv.weight, a.qkv.bias
        n = w.shape[0] // 3
        v = F.linear(h, w[2 * n :], None if b is None else b[2 * n :])
        if getattr(a, "v_bias", None) is not None:  # EvaAttention keeps the fused biases apart
            v = v + a.v_bias
    else:
        v = a.v_proj(h)
    v = v.unflatten(-1, (-1, a.head_dim)).transpose(1, 2)  # [B, Hkv, L, d]
    groups = getattr(a, "num_kv_groups", 1)
    if groups > 1:  # grouped-query attention: each query head reads its kv head, as AttentionRope does
        v = v.repeat_interleave(groups, dim=1)
    o = F.scaled_dot_product_attention(v, v, v).transpose(1, 2).reshape(B, L, -1)  # [B, L, H * d]
    o = a.norm(o)
    if getattr(a, "gate", None) is not None:
        o = o * a.gate(h).sigmoid()
    return vv + layer_scale(a.proj(o))


def _resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1 + P, W] positional embeddings for another patch grid: bilinear on the patch part, class kept.

    The pre-training grid is returned unchanged; otherwise the patch embeddings are resampled as
    zqhang/AnomalyCLIP does at 518 px (``F.interpolate(mode="bilinear")``, align_corners=False).
    """
    side = int(round((pos.shape[0] - 1) ** 0.5))
    if (side, side) == tuple(grid):
        return pos
    patch = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()  # [1, W, s, s]
    patch = F.interpolate(patch, size=grid, mode="bilinear", align_corners=False)
    return torch.cat([pos[:1], patch.flatten(2).transpose(1, 2)[0].to(pos.dtype)], dim=0)  # [1 + gh*gw, W]


def _replace_visual_prompts(
    deep: Mapping[int, torch.Tensor] | None, layer: int, x: torch.Tensor, n_img: int, n_prompt: int
) -> torch.Tensor:
    """x [B, n_img + n, Wv] with its n appended prompt tokens replaced by ``deep[layer]`` (if given)."""
    if not deep or layer not in deep:
        return x
    p = _expand(deep[layer], x.shape[0]).to(x.dtype)
    if p.shape[1] != n_prompt:
        raise ValueError(
            f"deep visual prompts of layer {layer} have {p.shape[1]} tokens; they replace the {n_prompt} "
            "tokens appended by `prompts`, so the counts must match"
        )
    return torch.cat([x[:, :n_img], p], dim=1)


def _append_prompts(x: torch.Tensor, prompts: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Visual prompts appended after an image's tokens, and their count (both image loops share it)."""
    if prompts is None:
        return x, 0
    p = _expand(prompts, x.shape[0]).to(x.dtype)  # [B, n, Wv]
    return torch.cat([x, p], dim=1), p.shape[1]


def _expand(p: torch.Tensor, batch: int) -> torch.Tensor:
    return p.unsqueeze(0).expand(batch, -1, -1) if p.dim() == 2 else p


def _check_deep_keys(deep: DeepPrompts | None) -> None:
    if isinstance(deep, Mapping) and any(int(k) < 1 for k in deep):
        raise ValueError(
            f"deep_prompts keys {sorted(deep)}: layer indices start at 1 (block 0 reads the input "
            "embeddings, where the method splices its shallow prompt itself)"
        )


def _apply_deep_prompts(deep: DeepPrompts, layer: int, x: torch.Tensor, start: int = 1) -> torch.Tensor:
    """Replace the n tokens after the ``start`` leading tokens (CLIP's [SOS]: 1; SigLIP: 0)."""
    if callable(deep) and not isinstance(deep, Mapping):
        return deep(layer, x)
    if layer not in deep:
        return x
    p = _expand(deep[layer], x.shape[0]).to(x.dtype)  # [N, n, W]
    return torch.cat([x[:, :start], p, x[:, start + p.shape[1] :]], dim=1)


# ---------------------------------------------------------------------- backbone loaders
@dataclass(frozen=True)
class BackboneLoader:
    """One way of building the CLIP model behind a :class:`FrozenCLIP` (open_clip tag, local file,
    Hugging Face directory, OpenAI ``.pt``, the sandbox, tiny random models, or a user's own).

    FrozenCLIP imports none of them: loaders register here (:func:`register_backbone`) and
    :func:`promptlab.backbones.load_clip` asks them, the most recently registered first.

    Attributes:
        name: for messages and :func:`backbone_loaders`.
        claims: ``(arch, pretrained) -> bool``: does this loader build it? No file is opened.
        load: ``(arch, pretrained) -> (model, arch name to record, tokenizer or None)``; the model is
            an open_clip ``CLIP`` or a Hugging Face ``CLIPModel`` in fp32 on the CPU.
        check: ``(arch, pretrained) -> None``: refuse a name this loader claims but cannot build
            (raises :class:`promptlab.backbones.UnknownBackbone`), without loading anything.
        model_config: ``FrozenCLIP -> dict | None``: the open_clip model config of a model this
            loader built, so that ``save_clip`` can write it as a ``local-dir`` folder.
        archs: ``() -> names``: the architectures it builds by name (for suggestions).
    """

    name: str
    claims: Callable[[str, str | None], bool]
    load: Callable[[str, str | None], tuple[nn.Module, str, object]]
    check: Callable[[str, str | None], None] | None = None
    model_config: Callable[[FrozenCLIP], dict | None] | None = None
    archs: Callable[[], Sequence[str]] = tuple


_LOADERS: list[BackboneLoader] = []


def register_backbone(loader: BackboneLoader) -> BackboneLoader:
    """Add a loader; it is asked before every loader registered earlier (a later one may specialise)."""
    _LOADERS[:] = [ld for ld in _LOADERS if ld.name != loader.name] + [loader]
    return loader


def backbone_loaders() -> list[BackboneLoader]:
    """The registered loaders, in the order they are asked (most recently registered first)."""
    return _LOADERS[::-1]


def wrap_model(
    model: nn.Module,
    *,
    arch: str,
    pretrained: str | None,
    tokenizer: object = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> FrozenCLIP:
    """Cast and move a loaded CLIP model as ``precision`` says and wrap it in a :class:`FrozenCLIP`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == REFERENCE_FP16:
        model = to_reference_fp16(model.to(device=device, dtype=torch.float32))
    else:
        model = model.to(device=device, dtype=_DTYPES[precision])
    clip = FrozenCLIP(model, arch=arch, pretrained=pretrained, tokenizer=tokenizer)
    clip.precision = precision
    return clip
