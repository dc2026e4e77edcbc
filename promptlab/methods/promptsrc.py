"""PromptSRC: Self-regulating Prompts: Foundational Model Adaptation without Forgetting (Khattak et al.,
ICCV 2023, https://arxiv.org/abs/2307.06948; muzairkhattak/PromptSRC ``trainers/promptsrc.py``).

IVLP's independent deep prompts in both towers (the same ``clip/model.py`` ResidualAttentionBlock_IVLP),
regulated by the frozen model on every step:
- mutual agreement (L_SCL): ``25 * L1(text, frozen text)`` + ``10 * L1(image, frozen image)`` on the
  normalised features, plus ``KL(prompted logits || frozen logits)`` summed and divided by B x C
  (forward_backward L297-313); the frozen text features are the normalised *mean of the raw* features of
  60 ImageNet templates (textual diversity, L116-128), the frozen image features come from a second pass
  of the same images through the unprompted image tower (L199-205);
- Gaussian prompt aggregation (GPA): after epoch e the learned tensors are added with weight
  N(e; mean, std) (normalised over the epochs), and the run ends on that sum (L320-335), through the
  engine's ``end_epoch`` hook, with the running sum kept in training checkpoints.
The reference sums its *whole* state dict, frozen CLIP included: in fp16 that rounds the frozen weights by
about an ulp; promptlab averages the learned tensors only and keeps the backbone exact. Under
``reference_fp16`` the reference computes the frozen text features with an fp32 copy of CLIP; here they
come from the run's backbone (fp16 there), upcast: exact in fp32 runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from promptlab.clip import FrozenCLIP
from promptlab.prompts import (
    PromptModule,
    encode_prompts,
    hand_crafted_features,
    independent_vl_prompts,
    insert_context,
    layer_prompts,
    prompt_buffers,
)
from promptlab.templates import resolve_templates


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """Normalised Gaussian weights of epochs 1..``epochs`` (``get_gauss`` L358-360, build_model L265-270)."""
    g = [
        math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
        for e in range(1, epochs + 1)
    ]
    return [w / sum(g) for w in g]


class PromptSRC(PromptModule):
    """Self-regulated deep vision-language prompts (image side trained: features are not cacheable).

    Args:
        n_ctx_text, n_ctx_vision, ctx_init, prompt_depth_text, prompt_depth_vision: IVLP's prompts
            (``TRAINER.PROMPTSRC.*``: 4, 4, "a photo of a", 9, 9).
        text_loss_weight: weight of L1(text, frozen text) (``TEXT_LOSS_WEIGHT`` 25).
        image_loss_weight: weight of L1(image, frozen image) (``IMAGE_LOSS_WEIGHT`` 10).
        gpa: aggregate the learned tensors over epochs with Gaussian weights (false: the last epoch's).
        gpa_mean, gpa_std: the Gaussian over epochs 1..N (``GPA_MEAN`` 15, ``GPA_STD`` 1 for 20 epochs).
        templates: the frozen text features' prompts, ``"promptsrc60"`` as the reference, or any of
            :func:`~promptlab.templates.resolve_templates`'s (raw features averaged, then normalised).
        template: the dataset's template, used only with ``templates="dataset"`` (filled by the runner).
    """

    image_side_frozen: ClassVar[bool] = False
    # PREC=fp16: the text context is fp16; the deep text and the visual prompts are created fp32 inside
    # the CLIP model and cast with .half() where used (clip/model.py), as in IVLP
    fp32_in_reference: ClassVar[tuple[str, ...]] = ("text_deep", "vis_ctx", "vis_deep")

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: Sequence[str],
        n_ctx_text: int = 4,
        n_ctx_vision: int = 4,
        ctx_init: str | None = "a photo of a",
        prompt_depth_text: int = 9,
        prompt_depth_vision: int = 9,
        text_loss_weight: float = 25.0,
        image_loss_weight: float = 10.0,
        gpa: bool = True,
        gpa_mean: float = 15.0,
        gpa_std: float = 1.0,
        templates: str | list[str] = "promptsrc60",
        template: str | None = None,
    ):
        super().__init__(clip, classnames)
        self.n_ctx_text = n_ctx_text
        self.prefix, learned = independent_vl_prompts(
            clip, n_ctx_text, n_ctx_vision, ctx_init, prompt_depth_text, prompt_depth_vision, "PromptSRC"
        )
        for name, p in learned.items():  # ctx [n_t, W], text_deep, vis_ctx [n_v, Wv], vis_deep
            setattr(self, name, p)
        self.text_loss_weight, self.image_loss_weight = float(text_loss_weight), float(image_loss_weight)
        self.gpa, self.gpa_mean, self.gpa_std = bool(gpa), float(gpa_mean), float(gpa_std)
        if self.gpa and self.gpa_std <= 0:
            raise ValueError(f"PromptSRC gpa_std={gpa_std}: the Gaussian needs a positive width")
        self.templates = resolve_templates(templates, template)
        self._gpa_sum: dict[str, torch.Tensor] = {}
        self._step: tuple[torch.Tensor, torch.Tensor] | None = None  # normalised (text, image) features
        self._step_images: torch.Tensor | None = None  # the images of a training step, for the frozen pass
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.register_class_buffers(
            {
                **prompt_buffers(self.clip, self.classnames, self.n_ctx_text, prefix=self.prefix),
                "_fixed": hand_crafted_features(
                    self.clip, self.classnames, self.templates, normalize_each=False
                ),
            }
        )

    def text_features(self) -> torch.Tensor:
        prompts = insert_context(self._base, self.ctx, self._ctx_pos)  # [C, L, W]
        return encode_prompts(self.clip, prompts, self._eot, deep_prompts=layer_prompts(self.text_deep))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self._step_images = (
            images if torch.is_grad_enabled() else None
        )  # loss() runs them through frozen CLIP
        return self.clip.encode_image(images, prompts=self.vis_ctx, deep_prompts=layer_prompts(self.vis_deep))

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        img = F.normalize(image_features.to(self.head_dtype), dim=-1)  # [B, D]
        txt = F.normalize(self.class_text_features().to(self.head_dtype), dim=-1)  # [C, D]
        self._step = (txt, img) if torch.is_grad_enabled() and txt.requires_grad else None  # for loss()
        return self.clip.logit_scale * img @ txt.t()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, **aux: Any) -> torch.Tensor:
        """CE + L_SCL: the mutual-agreement terms to the frozen model, on the same images (L297-313)."""
        step, self._step = self._step, None
        images, self._step_images = aux.get("images", self._step_images), None
        if step is None or images is None:
            raise RuntimeError("PromptSRC.loss() follows a training forward pass on images")
        txt, img = step
        dt = self.head_dtype
        zs_img = F.normalize(self.frozen_image_features(images).to(dt), dim=-1)  # [B, D]
        zs_logits = self.clip.logit_scale * zs_img @ self._fixed.to(dt).t()  # [B, C]
        l_text = F.l1_loss(txt.float(), self._fixed, reduction="mean") * self.text_loss_weight
        l_image = F.l1_loss(img, zs_img, reduction="mean") * self.image_loss_weight
        l_logits = (
            F.kl_div(
                F.log_softmax(logits, dim=1),
                F.log_softmax(zs_logits, dim=1),
                reduction="sum",
                log_target=True,
            )
            / logits.numel()
        )
        return F.cross_entropy(logits, labels) + (l_logits + l_text + l_image)

    # ------------------------------------------------------------------ Gaussian prompt aggregation
    def _learned(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("clip.")}

    def end_epoch(self, epoch: int, epochs: int) -> None:
        """Add this epoch's learned tensors with their Gaussian weight; after the last, load the sum."""
        if not self.gpa:
            return
        with torch.no_grad():  # a with block, not a decorator: mutmut skips decorated functions
            w = gpa_weights(epochs, self.gpa_mean, self.gpa_std)[epoch - 1]
            # in the tensor's own dtype, as the reference's state dict
            for name, p in self._learned().items():
                acc = self._gpa_sum.get(name)
                self._gpa_sum[name] = p.detach() * w if acc is None else acc + p.detach() * w
            if epoch == epochs:
                for name, p in self._learned().items():
                    p.copy_(self._gpa_sum[name])
                self._gpa_sum = {}

    def training_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._gpa_sum)

    def load_training_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._gpa_sum = {k: v.to(self._learned()[k].device) for k, v in state.items()}
