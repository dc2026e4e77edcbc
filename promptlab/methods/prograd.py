"""ProGrad: Prompt-aligned Gradient for Prompt Tuning (Zhu et al., ICCV 2023, https://arxiv.org/abs/2205.14865).

CoOp's unified context, trained on cross-entropy whose gradient is stripped of the part that conflicts
with the "general direction": the gradient of the KL divergence to zero-shot CLIP's prediction with the
hand-crafted prompt. Per learned tensor, with ``g_ce`` and ``g_kl`` the two gradients
(BeierZhu/Prompt-align ``Dassl.ProGrad.pytorch/dassl/engine/trainer.py`` L311-349):
``g = g_ce - lam * (g_ce . g_kl / |g_kl|) g_kl / |g_kl|`` when ``cos(g_ce, g_kl) < 0``, else ``g_ce``.
The projection is :meth:`PromptModule.backward` (the engine's gradient hook), not a special loop.

The context starts from the hand-crafted prompt's words (``ctx_init=true``: the dataset template
without " {}.", right-aligned in ``n_ctx`` zero vectors, ``trainers/prograd.py`` L78-95), and the
teacher is zero-shot CLIP with the same template (``CLIP`` L220-249), on the same (augmented) images.
Under ``model.precision=reference_fp16`` the reference's teacher is a second, fp32 copy of CLIP; here it
reuses the run's fp16 image features and text tower (upcast to fp32 for its logits): exact in fp32 runs,
fp16-rounded teacher features otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from promptlab.clip import FrozenCLIP
from promptlab.prompts import (
    PromptModule,
    encode_context_prefix,
    hand_crafted_features,
    init_context,
    prompt_buffers,
    word_embeddings,
)
from promptlab.templates import DEFAULT_TEMPLATE


def project_conflicting(g: torch.Tensor, general: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """``g`` without ``lam`` times its component along ``general`` when the two point apart (cos < 0).

    Same operations, in the same order and dtype, as the reference (trainer.py L336-345); a zero
    ``general`` gives NaN directions there too, and then no projection (the comparison is false).
    """
    general_dir = general / torch.linalg.norm(general)
    g_dir = g / torch.linalg.norm(g)
    if torch.dot(g_dir.flatten(), general_dir.flatten()) < 0:
        return g - lam * torch.dot(g.flatten(), general_dir.flatten()) * general_dir
    return g


class ProGrad(PromptModule):
    """CoOp with prompt-aligned gradients (text side only; image features are cacheable).

    Args:
        n_ctx: number of context vectors (16 in the reference scripts).
        ctx_init: true: initialise the last context vectors from the template's words (the rest zeros),
            as the reference's ``CTX_INIT: True``; false: N(0, 0.02) behind "X X ...".
        lam: ``LOSS.LAMBDA``, how much of the conflicting component is removed (1.0; the paper used 0.8
            for 8 and 16 shots on Flowers102, DTD and EuroSAT in its few-shot table).
        temperature: ``LOSS.T`` of the distillation term (1.0).
        template: the hand-crafted prompt (ProGrad's ``CUSTOM_TEMPLATES``); the runner fills it from the
            dataset definition, the recipes' ``per_dataset`` section sets ProGrad's where they differ.
    """

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: Sequence[str],
        n_ctx: int = 16,
        ctx_init: bool = True,
        lam: float = 1.0,
        temperature: float = 1.0,
        template: str | None = None,
    ):
        super().__init__(clip, classnames)
        self.template = template or DEFAULT_TEMPLATE
        self.lam, self.temperature = float(lam), float(temperature)
        if ctx_init:
            words = self.template.replace(" {}.", "").replace("_", " ")  # trainers/prograd.py L79-81
            k = len(words.split(" "))  # counted in words, as the reference; the embeddings are tokens
            if n_ctx < k:
                raise ValueError(f"ProGrad: n_ctx={n_ctx} is fewer than the {k} words of {words!r}")
            ctx = torch.zeros(n_ctx, clip.width)
            ctx[n_ctx - k :] = word_embeddings(clip, words)[:k]  # L90-93: the first k tokens of the words
            self.prefix = f"{' '.join(['X'] * (n_ctx - k))} {words}"  # L94-95
        else:
            ctx = init_context(clip, n_ctx, "")
            self.prefix = " ".join(["X"] * n_ctx)
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(ctx)  # [n_ctx, W]
        self._step_feats: torch.Tensor | None = None  # a training step's image features, for the teacher
        self._step_kl: torch.Tensor | None = None  # its KL term, for backward()
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        # "[SOS] ctx(n_ctx) {rest of the prefix tokens} name." (L112-126): the prefix's tokens beyond n_ctx
        # stay fixed words, e.g. the last "a" of "a type of pet, a photo of a" (9 tokens, 8 words)
        self.register_class_buffers(
            prompt_buffers(self.clip, self.classnames, self.n_ctx, prefix=self.prefix)
        )
        self.register_buffer(
            "_zs", hand_crafted_features(self.clip, self.classnames, [self.template]), persistent=False
        )  # [C, D] the teacher's normalised text features

    def text_features(self) -> torch.Tensor:
        # [SOS] + context is a prefix shared by all classes: the causal tower runs it once (exact)
        return encode_context_prefix(self.clip, self._base, self.ctx, self._eot)  # [C, D]

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # a training step: loss() needs the teacher's view of these images
            self._step_feats = image_features.detach()
        return super().logits(image_features)

    def teacher_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """[B, C] zero-shot CLIP with the hand-crafted prompt, in fp32 (the reference's ``clip_model.float()``)."""
        img = F.normalize(image_features.float(), dim=-1)
        return self.clip.logit_scale * img @ self._zs.t()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, **aux: Any) -> torch.Tensor:
        """Cross-entropy, the loss whose gradient is stepped; the KL term only sets the projection
        direction in :meth:`backward` (ProGradLoss, trainers/prograd.py L280-293)."""
        feats, self._step_feats = self._step_feats, None
        if feats is None:
            raise RuntimeError("ProGrad.loss() follows a training forward pass (it needs its image features)")
        T = self.temperature
        tea_prob = F.softmax(self.teacher_logits(feats) / T, dim=-1)
        self._step_kl = (-tea_prob * F.log_softmax(logits / T, -1) * T * T).sum(1).mean()
        return F.cross_entropy(logits, labels)

    def backward(self, loss: torch.Tensor) -> None:
        """ProGrad's update direction (trainer.py L311-349), added to ``.grad``: the KL gradient, then the
        cross-entropy gradient projected off it where they conflict, per learned tensor."""
        kl, self._step_kl = self._step_kl, None
        if kl is None or not kl.requires_grad:
            loss.backward()
            return
        params = self.trainable_parameters()
        g_kl = torch.autograd.grad(kl, params, retain_graph=True, allow_unused=True)
        g_ce = torch.autograd.grad(loss, params, allow_unused=True)
        for p, a, b in zip(params, g_ce, g_kl):
            if a is None:
                continue
            g = a if b is None else project_conflicting(a, b, self.lam)
            p.grad = g if p.grad is None else p.grad + g
