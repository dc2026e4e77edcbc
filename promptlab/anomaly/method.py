"""AnomalyCLIP: object-agnostic prompt learning for zero-shot anomaly detection.

Zhou et al., ICLR 2024, https://arxiv.org/abs/2310.18961; facts from zqhang/AnomalyCLIP
(``prompt_ensemble.py``, ``train.py``, ``test.py``, ``loss.py``). Two learned prompts,
"[V1..VE] object." and "[W1..WE] damaged object.", describe normality and abnormality whatever the
object, so prompts learned on one dataset detect and segment defects on unseen ones. Learnable
tokens also replace the first ``deep_n_ctx`` positions after [SOS] before text blocks
1..deep_depth-1. The image tower stays frozen; patch tokens of a few layers come from DPAM's V-V
attention path (``FrozenCLIP.encode_image_dense``). Nothing here depends on class names.

Which patch maps (``feature_layers``): the published numbers used the *last* block's map only.
The original code returned four "layers" (6/12/18/24) that were one tensor: the V-V path is
updated in place (``x += x_res``) and was appended without a copy, so all four held block 24's
output (fixed in zqhang/AnomalyCLIP commit 2a7c886). That summed the layer-24 loss four times;
HEAD reproduces it with ``--features_list 24`` and ``lam = 4`` (train.sh, test.sh, train.py L50,
L102); the published test map was 4 x the layer-24 map, and the metrics do not depend on scale.
``"published"`` (default) is that configuration; ``"multilayer"`` is the fixed code run with
four distinct layers (blocks at each quarter of the tower, 6/12/18/24 of 24), same ``lam``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from promptlab.clip import FrozenCLIP
from promptlab.prompts import (
    PromptModule,
    build_prompt_layout,
    deep_prompt_tokens,
    encode_prompts,
    insert_context,
    layer_prompts,
)

#: The two object-agnostic states, in the order of the text features (normal first).
STATES = ("object", "damaged object")
IMAGE_SCORES = ("global", "global_max")
#: Named choices of ``feature_layers`` (see the module docstring).
LAYER_PRESETS = ("published", "multilayer")


def resolve_feature_layers(feature_layers: Sequence[int] | str, n_blocks: int) -> list[int]:
    """1-based vision blocks whose patch maps are used: a preset name or explicit block numbers.

    ``"published"``: the last block only; ``"multilayer"``: the block at each quarter of the tower
    (6, 12, 18, 24 of 24; 1, 2, 3 of 3).
    """
    if isinstance(feature_layers, str):
        if feature_layers == "published":
            return [n_blocks]
        if feature_layers == "multilayer":
            return sorted({-(-k * n_blocks // 4) for k in range(1, 5)})
        raise ValueError(f"feature_layers={feature_layers!r}: expected {LAYER_PRESETS} or block numbers")
    layers = [int(i) for i in feature_layers]
    bad = [i for i in layers if not 1 <= i <= n_blocks]
    if bad or not layers:
        raise ValueError(f"feature_layers {bad or layers}: the image tower has blocks 1..{n_blocks}")
    return layers


@dataclass
class AnomalyOutput:
    """image_logits [B, 2] (normal, anomalous) / temperature; layer_maps [B, n_layers, 2, H, W] softmax probabilities."""

    image_logits: torch.Tensor
    layer_maps: torch.Tensor


class AnomalyCLIP(PromptModule):
    """Object-agnostic normal / abnormal prompts with deep text tokens.

    Args:
        n_ctx: learned tokens E in front of each of the two prompts (12 in the paper).
        deep_depth: shallow prompt plus deep text tokens before blocks 1..deep_depth-1 (9).
        deep_n_ctx: deep text tokens per layer, replacing the positions right after [SOS] (4).
        feature_layers: ``"published"`` (the last block's map: what produced the published
            numbers), ``"multilayer"`` (blocks 6/12/18/24 of 24) or explicit 1-based block numbers.
        dpam_layers: number of final vision blocks with the V-V path. The reference's
            ``DPAM_layer=20`` replaces the last 19 blocks (6..24 of ViT-L/14): 19.
        temperature: similarities are divided by it (0.07, fixed in the reference).
        global_ln_post: LayerNorm the class token before projecting it; the reference does not.
        image_score: ``"global"`` (the reference's test.py: the anomalous probability of the global
            feature) or ``"global_max"`` (its mean with the layer-averaged map's maximum).
        map_loss_weight: the map losses (summed over layers) are multiplied by it (train.py's
            ``lam = 4``).
        deep_fp16: round the deep text tokens to fp16 before they enter the fp32 text tower, as
            the reference does (``.half()`` in AnomalyCLIP_lib/AnomalyCLIP.py L246, a leftover of
            fp16 CLIP code; its gradient is rounded likewise). ``False`` keeps them in full precision.
    """

    image_side_frozen: ClassVar[bool] = True

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: Sequence[str] | None = None,
        n_ctx: int = 12,
        deep_depth: int = 9,
        deep_n_ctx: int = 4,
        feature_layers: Sequence[int] | str = "published",
        dpam_layers: int = 19,
        temperature: float = 0.07,
        global_ln_post: bool = False,
        image_score: str = "global",
        map_loss_weight: float = 4.0,
        deep_fp16: bool = True,
    ):
        super().__init__(clip, ["normal", "anomalous"])  # object-agnostic: any class names are ignored
        if image_score not in IMAGE_SCORES:
            raise ValueError(f"image_score={image_score!r}: expected one of {IMAGE_SCORES}")
        if not clip.supports_dense_features:
            raise ValueError(
                f"{clip.arch}: AnomalyCLIP needs ViT patch tokens in the joint space: {clip.dense_features_refusal}"
            )
        self.feature_layers = resolve_feature_layers(feature_layers, clip.vision_layers)
        self.dpam_from = max(clip.vision_layers - dpam_layers, 0) if dpam_layers > 0 else None
        self.temperature = temperature
        self.global_ln_post = global_ln_post
        self.image_score = image_score
        self.map_loss_weight = map_loss_weight
        self.deep_fp16 = deep_fp16
        init = lambda: nn.init.normal_(torch.empty(n_ctx, clip.width), std=0.02)  # noqa: E731
        self.ctx_normal = nn.Parameter(init())  # [E, W]
        self.ctx_anomalous = nn.Parameter(init())  # [E, W]
        self.deep = deep_prompt_tokens(
            clip.text_layers, deep_depth, deep_n_ctx, clip.width, "text"
        )  # [depth-1, n, W]
        ids, pos, eot = build_prompt_layout(clip, list(STATES), n_ctx, "end")  # "[SOS] X..X object. [EOT]"
        L = int(eot.max()) + 1
        with torch.no_grad():
            base = clip.embed_tokens(ids[:, :L]).float()
        self.register_class_buffers({"_base": base, "_ctx_pos": pos, "_eot": eot})

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Object-agnostic: the prompts never hold class names, so there is nothing to rebuild."""

    def text_features(self) -> torch.Tensor:
        """[2, D] features of the normal and the anomalous prompt (not normalised)."""
        ctx = torch.stack([self.ctx_normal, self.ctx_anomalous])  # [2, E, W]
        prompts = insert_context(self._base, ctx, self._ctx_pos)  # [2, L, W]
        deep = self.deep  # [depth-1, n, W]
        if deep is not None and self.deep_fp16:
            # The reference expands the tokens to each prompt, then casts: [depth-1, 2, n, W]. Values and
            # (per prompt) gradients pass through fp16, as there.
            deep = deep.unsqueeze(1).expand(-1, 2, -1, -1).to(torch.float16).to(deep.dtype)
        return encode_prompts(self.clip, prompts, self._eot, deep_prompts=layer_prompts(deep))

    def outputs(self, images: torch.Tensor) -> AnomalyOutput:
        """Image logits and per-layer normal/anomalous probability maps at the input resolution."""
        with torch.no_grad():  # the image tower is frozen: no graph through it
            pooled, patches = self.clip.encode_image_dense(
                images, self.feature_layers, dpam_from=self.dpam_from, pooled_ln_post=self.global_ln_post
            )
        text = F.normalize(self.class_text_features().float(), dim=-1)  # [2, D]
        image_logits = F.normalize(pooled.float(), dim=-1) @ text.t() / self.temperature  # [B, 2]
        H, W = images.shape[-2:]
        gh, gw = H // self.clip.patch_size, W // self.clip.patch_size
        maps = []
        for p in patches:  # [B, P, D]
            prob = (F.normalize(p.float(), dim=-1) @ text.t() / self.temperature).softmax(-1)  # [B, P, 2]
            prob = prob.transpose(1, 2).reshape(p.shape[0], 2, gh, gw)
            maps.append(F.interpolate(prob, size=(H, W), mode="bilinear", align_corners=False))
        return AnomalyOutput(image_logits, torch.stack(maps, dim=1))  # [B, n_layers, 2, H, W]

    def forward(
        self, images: torch.Tensor | None = None, *, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, 2] normal / anomalous logits of the global image feature (needs images: dense features)."""
        if images is None:
            raise ValueError("AnomalyCLIP needs images (its features come from several layers)")
        return self.outputs(images).image_logits

    def training_step(
        self, inputs: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of ``images`` and pixel ``masks`` -> (image logits, image + map losses): the engine's
        training contract, so AnomalyCLIP trains in :func:`promptlab.engine.train` like every method."""
        out = self.outputs(inputs["images"])
        return out.image_logits, self.loss(
            out.image_logits, labels, layer_maps=out.layer_maps, masks=inputs["masks"]
        )

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, **aux: torch.Tensor) -> torch.Tensor:
        """Image cross-entropy; with ``layer_maps`` and ``masks`` in ``aux`` also the map losses."""
        loss = F.cross_entropy(logits, labels.long())
        if "layer_maps" in aux:
            loss = loss + map_loss(aux["layer_maps"], aux["masks"], self.map_loss_weight)
        return loss

    def scores(self, out: AnomalyOutput, sigma: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores [B] and anomaly maps [B, H, W]: the anomalous probability summed over layers, smoothed."""
        with torch.no_grad():  # a with block, not a decorator: mutmut skips decorated functions
            amap = out.layer_maps[:, :, 1].sum(1)  # == sum of (p_anomalous + 1 - p_normal) / 2 for two states
            amap = gaussian_blur(amap, sigma) if sigma > 0 else amap
            image = out.image_logits.softmax(-1)[:, 1]
            if self.image_score == "global_max":
                image = 0.5 * (image + amap.flatten(1).amax(1) / out.layer_maps.shape[1])
            return image, amap


# ---------------------------------------------------------------------- losses (zqhang/AnomalyCLIP loss.py)
def focal_loss(
    probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5
) -> torch.Tensor:
    """Focal loss on probabilities [B, 2, H, W] against a {0, 1} target [B, H, W], mean over pixels.

    The one-hot target is clamped to [smooth, 1 - smooth] and ``smooth`` added to p_t, as in the reference.
    """
    onehot = F.one_hot(target.long(), probs.shape[1]).movedim(-1, 1).float().clamp(smooth, 1 - smooth)
    pt = (onehot * probs).sum(1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean over images of (2 |p t| + 1) / (|p| + |t| + 1), for [B, H, W] maps."""
    p, t = prob.flatten(1), target.flatten(1).float()
    return 1 - ((2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


def map_loss(layer_maps: torch.Tensor, masks: torch.Tensor, weight: float = 4.0) -> torch.Tensor:
    """``weight`` x sum over layers of focal + dice(anomalous, mask) + dice(normal, 1 - mask).

    Args:
        layer_maps: [B, n_layers, 2, H, W] probabilities; masks: [B, 1, H, W] or [B, H, W] in {0, 1}.
    """
    gt = (masks.reshape(masks.shape[0], *layer_maps.shape[-2:]) > 0.5).float()
    total = layer_maps.new_zeros(())
    for k in range(layer_maps.shape[1]):
        m = layer_maps[:, k]
        total = total + focal_loss(m, gt) + dice_loss(m[:, 1], gt) + dice_loss(m[:, 0], 1 - gt)
    return weight * total


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """[B, H, W] -> [B, H, W], equal to ``scipy.ndimage.gaussian_filter(map, sigma)`` per map.

    Separable kernel of radius int(truncate * sigma + 0.5), borders in scipy's ``reflect`` mode
    (the edge pixel repeated: d c b a | a b c d), for any radius.
    """
    r = int(truncate * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=torch.float64, device=maps.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).to(maps.dtype)
    out = maps
    for dim in (-1, -2):
        n = out.shape[dim]
        idx = torch.arange(-r, n + r, device=maps.device) % (2 * n)
        idx = torch.where(idx >= n, 2 * n - 1 - idx, idx)
        padded = out.index_select(dim, idx)  # [..., n + 2r along dim]
        out = padded.unfold(dim if dim == -1 else out.dim() - 2, 2 * r + 1, 1) @ k
    return out
